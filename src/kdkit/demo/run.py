"""``kdkit demo``: the whole job on the bundled tiny world, in minutes on a CPU.

1. generate the world (train / anchors / holdout code tasks) from the seed;
2. precompute the bundled teacher's top-K cache on the student's training rows;
3. train a small student twice from the same initialisation, data, steps and seed:
   distilled (CE + KD from the cache) and baseline (CE only);
4. merge both, evaluate teacher, distilled and baseline on anchors and holdout in the sandbox;
5. make the baseline production and gate the distilled student against it;
6. print the table and write an HTML report.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdkit.demo.assets_build import STUDENT_SHAPE, fresh_model_dir
from kdkit.demo.world import make_world, training_rows
from kdkit.util.io import check_output_dir, mark_output_dir

TEACHER_DIR = Path(__file__).resolve().parent / "assets" / "teacher"
WORLD_SEED = 0  # the seed scripts/train_demo_teacher.py trained the bundled teacher on


@dataclass
class DemoSettings:
    seed: int = 0
    student_rows: int = 400
    epochs: int = 12
    micro_batch: int = 16
    lr: float = 3e-3
    kd_weight: float = 1.0
    kd_kind: str = "kl_fwd"
    temperature: float = 1.0
    top_k: int = 16
    max_new_tokens: int = 96
    n_anchors: int = 30
    n_holdout: int = 40


@dataclass
class ModelRow:
    model: str
    parameters: int
    anchor_passed: int
    anchor_total: int
    anchor_interval: tuple[float, float]
    holdout_passed: int
    holdout_total: int
    val_loss: float
    kl_to_teacher: float | None
    wall_s: float  # training (and merge) only
    precompute_s: float = 0.0  # the teacher cache this model was trained from
    anchor_outcomes: dict[str, bool] = field(default_factory=dict)
    holdout_outcomes: dict[str, bool] = field(default_factory=dict)
    val_rows: dict[str, list] = field(default_factory=dict)  # per validation row: tokens, CE and KL sums


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return path


def _config(s: DemoSettings, student: Path, train: Path, val: Path, cache: Path | None) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "student": {"path": str(student)},
        "data": {"train": str(train), "validation": str(val), "max_length": 256, "shuffle_seed": s.seed},
        "objective": {"ce_coef": 1.0},
        "optim": {"lr": s.lr, "micro_batch": s.micro_batch, "epochs": s.epochs, "warmup_steps": 20,
                  "schedule": "cosine", "seed": s.seed},
        "checkpoint": {"every": 0},
        "logging": {"every": 5},
    }
    if cache is not None:  # the baseline has no teacher, hence no KD settings (they would do nothing)
        cfg["teacher"] = {"cache": str(cache)}
        cfg["objective"].update(kd_weight=s.kd_weight, kd={"kind": s.kd_kind, "temperature": s.temperature})
    return cfg


def _val_metrics(model_dir: Path, val: Path, teacher_dir: Path) -> tuple[float, float | None, dict[str, list]]:
    """Validation CE per target token, KL(teacher ‖ model) per target token, and both summed per row."""
    from kdkit.config.schema import TrainConfig
    from kdkit.data import rows as kdata
    from kdkit.models.load import load_causal_lm, load_tokenizer
    from kdkit.teacher.signals import LiveSignal
    from kdkit.train import evaluate_loss

    tok = load_tokenizer(model_dir)
    rows, _ = kdata.load_dataset(tok, val, max_length=256)
    model = load_causal_lm(model_dir)
    teacher = (None if model_dir.resolve() == teacher_dir.resolve() else
               LiveSignal(load_causal_lm(teacher_dir), len(tok), "teacher"))
    cfg = TrainConfig.model_validate({"student": {"path": str(model_dir)}, "data": {"train": str(val)},
                                      "optim": {"micro_batch": 16}})
    import torch

    ev = evaluate_loss(model, rows, cfg, tok.pad_token_id, len(tok), torch.device("cpu"), teacher)
    return ev["val_loss"], ev.get("val_kl", 0.0 if teacher is None else None), ev["per_row"]


def _train_students(out: Path, s: DemoSettings, teacher: Path, cache: Path, train_p: Path, val_p: Path,
                    progress: bool, log: Any) -> dict[str, tuple[Path, float]]:
    """The distilled and the CE-only student from one initialisation, merged into packs: {name: (pack, seconds)};
    also the pruned student of examples/tiny.yaml."""
    from kdkit.config.load import load_train_config
    from kdkit.models.student import init_student
    from kdkit.train import merge, train

    student_init = fresh_model_dir(out / "student_init", STUDENT_SHAPE, seed=s.seed + 1)
    init_student(teacher, out / "student_pruned", layers=2)  # starts from the teacher's own layers
    runs: dict[str, tuple[Path, float]] = {}
    for name, c in (("distilled", cache), ("baseline", None)):
        log(f"[3/6] train {name} student ({'CE + KD' if c else 'CE only'})")
        cfg_p = out / f"{name}.yaml"
        cfg_p.write_text(yaml.safe_dump(_config(s, student_init, train_p, val_p, c)))
        t0 = time.perf_counter()
        train(load_train_config(cfg_p), out / "runs" / name, progress=progress, log=log)
        merge(out / "runs" / name, out / "packs" / name)
        runs[name] = (out / "packs" / name, time.perf_counter() - t0)
    return runs


def _model_row(name: str, path: Path, wall: float, teacher: Path, files: tuple[Path, Path, Path],
               gen: Any, precompute_s: float, progress: bool, log: Any) -> ModelRow:
    """One model's row of the demo's table: anchors and holdout in the sandbox, validation CE and KL."""
    from kdkit.evaluate.passrate import evaluate_model
    from kdkit.models.load import load_causal_lm
    from kdkit.train import count_parameters

    anchors_p, holdout_p, val_p = files
    ev = {}
    for split, tp in (("anchors", anchors_p), ("holdout", holdout_p)):
        log(f"      {name} on {split}")
        res, summ, _ = evaluate_model(path, tp, settings=gen, progress=progress, log=log)
        ev[split] = (summ, {r.task_id: r.passed for r in res})
    val_loss, kl, per_row = _val_metrics(path, val_p, teacher)
    return ModelRow(name, count_parameters(load_causal_lm(path)), ev["anchors"][0].n_passed, ev["anchors"][0].n_tasks,
                    ev["anchors"][0].interval, ev["holdout"][0].n_passed, ev["holdout"][0].n_tasks, val_loss, kl, wall,
                    precompute_s=precompute_s, anchor_outcomes=ev["anchors"][1], holdout_outcomes=ev["holdout"][1],
                    val_rows=per_row)


def run_demo(out: str | Path = "demo-out", settings: DemoSettings = DemoSettings(), *, teacher: Path = TEACHER_DIR,
             progress: bool = True, log=print) -> dict[str, Any]:
    from kdkit.decide.gate import gate
    from kdkit.decide.registry import Registry
    from kdkit.evaluate.passrate import GenerationSettings
    from kdkit.teacher.cache.precompute import PrecomputeSettings, precompute

    t_all = time.perf_counter()
    s = settings
    out = Path(out).resolve()  # the run configs hold absolute paths
    if check_output_dir(out, "--out", kind="demo"):  # a previous demo's output: replaced, never a user's files
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    mark_output_dir(out, "demo")
    if not (teacher / "model.safetensors").is_file():
        raise FileNotFoundError(f"{teacher}: the demo teacher is missing (run scripts/train_demo_teacher.py)")

    # The world is the teacher's (seed 0): another world would put the teacher's training tasks into the
    # anchors and holdout. --seed varies the student's initialisation and data order.
    log(f"[1/6] world: the teacher's (seed {WORLD_SEED}); student seed {s.seed}")
    world = make_world(WORLD_SEED, n_anchors=s.n_anchors, n_holdout=s.n_holdout)
    wdir = out / "world"
    wdir.mkdir()
    # the last 200 training tasks are the validation rows; the student trains on the first student_rows
    train_rows = training_rows(world.train[:-200][: s.student_rows])
    train_p = _write_jsonl(wdir / "student_train.jsonl", train_rows)
    val_p = _write_jsonl(wdir / "val.jsonl", training_rows(world.train[-200:]))
    anchors_p = _write_jsonl(wdir / "anchors.jsonl", world.anchors)
    holdout_p = _write_jsonl(wdir / "holdout.jsonl", world.holdout)

    log(f"[2/6] precompute: teacher top-{s.top_k} on {len(train_rows)} rows")
    t0 = time.perf_counter()
    cache = out / "cache"
    precompute(teacher, train_p, cache, PrecomputeSettings(top_k=s.top_k, temperature=s.temperature, batch_size=32,
                                                           max_length=256), progress=progress, log=log)
    t_cache = time.perf_counter() - t0

    runs = _train_students(out, s, teacher, cache, train_p, val_p, progress, log)

    log("[4/6] evaluate teacher, distilled and baseline on anchors and holdout (sandboxed, greedy)")
    gen = GenerationSettings(max_new_tokens=s.max_new_tokens, batch_size=16)
    rows = [_model_row(name, path, wall, teacher, (anchors_p, holdout_p, val_p), gen,
                       t_cache if name == "distilled" else 0.0, progress, log)
            for name, (path, wall) in [("teacher", (teacher, 0.0)), *runs.items()]]

    log("[5/6] gate: baseline is production; distilled is the candidate")
    reg = Registry(out / ".kdkit")
    base_pack = reg.register(runs["baseline"][0], name="baseline")
    reg.promote(base_pack.id, reason="demo: the CE-only student is production")
    g = gate(reg, str(runs["distilled"][0]), anchors_p, settings=gen, log=lambda m: None, progress=progress,
             candidate_meta={"name": "distilled", "source_run": str(out / "runs" / "distilled")})

    by = {r.model: r for r in rows}
    wins = by["distilled"].holdout_passed > by["baseline"].holdout_passed
    summary = {
        "settings": asdict(s),
        "models": [asdict(r) for r in rows],
        "gate": g.to_json(),
        "distillation_wins_holdout": wins,
        "holdout_delta": by["distilled"].holdout_passed - by["baseline"].holdout_passed,
        "anchor_delta": by["distilled"].anchor_passed - by["baseline"].anchor_passed,
        "total_seconds": time.perf_counter() - t_all,
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    log("[6/6] report")
    from kdkit.decide.report import write_report

    summary["report"] = str(write_report(out))
    summary["total_seconds"] = time.perf_counter() - t_all
    (out / "demo.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary
