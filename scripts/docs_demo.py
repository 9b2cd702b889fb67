"""The demo page's table (docs/commands/demo.md), from the demo itself:
run `kdkit demo --seed N` for each seed under each of torch's CPU
kernel sets (ATEN_CPU_CAPABILITY), keep the figures and the environment in docs/demo_seeds.json and write the
table and what holds across its runs into docs/commands/demo.md between the demo-seeds markers.

    python scripts/docs_demo.py [--seeds 0 1 2] [--capabilities default avx2 avx512]   # about 100 s a run
    python scripts/docs_demo.py --from-json                 # the page from docs/demo_seeds.json, no run

tests/test_docs_demo.py checks that the page shows what docs/demo_seeds.json holds, and (slow) that the
demo of seed 0 prints those figures where its environment is the recorded one, and the claims that hold
on every CPU elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "demo_seeds.json"
PAGE = ROOT / "docs" / "commands" / "demo.md"
START, END = "<!-- demo-seeds:start -->\n", "<!-- demo-seeds:end -->"
MODELS = ("teacher", "distilled", "baseline")


def figures(demo_json: dict) -> dict:
    """One seed's row: what the demo's table prints (pass counts, losses, the gate), not its seconds."""
    m = {x["model"]: x for x in demo_json["models"]}
    return {"anchors": {k: f"{m[k]['anchor_passed']}/{m[k]['anchor_total']}" for k in MODELS},
            "holdout": {k: f"{m[k]['holdout_passed']}/{m[k]['holdout_total']}" for k in MODELS},
            "val_loss": {k: round(m[k]["val_loss"], 4) for k in ("distilled", "baseline")},
            "gate": demo_json["gate"]["decision"]}


def _passed(cell: str) -> int:
    return int(cell.split("/")[0])


def claims(rows: dict[str, dict]) -> dict[str, int]:
    """What the page says of the runs: in how many the distilled student is ahead (holdout, validation loss), and
    how many gates kept it."""
    return {"runs": len(rows),
            "holdout_ahead": sum(_passed(r["holdout"]["distilled"]) > _passed(r["holdout"]["baseline"])
                                 for r in rows.values()),
            "val_loss_lower": sum(r["val_loss"]["distilled"] < r["val_loss"]["baseline"] for r in rows.values()),
            "kept": sum(r["gate"] == "KEEP" for r in rows.values())}


def table(rows: dict[str, dict]) -> str:
    """One row per run, keyed ``SEED/CAPABILITY``."""
    head = ("| seed | CPU kernels | anchors: teacher | distilled | baseline | holdout: teacher | distilled | baseline | "
            "val loss: distilled | baseline | gate |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {' | '.join(key.split('/'))} | {' | '.join(r['anchors'][k] for k in MODELS)} | "
                   f"{' | '.join(r['holdout'][k] for k in MODELS)} | {r['val_loss']['distilled']:.4f} | "
                   f"{r['val_loss']['baseline']:.4f} | {r['gate']} |\n" for key, r in rows.items())
    n = len(rows)

    def mean(get) -> float:
        return sum(get(r) for r in rows.values()) / n

    held = {k: mean(lambda r, k=k: _passed(r["holdout"][k])) for k in ("distilled", "baseline")}
    val = {k: mean(lambda r, k=k: r["val_loss"][k]) for k in ("distilled", "baseline")}
    c = claims(rows)
    return (body and head + body) + (
        f"\nOver the {n} runs: the distilled student passes more holdout tasks in {c['holdout_ahead']} of {n} "
        f"({held['distilled']:.1f} against {held['baseline']:.1f} on average) and has the lower validation loss in "
        f"{c['val_loss_lower']} of {n} ({val['distilled']:.4f} against {val['baseline']:.4f}); the gate kept it "
        f"in {c['kept']} of {n}.\n")


def write_readme(rows: dict[str, dict]) -> None:
    text = PAGE.read_text()
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    PAGE.write_text(before + START + table(rows) + END + after)


def run(seeds: list[int], capabilities: list[str]) -> dict[str, dict]:
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for s in seeds:
            for cap in capabilities:
                out = Path(tmp) / f"seed-{s}-{cap}"
                subprocess.run([sys.executable, "-m", "kdkit", "demo", "--seed", str(s), "--out", str(out),
                                "--no-progress"], check=True, cwd=ROOT, env={**os.environ, "ATEN_CPU_CAPABILITY": cap})
                rows[f"{s}/{cap}"] = figures(json.loads((out / "demo.json").read_text()))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--capabilities", nargs="+", default=["default", "avx2", "avx512"],
                    help="ATEN_CPU_CAPABILITY values to run each seed under (those this CPU has)")
    ap.add_argument("--from-json", action="store_true", help="rewrite the demo page from docs/demo_seeds.json only")
    args = ap.parse_args()
    if args.from_json:
        rows = json.loads(FIGURES.read_text())["seeds"]
    else:
        rows = run(args.seeds, args.capabilities)
        from kdkit.util.environment import compute_environment

        env = {k: v for k, v in compute_environment().items() if k != "cpu_capability"}
        FIGURES.write_text(json.dumps({"command": "python scripts/docs_demo.py --seeds "
                                       + " ".join(map(str, args.seeds)) + " --capabilities "
                                       + " ".join(args.capabilities), "environment": env,
                                       "seeds": rows}, indent=1, sort_keys=True) + "\n")
    write_readme(rows)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
