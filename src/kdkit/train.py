"""``kdkit train``: one loop for distillation and KL-anchored fine-tuning.

Read :func:`train` top to bottom: :func:`_prepare` sets the run up, then for every optimizer
step :func:`_step_batches` picks the rows (and, on an on-policy step, lets the student write their
completions), :func:`_optimizer_step` runs forward → loss → backward per micro-batch → gradient
edits → clip → optimizer, and :func:`_after_step` logs, evaluates and checkpoints. Teacher signals
come from :mod:`kdkit.teacher`, checkpoint I/O from :mod:`kdkit.checkpoint`. Everything a user
varies is in :class:`TrainConfig`.

A run directory holds ``config.yaml`` (resolved), ``run.json`` (git revision,
cache manifest hash, versions), ``metrics.jsonl`` (per logged step),
``epochs.jsonl`` (per epoch), ``checkpoints/step-NNNNNNN/`` and ``final/``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kdkit import __version__, onpolicy, sharding
from kdkit import data as kdata
from kdkit.checkpoint import (
    INPUTS_FILE,
    check_resume,
    finished,
    load_checkpoint,
    load_extra,
    newest_checkpoint,
    save_checkpoint,
    save_final,
)
from kdkit.config import TrainConfig, dump_config
from kdkit.errors import KdkitError, TrainingError
from kdkit.hidden import HiddenDistill
from kdkit.identity import run_inputs
from kdkit.io import atomic_write_bytes, atomic_write_json, storage
from kdkit.losses import aggregate, token_divergence
from kdkit.models import (
    PACK_FILE,
    ModelError,
    head_reads_last_hidden,
    load_causal_lm,
    load_tokenizer,
    merge,
    pad_id,
    sha256_file,
    vocab_logits,
)
from kdkit.objective import (
    ObjectiveOutput,
    StepDenominator,
    compute_objective,
    compute_objective_chunked,
    hidden_term,
    resolved_chunk,
    token_weights,
)
from kdkit.preflight import load_rows, model_config, preflight
from kdkit.probes import EarlyStop, Probe, load_probes, probe_round
from kdkit.routing import Router, add_quarantine
from kdkit.teacher import Signal, Sources, open_sources, unwrap

__all__ = ["train", "merge", "evaluate_loss", "TrainingError", "PACK_FILE", "FAULT_ENV",
           "step_rows", "micro_slices", "lr_lambda", "count_parameters", "GradHook"]

GradHook = Callable[[torch.nn.Module, int], dict[str, float] | None]
"""Called after backward and before clipping, once per optimizer step: the place for
gradient edits (projection, routing). May return metrics to log."""


FAULT_ENV = "KDKIT_FAULT_TRAIN"


def _fault(point: str, step: int) -> None:
    """Fault injection for the crash tests: KDKIT_FAULT_TRAIN=<point>:<step> kills -9 there;
    ``sigint:<step>`` sends this process a real SIGINT after that step, ``sigint_mid:<step>`` in the middle
    of it (after the first micro-batch's backward), as a Ctrl-C would."""
    spec = os.environ.get(FAULT_ENV)
    if spec == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
    if (spec == f"sigint:{step}" and point == "after_step") or (spec == f"sigint_mid:{step}" and point == "mid_step"):
        os.kill(os.getpid(), signal.SIGINT)


class _Interrupts:
    """Ctrl-C during training: the current step finishes, a checkpoint is saved at that step boundary (so
    weights, optimizer, RNG state and logs agree), then KeyboardInterrupt. A second Ctrl-C stops at once.

    The handler is installed explicitly, so it works where SIGINT starts out ignored (background jobs)."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.requested = False
        self.log = log
        self._old: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.log("interrupt: finishing this step, then saving a checkpoint (Ctrl-C again to stop without one)")

    def __enter__(self) -> _Interrupts:
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)

    def agreed(self, acc: Any) -> bool:
        """Whether any rank was interrupted (every rank must stop at the same step)."""
        if acc.num_processes == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=acc.device)
        return bool(acc.reduce(flag, "sum").item() > 0)


# --------------------------------------------------------------------------- set-up


def _load_student(cfg: TrainConfig) -> torch.nn.Module:
    model = load_causal_lm(cfg.student.path, cfg.student.dtype, cfg.student.load_in, "student.load_in")
    if cfg.student.lora is not None:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if cfg.student.load_in is not None:  # QLoRA: norms in float32, inputs that carry gradients
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

        lc = cfg.student.lora
        names = {n.split(".")[-1] for n, _ in model.named_modules()}
        missing = [m for m in lc.target_modules if m not in names]
        if missing:
            raise ModelError(f"student.lora.target_modules: {missing} are not modules of {cfg.student.path}")
        model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                 target_modules=list(lc.target_modules), task_type="CAUSAL_LM"))
        if cfg.routing is not None:
            add_quarantine(model, cfg.routing)
    if cfg.optim.gradient_checkpointing:
        # non-reentrant: exact recomputation (RNG state restored), and gradients reach LoRA weights of frozen bases
        unwrap(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


# --------------------------------------------------------------------------- data order


def step_rows(n_rows: int, step: int, steps_per_epoch: int, global_batch: int, seed: int) -> list[int]:
    """Row indices of one optimizer step (all ranks, all micro-batches): epoch-seeded permutation."""
    epoch, k = divmod(step, steps_per_epoch)
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return perm[k * global_batch:(k + 1) * global_batch]


def micro_slices(rows: list[int], micro: int, accum: int, world: int, rank: int) -> list[list[int]]:
    """This rank's micro-batches of a step; may be empty at the end of an epoch."""
    return [rows[(m * world + rank) * micro:(m * world + rank + 1) * micro] for m in range(accum)]


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        frac = (step - warmup) / max(1, total - warmup)
        frac = min(max(frac, 0.0), 1.0)
        return 1.0 - frac if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))

    return f


# --------------------------------------------------------------------------- metrics


@dataclass
class Sums:
    """Token-weighted running sums, reduced across micro-batches and ranks. Within a step they are device
    tensors (the metrics of each micro-batch are added where they were computed); :meth:`reduce` reads
    them once, summed over the ranks, into floats."""

    keys = ("total", "ce", "tok", "kl", "kd_tok", "barrier", "tail", "tail_tok", "agree", "agree_tok", "hidden",
            "hidden_tok", "steps")
    v: dict[str, Any] = field(default_factory=lambda: dict.fromkeys(Sums.keys, 0.0))

    def reduce(self, acc: Any) -> None:
        """Every sum as a float, over all ranks: one host read for the whole step."""
        packed = torch.stack([torch.as_tensor(self.v[k], dtype=torch.float64, device=acc.device).reshape(())
                              for k in self.keys])
        self.v = dict(zip(self.keys, acc.reduce(packed, "sum").tolist(), strict=True))

    def add_output(self, out: ObjectiveOutput) -> None:
        m = out.metrics
        self.v["total"] += m["total_loss"]
        self.v["ce"] += m["ce_loss"] * m["tokens"]
        self.v["tok"] += m["tokens"]
        kd_tok = m.get("kd_tokens", 0.0)
        self.v["kl"] += m.get("kl_loss", 0.0) * kd_tok
        self.v["kd_tok"] += kd_tok
        self.v["barrier"] += m.get("barrier", 0.0)
        # a top-K teacher has a tail mass, a teacher with the same vocabulary a top-1 agreement
        self.v["tail"] += m.get("tail_mass", 0.0) * kd_tok
        self.v["tail_tok"] += kd_tok if "tail_mass" in m else 0.0
        self.v["agree"] += m.get("top1_agree", 0.0) * kd_tok
        self.v["agree_tok"] += kd_tok if "top1_agree" in m else 0.0
        self.v["hidden"] += m.get("hidden_loss", 0.0) * m.get("hidden_tokens", 0.0)
        self.v["hidden_tok"] += m.get("hidden_tokens", 0.0)

    def merge(self, other: Sums) -> None:
        for k in self.keys:
            self.v[k] += other.v[k]

    def summary(self, per_step_total: bool) -> dict[str, float]:
        steps = max(self.v["steps"], 1.0) if per_step_total else 1.0
        out = {"total_loss": self.v["total"] / steps, "ce_loss": self.v["ce"] / max(self.v["tok"], 1.0),
               "barrier": self.v["barrier"] / steps}
        if self.v["kd_tok"]:
            out["kl_loss"] = self.v["kl"] / self.v["kd_tok"]
        if self.v["tail_tok"]:
            out["tail_mass"] = self.v["tail"] / self.v["tail_tok"]
        if self.v["agree_tok"]:
            out["top1_agree"] = self.v["agree"] / self.v["agree_tok"]
        if self.v["hidden_tok"]:
            out["hidden_loss"] = self.v["hidden"] / self.v["hidden_tok"]
        return out


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(row, sort_keys=True) + "\n")
        fh.flush()


def _truncate_jsonl(path: Path, keep: Callable[[dict[str, Any]], bool]) -> None:
    if path.is_file():
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows if keep(r)).encode())


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _empty_batch(rows: list[kdata.TokenizedRow], pad_id: int) -> kdata.Batch:
    """A micro-batch with no target: loss 0, gradient 0, but it still joins the collective ops."""
    b = kdata.collate([rows[0]], pad_id, [0])
    b.targets.fill_(kdata.IGNORE_INDEX)
    return b


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
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"the LM head is a {type(head).__name__} (e.g. LoRA on lm_head), not a plain Linear"
    return None


# --------------------------------------------------------------------------- the step


def _forward_loss(r: _Run, model: torch.nn.Module, batch: kdata.Batch, objective: Any,
                  denom: StepDenominator) -> ObjectiveOutput:
    """One micro-batch: the sources' signals, the student's forward, the objective."""
    # the chunked loss reads the teacher at the target positions alone: a live teacher runs its head there only
    at_targets = r.chunked and r.hidden is None
    teacher = r.src.teacher(batch, model, at_targets=at_targets) if r.src.teacher is not None else None
    reference = r.src.reference(batch, model) if r.src.reference is not None else None
    kw = dict(teacher=teacher, roles=batch.roles, tasks=batch.tasks, row_weights=batch.weights, denom=denom)
    if not r.chunked:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    output_hidden_states=r.hidden is not None)
        res = compute_objective(vocab_logits(out.logits[:, :-1], r.real_vocab, "student"), batch.targets, objective,
                                reference=reference, **kw)
        return _with_hidden(r, res, out.hidden_states, batch, objective, denom)
    # Only the last position's logits are materialised by the model; the loss is computed from the
    # final hidden states, chunk by chunk. Padded embedding rows are dropped from the head.
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True,
                logits_to_keep=1)
    hidden, head = out.hidden_states[-1], unwrap(model).get_output_embeddings()
    if not r.head_checked:  # once per run: the architecture does not change between steps
        if not head_reads_last_hidden(unwrap(model), batch.input_ids, batch.attention_mask):
            raise TrainingError("this model's last hidden state is not the LM head's input; "
                                "set objective.chunk_size: 0")
        r.head_checked = True
    bias = None if head.bias is None else head.bias[:r.real_vocab]
    res = compute_objective_chunked(hidden[:, :-1], head.weight[:r.real_vocab], batch.targets, objective,
                                    head_bias=bias, teacher_at_targets=at_targets, **kw)
    return _with_hidden(r, res, out.hidden_states, batch, objective, denom)


def _with_hidden(r: _Run, res: ObjectiveOutput, states: tuple[torch.Tensor, ...] | None, batch: kdata.Batch,
                 objective: Any, denom: StepDenominator) -> ObjectiveOutput:
    """The hidden-state term added to a micro-batch's objective (when the run distils hidden states)."""
    if r.hidden is None:
        return res
    values = r.hidden(states, r.src.teacher.last_hidden)
    term, metrics = hidden_term(values, batch.targets, objective, roles=batch.roles, tasks=batch.tasks,
                                row_weights=batch.weights, denom=denom)
    res.loss = res.loss + term
    res.terms["hidden"] = term
    res.metrics.update(metrics, total_loss=res.metrics["total_loss"] + term.detach().float())
    return res


def _step_batches(r: _Run, step: int) -> tuple[list[kdata.Batch], bool]:
    """This rank's micro-batches of optimizer step ``step`` (0-based), and whether the step is on-policy:
    then every row keeps its prompt and the student writes the completion (the only target)."""
    o = r.cfg.optim
    ids = step_rows(len(r.rows), step, r.steps_per_epoch, r.global_batch, r.cfg.data.shuffle_seed)
    micro = micro_slices(ids, o.micro_batch, o.grad_accum, r.world, r.rank)
    op = r.cfg.objective.on_policy
    on = onpolicy.is_on_policy(op, step)
    batches = []
    for j, m in enumerate(micro):
        if not m:
            batches.append(_empty_batch(r.rows, r.pad_id))
            continue
        rows = [r.rows[i] for i in m]
        if on:
            rows = onpolicy.rollouts(unwrap(r.model), r.tokenizer, rows, op,
                                     onpolicy.sample_seed(op, step, r.rank, j))
        batches.append(kdata.collate(rows, r.pad_id, m).to(r.acc.device))
    return batches, on


def _optimizer_step(r: _Run, step: int, batches: list[kdata.Batch], on_policy: bool,
                    grad_hooks: list[GradHook], last_ckpt: Path | None) -> tuple[Sums, dict[str, float]]:
    """Forward and backward over the step's micro-batches, gradient hooks, clipping, the optimizer step.
    Returns the step's sums over all ranks and the step's scalar metrics."""
    acc, cfg = r.acc, r.cfg
    objective = onpolicy.objective(cfg.objective) if on_policy else cfg.objective
    # One denominator for the whole step: every micro-batch of every rank.
    local = torch.tensor(sum(float(token_weights(b.targets, cfg.objective.ce_norm).sum()) for b in batches),
                         dtype=torch.float64, device=acc.device)
    denom = StepDenominator(float(acc.reduce(local, "sum")))
    sums, losses = Sums(), []
    for j, b in enumerate(batches):
        # Sync gradients across ranks only on the last micro-step: earlier ones accumulate locally.
        with acc.no_sync(r.model) if j < len(batches) - 1 else nullcontext():
            out = _forward_loss(r, r.model, b, objective, denom)
            if r.router is not None and j == 0:
                r.router.term_shares(out.terms)  # cin_t / cin_s: the KD and CE terms' gradients apart
            losses.append(out.loss.detach())  # checked once, before the optimizer step
            # DDP averages gradients over ranks; the loss is already this rank's share of the
            # step's sum, so undo the average to get the gradient of the global loss.
            acc.backward(out.loss * r.world)
        sums.add_output(out)
        if j == 0:
            _fault("mid_step", step + 1)
    if r.hidden is not None and r.world > 1:  # outside DDP's wrapper: average the projections' gradients here
        for p in r.hidden.parameters():
            if p.grad is not None:
                p.grad.copy_(acc.reduce(p.grad, "mean"))
    values = torch.stack(losses)
    bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
    if bad:
        raise TrainingError(f"non-finite loss ({float(values[bad[0]])}) at step {step + 1}, micro-batch {bad[0]}; "
                            f"the optimizer step was not taken; last good checkpoint: {last_ckpt or 'none'} "
                            f"(lower optim.lr or check the data)")
    metrics: dict[str, float] = {}
    for hook in ([r.router] if r.router is not None else []) + grad_hooks:
        metrics.update(hook(acc.unwrap_model(r.model), step) or {})
    acc.unscale_gradients()  # fp16-mixed: the norm and the clipping see the true gradients
    metrics["grad_norm"] = sharding.grad_norm(r.trainable, cfg.optim.grad_clip)
    metrics["lr"] = r.sched.get_last_lr()[0]
    r.opt.step()
    r.sched.step()
    r.opt.zero_grad(set_to_none=True)
    if cfg.objective.on_policy is not None:
        metrics["on_policy"] = 1.0 if on_policy else 0.0
    sums.reduce(acc)
    sums.v["steps"] = 1.0
    return sums, metrics


# --------------------------------------------------------------------------- set-up of a run


@dataclass
class _Run:
    """Everything the loop reads, resolved once by :func:`_prepare`."""

    cfg: TrainConfig
    acc: Any
    dir: Path
    tokenizer: Any
    rows: list[kdata.TokenizedRow]
    val_rows: list[kdata.TokenizedRow]
    pad_id: int
    real_vocab: int
    model: torch.nn.Module
    trainable: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    sched: Any
    src: Sources
    chunked: bool
    world: int
    rank: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    head_checked: bool = False
    probes: list[Probe] = field(default_factory=list)
    early: EarlyStop | None = None
    router: Router | None = None
    hidden: HiddenDistill | None = None

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def epochs_path(self) -> Path:
        return self.dir / "epochs.jsonl"

    @property
    def probes_path(self) -> Path:
        return self.dir / "probes.jsonl"


def _open_run(run: Path, cfg: TrainConfig, resume: bool, log: Callable[[str], None]
              ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Refuse a run directory that is not ours to write, or a resume whose config or inputs changed. Returns
    the summary of a run that already completed (else None) and the inputs' identity."""
    if not resume and run.exists() and any(run.iterdir()):
        raise TrainingError(f"{run}: run directory is not empty; pass --resume to continue it or choose another --out")
    inputs = run_inputs(cfg)
    if resume and run.is_dir() and any(run.iterdir()):
        if not (run / INPUTS_FILE).is_file():
            log(f"note: {run} has no {INPUTS_FILE} (made before kdkit recorded its inputs): inputs not checked")
        check_resume(run, cfg, inputs)
        done = finished(run)
        if done is not None:
            log(f"{run}: the run is complete ({done['steps']} steps, final/ written); nothing to resume")
            return {"run_dir": str(run), "steps": done["steps"], "max_weight_change": None, "seconds": 0.0,
                    "already_complete": True}, inputs
    return None, inputs


def _prepare(cfg: TrainConfig, run: Path, acc: Any, fresh: bool, log: Callable[[str], None]) -> _Run:
    """Data, student, sources, optimizer and schedule, placed on the run's devices."""
    tokenizer = load_tokenizer(cfg.student.path)
    rows, val_rows, rep = load_rows(cfg, tokenizer)
    log(f"data: {rep.summary(cfg.data.max_length)}")
    pad = pad_id(tokenizer)
    # validate's checks, before any weight is read: what validate accepts, this runs
    try:
        preflight(cfg, rows, tokenizer, int(model_config(cfg.student.path).get("vocab_size", len(tokenizer))))
    except KdkitError as e:
        e.same_on_every_rank = True  # every rank checks the same config and files: rank 0 reports it
        raise

    model = _load_student(cfg)
    src = open_sources(cfg, rows, tokenizer, int(model.get_output_embeddings().weight.shape[0]), student=model)
    for m in (model, *src.modules()):
        # bitsandbytes places quantised weights on the GPU when loading and refuses .to()
        if not (getattr(m, "is_loaded_in_4bit", False) or getattr(m, "is_loaded_in_8bit", False)):
            m.to(acc.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise TrainingError("the student has no trainable parameter")
    hidden = _hidden_distill(cfg, model, src, acc.device)
    if hidden is not None:  # the projections train with the student (after its parameters: one optimizer)
        trainable = trainable + list(hidden.parameters())
    if fresh:
        with storage(run):
            save_file(sharding.full_trainable(model), str(run / "initial_trainable.safetensors"))
    o = cfg.optim
    opt = torch.optim.AdamW(trainable, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    world, rank = acc.num_processes, acc.process_index
    global_batch = o.micro_batch * o.grad_accum * world
    steps_per_epoch = math.ceil(len(rows) / global_batch)
    total_steps = min(o.max_steps or 10**12, o.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o.schedule, o.warmup_steps, total_steps))
    why_not = use_chunked(cfg, model)
    if why_not and cfg.objective.chunk_size:
        log(f"note: using the dense loss path ({why_not})")
    model, opt = acc.prepare(model, opt)
    if sharding.is_sharded(model):  # FSDP2 replaced the parameters by their shards
        trainable = [p for p in model.parameters() if p.requires_grad]
    r = _Run(cfg, acc, run, tokenizer, rows, val_rows, pad, len(tokenizer), model, trainable, opt, sched, src,
             why_not is None, world, rank, global_batch, steps_per_epoch, total_steps, hidden=hidden)
    if cfg.routing is not None:  # directions from the initial weights (a resume loads the saved ones)
        r.router = Router(unwrap(model), cfg.routing, tokenizer, pad)
    if cfg.probes is not None:
        r.probes = load_probes(cfg.probes, tokenizer)
        r.early = EarlyStop(cfg.early_stop) if cfg.early_stop is not None else None
    if acc.is_main_process:
        _write_run_meta(r, why_not)
    return r


def _hidden_distill(cfg: TrainConfig, model: torch.nn.Module, src: Sources, device: torch.device
                    ) -> HiddenDistill | None:
    if cfg.objective.hidden is None:
        return None
    h = cfg.objective.hidden
    s_cfg, t_cfg = unwrap(model).config, src.teacher.model.config
    src.teacher.keep_hidden = tuple(sorted(set(h.layers.values())))
    return HiddenDistill(h, s_cfg.hidden_size, t_cfg.hidden_size, s_cfg.num_hidden_layers,
                         t_cfg.num_hidden_layers).to(device)


def _write_run_meta(r: _Run, why_not: str | None) -> None:
    cfg = r.cfg
    manifest_sha = (sha256_file(Path(cfg.teacher.cache) / "manifest.json")
                    if cfg.teacher is not None and cfg.teacher.cache else None)
    atomic_write_bytes(r.dir / "config.yaml", dump_config(cfg).encode())
    atomic_write_json(r.dir / "run.json", {
        "kdkit_version": __version__, "git_revision": _git_revision(), "torch": torch.__version__,
        "distributed": str(r.acc.distributed_type.value).lower(),
        "teacher_cache_manifest_sha256": manifest_sha, "world_size": r.world, "rows": len(r.rows),
        "loss_path": f"dense ({why_not})" if why_not else
        f"chunked ({resolved_chunk(cfg.objective.chunk_size, r.real_vocab)} positions)",
        "precision": cfg.optim.precision, "gradient_checkpointing": cfg.optim.gradient_checkpointing,
        "steps_per_epoch": r.steps_per_epoch, "total_steps": r.total_steps})


def _restore(r: _Run, ckpt: Path | None, log: Callable[[str], None]) -> tuple[int, Sums]:
    """The step and epoch sums to continue from; the logs cut back to that step."""
    step, epoch_sums = 0, Sums()
    if ckpt is not None:
        state = load_checkpoint(ckpt, r.acc.unwrap_model(r.model), r.opt)
        step = int(state["global_step"])
        epoch_sums.v.update(state["epoch_sums"])
        if r.early is not None:
            r.early.load(state["early_stop"])
        extra = load_extra(ckpt)
        if r.router is not None:
            r.router.load(extra)
        if r.hidden is not None:
            r.hidden.load_state_dict({k[len("hidden."):]: v for k, v in extra.items() if k.startswith("hidden.")})
        o = r.cfg.optim
        r.sched = torch.optim.lr_scheduler.LambdaLR(r.opt, lr_lambda(o.schedule, o.warmup_steps, r.total_steps),
                                                    last_epoch=step - 1)
        log(f"resumed from {ckpt} at step {step}")
    if r.acc.is_main_process:
        _truncate_jsonl(r.metrics_path, lambda row: row["step"] <= step)
        _truncate_jsonl(r.epochs_path, lambda row: row["step"] <= step)
        _truncate_jsonl(r.probes_path, lambda row: row["step"] <= step)
    return step, epoch_sums


# --------------------------------------------------------------------------- the loop


def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    grad_hooks: list[GradHook] | None = None,
) -> dict[str, Any]:
    """Train a student as ``cfg`` says, writing the run into ``out_dir``; returns a summary."""
    from accelerate.utils import set_seed
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    if int(os.environ.get("RANK", "0")) != 0:
        log = _quiet  # one voice per run under torchrun / accelerate launch: rank 0's
    run = Path(out_dir)
    done, inputs = _open_run(run, cfg, resume, log)
    if done is not None:
        return done
    ckpt = newest_checkpoint(run) if resume else None
    run.mkdir(parents=True, exist_ok=True)
    mixed = {"bf16-mixed": "bf16", "fp16-mixed": "fp16"}.get(cfg.optim.precision, "no")
    # Accelerate keeps one state per process; a second run in the same process (a ladder, the tests) may ask
    # for another precision. The process group (PartialState) is kept.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    acc = sharding.make_accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed,
                                    log_with="tensorboard" if cfg.logging.tensorboard else None,
                                    project_dir=str(run))
    sharding.check_supported(cfg.model_dump(), acc)
    set_seed(cfg.optim.seed)
    r = _prepare(cfg, run, acc, ckpt is None, log)
    if acc.is_main_process:  # after every check passed: a refused run leaves its directory as it was
        atomic_write_json(run / INPUTS_FILE, inputs)
    if cfg.logging.tensorboard:
        acc.init_trackers("kdkit")
    step, epoch_sums = _restore(r, ckpt, log)
    stopped = bool(r.probes) and step == 0 and _probe(r, 0, log) == "stop"

    bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), disable=not (progress and acc.is_main_process))
    r.model.train()
    t_start = time.perf_counter()
    last_ckpt: Path | None = ckpt
    with _Interrupts(log) as interrupts, bar:
        task = bar.add_task("train", total=r.total_steps, completed=step, info="")
        while step < r.total_steps and not stopped:
            t0 = time.perf_counter()
            batches, on_policy = _step_batches(r, step)
            step_sums, metrics = _optimizer_step(r, step, batches, on_policy, grad_hooks or [], last_ckpt)
            step += 1
            epoch_sums.merge(step_sums)
            summary = _log_step(r, step, step_sums, metrics, time.perf_counter() - t0)
            bar.update(task, completed=step, info=f"loss {summary['total_loss']:.4f}")
            _fault("after_step", step)
            if r.probes and (step % cfg.probes.every == 0 or step == r.total_steps):
                stopped = _probe(r, step, log) == "stop"
            if step % r.steps_per_epoch == 0 or step == r.total_steps or stopped:
                _end_epoch(r, step, epoch_sums)
                epoch_sums = Sums()
            state = {"global_step": step, "epoch_sums": epoch_sums.v, "total_steps": r.total_steps,
                     "early_stop": r.early.state() if r.early is not None else None}
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < r.total_steps and not stopped:
                last_ckpt = _save_checkpoint(r, state)
                _fault("after_checkpoint", step)
            if step < r.total_steps and not stopped and interrupts.agreed(acc):
                _stop_interrupted(r, step, state, last_ckpt, log)

    acc.wait_for_everyone()
    final_step = _early_stopped(r, step, log) if stopped else step
    drift = _drift(r, run / "initial_trainable.safetensors")
    if drift <= cfg.drift_tolerance and not stopped:
        raise TrainingError(
            f"no trainable weight moved more than drift_tolerance = {cfg.drift_tolerance:g} (max |Δ| = {drift:.3g}) "
            f"after {step} steps: "
            f"the run would return its input unchanged (check optim.lr, the data's targets, the objective)")
    _save_final(r, final_step)
    if cfg.logging.tensorboard:
        acc.end_training()
    return {"run_dir": str(run), "steps": final_step, "max_weight_change": drift,
            "seconds": time.perf_counter() - t_start, "early_stopped_at": step if stopped else None}


LAST_GOOD = "last_good_trainable.safetensors"


def _probe(r: _Run, step: int, log: Callable[[str], None]) -> str:
    """A probe round after ``step``: its rows written, the coherence floor applied ('none' without one)."""
    live = [s for s in (r.src.reference, r.src.teacher) if s is not None and s.scores_any_tokens]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):  # greedy, but never let a probe move the training RNG
        records, row = probe_round(unwrap(r.model), r.tokenizer, r.probes, r.cfg.probes, step,
                                   live[0] if live else None, r.real_vocab)
    if live:
        row["probe_kl_to"] = live[0].what
    verdict = r.early.update(step, row["probe_coherence"]) if r.early is not None else "none"
    if r.early is not None:
        row["coherence_floor"] = verdict
    if r.acc.is_main_process:
        for rec in records:
            _append_jsonl(r.probes_path, rec)
        _append_jsonl(r.metrics_path, row)
        if verdict == "good":  # the weights final/ falls back to if the run later drops below the floor
            save_file(sharding.full_trainable(r.acc.unwrap_model(r.model)), str(r.dir / f".tmp-{LAST_GOOD}"))
            os.replace(r.dir / f".tmp-{LAST_GOOD}", r.dir / LAST_GOOD)
    if verdict == "stop":
        log(f"early stop after step {step}: probe coherence {row['probe_coherence']:.3f} below the floor "
            f"{r.cfg.early_stop.coherence_floor} for {r.cfg.early_stop.patience} round(s)")
    return verdict


def _early_stopped(r: _Run, step: int, log: Callable[[str], None]) -> int:
    """Put the weights of the last probe round at or above the floor back (the initial ones if none was),
    record the stop in run.json, and return that round's step: final/ holds those weights."""
    good = r.early.last_good_step
    source = r.dir / (LAST_GOOD if good is not None else "initial_trainable.safetensors")
    weights = load_file(str(source))
    params = dict(r.acc.unwrap_model(r.model).named_parameters())
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    final_step = good if good is not None else 0
    if r.acc.is_main_process:
        meta = json.loads((r.dir / "run.json").read_text())
        meta["early_stop"] = {"stopped_after_step": step, "final_step": final_step,
                              "coherence_floor": r.cfg.early_stop.coherence_floor,
                              "patience": r.cfg.early_stop.patience, "probe_coherence": r.early.history}
        atomic_write_json(r.dir / "run.json", meta)
    log(f"final/ holds the weights of step {final_step}, the last probe round at or above the floor")
    return final_step


def _log_step(r: _Run, step: int, sums: Sums, metrics: dict[str, float], dt: float) -> dict[str, float]:
    """A metrics.jsonl row (every ``logging.every`` steps and at the end); the step's loss summary."""
    summary = sums.summary(per_step_total=True)
    if r.acc.is_main_process and (step % r.cfg.logging.every == 0 or step == r.total_steps):
        row = {"step": step, "epoch": (step - 1) // r.steps_per_epoch, "tokens": sums.v["tok"], "step_time_s": dt,
               "tokens_per_s": sums.v["tok"] / max(dt, 1e-9), **summary, **metrics}
        _append_jsonl(r.metrics_path, row)
        if r.cfg.logging.tensorboard:
            r.acc.log({k: v for k, v in row.items() if isinstance(v, int | float)}, step=step)
    return summary


def _end_epoch(r: _Run, step: int, epoch_sums: Sums) -> None:
    """The epoch's row in epochs.jsonl, with the validation loss (and KL to a live teacher)."""
    live = r.src.teacher if r.src.teacher is not None and r.src.teacher.scores_any_tokens else None
    ev = evaluate_loss(r.acc.unwrap_model(r.model), r.val_rows, r.cfg, r.pad_id, r.real_vocab, r.acc.device,
                       live) if r.val_rows else {}
    if r.acc.is_main_process:
        summary = epoch_sums.summary(True)
        _append_jsonl(r.epochs_path, {"epoch": (step - 1) // r.steps_per_epoch, "step": step,
                                      "train_loss": summary["total_loss"], **summary, **ev})


def _stop_interrupted(r: _Run, step: int, state: dict[str, Any], last_ckpt: Path | None,
                      log: Callable[[str], None]) -> None:
    """Ctrl-C: a checkpoint at this step boundary (unless one was just written), then stop."""
    if last_ckpt is None or last_ckpt.name != f"step-{step:07d}":
        last_ckpt = _save_checkpoint(r, state)
    log(f"interrupted after step {step}: saved {last_ckpt}; continue with --resume")
    raise KeyboardInterrupt


def _save_final(r: _Run, step: int) -> None:
    """final/: every rank gathers (a collective when the model is sharded); rank 0 writes."""
    model = r.acc.unwrap_model(r.model)
    full = sharding.full_model(model, trainable_only=r.cfg.student.lora is not None)
    if r.acc.is_main_process:
        save_final(r.dir, model, r.tokenizer, r.cfg, step, full)
        if r.hidden is not None and len(r.hidden.proj):  # the run keeps its projections; a merged pack does not
            save_file({k: v.detach().cpu().contiguous() for k, v in r.hidden.state_dict().items()},
                      str(r.dir / "final" / "hidden_projection.safetensors"))


def _save_checkpoint(r: _Run, state: dict[str, Any]) -> Path:
    """Every rank gathers (a collective when the model is sharded); rank 0 writes."""
    r.acc.wait_for_everyone()
    model = r.acc.unwrap_model(r.model)
    weights, opt_state = sharding.full_trainable(model), sharding.full_optimizer(model, r.opt)
    path = r.dir / "checkpoints" / f"step-{state['global_step']:07d}"
    if r.acc.is_main_process:
        path = save_checkpoint(r.dir, weights, opt_state, state, r.cfg.checkpoint.keep, _extra(r))
    r.acc.wait_for_everyone()
    return path


def _extra(r: _Run) -> dict[str, torch.Tensor] | None:
    """Loop state beside the model's weights: routing directions, hidden-state projections."""
    out = r.router.state() if r.router is not None else {}
    if r.hidden is not None:
        out.update({f"hidden.{k}": v.detach().cpu().contiguous() for k, v in r.hidden.state_dict().items()})
    return out or None


def _drift(r: _Run, initial_path: Path) -> float:
    """The largest change of any trainable weight since the start (the same on every rank)."""
    cur = sharding.full_trainable(r.acc.unwrap_model(r.model))
    init = load_file(str(initial_path)) if cur else {}
    local = max((float((cur[n].float() - init[n].float()).abs().max()) for n in init), default=0.0)
    return float(r.acc.reduce(torch.tensor(local, dtype=torch.float64, device=r.acc.device), "max"))


def _quiet(message: str) -> None:
    return None


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, rows: list[kdata.TokenizedRow], cfg: TrainConfig, pad_id: int,
                  real_vocab: int, device: torch.device, teacher: Signal | None = None) -> dict[str, float]:
    """Validation CE per target token, and KL(teacher ‖ student) per target token when the teacher can score
    any rows (a live model)."""
    was_training = model.training
    model.eval()
    ce_sum = kl_sum = 0.0
    n = 0
    for i in range(0, len(rows), cfg.optim.micro_batch):
        batch = kdata.collate(rows[i:i + cfg.optim.micro_batch], pad_id).to(device)
        logits = vocab_logits(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1],
                              real_vocab, "student").float()
        valid = batch.targets != kdata.IGNORE_INDEX
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.targets, reduction="none")
        ce_sum += float(ce[valid].sum())
        n += int(valid.sum())
        if teacher is not None:
            div = token_divergence(logits, teacher(batch, model), "kl_fwd", temperature=cfg.objective.kd.temperature,
                                   t2_scale=False)
            kl_sum += float(aggregate(div, valid, "sum"))
    model.train(was_training)
    out = {"val_loss": ce_sum / max(n, 1)}
    if teacher is not None:
        out["val_kl"] = kl_sum / max(n, 1)
    return out


def count_parameters(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))
