"""A run's parts, built once and frozen: data, student (+LoRA), signals, optimizer and schedule, the loss
path; restored from a checkpoint when the run resumes."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from kdkit.config.schema import TrainConfig
from kdkit.data import rows as kdata
from kdkit.models import sharding
from kdkit.models.checkpoint import load_checkpoint, load_extra
from kdkit.models.load import head_reads_last_hidden, load_causal_lm, load_tokenizer, pad_id
from kdkit.teacher.signals import Sources, unwrap
from kdkit.train import onpolicy
from kdkit.train.hidden import HiddenDistill
from kdkit.train.metrics import Sums
from kdkit.train.objective import Objective
from kdkit.train.plan import lr_lambda
from kdkit.train.preflight import load_rows, model_config, preflight
from kdkit.train.probes import EarlyStop, load_probes
from kdkit.train.rollout import RolloutServer, open_rollout_server
from kdkit.train.routing import Router, add_quarantine
from kdkit.train.run import Run
from kdkit.train.rundir import truncate_jsonl, write_run_meta
from kdkit.util.errors import KdkitError, TrainingError
from kdkit.util.io import storage
from kdkit.util.rng import own_rng


def load_student(cfg: TrainConfig) -> torch.nn.Module:
    model = load_causal_lm(cfg.student.path, cfg.student.dtype, cfg.student.load_in, "student.load_in")
    if cfg.student.lora is not None:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if cfg.student.load_in is not None:  # QLoRA: norms in float32, inputs that carry gradients
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

        lc = cfg.student.lora  # its target modules were checked by preflight, against the same structure
        model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                 target_modules=list(lc.target_modules), task_type="CAUSAL_LM"))
        if cfg.routing is not None:
            add_quarantine(model, cfg.routing)
    if cfg.optim.gradient_checkpointing:
        # non-reentrant: exact recomputation (RNG state restored), and gradients reach LoRA weights of frozen bases
        unwrap(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def use_chunked(cfg: TrainConfig, model: torch.nn.Module) -> str | None:
    """Why the memory-lean chunked loss cannot be used for this run (None: it can)."""
    if cfg.objective.chunk_size == 0:
        return "objective.chunk_size is 0"
    if cfg.objective.barrier is not None:
        return "the barrier needs full logits"
    if cfg.routing is not None:
        return "routing's cin_t / cin_s need the CE and KD terms apart"
    if cfg.objective.kd.cross_tokenizer != "none":
        return "the cross-tokenizer loss compares whole distributions at aligned positions"
    if cfg.teachers:
        return "several teachers: the KD term is routed by row on the dense path"
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"the LM head is a {type(head).__name__} (e.g. LoRA on lm_head), not a plain Linear"
    return None


def dense_path_note(why_not: str, micro_batch: int, max_length: int, vocab: int) -> str:
    """Why the dense loss path runs, and what it holds: every micro-batch's logits whole, several float32 copies
    at once (the student's log-probabilities and probabilities, a reference's, their gradients)."""
    gb = micro_batch * max_length * vocab * 4 / 2**30
    return (f"note: using the dense loss path ({why_not}): a micro-batch's logits are held whole, "
            f"{micro_batch} × {max_length} × {vocab:,} float32 = {gb:.2f} GiB per copy, and several copies live at "
            f"once; a smaller optim.micro_batch with a larger optim.grad_accum takes the same step in less memory")


def hidden_distill(cfg: TrainConfig, model: torch.nn.Module, src: Sources, device: torch.device
                    ) -> HiddenDistill | None:
    if cfg.objective.hidden is None:
        return None
    h = cfg.objective.hidden
    s_cfg, t_cfg = unwrap(model).config, src.teacher.model.config
    return HiddenDistill(h, s_cfg.hidden_size, t_cfg.hidden_size).to(device)


def _checked_data(cfg: TrainConfig, log: Callable[[str], None]) -> tuple[Any, list[kdata.TokenizedRow],
                                                                        list[kdata.TokenizedRow], Sources]:
    """The tokenizer, the rows and the sources (opened once), after validate's checks: what validate accepts,
    this runs."""
    tokenizer = load_tokenizer(cfg.student.path)
    rows, val_rows, rep = load_rows(cfg, tokenizer)
    log(f"data: {rep.summary(cfg.data.max_length)}")
    try:
        src = preflight(cfg, rows, tokenizer, int(model_config(cfg.student.path).get("vocab_size", len(tokenizer))),
                        val_rows=val_rows)
    except KdkitError as e:
        e.same_on_every_rank = True  # every rank checks the same config and files: rank 0 reports it
        raise
    return tokenizer, rows, val_rows, src


def build(cfg: TrainConfig, run: Path, acc: Any, ckpt: Path | None, log: Callable[[str], None]
          ) -> tuple[Run, int, Sums]:
    """Data, student, sources, optimizer and schedule, placed on the run's devices and, from ``ckpt``,
    restored; returns the run, the step to continue from and the epoch's sums so far."""
    tokenizer, rows, val_rows, src = _checked_data(cfg, log)
    pad = pad_id(tokenizer)
    model = load_student(cfg)
    src.load(model)
    for m in (model, *src.modules()):
        # bitsandbytes places quantised weights on the GPU when loading and refuses .to()
        if not (getattr(m, "is_loaded_in_4bit", False) or getattr(m, "is_loaded_in_8bit", False)):
            m.to(acc.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise TrainingError("the student has no trainable parameter")
    hidden = hidden_distill(cfg, model, src, acc.device)
    if hidden is not None:  # the projections train with the student (after its parameters: one optimizer)
        trainable = trainable + list(hidden.parameters())
    if ckpt is None:
        with storage(run):
            save_file(sharding.full_trainable(model), str(run / "initial_trainable.safetensors"))
    o = cfg.optim
    opt = torch.optim.AdamW(trainable, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    world, rank = acc.num_processes, acc.process_index
    global_batch = o.micro_batch * o.grad_accum * world
    steps_per_epoch = math.ceil(len(rows) / global_batch)
    total_steps = min(o.max_steps or 10**12, o.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o.schedule, o.warmup_steps, total_steps))
    if world > 1:  # each rank adds its micro-batches: fewer steps per epoch than on one process
        log(f"{world} processes: a step takes {global_batch} rows ({world} × micro_batch {o.micro_batch} × "
            f"grad_accum {o.grad_accum}), {steps_per_epoch} steps per epoch; divide grad_accum or micro_batch by "
            f"{world} to keep one process's batch")
    why_not = use_chunked(cfg, model)
    if why_not and cfg.objective.chunk_size:
        log(dense_path_note(why_not, o.micro_batch, cfg.data.max_length, int(model.get_output_embeddings().weight.shape[0])))
    model, opt = acc.prepare(model, opt)
    if sharding.is_sharded(model):  # FSDP2 replaced the parameters by their shards
        trainable = [p for p in model.parameters() if p.requires_grad]
    parts = {"router": Router(unwrap(model), cfg.routing, tokenizer, pad) if cfg.routing is not None else None,
             # directions from the initial weights (a resume loads the saved ones)
             "probes": load_probes(cfg.probes, tokenizer) if cfg.probes is not None else [],
             "early": EarlyStop(cfg.early_stop) if cfg.early_stop is not None else None, "hidden": hidden,
             "rollout": _rollout_server(cfg, run, acc, ckpt is not None)}
    step, epoch_sums = 0, Sums()
    if ckpt is not None:
        step, epoch_sums = _restore(ckpt, acc.unwrap_model(model), opt, parts, log)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o.schedule, o.warmup_steps, total_steps),
                                                  last_epoch=step - 1)
    if why_not is None:  # after the restore: a sharded model's forward leaves its root parameters gathered
        _check_head(model, rows[0], pad, acc.device)
    if cfg.data.packing:
        _check_packing(model, rows, pad, acc.device)
    r = Run(cfg, acc, run, tokenizer, rows, val_rows, pad, len(tokenizer), model, trainable, opt, sched, src,
            *objectives(cfg, why_not is None, hidden), world, rank, global_batch, steps_per_epoch, total_steps,
            **parts)
    if acc.is_main_process:
        write_run_meta(r, why_not)
        cut_logs(r, step)
    return r, step, epoch_sums


def objectives(cfg: TrainConfig, chunked: bool, hidden: HiddenDistill | None) -> tuple[Objective, Objective | None]:
    """The run's objective and, with ``objective.on_policy``, an on-policy step's: their terms chosen once."""
    op = cfg.objective.on_policy
    off = Objective.for_run(cfg.objective, chunked, hidden)
    if op is None:
        return off, None
    return off, Objective.for_run(onpolicy.objective(cfg.objective), chunked, hidden, op.loss == "sampled_kl_rev")


def _rollout_server(cfg: TrainConfig, run: Path, acc: Any, resumed: bool) -> RolloutServer | None:
    """The student's server; under several ranks rank 0 pushes the weights and every rank waits for them."""
    op = cfg.objective.on_policy
    if op is None or op.rollout_url is None:
        return None
    rollout = open_rollout_server(op.rollout_url, None, run, op.sync_every, cfg.student.lora is not None,
                                  acc.process_index, acc.wait_for_everyone)
    if resumed:
        rollout.restore()
    return rollout


def _check_head(model: torch.nn.Module, row: kdata.TokenizedRow, pad: int, device: torch.device) -> None:
    """The chunked loss runs the LM head itself: once per run, check that it is the model's head."""
    batch = kdata.collate([row], pad).to(device)
    if not head_reads_last_hidden(unwrap(model), batch.input_ids, batch.attention_mask):
        raise TrainingError("this model's last hidden state is not the LM head's input; set objective.chunk_size: 0")


@torch.no_grad()
def _check_packing(model: torch.nn.Module, rows: list[kdata.TokenizedRow], pad: int, device: torch.device) -> None:
    """``data.packing``, once per run: two rows packed into one sequence give the logits they give apart (the
    model's attention restarts where the positions do; a transformers release or an architecture that ignores
    restarting positions would let the rows attend to each other)."""
    if len(rows) < 2:
        return
    batch = kdata.collate(rows[:2], pad).to(device)
    pk = kdata.pack(batch, int(batch.attention_mask.sum()), pad)
    was_training = model.training
    model.eval()  # no dropout: the two forwards must see the same weights
    with own_rng():
        apart = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        packed = pk.unpack(model(input_ids=pk.input_ids, position_ids=pk.position_ids, use_cache=False).logits.float())
    model.train(was_training)
    valid = batch.attention_mask.bool()
    gap = float((packed[valid] - apart[valid]).abs().max())
    bound = max(1e-3, 4 * torch.finfo(next(unwrap(model).parameters()).dtype).eps) * (1 + float(apart[valid].abs().max()))
    if not gap <= bound:
        raise TrainingError(f"data.packing: this model lets packed rows attend to each other (two rows packed give "
                            f"logits {gap:.3g} away from the rows apart; transformers >= 5 keeps them apart for "
                            f"its decoders); leave data.packing out")


def _restore(ckpt: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, parts: dict[str, Any],
             log: Callable[[str], None]) -> tuple[int, Sums]:
    """Weights, optimizer and loop state from ``ckpt``; the step and the epoch's sums to continue from."""
    state = load_checkpoint(ckpt, model, opt)
    step, epoch_sums = int(state["global_step"]), Sums()
    epoch_sums.v.update(state["epoch_sums"])
    if parts["early"] is not None:
        parts["early"].load(state["early_stop"])
    extra = load_extra(ckpt)
    if parts["router"] is not None:
        parts["router"].load(extra)
    if parts["hidden"] is not None:
        parts["hidden"].load_state_dict({k[len("hidden."):]: v for k, v in extra.items() if k.startswith("hidden.")})
    log(f"resumed from {ckpt} at step {step}")
    return step, epoch_sums


def cut_logs(r: Run, step: int) -> None:
    """metrics.jsonl, epochs.jsonl and probes.jsonl cut back to ``step`` (a resume rewrites what follows)."""
    for path in (r.metrics_path, r.epochs_path, r.probes_path):
        truncate_jsonl(path, lambda row: row["step"] <= step)


def count_parameters(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))
