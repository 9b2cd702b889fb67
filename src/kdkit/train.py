"""``kdkit train``: one loop for distillation and KL-anchored fine-tuning.

Read :func:`train` top to bottom: set-up, then for every optimizer step
forward → loss → backward (per micro-batch) → gradient edits → clip → optimizer,
then metrics and checkpoints. Everything a user varies is in :class:`TrainConfig`.

A run directory holds ``config.yaml`` (resolved), ``run.json`` (git revision,
cache manifest hash, versions), ``metrics.jsonl`` (per logged step),
``epochs.jsonl`` (per epoch), ``checkpoints/step-NNNNNNN/`` and ``final/``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kdkit import __version__
from kdkit import data as kdata
from kdkit.cache import TeacherCache, verify_cache
from kdkit.config import TrainConfig, dump_config
from kdkit.errors import KdkitError
from kdkit.io import atomic_write_bytes, atomic_write_json, check_output_dir, fsync_dir
from kdkit.losses import TopK, aggregate, token_divergence
from kdkit.models import (
    ModelError,
    check_model_dir,
    check_quantisation,
    load_causal_lm,
    load_tokenizer,
    sha256_file,
    tokenizer_fingerprint,
    vocab_logits,
)
from kdkit.objective import (
    ObjectiveOutput,
    StepDenominator,
    compute_objective,
    compute_objective_chunked,
    token_weights,
)

GradHook = Callable[[torch.nn.Module, int], dict[str, float] | None]
"""Called after backward and before clipping, once per optimizer step: the place for
gradient edits (projection, routing). May return metrics to log."""


class TrainingError(KdkitError, RuntimeError):
    """Training cannot continue; the message names the step and what to do."""


FAULT_ENV = "KDKIT_FAULT_TRAIN"
PACK_FILE = "kdkit_pack.json"  # written by merge into every pack: the pack's marker


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


@dataclass
class Sources:
    """Where the teacher and the barrier reference come from, resolved once."""

    teacher_cache: TeacherCache | None = None
    teacher_model: torch.nn.Module | None = None
    reference_cache: TeacherCache | None = None
    reference_model: torch.nn.Module | None = None
    reference_is_adapter_base: bool = False
    head_checked: bool = False  # the chunked path's "hidden state feeds the LM head" check ran once


def _cache_for(path: str, rows: list[kdata.TokenizedRow], tok_sha: str, vocab_rows: int, what: str,
               verify: bool = False) -> TeacherCache:
    cache = TeacherCache(path)
    if verify:  # `kdkit validate`: every shard training will read is present and sound
        problems = verify_cache(path)
        if problems:
            raise TrainingError(f"{what} cache {path} is damaged: {'; '.join(problems)} (rerun the same "
                                f"`kdkit precompute` to repair it)")
    # The data fingerprint covers the token ids after truncation, so max_length needs no separate check.
    cache.check_compatible(data=kdata.data_fingerprint(rows))
    cache.check_student_vocab(tok_sha, vocab_rows)
    if len(cache) != len(rows):
        raise TrainingError(f"{what} cache {path} has {len(cache)} rows, the data has {len(rows)}")
    return cache


def _check_live_vocab(path: str, field: str, student_tok_sha: str, real_vocab: int) -> None:
    """A live model must share the student's tokenizer and have a logit for every real token; rows past
    the tokenizer's vocabulary (padding, possibly more than the student's) are dropped."""
    tok = load_tokenizer(path)
    if tokenizer_fingerprint(tok)["sha256"] != student_tok_sha:
        raise TrainingError(f"{field}: {path} has another tokenizer than the student (ids would mean different "
                            f"text); kdkit distils between models that share a tokenizer")
    cfg_path = Path(path) / "config.json"
    rows = json.loads(cfg_path.read_text()).get("vocab_size") if cfg_path.is_file() else None
    if isinstance(rows, int) and rows < real_vocab:
        raise TrainingError(f"{field}: {path} has {rows} output rows but the tokenizer has {real_vocab} tokens")


def check_sources(cfg: TrainConfig, rows: list[kdata.TokenizedRow], tokenizer: Any, vocab_rows: int,
                  verify: bool = False) -> None:
    """Compatibility checks shared by ``kdkit validate`` and ``kdkit train`` (``verify``: also re-hash every
    cache shard and check model directories, as validate does without loading anything)."""
    tok_sha = tokenizer_fingerprint(tokenizer)["sha256"]
    if verify:
        check_model_dir(cfg.student.path, "student.path:")
        if cfg.teacher is not None and cfg.teacher.model:
            check_model_dir(cfg.teacher.model, "teacher.model:")
        if cfg.reference is not None and cfg.reference.kind == "model":
            check_model_dir(cfg.reference.path, "reference.path:")
    if cfg.teacher is not None and cfg.teacher.model:
        _check_live_vocab(cfg.teacher.model, "teacher.model", tok_sha, len(tokenizer))
    if cfg.reference is not None and cfg.reference.kind == "model":
        _check_live_vocab(cfg.reference.path, "reference.path", tok_sha, len(tokenizer))
    if cfg.teacher is not None and cfg.teacher.cache:
        cache = _cache_for(cfg.teacher.cache, rows, tok_sha, vocab_rows, "teacher", verify)
        if cache.temperature != cfg.objective.kd.temperature:
            raise TrainingError(
                f"teacher cache {cfg.teacher.cache} was captured at temperature {cache.temperature} but "
                f"objective.kd.temperature is {cfg.objective.kd.temperature}; a top-K teacher cannot be "
                f"re-tempered — precompute again or set objective.kd.temperature={cache.temperature}"
            )
    if cfg.reference is not None and cfg.reference.kind == "cache":
        ref = _cache_for(cfg.reference.path, rows, tok_sha, vocab_rows, "reference", verify)
        if ref.temperature != cfg.objective.barrier.temperature:
            raise TrainingError(
                f"reference cache {cfg.reference.path} was captured at temperature {ref.temperature} but "
                f"objective.barrier.temperature is {cfg.objective.barrier.temperature}; precompute the reference "
                f"again or set objective.barrier.temperature={ref.temperature}")
    seen_roles = {r.role for r in rows}
    for role in cfg.objective.roles:
        if role not in seen_roles:
            raise TrainingError(f"objective.roles.{role}: role {role!r} never occurs in {cfg.data.train} "
                                f"(roles there: {', '.join(sorted(seen_roles))})")
    seen_tasks = {r.task for r in rows}
    for task in cfg.objective.task_weights:
        if task not in seen_tasks:
            raise TrainingError(f"objective.task_weights.{task}: task {task!r} never occurs in {cfg.data.train}")
    check_quantisation(cfg.student.load_in, "student.load_in")
    if cfg.teacher is not None:
        check_quantisation(cfg.teacher.load_in, "teacher.load_in")
    if cfg.logging.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise TrainingError("logging.tensorboard is true but tensorboard is not installed "
                                "(pip install tensorboard)") from None


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
    return model


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _sources(cfg: TrainConfig, student: torch.nn.Module) -> Sources:
    src = Sources()
    if cfg.teacher is not None:
        if cfg.teacher.cache:
            src.teacher_cache = TeacherCache(cfg.teacher.cache)
        else:
            src.teacher_model = _frozen(load_causal_lm(cfg.teacher.model, cfg.teacher.dtype, cfg.teacher.load_in,
                                                       "teacher.load_in"))
    if cfg.reference is not None:
        if cfg.reference.kind == "cache":
            src.reference_cache = TeacherCache(cfg.reference.path)
        elif cfg.reference.kind == "model":
            src.reference_model = _frozen(load_causal_lm(cfg.reference.path, cfg.student.dtype))
        elif cfg.student.lora is not None:
            src.reference_is_adapter_base = True  # the same weights with adapters off: no second copy
        else:
            src.reference_model = _frozen(copy.deepcopy(student))
    return src


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


# --------------------------------------------------------------------------- checkpoints


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _opt_to_files(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _opt_from_files(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def newest_checkpoint(run_dir: Path) -> Path | None:
    ck = run_dir / "checkpoints"
    done = sorted(p for p in ck.glob("step-*") if (p / "COMPLETE").is_file()) if ck.is_dir() else []
    return done[-1] if done else None


def save_checkpoint(run_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any],
                    keep: int) -> Path:
    """Write ``checkpoints/step-N`` atomically: a temp dir, a COMPLETE marker last, then rename."""
    ck = run_dir / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    final = ck / f"step-{state['global_step']:07d}"
    tmp = ck / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_trainable(model), str(tmp / "trainable.safetensors"))
    tensors, meta = _opt_to_files(opt)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    atomic_write_json(tmp / "optimizer.json", meta)
    save_file(_rng_states(), str(tmp / "rng.safetensors"))
    atomic_write_json(tmp / "state.json", state)
    atomic_write_bytes(tmp / "COMPLETE", b"ok\n")
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(ck)
    for old in sorted(p for p in ck.glob("step-*") if (p / "COMPLETE").is_file())[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in weights.items():
            if n not in params:
                raise TrainingError(f"{path}: parameter {n} is not in the model; was the config changed?")
            params[n].copy_(t)
    _opt_from_files(opt, load_file(str(path / "optimizer.safetensors")),
                    json.loads((path / "optimizer.json").read_text()))
    _set_rng_states(load_file(str(path / "rng.safetensors")))
    return json.loads((path / "state.json").read_text())


def _rng_states() -> dict[str, torch.Tensor]:
    """The CPU generator and every CUDA device's: dropout on any device resumes exactly."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda.{i}"] = st
    return states


def _set_rng_states(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    cuda = [states[k] for k in sorted((k for k in states if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            raise TrainingError(f"the checkpoint holds the RNG state of {len(cuda)} GPU(s), this machine has "
                                f"{torch.cuda.device_count()}; an exact resume needs the same devices")
        torch.cuda.set_rng_state_all(cuda)


# Settings that do not change what is trained: a resume may change them.
RESUME_FREE = ("logging", "checkpoint")


def config_changes(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """``field: old → new`` for every field that differs (except :data:`RESUME_FREE` sections)."""
    out = []
    for k in sorted(set(saved) | set(now)):
        name = f"{prefix}{k}"
        if not prefix and k in RESUME_FREE:
            continue
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{name}.")
        elif a != b:
            out.append(f"{name}: {a!r} → {b!r}")
    return out


def _check_resume(run: Path, cfg: TrainConfig) -> None:
    import yaml

    saved_path = run / "config.yaml"
    if not saved_path.is_file():
        raise TrainingError(f"{run}: no config.yaml — not a kdkit run directory, nothing to resume")
    changes = config_changes(yaml.safe_load(saved_path.read_text()) or {}, cfg.model_dump(mode="json"))
    if changes:
        raise TrainingError(f"--resume with a config that differs from {saved_path} in what is trained: "
                            f"{'; '.join(changes)}. Resume with the saved config, or start a new run with another --out")


# --------------------------------------------------------------------------- metrics


@dataclass
class Sums:
    """Token-weighted running sums, reduced across micro-batches and ranks."""

    keys = ("total", "ce", "tok", "kl", "kd_tok", "barrier", "tail", "agree", "steps")
    v: dict[str, float] = field(default_factory=lambda: dict.fromkeys(Sums.keys, 0.0))

    def add_output(self, out: ObjectiveOutput) -> None:
        m = out.metrics
        self.v["total"] += m["total_loss"]
        self.v["ce"] += m["ce_loss"] * m["tokens"]
        self.v["tok"] += m["tokens"]
        kd_tok = m.get("kd_tokens", 0.0)
        self.v["kl"] += m.get("kl_loss", 0.0) * kd_tok
        self.v["kd_tok"] += kd_tok
        self.v["barrier"] += m.get("barrier", 0.0)
        self.v["tail"] += m.get("tail_mass", 0.0) * kd_tok
        self.v["agree"] += m.get("top1_agree", 0.0) * kd_tok

    def merge(self, other: Sums) -> None:
        for k in self.keys:
            self.v[k] += other.v[k]

    def summary(self, per_step_total: bool) -> dict[str, float]:
        steps = max(self.v["steps"], 1.0) if per_step_total else 1.0
        out = {"total_loss": self.v["total"] / steps, "ce_loss": self.v["ce"] / max(self.v["tok"], 1.0),
               "barrier": self.v["barrier"] / steps}
        if self.v["kd_tok"]:
            out.update(kl_loss=self.v["kl"] / self.v["kd_tok"], tail_mass=self.v["tail"] / self.v["kd_tok"],
                       top1_agree=self.v["agree"] / self.v["kd_tok"])
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


# --------------------------------------------------------------------------- the step


def _signals(batch: kdata.Batch, rows: list[kdata.TokenizedRow], model: torch.nn.Module, src: Sources,
             device: torch.device) -> tuple[torch.Tensor | TopK | None, torch.Tensor | TopK | None]:
    seq = batch.targets.shape[1]
    uses_cache = src.teacher_cache is not None or src.reference_cache is not None
    expected = [rows[i].loss_positions() for i in batch.row_index] if uses_cache else None
    teacher: torch.Tensor | TopK | None = None
    if src.teacher_cache is not None:
        tk = src.teacher_cache.topk_batch(batch.row_index, seq, expected)
        teacher = TopK(tk.ids.to(device), tk.logprobs.to(device))
    elif src.teacher_model is not None:
        with torch.no_grad():
            teacher = src.teacher_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    reference: torch.Tensor | TopK | None = None
    if src.reference_cache is not None:
        tk = src.reference_cache.topk_batch(batch.row_index, seq, expected)
        reference = TopK(tk.ids.to(device), tk.logprobs.to(device))
    elif src.reference_model is not None or src.reference_is_adapter_base:
        with torch.no_grad():
            if src.reference_is_adapter_base:
                inner = _unwrap(model)  # DDP's wrapper has no disable_adapter; no gradient flows here anyway
                with inner.disable_adapter():
                    reference = inner(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
            else:
                reference = src.reference_model(input_ids=batch.input_ids,
                                                attention_mask=batch.attention_mask).logits[:, :-1]
    return teacher, reference


def _to(batch: kdata.Batch, device: torch.device) -> kdata.Batch:
    batch.input_ids = batch.input_ids.to(device)
    batch.attention_mask = batch.attention_mask.to(device)
    batch.targets = batch.targets.to(device)
    batch.weights = batch.weights.to(device)
    return batch


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
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"the LM head is a {type(head).__name__} (e.g. LoRA on lm_head), not a plain Linear"
    return None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _head(model: torch.nn.Module) -> torch.nn.Linear:
    return _unwrap(model).get_output_embeddings()


def _forward_loss(model, batch, rows, cfg, src, denom, real_vocab, device, chunked: bool) -> ObjectiveOutput:
    teacher, reference = _signals(batch, rows, model, src, device)
    if teacher is not None and not isinstance(teacher, TopK):
        teacher = vocab_logits(teacher, real_vocab, "teacher")
    if reference is not None and not isinstance(reference, TopK):
        reference = vocab_logits(reference, real_vocab, "reference")
    if chunked:
        # Only the last position's logits are materialised by the model; the loss is computed from the
        # final hidden states, chunk by chunk. Padded embedding rows are dropped from the head.
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True,
                    logits_to_keep=1)
        hidden = out.hidden_states[-1]
        head = _head(model)
        if not src.head_checked:  # once per run: the architecture does not change between steps
            if not torch.allclose(head(hidden[:, -1]).float(), out.logits[:, -1].float(), rtol=1e-3, atol=1e-3,
                                  equal_nan=True):
                raise TrainingError("this model's last hidden state is not the LM head's input; "
                                    "set objective.chunk_size: 0")
            src.head_checked = True
        bias = None if head.bias is None else head.bias[:real_vocab]
        return compute_objective_chunked(hidden[:, :-1], head.weight[:real_vocab], batch.targets, cfg.objective,
                                         head_bias=bias, teacher=teacher, roles=batch.roles, tasks=batch.tasks,
                                         row_weights=batch.weights, denom=denom)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    logits = vocab_logits(logits, real_vocab, "student")
    return compute_objective(logits, batch.targets, cfg.objective, teacher=teacher, reference=reference,
                             roles=batch.roles, tasks=batch.tasks, row_weights=batch.weights, denom=denom)


@torch.no_grad()
def evaluate_loss(model, rows, cfg, pad_id, real_vocab, device, teacher_model=None) -> dict[str, float]:
    """Validation CE per target token, and KL to an online teacher per target token when there is one."""
    was_training = model.training
    model.eval()
    ce_sum = kl_sum = 0.0
    n = 0
    for i in range(0, len(rows), cfg.optim.micro_batch):
        batch = _to(kdata.collate(rows[i:i + cfg.optim.micro_batch], pad_id), device)
        logits = vocab_logits(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1],
                              real_vocab, "student").float()
        valid = batch.targets != kdata.IGNORE_INDEX
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.targets, reduction="none")
        ce_sum += float(ce[valid].sum())
        n += int(valid.sum())
        if teacher_model is not None:
            t = vocab_logits(teacher_model(input_ids=batch.input_ids,
                                           attention_mask=batch.attention_mask).logits[:, :-1], real_vocab, "teacher")
            kd = cfg.objective.kd
            div = token_divergence(logits, t, "kl_fwd", temperature=kd.temperature, t2_scale=False)
            kl_sum += float(aggregate(div, valid, "sum"))
    model.train(was_training)
    out = {"val_loss": ce_sum / max(n, 1)}
    if teacher_model is not None:
        out["val_kl"] = kl_sum / max(n, 1)
    return out


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
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if int(os.environ.get("RANK", "0")) != 0:
        log = _quiet  # one voice per run under torchrun / accelerate launch: rank 0's
    run = Path(out_dir)
    if not resume and run.exists() and any(run.iterdir()):
        raise TrainingError(f"{run}: run directory is not empty; pass --resume to continue it or choose another --out")
    if resume and run.is_dir() and any(run.iterdir()):
        _check_resume(run, cfg)
        done = _finished(run)
        if done is not None:
            log(f"{run}: the run is complete ({done['steps']} steps, final/ written); nothing to resume")
            return {"run_dir": str(run), "steps": done["steps"], "max_weight_change": None, "seconds": 0.0,
                    "already_complete": True}
    ckpt = newest_checkpoint(run) if resume else None
    run.mkdir(parents=True, exist_ok=True)
    acc = Accelerator(cpu=not torch.cuda.is_available(), log_with="tensorboard" if cfg.logging.tensorboard else None,
                      project_dir=str(run))
    set_seed(cfg.optim.seed)
    device = acc.device

    tokenizer = load_tokenizer(cfg.student.path)
    d = cfg.data
    rows, rep = kdata.load_dataset(tokenizer, d.train, max_length=d.max_length, on_empty=d.on_empty,
                                   truncation=d.truncation)
    val_rows = (kdata.load_dataset(tokenizer, d.validation, max_length=d.max_length, truncation=d.truncation)[0]
                if d.validation else [])
    log(f"data: {rep.summary(d.max_length)}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    real_vocab = len(tokenizer)

    model = _load_student(cfg)
    vocab_rows = int(model.get_output_embeddings().weight.shape[0])
    check_sources(cfg, rows, tokenizer, vocab_rows)
    src = _sources(cfg, model)
    for m in (model, src.teacher_model, src.reference_model):
        # bitsandbytes places quantised weights on the GPU when loading and refuses .to()
        if m is not None and not (getattr(m, "is_loaded_in_4bit", False) or getattr(m, "is_loaded_in_8bit", False)):
            m.to(device)

    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise TrainingError("the student has no trainable parameter")
    initial_path = run / "initial_trainable.safetensors"
    if ckpt is None:
        save_file(_trainable(model), str(initial_path))
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

    manifest_sha = (sha256_file(Path(cfg.teacher.cache) / "manifest.json")
                    if cfg.teacher is not None and cfg.teacher.cache else None)
    if acc.is_main_process:
        atomic_write_bytes(run / "config.yaml", dump_config(cfg).encode())
        atomic_write_json(run / "run.json", {
            "kdkit_version": __version__, "git_revision": _git_revision(), "torch": torch.__version__,
            "teacher_cache_manifest_sha256": manifest_sha, "world_size": world, "rows": len(rows),
            "loss_path": f"dense ({why_not})" if why_not else f"chunked ({cfg.objective.chunk_size} positions)",
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps})
    if cfg.logging.tensorboard:
        acc.init_trackers("kdkit")

    step, epoch_sums = 0, Sums()
    if ckpt is not None:
        state = load_checkpoint(ckpt, acc.unwrap_model(model), opt)
        step = int(state["global_step"])
        epoch_sums.v.update(state["epoch_sums"])
        log(f"resumed from {ckpt} at step {step}")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o.schedule, o.warmup_steps, total_steps),
                                              last_epoch=step - 1) if step else sched
    metrics_path, epochs_path = run / "metrics.jsonl", run / "epochs.jsonl"
    if acc.is_main_process:
        _truncate_jsonl(metrics_path, lambda r: r["step"] <= step)
        _truncate_jsonl(epochs_path, lambda r: r["step"] <= step)

    def state_dict() -> dict[str, Any]:
        return {"global_step": step, "epoch_sums": epoch_sums.v, "total_steps": total_steps}

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), disable=not (progress and acc.is_main_process))
    model.train()
    t_start = time.perf_counter()
    last_ckpt: Path | None = ckpt
    with _Interrupts(log) as interrupts, bar:
        task = bar.add_task("train", total=total_steps, completed=step, info="")
        while step < total_steps:
            t0 = time.perf_counter()
            epoch = step // steps_per_epoch
            ids = step_rows(len(rows), step, steps_per_epoch, global_batch, cfg.data.shuffle_seed)
            micro = micro_slices(ids, o.micro_batch, o.grad_accum, world, rank)
            batches = [kdata.collate([rows[i] for i in m], pad_id, m) if m else _empty_batch(rows, pad_id)
                       for m in micro]
            # One denominator for the whole step: every micro-batch of every rank.
            local = torch.tensor(sum(float(token_weights(b.targets, cfg.objective.ce_norm).sum()) for b in batches),
                                 dtype=torch.float64, device=device)
            denom = StepDenominator(float(acc.reduce(local, "sum")))
            step_sums = Sums()
            for j, b in enumerate(batches):
                b = _to(b, device)
                # Sync gradients across ranks only on the last micro-step: earlier ones accumulate locally.
                ctx = acc.no_sync(model) if j < len(batches) - 1 else _nullcontext()
                with ctx:
                    out = _forward_loss(model, b, rows, cfg, src, denom, real_vocab, device, why_not is None)
                    if not torch.isfinite(out.loss):
                        raise TrainingError(
                            f"non-finite loss ({float(out.loss.detach())}) at step {step + 1}, micro-batch {j}; "
                            f"last good checkpoint: {last_ckpt or 'none'} (lower optim.lr or check the data)")
                    # DDP averages gradients over ranks; the loss is already this rank's share of the
                    # step's sum, so undo the average to get the gradient of the global loss.
                    acc.backward(out.loss * world)
                step_sums.add_output(out)
                if j == 0:
                    _fault("mid_step", step + 1)
            hook_metrics: dict[str, float] = {}
            for hook in grad_hooks or []:
                hook_metrics.update(hook(acc.unwrap_model(model), step) or {})
            gnorm = float(acc.clip_grad_norm_(trainable, o.grad_clip) if o.grad_clip > 0 else
                          torch.norm(torch.stack([p.grad.norm() for p in trainable if p.grad is not None])))
            lr_now = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1

            packed = torch.tensor([step_sums.v[k] for k in Sums.keys], dtype=torch.float64, device=device)
            packed = acc.reduce(packed, "sum")
            step_sums.v = dict(zip(Sums.keys, packed.tolist(), strict=True))
            step_sums.v["steps"] = 1.0
            epoch_sums.merge(step_sums)
            dt = time.perf_counter() - t0
            summary = step_sums.summary(per_step_total=True)
            if acc.is_main_process and (step % cfg.logging.every == 0 or step == total_steps):
                row = {"step": step, "epoch": epoch, "lr": lr_now, "grad_norm": gnorm,
                       "tokens": step_sums.v["tok"], "step_time_s": dt,
                       "tokens_per_s": step_sums.v["tok"] / max(dt, 1e-9), **summary, **hook_metrics}
                _append_jsonl(metrics_path, row)
                if cfg.logging.tensorboard:
                    acc.log({k: v for k, v in row.items() if isinstance(v, int | float)}, step=step)
            bar.update(task, completed=step, info=f"loss {summary['total_loss']:.4f}")
            _fault("after_step", step)

            end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
            if end_of_epoch:
                ev = evaluate_loss(acc.unwrap_model(model), val_rows, cfg, pad_id, real_vocab, device,
                                   src.teacher_model) if val_rows else {}
                if acc.is_main_process:
                    _append_jsonl(epochs_path, {"epoch": epoch, "step": step,
                                                "train_loss": epoch_sums.summary(True)["total_loss"],
                                                **epoch_sums.summary(True), **ev})
                epoch_sums = Sums()
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < total_steps:
                acc.wait_for_everyone()
                if acc.is_main_process:
                    last_ckpt = save_checkpoint(run, acc.unwrap_model(model), opt, state_dict(), cfg.checkpoint.keep)
                _fault("after_checkpoint", step)
            if step < total_steps and interrupts.agreed(acc):
                acc.wait_for_everyone()
                if acc.is_main_process:
                    if last_ckpt is None or last_ckpt.name != f"step-{step:07d}":
                        last_ckpt = save_checkpoint(run, acc.unwrap_model(model), opt, state_dict(),
                                                    cfg.checkpoint.keep)
                    log(f"interrupted after step {step}: saved {last_ckpt}; continue with --resume")
                raise KeyboardInterrupt

    acc.wait_for_everyone()
    unwrapped = acc.unwrap_model(model)
    drift = _drift(unwrapped, initial_path)
    if drift <= cfg.drift_tolerance:
        raise TrainingError(
            f"no trainable weight moved more than drift_tolerance = {cfg.drift_tolerance:g} (max |Δ| = {drift:.3g}) "
            f"after {step} steps: "
            f"the run would return its input unchanged (check optim.lr, the data's targets, the objective)")
    if acc.is_main_process:
        _save_final(run, unwrapped, tokenizer, cfg, step)
    if cfg.logging.tensorboard:
        acc.end_training()
    return {"run_dir": str(run), "steps": step, "max_weight_change": drift,
            "seconds": time.perf_counter() - t_start}


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def _drift(model: torch.nn.Module, initial_path: Path) -> float:
    init = load_file(str(initial_path))
    cur = _trainable(model)
    return max(float((cur[n].float() - init[n].float()).abs().max()) for n in init)


def _quiet(message: str) -> None:
    return None


def _finished(run: Path) -> dict[str, Any] | None:
    """The final/ metadata of a run that completed, else None."""
    meta = run / "final" / "kdkit.json"
    return json.loads(meta.read_text()) if meta.is_file() else None


def _save_final(run: Path, model: torch.nn.Module, tokenizer: Any, cfg: TrainConfig, step: int) -> None:
    final, tmp = run / "final", run / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    atomic_write_json(tmp / "kdkit.json", {"kind": "lora" if cfg.student.lora else "full", "steps": step,
                                           "base": cfg.student.path})
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(run)


def merge(run_dir: str | Path, out: str | Path) -> Path:
    """Write a full HF model dir (a "pack") from a run's ``final/``: LoRA merged into the base."""
    run, out = Path(run_dir), Path(out)
    replace = check_output_dir(out, "--out", marker=PACK_FILE)  # an earlier pack may be replaced; nothing else
    final = run / "final"
    meta_path = final / "kdkit.json"
    if not meta_path.is_file():
        raise TrainingError(f"{run}: no final/kdkit.json — the run did not finish")
    meta = json.loads(meta_path.read_text())
    tokenizer = load_tokenizer(final)
    if meta["kind"] == "lora":
        from peft import PeftModel

        base = load_causal_lm(meta["base"])
        model = PeftModel.from_pretrained(base, str(final)).merge_and_unload()
    else:
        model = load_causal_lm(final)
    tmp = out.with_name(f".kdkit-tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    atomic_write_json(tmp / PACK_FILE, {"source_run": str(run.resolve()), "steps": meta["steps"],
                                        "config_sha256": sha256_file(run / "config.yaml")})
    if replace or out.is_dir():  # our earlier pack, or an empty directory
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def count_parameters(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


