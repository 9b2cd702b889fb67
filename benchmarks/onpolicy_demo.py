"""Off-policy KD vs on-policy KD (λ = 0.5, 1.0) vs sequence-level KD vs CE only, on the demo world.

Every variant trains the demo's student from the same initialisation, on the same rows, for the same
steps and seed as ``kdkit demo`` (400 rows, 12 epochs, batch 16, lr 3e-3, cosine), and is evaluated
greedy in the sandbox on the demo's 30 anchors and 40 holdout tasks:

* ``ce_only``      CE on the dataset's completions (the demo's baseline);
* ``off_policy``   CE + KL(teacher ‖ student) from the teacher's top-16 cache (the demo's distilled student);
* ``on_policy_0.5`` / ``on_policy_1.0``  a live teacher; on a λ share of steps the student writes the
  completions (temperature 1, ≤ 96 tokens) and the loss is KL(teacher ‖ student) on its tokens, CE off;
  the other steps are ``off_policy``'s loss with the live teacher (``on_policy_1.0_greedy``, on request:
  λ = 1 with greedy rollouts, temperature 0);
* ``seq_kd``       CE on the teacher's greedy completions of the training prompts (``kdkit generate``).

With ``--from-sft E`` every variant instead starts from the CE-only student of the first setting (trained
as above, or reused from the same --out) and continues for E epochs at lr 1e-3: GKD's setting, where
on-policy distillation refines a student that already writes plausible completions (``ce_only`` is then
E more epochs of CE).

Run: ``python benchmarks/onpolicy_demo.py --seeds 0 1 2 --out /tmp/onpolicy [--from-sft 4]`` (prints JSON, then
a table).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import yaml

VARIANTS = ("ce_only", "off_policy", "on_policy_0.5", "on_policy_1.0", "seq_kd")
EXTRA = ("on_policy_1.0_greedy",)  # on request (--variants): λ = 1 with greedy rollouts


def _variant_config(name: str, base: dict, cache: Path, teacher: Path, seq_rows: Path) -> dict:
    from kdkit.demo.run import DemoSettings

    s = DemoSettings()
    cfg = json.loads(json.dumps(base))
    kd = {"kd_weight": s.kd_weight, "kd": {"kind": s.kd_kind, "temperature": s.temperature}}
    if name == "off_policy":
        cfg["teacher"] = {"cache": str(cache)}
        cfg["objective"].update(kd)
    elif name.startswith("on_policy"):
        cfg["teacher"] = {"model": str(teacher)}
        cfg["objective"].update(kd, on_policy={"fraction": float(name.split("_")[2]), "max_new_tokens": s.max_new_tokens,
                                               "temperature": 0.0 if name.endswith("_greedy") else 1.0})
    elif name == "seq_kd":
        cfg["data"]["train"] = str(seq_rows)
    return cfg


def run_seed(seed: int, out: Path, variants: tuple[str, ...], from_sft: int = 0) -> list[dict]:
    from kdkit.config.load import load_train_config
    from kdkit.demo.assets_build import STUDENT_SHAPE, fresh_model_dir
    from kdkit.demo.run import TEACHER_DIR, WORLD_SEED, DemoSettings, _config, _val_metrics, _write_jsonl
    from kdkit.demo.world import make_world, training_rows
    from kdkit.evaluate.passrate import GenerationSettings, evaluate_model
    from kdkit.teacher.cache.precompute import PrecomputeSettings, precompute
    from kdkit.teacher.seqkd import generate_rows
    from kdkit.train import merge, train

    s = DemoSettings(seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    world = make_world(WORLD_SEED, n_anchors=s.n_anchors, n_holdout=s.n_holdout)
    train_p = _write_jsonl(out / "train.jsonl", training_rows(world.train[:-200][: s.student_rows]))
    val_p = _write_jsonl(out / "val.jsonl", training_rows(world.train[-200:]))
    anchors_p, holdout_p = _write_jsonl(out / "anchors.jsonl", world.anchors), _write_jsonl(out / "holdout.jsonl",
                                                                                            world.holdout)
    cache = out / "cache"
    precompute(TEACHER_DIR, train_p, cache, PrecomputeSettings(top_k=s.top_k, temperature=s.temperature, batch_size=32,
                                                               max_length=256), progress=False, log=lambda m: None)
    seq_rows, t_seq = out / "seq_kd_rows.jsonl", time.perf_counter()
    if "seq_kd" in variants:
        generate_rows(str(TEACHER_DIR), str(train_p), seq_rows,
                      GenerationSettings(max_new_tokens=s.max_new_tokens, batch_size=32), progress=False,
                      log=lambda m: None)
    t_seq = time.perf_counter() - t_seq
    init = fresh_model_dir(out / "student_init", STUDENT_SHAPE, seed=s.seed + 1)
    base = _config(s, init, train_p, val_p, None)
    stage = ""
    if from_sft:
        sft = out / "packs" / "ce_only"
        if not sft.is_dir():
            (out / "ce_only.yaml").write_text(yaml.safe_dump(base))
            train(load_train_config(out / "ce_only.yaml"), out / "runs" / "ce_only", progress=False, log=lambda m: None)
            merge(out / "runs" / "ce_only", sft)
        base = _config(s, sft, train_p, val_p, None)
        base["optim"].update(epochs=from_sft, lr=1e-3, warmup_steps=0)
        stage = f"from-sft-{from_sft}/"
    gen = GenerationSettings(max_new_tokens=s.max_new_tokens, batch_size=16)
    rows = []
    for name in variants:
        cfg_p = out / f"{stage}{name}.yaml"
        cfg_p.parent.mkdir(parents=True, exist_ok=True)
        cfg_p.write_text(yaml.safe_dump(_variant_config(name, base, cache, TEACHER_DIR, seq_rows)))
        t0 = time.perf_counter()
        train(load_train_config(cfg_p), out / stage / "runs" / name, progress=False, log=lambda m: None)
        wall = time.perf_counter() - t0 + (t_seq if name == "seq_kd" else 0.0)
        pack = merge(out / stage / "runs" / name, out / stage / "packs" / name)
        passed = {split: evaluate_model(pack, tp, settings=gen, progress=False)[1].n_passed
                  for split, tp in (("anchors", anchors_p), ("holdout", holdout_p))}
        val_loss, kl = _val_metrics(pack, val_p, TEACHER_DIR)
        rows.append({"seed": seed, "variant": name, "anchors": passed["anchors"], "holdout": passed["holdout"],
                     "n_anchors": s.n_anchors, "n_holdout": s.n_holdout, "val_loss": val_loss, "val_kl": kl,
                     "train_wall_s": wall})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    def mean_sd(xs: list[float]) -> str:
        m = sum(xs) / len(xs)
        sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
        return f"{m:.1f} ± {sd:.1f}"

    out = ["| variant | holdout passed (per seed) | mean ± sd | anchors passed (per seed) | mean ± sd | "
           "val loss | val KL | train s |", "|---|---|---|---|---|---|---|---|"]
    for v in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == v]
        out.append(f"| {v} | {', '.join(str(r['holdout']) for r in rs)} / {rs[0]['n_holdout']} | "
                   f"{mean_sd([r['holdout'] for r in rs])} | {', '.join(str(r['anchors']) for r in rs)} / "
                   f"{rs[0]['n_anchors']} | {mean_sd([r['anchors'] for r in rs])} | "
                   f"{sum(r['val_loss'] for r in rs) / len(rs):.3f} | {sum(r['val_kl'] for r in rs) / len(rs):.3f} | "
                   f"{sum(r['train_wall_s'] for r in rs) / len(rs):.0f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS + EXTRA)
    ap.add_argument("--out", type=Path, required=True, help="working directory (created)")
    ap.add_argument("--from-sft", type=int, default=0, metavar="E",
                    help="start every variant from the CE-only student and train E more epochs")
    a = ap.parse_args()
    rows = [r for seed in a.seeds for r in run_seed(seed, a.out / f"seed-{seed}", tuple(a.variants), a.from_sft)]
    (a.out / f"results{f'-from-sft-{a.from_sft}' if a.from_sft else ''}.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(json.dumps(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
