"""Packing (data.packing): step time with the rows packed end to end against padded micro-batches.

    python benchmarks/packing.py --teacher /tmp/kdkit-real/smollm2/teacher \
        --data /tmp/kdkit-real/smollm2/rows_messages.jsonl [--steps 10 --rounds 2 --pack-lengths 512 1024]

Offline KD from the teacher's top-64 cache into a LoRA on the teacher itself (r 8, q/k/v/o), the same rows,
batches and steps; only data.packing (and its pack_length) differs. The arms alternate (interleaved rounds);
reports each arm's median seconds per step (the first step dropped), the forward's token slots per step and
the share of them that is padding, and how far each packed arm's total_loss is from the padded one's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine  # noqa: E402


def _counting(slots: dict[str, int]) -> None:
    """Count the forward's slots: the batch's, and the packed sequences' when the run packs."""
    from kdkit.data import rows as kdata
    from kdkit.train import step

    forward, pack = step.student_forward, kdata.pack

    def student_forward(r, model, batch, *a, **kw):
        slots["real"] += int(batch.attention_mask.sum())
        slots["padded"] += batch.input_ids.numel()
        return forward(r, model, batch, *a, **kw)

    def packed(batch, *a, **kw):
        pk = pack(batch, *a, **kw)
        slots["packed"] += pk.input_ids.numel()
        return pk

    step.student_forward, kdata.pack = student_forward, packed


def _config(args: argparse.Namespace, cache: Path, pack_length: int | None) -> dict:
    data = {"train": args.data, "max_length": args.max_length}
    if pack_length:
        data.update(packing=True, pack_length=pack_length)
    return {"student": {"path": args.teacher,
                        "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
            "teacher": {"cache": str(cache)}, "data": data, "objective": {"kd_weight": 1.0},
            "optim": {"lr": 1e-4, "micro_batch": args.micro_batch, "max_steps": args.steps, "epochs": 100},
            "checkpoint": {"every": 0}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--pack-lengths", type=int, nargs="+", default=[512, 1024],
                    help="data.pack_length of each packed arm (1024: a micro-batch of 4 chat rows in one sequence)")
    args = ap.parse_args()

    from kdkit.config.load import load_train_config
    from kdkit.teacher.cache.precompute import PrecomputeSettings, precompute
    from kdkit.train import train

    slots = {"real": 0, "padded": 0, "packed": 0}
    _counting(slots)
    arms: list[int | None] = [None, *args.pack_lengths]
    times: dict[int | None, list[float]] = {a: [] for a in arms}
    losses: dict[int | None, list[float]] = {}
    per_step: dict[int | None, dict[str, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        precompute(args.teacher, args.data, tmp / "cache", PrecomputeSettings(top_k=64, max_length=args.max_length,
                   batch_size=4), progress=False, log=lambda m: None)
        for i, arm in enumerate(arms * args.rounds):  # interleaved: drift hits every arm alike
            (tmp / f"c{i}.yaml").write_text(yaml.safe_dump(_config(args, tmp / "cache", arm)))
            before = dict(slots)
            train(load_train_config(tmp / f"c{i}.yaml"), tmp / f"run{i}", progress=False, log=lambda m: None)
            rows = [json.loads(x) for x in (tmp / f"run{i}" / "metrics.jsonl").read_text().splitlines()]
            times[arm].append(statistics.median(r["step_time_s"] for r in rows[1:]))
            losses[arm] = [r["total_loss"] for r in rows]
            per_step[arm] = {k: (slots[k] - before[k]) // args.steps for k in slots}
    res = {"benchmark": "packing", "steps": args.steps, "micro_batch": args.micro_batch, "arms": [], **machine()}
    base = statistics.median(times[None])
    for arm in arms:
        s = statistics.median(times[arm])
        used = per_step[arm]["packed" if arm else "padded"]
        res["arms"].append({"pack_length": arm, "s_per_step": round(s, 3), "speedup": round(base / s, 3),
                            "forward_slots_per_step": used, "real_tokens_per_step": per_step[arm]["real"],
                            "padding": round(1 - per_step[arm]["real"] / used, 3),
                            "total_loss_max_rel_diff": max(abs(a - b) / abs(a) for a, b in
                                                           zip(losses[None], losses[arm], strict=True)),
                            "rounds": [round(x, 3) for x in times[arm]]})
    print(json.dumps(res))
    print("\n| arm | s/step | speed-up | forward slots/step | padding | total_loss vs padded (max rel.) |")
    print("|---|---|---|---|---|---|")
    for a in res["arms"]:
        name = f"packed, pack_length {a['pack_length']}" if a["pack_length"] else "padded"
        print(f"| {name} | {a['s_per_step']} | {a['speedup']} | {a['forward_slots_per_step']} | {a['padding']:.1%} | "
              f"{a['total_loss_max_rel_diff']:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
