"""The real-model tables of docs/real-models.md, from the examples' own summaries (docs/real_models.json).

    python examples/smollm2_kd_vs_ce.py --out kd-vs-ce                   # the full run (~60 min, 2 cores)
    python scripts/docs_real.py --kd-vs-ce kd-vs-ce/summary.json        # keep it and rewrite the page's table
    python scripts/docs_real.py --reduced kd-vs-ce-small/summary.json   # the reduced run the slow test repeats
    python examples/smollm2_kl_leash.py --out kl-leash                   # the KL-leash example's full run (~85 min)
    python scripts/docs_real.py --kl-leash kl-leash/summary.json        # keep it and rewrite the page's table
    python examples/smollm2_kl_leash.py --out kl-leash-p09 --target-prob 0.9 --barrier-only   # a looser τ
    python scripts/docs_real.py --kl-leash-p09 kl-leash-p09/summary.json
    python scripts/docs_real.py --leash-reduced kl-leash-small/summary.json   # its reduced run, likewise
    python examples/smollm2_anchor_ladder.py --out anchor-ladder          # seed 000's levers (resumable)
    python scripts/docs_real.py --anchor-ladder anchor-ladder/summary.json
    python scripts/docs_real.py --anchor-reduced anchor-small/summary.json   # its reduced run
    python examples/smollm2_barrier_rounds.py --out barrier-rounds      # seed 002's rounds (resumable)
    python scripts/docs_real.py --barrier-rounds barrier-rounds/summary.json
    python scripts/docs_real.py --rounds-reduced rounds-small/summary.json   # its reduced run
    python examples/smollm2_draft.py --out draft                         # students as draft models (resumable)
    python scripts/docs_real.py --draft draft/summary.json
    python scripts/docs_real.py                                         # the page from docs/real_models.json

tests/test_real_examples.py checks that the page shows what docs/real_models.json holds, and (slow) that the
reduced run still gives the recorded figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "real_models.json"
PAGE = ROOT / "docs" / "real-models.md"
REDUCED = ["--train-rows", "24", "--val-rows", "8", "--tasks-n", "3", "--steps", "4", "--seeds", "2",
           "--max-new-tokens", "64"]
"""The reduced size of examples/smollm2_kd_vs_ce.py the slow test reruns."""
LEASH_REDUCED = ["--anchors", "4", "--heldout", "6", "--train-rows", "80", "--steps", "10", "--seeds", "2",
                 "--max-new-tokens", "96"]
"""The reduced size of examples/smollm2_kl_leash.py the slow test reruns."""
ANCHOR_REDUCED = ["--seeds", "1", "--shares", "0.5", "--lambdas", "0.1", "--no-barrier", "--new-rows", "24",
                  "--heldout", "4", "--anchor-tasks", "6", "--pool", "24", "--steps", "4", "--max-new-tokens", "64"]
"""The reduced size of examples/smollm2_anchor_ladder.py the slow test reruns."""
ROUNDS_REDUCED = ["--rounds", "2", "--seeds", "1", "--round-steps", "2", "--train-rows", "24", "--heldout", "4",
                  "--anchors", "4", "--max-new-tokens", "64"]
"""The reduced size of examples/smollm2_barrier_rounds.py the slow test reruns."""
sys.path.insert(0, str(ROOT / "examples"))

from smollm2_anchor_ladder import anchor_table, arms_table  # noqa: E402
from smollm2_barrier_rounds import rounds_table  # noqa: E402
from smollm2_draft import draft_table  # noqa: E402
from smollm2_kd_vs_ce import summary_table  # noqa: E402
from smollm2_kl_leash import leash_table  # noqa: E402

TABLES = {"kd_vs_ce": summary_table, "kl_leash": leash_table, "kl_leash_p09": leash_table,
          "anchor_ladder": anchor_table, "barrier_rounds": rounds_table, "draft": draft_table}
"""docs/real_models.json's full runs and the function that writes each one's table."""
README = ROOT / "README.md"
README_TABLES = {"anchor_ladder": ("anchor_ladder_arms", arms_table), "draft": ("draft", draft_table)}
"""The full runs README shows a table of (between its own markers), and the function that writes it."""


def figures(summary: dict) -> dict:
    """What a rerun must reproduce: per arm and seed the validation figures and pass counts; the student
    before training and the teacher (not the seconds)."""
    arms = {name: {"seeds": a["seeds"], **{k: [round(x, 4) for x in a[k]["values"]] for k in
                                           ("val_loss", "val_kl", "val_top1")}, "pass": a["pass"]["per_seed"]}
            for name, a in summary["arms"].items()}
    return {"arms": arms, **{m: {k: round(v, 4) for k, v in summary[m].items()} for m in ("student_before", "teacher")}}


def leash_figures(summary: dict) -> dict:
    """What a rerun of the KL-leash example must reproduce: per arm the τ, and per seed the HumanEval and
    skeleton tasks passed, the gate's decision, the training CE and the divergence to the base."""
    return {name: {"tau": None if a["tau"] is None else round(a["tau"], 4), "seeds": a["seeds"],
                   "anchor_passed": a["anchor_passed"], "new_task_passed": a["new_task_passed"],
                   "decisions": a["decisions"], "base": [a["base_anchor_passed"], a["base_new_task_passed"]],
                   "avg_ce": [round(x, 4) for x in a["avg_ce"]],
                   "kl_to_base": {how: [round(x, 4) for x in v] for how, v in a["kl_to_base"].items()}}
            for name, a in summary["arms"].items()}


def anchor_figures(summary: dict) -> dict:
    """What a rerun of the anchor-ladder example must reproduce: per run the pass counts, the gate's decision,
    the training CE and KD, and the drift from the base."""
    def rounded(d: dict | None) -> dict | None:
        return None if d is None else {w: {k: round(v, 4) if isinstance(v, float) else v for k, v in f.items()}
                                       for w, f in d.items() if f}

    return {f"{r['arm']}, seed {r['seed']}": {
        "passed": r["passed"], "baseline_passed": r["baseline_passed"], "skeletons": r["skeletons"],
        "decision": r["decision"], "avg_ce": round(r["avg_ce"], 4),
        "avg_kl": None if r["avg_kl"] is None else round(r["avg_kl"], 4), "drift": rounded(r.get("drift"))}
        for r in summary["runs"]}


def rounds_figures(summary: dict) -> dict:
    """What a rerun of the barrier-rounds example must reproduce: the base's passes, and per aggregate, seed and
    round the τ, the steps above it, the coherence, the divergences to the base, the passes, the floor's stop."""
    def rounded(x: dict) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else [round(e, 4) for e in v] if k == "start_coherence"
                else v for k, v in x.items() if k not in ("aggregate", "seed", "round")}

    return {"base": summary["base"],
            **{f"{x['aggregate']}, seed {x['seed']}, round {x['round']}": rounded(x) for x in summary["rounds"]}}


def markers(key: str) -> tuple[str, str]:
    """The page's markers around a full run's table: <!-- kd-vs-ce:start --> … <!-- kd-vs-ce:end -->."""
    name = key.replace("_", "-")
    return f"<!-- {name}:start -->\n", f"<!-- {name}:end -->"


def shown(text: str, key: str) -> str:
    """What the page shows for a full run."""
    start, end = markers(key)
    return text.split(start, 1)[1].split(end, 1)[0]


def replace_table(text: str, key: str, table: str) -> str:
    start, end = markers(key)
    head, rest = text.split(start, 1)
    return head + start + table + end + rest.split(end, 1)[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kd-vs-ce", type=Path, help="the full run's summary.json")
    ap.add_argument("--reduced", type=Path, help="the reduced run's summary.json")
    ap.add_argument("--kl-leash", type=Path, help="the KL-leash example's full run's summary.json")
    ap.add_argument("--kl-leash-p09", type=Path, help="its barrier arms' run at --target-prob 0.9 (summary.json)")
    ap.add_argument("--leash-reduced", type=Path, help="the KL-leash example's reduced run's summary.json")
    ap.add_argument("--anchor-ladder", type=Path, help="the anchor-ladder example's run's summary.json")
    ap.add_argument("--anchor-reduced", type=Path, help="the anchor-ladder example's reduced run's summary.json")
    ap.add_argument("--barrier-rounds", type=Path, help="the barrier-rounds example's run's summary.json")
    ap.add_argument("--rounds-reduced", type=Path, help="the barrier-rounds example's reduced run's summary.json")
    ap.add_argument("--draft", type=Path, help="the draft-model example's run's summary.json")
    a = ap.parse_args()
    data = json.loads(FIGURES.read_text()) if FIGURES.is_file() else {}
    if a.kd_vs_ce:
        data["kd_vs_ce"] = json.loads(a.kd_vs_ce.read_text())
    if a.reduced:
        data["kd_vs_ce_reduced"] = {"args": REDUCED, "figures": figures(json.loads(a.reduced.read_text()))}
    for key in ("kl_leash", "kl_leash_p09"):
        if getattr(a, key):
            data[key] = json.loads(getattr(a, key).read_text())
    if a.leash_reduced:
        data["kl_leash_reduced"] = {"args": LEASH_REDUCED, "figures": leash_figures(json.loads(a.leash_reduced.read_text()))}
    for key in ("anchor_ladder", "barrier_rounds", "draft"):
        if getattr(a, key):
            data[key] = json.loads(getattr(a, key).read_text())
    if a.anchor_reduced:
        data["anchor_ladder_reduced"] = {"args": ANCHOR_REDUCED,
                                         "figures": anchor_figures(json.loads(a.anchor_reduced.read_text()))}
    if a.rounds_reduced:
        data["barrier_rounds_reduced"] = {"args": ROUNDS_REDUCED,
                                          "figures": rounds_figures(json.loads(a.rounds_reduced.read_text()))}
    FIGURES.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    text = PAGE.read_text()
    for key, table in TABLES.items():
        if key in data:
            text = replace_table(text, key, table(data[key]))
    PAGE.write_text(text)
    readme = README.read_text()
    for key, (marker, table) in README_TABLES.items():
        if key in data:
            readme = replace_table(readme, marker, table(data[key]))
    README.write_text(readme)
    print(f"{PAGE.relative_to(ROOT)}, README.md: the real-model tables from {FIGURES.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
