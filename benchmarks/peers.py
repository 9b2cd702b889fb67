"""kdkit train (online and offline KD) side by side with TRL's GKD trainer, same teacher/student/data.

    pip install -e '.[bench]'        # TRL (GKDTrainer lives in trl.experimental.gkd in TRL 1.x)
    python benchmarks/peers.py [--rows 256] [--steps 24] [--batch 16]

Off-policy, TRL runs with lmbda = 0 (no student generation) and beta = 0 (forward KL), the closest
equivalent of kdkit's kl_fwd + CE. On-policy (``trl_gkd_onpolicy`` vs ``kdkit_onpolicy``), both run
every step on-policy (TRL lmbda = 1, kdkit objective.on_policy.fraction = 1) with the generalised JSD at
beta = 0.5, sampling at temperature 1 with at most --new-tokens tokens per completion. Data: the tiny
world's rows as chat messages (the char tokenizer has a chat template). Each trainer runs in a fresh
subprocess; reported: median seconds per optimizer step (first two dropped) and the growth of max RSS
during training.

``kdkit_onpolicy_vllm`` is ``kdkit_onpolicy`` with the rollouts written by a vLLM server of the student
(``objective.on_policy.rollout_url``, the full weights reloaded in place before every step);
``kdkit_onpolicy_served`` also serves the teacher (``teacher.url``, top-64 + tail). Both need ``make
vllm-env`` and ``--real`` (vLLM's CPU attention needs a head size of 32 or more); the servers start before
the timed steps and share the machine's cores with the trainer.

``--real DIR`` runs the issue's real size instead: DIR is what ``examples/smollm2_chat_rows.py --out DIR``
wrote (``DIR/teacher`` = SmolLM2-135M-Instruct, ``DIR/rows_messages.jsonl`` = 48 HumanEval tasks as
chat rows); the student is a fresh seeded 2-layer width-128 Llama with SmolLM2's tokenizer; use it with
``--batch 4 --steps 12``. The report adds samples/s (batch / median s per step).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine  # noqa: E402

METHODS = ("trl_gkd", "kdkit_online", "kdkit_offline", "trl_gkd_onpolicy", "kdkit_onpolicy", "kdkit_onpolicy_vllm",
           "kdkit_onpolicy_served")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rows(n: int) -> list[dict]:
    from kdkit.demo.world import make_world

    return [{"messages": [{"role": "user", "content": t["prompt"]},
                          {"role": "assistant", "content": t["canonical_solution"]}]}
            for t in make_world(0).train[:n]]


def _real_student(path: Path, teacher: Path) -> Path:
    """A fresh seeded 2-layer width-128 Llama with the teacher's tokenizer (vocabulary 49,152)."""
    import torch
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    from kdkit.models.load import load_tokenizer

    t = AutoConfig.from_pretrained(str(teacher))
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=t.vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id))
    model.save_pretrained(str(path), safe_serialization=True)
    load_tokenizer(teacher).save_pretrained(str(path))
    return path


def run_trl(tmp: Path, student: Path, teacher: Path, rows: list[dict], steps: int, batch: int,
            new_tokens: int | None) -> list[float]:
    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from kdkit.models.load import load_tokenizer

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    tok = load_tokenizer(student)
    mode = {"lmbda": 1.0, "beta": 0.5, "max_new_tokens": new_tokens} if new_tokens else {"lmbda": 0.0, "beta": 0.0}
    cfg = GKDConfig(output_dir=str(tmp / "trl"), **mode, temperature=1.0, max_steps=steps,
                    per_device_train_batch_size=batch, learning_rate=1e-3, report_to=[], logging_steps=50,
                    save_strategy="no", use_cpu=True, max_length=256, disable_dropout=True, seed=0)
    trainer = GKDTrainer(model=AutoModelForCausalLM.from_pretrained(str(student)),
                         teacher_model=AutoModelForCausalLM.from_pretrained(str(teacher)), args=cfg,
                         train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[Timer()])
    trainer.train()
    return times


def run_kdkit(tmp: Path, student: Path, teacher_dir: Path, rows: list[dict], steps: int, batch: int, offline: bool,
              new_tokens: int | None, rollout_url: str | None = None, teacher_url: str | None = None) -> list[float]:
    from kdkit.config.load import load_train_config
    from kdkit.train import train

    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    teacher = {"model": str(teacher_dir)}
    if offline:
        # in its own process: the training run's peak RSS is its own, not the capture's
        subprocess.run([sys.executable, "-m", "kdkit", "precompute", "--teacher", str(teacher_dir), "--data",
                        str(data), "--out", str(tmp / "cache"), "--top-k", "64", "--max-length", "256",
                        "--no-progress"], check=True, capture_output=True)
        teacher = {"cache": str(tmp / "cache")}
    if teacher_url:
        teacher = {"url": teacher_url, "top_k": 64}
    cfg = {"student": {"path": str(student)}, "teacher": teacher, "data": {"train": str(data), "max_length": 256},
           "objective": {"kd_weight": 1.0, **({"kd": {"kind": "jsd", "beta": 0.5}, "on_policy": {
               "fraction": 1.0, "max_new_tokens": new_tokens, "temperature": 1.0,
               **({"rollout_url": rollout_url} if rollout_url else {})}} if new_tokens else {})},
           "checkpoint": {"every": 0},
           "optim": {"lr": 1e-3, "micro_batch": batch, "max_steps": steps, "epochs": 100, "schedule": "constant"}}
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    train(load_train_config(tmp / "cfg.yaml"), tmp / "run", progress=False, log=lambda m: None)
    return [json.loads(x)["step_time_s"] for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]


def _servers(method: str, tmp: Path, student: Path, teacher: Path) -> dict:
    """The vLLM servers a method needs, started: the student's (dev mode: weights reloaded in place), the
    teacher's."""
    if method not in ("kdkit_onpolicy_vllm", "kdkit_onpolicy_served"):
        return {}
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.vllm_server import DEV, VllmServer, stop_on_sigterm

    stop_on_sigterm()  # a kill stops these servers, not only a normal exit
    started = [VllmServer(student, tmp / "student-vllm.log", extra=DEV[0], env=DEV[1]).start()]
    out = {"student": started[0].url}
    if method == "kdkit_onpolicy_served":
        started.append(VllmServer(teacher, tmp / "teacher-vllm.log").start())
        out["teacher"] = started[1].url
    return {**out, "_all": started}


def one(method: str, rows_n: int, steps: int, batch: int, new_tokens: int, real: str | None) -> dict:
    from kdkit.demo.assets_build import STUDENT_SHAPE, fresh_model_dir
    from kdkit.demo.run import TEACHER_DIR

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if real:
            teacher = Path(real) / "teacher"
            student = _real_student(tmp / "student", teacher)
            lines = (Path(real) / "rows_messages.jsonl").read_text().splitlines()[:rows_n]
            rows = [json.loads(x) for x in lines]
        else:
            teacher, student, rows = TEACHER_DIR, fresh_model_dir(tmp / "student", STUDENT_SHAPE, seed=1), _rows(rows_n)
        servers = _servers(method, tmp, student, teacher)
        base = _rss_mb()
        on = new_tokens if "_onpolicy" in method else None
        try:
            if method.startswith("trl_gkd"):
                times = run_trl(tmp, student, teacher, rows, steps, batch, on)
            else:
                times = run_kdkit(tmp, student, teacher, rows, steps, batch, offline=method == "kdkit_offline",
                                  new_tokens=on, rollout_url=servers.get("student"), teacher_url=servers.get("teacher"))
        finally:
            for server in servers.pop("_all", []):
                server.stop()
        peak = _rss_mb() - base
    s_step = statistics.median(times[2:])
    return {"method": method, "s_per_step": round(s_step, 4), "samples_per_s": round(batch / s_step, 3),
            "steps": len(times), "peak_rss_growth_mb": round(peak, 1), "batch": batch, "rows": len(rows)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64, help="on-policy: the most tokens per completion")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--rounds", type=int, default=1, help="run the methods this many times, interleaved; "
                    "report each one's median round")
    ap.add_argument("--real", metavar="DIR", help="real size: DIR as written by examples/smollm2_chat_rows.py")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.rows, args.steps, args.batch, args.new_tokens, args.real)))
        return 0
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    for _ in range(args.rounds):  # interleaved: a drift in the machine's speed hits every method alike
        for m in args.methods:
            out = subprocess.run([sys.executable, __file__, "--one", m, "--rows", str(args.rows), "--steps",
                                  str(args.steps), "--batch", str(args.batch), "--new-tokens", str(args.new_tokens)]
                                 + (["--real", args.real] if args.real else []),
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            runs[m].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps({**runs[m][-1], **machine()}), flush=True)
    res = []
    for rs in runs.values():  # the median round of each method; the largest peak
        s_step = statistics.median(r["s_per_step"] for r in rs)
        res.append({**rs[0], "s_per_step": round(s_step, 4), "samples_per_s": round(args.batch / s_step, 3),
                    "peak_rss_growth_mb": max(r["peak_rss_growth_mb"] for r in rs), "rounds": len(rs)})
    trl = {r["method"].endswith("_onpolicy"): r["s_per_step"] for r in res if r["method"].startswith("trl_gkd")}
    print("\n| trainer | s/step | samples/s | speed vs TRL GKD (same policy) | peak RSS growth MB |")
    print("|---|---|---|---|---|")
    for r in res:
        ref = trl.get("_onpolicy" in r["method"])
        ratio = f"{ref / r['s_per_step']:.2f}×" if ref else "–"
        print(f"| {r['method']} | {r['s_per_step']} | {r['samples_per_s']} | {ratio} | {r['peak_rss_growth_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
