"""Where an on-policy kdkit step spends its time: the student's rollouts, the teacher's scoring, the student's
forward, the loss, the backward, the optimizer, and what is left (kdkit's own work around them).

    python benchmarks/time_to_quality.py --out ttq ...          # its inputs: teacher, student, rows
    python benchmarks/onpolicy_profile.py --inputs ttq/data/inputs.json [--steps 6] [--loss kd|sampled_kl_rev]

The run is `benchmarks/time_to_quality.py`'s kdkit on-policy arm (every step on-policy, --new-tokens tokens
per answer, 8 rows a step as 4 × 2) for --steps steps in this process. Each phase is timed by wrapping the
function that does it, without changing kdkit: ``onpolicy.rollouts`` (the student's ``generate``),
``Sources.ask`` (the teacher's forward on the student's tokens), ``step.student_forward``,
``Accelerator.backward`` and the optimizer's ``step`` (torch's global pre/post hooks); the loss is
``forward_loss`` less the teacher and the student's forward; "kdkit" is the step's wall time less all of
these. The first step (warm-up) is left out; the table is the mean over the others.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine  # noqa: E402

PHASES = ("rollouts", "teacher", "student forward", "loss", "backward", "optimizer", "kdkit")


class Phases:
    """Seconds per phase per optimizer step, from wrapped functions."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = [defaultdict(float)]

    def wrap(self, owner: object, name: str, phase: str) -> None:
        fn = getattr(owner, name)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.steps[-1][phase] += time.perf_counter() - t0

        setattr(owner, name, timed)

    def optimizer_hooks(self) -> list:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        def pre(*_):
            self.t_opt = time.perf_counter()

        def post(*_):
            self.steps[-1]["optimizer"] += time.perf_counter() - self.t_opt
            self.steps.append(defaultdict(float))

        return [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]


def run(inputs: dict, args: argparse.Namespace) -> list[dict[str, float]]:
    """--steps on-policy steps with every phase timed; the per-step seconds, the step's wall time as "step"."""
    import accelerate
    import time_to_quality as ttq
    import yaml

    from kdkit.config.load import load_train_config
    from kdkit.teacher.signals import Sources
    from kdkit.train import onpolicy, train
    from kdkit.train import step as kstep

    ph = Phases()
    ph.wrap(onpolicy, "rollouts", "rollouts")
    ph.wrap(Sources, "ask", "teacher")
    ph.wrap(kstep, "student_forward", "student forward")
    ph.wrap(kstep, "forward_loss", "forward_loss")
    ph.wrap(accelerate.Accelerator, "backward", "backward")
    hooks = ph.optimizer_hooks()
    arm = "kdkit_onpolicy_sampled" if args.loss == "sampled_kl_rev" else "kdkit_onpolicy_full"
    ns = argparse.Namespace(lr=3e-4, new_tokens=args.new_tokens, seed=0)
    cfg = ttq.kdkit_config(arm, inputs, ns, None)
    cfg["optim"]["max_steps"] = args.steps
    cfg["logging"]["every"] = 1  # every step's wall time in metrics.jsonl
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        train(load_train_config(path), Path(tmp) / "run", progress=False, log=lambda m: None)
        wall = [json.loads(x)["step_time_s"] for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    for h in hooks:
        h.remove()
    out = []
    for s, w in zip(ph.steps[:len(wall)], wall, strict=True):
        row = {k: s.get(k, 0.0) for k in PHASES if k not in ("loss", "kdkit")}
        row["loss"] = s["forward_loss"] - s["teacher"] - s["student forward"]
        row["kdkit"] = w - sum(row.values())
        out.append({**row, "step": w})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=Path, required=True, help="time_to_quality's data/inputs.json")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--loss", choices=("kd", "sampled_kl_rev"), default="kd")
    args = ap.parse_args()
    rows = run(json.loads(args.inputs.read_text()), args)[1:]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in (*PHASES, "step")}
    print(json.dumps({"loss": args.loss, "steps": len(rows), "mean_s": mean, **machine()}))
    print("\n| phase | s per step | share |\n|---|---|---|")
    for k in PHASES:
        print(f"| {k} | {mean[k]:.3f} | {mean[k] / mean['step']:.0%} |")
    print(f"| step (wall) | {mean['step']:.3f} | 100% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
