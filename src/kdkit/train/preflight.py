"""The one check path: what ``kdkit validate`` calls valid is what ``kdkit train`` runs.

:func:`preflight` runs every check that needs the data, the tokenizer and the models' configs but not
their weights: the sources (cache or live teacher, reference) against the data, tokenizer, K and
temperature; roles and tasks named by the objective; LoRA target modules and hidden-state layers
against the models' structure (built on the meta device: no weights are read); probe prompts and
contrast pairs tokenised as training will tokenise them. ``kdkit validate`` calls it with
``verify=True`` (shards re-hashed, model directories checked); ``kdkit train`` calls it before it
loads a model, so a config that fails in train fails the same way, with the same words, in validate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdkit.config.load import located
from kdkit.config.schema import TrainConfig
from kdkit.data import rows as kdata
from kdkit.teacher.signals import SourceError, Sources, check_objective_data, open_sources, open_validation
from kdkit.train.trackers import check_installed
from kdkit.util.errors import KdkitError


def model_config(path: str) -> dict[str, Any]:
    """A model directory's config.json."""
    return json.loads((Path(path) / "config.json").read_text())


def module_names(path: str) -> set[str]:
    """The last component of every module name of the model at ``path``, built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return {n.split(".")[-1] for n, _ in model.named_modules() if n}


def check_lora_targets(cfg: TrainConfig) -> None:
    lc = cfg.student.lora
    if lc is None:
        return
    names = module_names(cfg.student.path)
    missing = [m for m in lc.target_modules if m not in names]
    if missing:
        linear = sorted(n for n in names if n.endswith("proj") or n in ("fc1", "fc2", "c_attn", "c_proj"))
        raise SourceError(f"student.lora.target_modules: {missing} are not modules of {cfg.student.path} "
                          f"(its projection modules: {', '.join(linear) or 'none found'})")


def check_hidden_layers(cfg: TrainConfig) -> None:
    """objective.hidden against the layer counts and widths of the two configs."""
    h = cfg.objective.hidden
    if h is None or cfg.teacher is None or not cfg.teacher.model:
        return
    s, t = model_config(cfg.student.path), model_config(cfg.teacher.model)
    s_layers, t_layers = int(s["num_hidden_layers"]), int(t["num_hidden_layers"])
    for a, b in h.layers.items():
        if a > s_layers or b > t_layers:
            raise SourceError(f"objective.hidden.layers: {a} → {b} is out of range (the student has layers "
                              f"0..{s_layers}, the teacher 0..{t_layers}; 0 = the embeddings)")
    if h.projection == "none" and s["hidden_size"] != t["hidden_size"]:
        raise SourceError(f"objective.hidden.projection: none needs equal widths; the student's is "
                          f"{s['hidden_size']}, the teacher's {t['hidden_size']} (use projection: linear)")


def load_rows(cfg: TrainConfig, tokenizer: Any) -> tuple[list[kdata.TokenizedRow], list[kdata.TokenizedRow],
                                                         kdata.TokenizeReport]:
    """The training and validation rows as training tokenises them (with character offsets for a
    cross-tokenizer loss, which refuses rows that have none)."""
    d = cfg.data
    rows, rep = kdata.load_dataset(tokenizer, d.train, max_length=d.max_length, on_empty=d.on_empty,
                                   truncation=d.truncation, offsets=cfg.objective.kd.cross_tokenizer != "none")
    val = (kdata.load_dataset(tokenizer, d.validation, max_length=d.max_length, truncation=d.truncation)[0]
           if d.validation else [])
    return rows, val, rep


def check_precision(cfg: TrainConfig) -> None:
    """A precision this machine would not honour is refused (not run in float32 under its name)."""
    import torch

    if cfg.optim.precision == "fp16-mixed" and not torch.cuda.is_available():
        raise SourceError("optim.precision: fp16-mixed needs a CUDA GPU; on this machine (no GPU) Accelerate would "
                          "train in float32 while the run said fp16-mixed — use bf16-mixed or fp32 here")


def preflight(cfg: TrainConfig, rows: list[kdata.TokenizedRow], tokenizer: Any, vocab_rows: int,
              verify: bool = False, val_rows: list[kdata.TokenizedRow] | None = None) -> Sources:
    """Every check of a training config that needs no weights; raises a :class:`kdkit.util.errors.KdkitError`
    naming the field (and file and line) on the first problem. Returns the sources, opened once and checked (a
    live model's weights not read: :meth:`~kdkit.teacher.signals.Sources.load`)."""
    try:
        return _checks(cfg, rows, tokenizer, vocab_rows, verify, val_rows)
    except KdkitError as e:  # a message that begins with a field: where the user wrote it, file and line
        e.args = (located(cfg, str(e)), *e.args[1:])
        raise


def _checks(cfg: TrainConfig, rows: list[kdata.TokenizedRow], tokenizer: Any, vocab_rows: int, verify: bool,
            val_rows: list[kdata.TokenizedRow] | None) -> Sources:
    check_precision(cfg)
    src = open_sources(cfg, rows, tokenizer, vocab_rows, verify=verify)
    src.validation = open_validation(cfg, val_rows or [], tokenizer, vocab_rows, verify=verify)
    check_objective_data(cfg, rows)
    check_installed(cfg.logging.report_to)
    check_lora_targets(cfg)
    check_hidden_layers(cfg)
    op = cfg.objective.on_policy
    if op is not None and op.rollout_url is not None:  # the student's server answers and serves one base model
        from kdkit.train.rollout import open_rollout_server

        open_rollout_server(op.rollout_url, None, Path("."), op.sync_every, cfg.student.lora is not None)
    if cfg.eval is not None:  # the server that will gate this run answers as its base: refused now, not after training
        from kdkit.evaluate.served import check_eval_server

        check_eval_server(cfg.eval.server, cfg.eval.served_model, cfg.student.path, cfg.student.lora is not None)
    if cfg.probes is not None:  # the files training reads later: refused now, naming file and line
        from kdkit.train.probes import load_probes

        load_probes(cfg.probes, tokenizer)
    if cfg.routing is not None and cfg.routing.control == "none":
        from kdkit.train.routing import load_pairs

        load_pairs(cfg.routing.pairs, tokenizer)
    return src
