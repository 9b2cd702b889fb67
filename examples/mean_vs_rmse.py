"""A miniature of seed 002 on the demo world: a KL barrier aggregated by mean vs by RMSE, watched by probes.

The demo teacher (a 2-layer character-level model that writes the world's functions) is the base. It is
fine-tuned with LoRA on rows whose completions end in a loop — the correct body, then ``return x``
written again and again — so CE pushes it toward token loops at a few positions of every completion.
A ``kl_rev`` barrier to the base (the adapters switched off) is the leash, aggregated over positions by
``mean`` or by ``rmse``, with the same hinge τ. Probe rounds generate greedy completions of 8 holdout
prompts every 8 steps; their coherence (``kdkit.evaluate.coherence``) is the outcome, with the anchor pass count
of the gate against the base.

A control ladder trains the same rows with the barrier's weight at 0. One command (about 10 minutes on
2 CPU cores):

    python examples/mean_vs_rmse.py --out /tmp/mean-vs-rmse [--seeds 3] [--tau 0.5]

It writes the configs and data, runs ``kdkit ladder`` over ``objective.barrier.aggregate=mean,rmse`` and
the seeds (``ladder.md``, ``ladder_seeds.md``, ``report.html`` with every rung's coherence trajectory on
one log-incoherence plot), then prints a table per aggregate: the last probe round's coherence per seed,
its mean and range, the lowest round, and the pooled anchor pass count with its Wilson interval.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

LOOP = "    return x\n" * 6


def build(out: Path, tau: float, weight: float, steps_every: int) -> Path:
    from kdkit.demo.run import TEACHER_DIR
    from kdkit.demo.world import make_world

    w = make_world(0, n_anchors=30, n_holdout=40)
    out.mkdir(parents=True, exist_ok=True)

    def jsonl(name: str, rows: list[dict]) -> Path:
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return out / name

    jsonl("loops.jsonl", [{"prompt": t["prompt"], "completion": t["canonical_solution"] + LOOP}
                          for t in w.train[:160]])
    jsonl("probes.jsonl", [{"prompt": t["prompt"], "id": t["task_id"]} for t in w.holdout[:8]])
    jsonl("anchors.jsonl", w.anchors)
    cfg = {
        "student": {"path": str(TEACHER_DIR), "lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                                                       "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
        "data": {"train": "loops.jsonl", "max_length": 384},
        "reference": {"kind": "base"},
        "objective": {"ce_coef": 1.0, "barrier": {"kind": "kl_rev", "aggregate": "mean", "tau": tau,
                                                  "weight": weight}},
        "optim": {"lr": 3e-3, "micro_batch": 8, "epochs": 2, "schedule": "constant"},
        "checkpoint": {"every": 0},
        "logging": {"every": 4},
        "probes": {"prompts": "probes.jsonl", "every": steps_every, "max_new_tokens": 96},
    }
    (out / "barrier.yaml").write_text(yaml.safe_dump(cfg))
    return out / "barrier.yaml"


def summary(ladder: Path, label: str | None = None) -> str:
    from kdkit.evaluate.passrate import wilson_interval

    rungs = [json.loads(p.read_text()) for p in sorted((ladder / "rungs").glob("*.json"))]
    lines = ["| aggregate | last-round coherence per seed | mean [min–max] | lowest round (mean) | "
             "anchors passed (pooled) [95% Wilson] |", "|---|---|---|---|---|"]
    def agg_of(r: dict) -> str:
        return r["values"].get("objective.barrier.aggregate", "—")

    for agg in dict.fromkeys(agg_of(r) for r in rungs):
        rs = [r for r in rungs if agg_of(r) == agg and r["status"] == "done"]
        last = [r["coherence"] for r in rs]
        k, n = sum(r["passed"] for r in rs), sum(r["n_tasks"] for r in rs)
        lo, hi = wilson_interval(k, n)
        lines.append(f"| {label or agg} | {', '.join(f'{c:.3f}' for c in last)} | {sum(last) / len(last):.3f} "
                     f"[{min(last):.3f}–{max(last):.3f}] | {sum(r['coherence_min'] for r in rs) / len(rs):.3f} | "
                     f"{k}/{n} [{100 * lo:.0f}–{100 * hi:.0f}%] |")
    return "\n".join(lines)


def main() -> None:
    from kdkit.decide.ladder import run_ladder
    from kdkit.decide.registry import Registry
    from kdkit.demo.run import TEACHER_DIR
    from kdkit.evaluate.passrate import GenerationSettings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tau", type=float, default=0.5, help="the barrier's hinge τ, the same for both aggregates")
    ap.add_argument("--weight", type=float, default=1.0, help="the barrier's weight λ_b")
    a = ap.parse_args()
    cfg = build(a.out, a.tau, a.weight, steps_every=8)
    reg = Registry(a.out / ".kdkit", create=True)
    if reg.production() is None:
        reg.promote(reg.register(TEACHER_DIR, name="base").id, reason="the base the barrier leashes to")
    seeds = "optim.seed=" + ",".join(str(s) for s in range(a.seeds))
    gen = GenerationSettings(max_new_tokens=96)
    # the control: the same fine-tuning with the barrier's weight at 0 (no leash)
    run_ladder(cfg, ["objective.barrier.weight=0.0", seeds], a.out / "anchors.jsonl", a.out / "control",
               registry=reg, settings=gen, progress=False, log=print)
    run_ladder(cfg, ["objective.barrier.aggregate=mean,rmse", seeds], a.out / "anchors.jsonl", a.out / "ladder",
               registry=reg, settings=gen, progress=False, log=print)
    print(summary(a.out / "control", "no barrier (λ_b = 0)"))
    print(summary(a.out / "ladder"))
    print(f"figure: {figure(a.out)}")


def figure(out: Path) -> Path:
    """Every run's probe log-incoherence on one plot, as ``coherence.png``."""
    import base64

    from kdkit.decide.report import coherence_trajectory

    runs, colors = {}, {}
    palette = {"no barrier": "tab:gray", "mean": "tab:red", "rmse": "tab:blue"}
    for ladder in ("control", "ladder"):
        for rec in sorted((out / ladder / "rungs").glob("*.json")):
            r = json.loads(rec.read_text())
            name = r["values"].get("objective.barrier.aggregate", "no barrier") if ladder == "ladder" else "no barrier"
            runs[f"{name}, seed {r['values']['optim.seed']}"] = Path(r["run_dir"])
            colors[f"{name}, seed {r['values']['optim.seed']}"] = palette[name]
    uri = coherence_trajectory(runs, colors)
    (out / "coherence.png").write_bytes(base64.b64decode(uri.split(",", 1)[1]))
    return out / "coherence.png"


if __name__ == "__main__":
    main()
