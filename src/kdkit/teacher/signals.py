"""Teacher signals: where the distribution a student is compared with comes from.

Every source — a cache made by ``kdkit precompute``, a live model, the student itself with its
LoRA adapters switched off, a reference model or cache for the barrier — is a :class:`Signal`:
called with a collated batch and the student, it returns the signal at the batch's prediction
positions (dense logits ``[B, T, V]`` over the tokenizer's real vocabulary, or a :class:`TopK`).
``kdkit.train`` asks its sources for signals and does not know their kinds.

A source also owns its compatibility checks (tokenizer, data, K, temperature, vocabulary rows), run
once by :func:`kdkit.train.preflight.preflight` for ``kdkit validate`` and ``kdkit train`` alike.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from kdkit.config.schema import TrainConfig
from kdkit.data import rows as kdata
from kdkit.loss.crosstok import CrossTeacher, CrossTopK, VocabMap, teacher_view
from kdkit.loss.divergences import SampledTokens, TopK
from kdkit.models.load import (
    check_model_dir,
    check_quantisation,
    load_causal_lm,
    load_tokenizer,
    target_logits,
    tokenizer_fingerprint,
    vocab_logits,
)
from kdkit.teacher.cache import TeacherCache, verify_cache
from kdkit.teacher.cache.format import CacheError, CacheMismatch
from kdkit.teacher.crosstok import aligned_teacher_logits
from kdkit.util.errors import KdkitError


class SourceError(KdkitError, RuntimeError):
    """A teacher or reference source does not fit the student or the data; the message names the field."""

    exit_code = 1


class Signal(Protocol):
    """A teacher signal. ``scores_any_tokens``: whether it can score tokens that are not in the data
    (a model can; a cache holds the dataset's positions only), which on-policy distillation needs.
    A call returns the signal at every prediction position ([B, T-1, ...]), or with ``at_targets`` at the
    batch's target positions only, row-major ([N, ...]): all the chunked loss reads, and a model then runs
    its LM head on those positions alone."""

    what: str
    scores_any_tokens: bool

    def __call__(self, batch: kdata.Batch, student: torch.nn.Module, at_targets: bool = False) -> Tensor | TopK: ...


def _sampled(batch: kdata.Batch, teacher_logprobs: Tensor) -> SampledTokens:
    safe = batch.targets.clamp(min=0)
    return SampledTokens(batch.targets, teacher_logprobs.gather(-1, safe[..., None]).squeeze(-1))


def _whole_rows_only(at_targets: bool, what: str) -> None:
    if at_targets:
        raise ValueError(f"the {what} signal is not defined at the target positions alone")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (which has no ``disable_adapter``)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _logits(model: torch.nn.Module, batch: kdata.Batch, real_vocab: int, what: str, at_targets: bool) -> Tensor:
    if at_targets:
        return target_logits(model, batch, real_vocab, what)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    return vocab_logits(out, real_vocab, what)  # padded rows of the embedding matrix take no mass


@dataclass
class CachedSignal:
    """Top-K log-probs and the exact float32 tail mass stored by ``kdkit precompute`` for the training rows."""

    cache: TeacherCache
    rows: list[kdata.TokenizedRow]
    what: str = "teacher"
    scores_any_tokens: bool = False
    cross: tuple[VocabMap, str] | None = None  # a teacher with another tokenizer: the vocabulary map, the loss

    @classmethod
    def open(cls, path: str, rows: list[kdata.TokenizedRow], tok_sha: str, vocab_rows: int, temperature: float,
             field: str, what: str, verify: bool = False, data_cfg: Any = None) -> CachedSignal:
        """Open a cache after checking it belongs to these rows, this tokenizer and this temperature."""
        try:
            cache = TeacherCache(path)
        except CacheError as e:  # missing, incomplete or not a cache: named by the config field that points at it
            key = {"reference": "reference.path"}.get(what, what if what.endswith("_cache") else f"{what}.cache")
            raise SourceError(f"{key}: {e}") from None
        if verify:  # `kdkit validate`: every shard training will read is present and sound
            problems = verify_cache(path)
            if problems:
                raise SourceError(f"{what} cache {path} is damaged: {'; '.join(problems)} (rerun the same "
                                  f"`kdkit precompute` to repair it)")
        # The data fingerprint covers the token ids after truncation; when it differs, say which setting did.
        try:
            cache.check_compatible(data=kdata.data_fingerprint(rows))
        except CacheMismatch as e:  # named by the field that points at the cache
            hint = _tokenisation_hint(cache, data_cfg, what) if data_cfg is not None else ""
            raise SourceError(f"{what}: {e}" + (f" — {hint}" if hint else "")) from None
        cache.check_student_vocab(tok_sha, vocab_rows)
        if len(cache) != len(rows):
            raise SourceError(f"{what} cache {path} has {len(cache)} rows, the data has {len(rows)}")
        if cache.temperature != temperature:
            raise SourceError(
                f"{what} cache {path} was captured at temperature {cache.temperature} but {field} is {temperature}; "
                f"a top-K distribution cannot be re-tempered — precompute again or set {field}={cache.temperature}")
        return cls(cache, rows, what)

    def __call__(self, batch: kdata.Batch, student: torch.nn.Module, at_targets: bool = False) -> TopK | CrossTopK:
        # a cross-tokenizer cache holds the aligned positions only (a subset of the targets)
        expected = None if self.cross else [self.rows[i].loss_positions() for i in batch.row_index]
        tk = self.cache.topk_batch(batch.row_index, batch.targets.shape[1], expected)
        device = batch.input_ids.device
        topk = TopK(tk.ids.to(device), tk.logprobs.to(device), tk.tail.to(device))
        if self.cross is not None:
            _whole_rows_only(at_targets, self.what)
            return CrossTopK(topk, *self.cross)
        return topk.select(batch.targets != kdata.IGNORE_INDEX) if at_targets else topk


def _tokenisation_hint(cache: TeacherCache, data_cfg: Any, what: str) -> str:
    """Names ``data.max_length`` / ``data.truncation`` when the cache was tokenised with another value."""
    made = cache.manifest.get("settings", {})
    for key in ("max_length", "truncation"):
        theirs, ours = made.get(key, "left" if key == "truncation" else None), getattr(data_cfg, key)
        if theirs is not None and theirs != ours:
            flag = "--" + key.replace("_", "-")
            return (f"data.{key} is {ours!r}, but the {what} cache was precomputed with {flag} {theirs}: its rows "
                    f"are other token sequences; set data.{key}: {theirs} or precompute again with {flag} {ours}")
    return ""


@dataclass
class LiveSignal:
    """A frozen model run on the batch: dense logits over the real vocabulary (:meth:`with_hidden`: and,
    from the same forward, hidden states, for hidden-state distillation)."""

    model: torch.nn.Module
    real_vocab: int
    what: str = "teacher"
    scores_any_tokens: bool = True

    @torch.no_grad()
    def __call__(self, batch: kdata.Batch, student: torch.nn.Module, at_targets: bool = False) -> Tensor:
        return _logits(self.model, batch, self.real_vocab, self.what, at_targets)

    @torch.no_grad()
    def sampled(self, batch: kdata.Batch) -> SampledTokens:
        """The teacher's log-prob of each target token (the sampled-token reverse KL)."""
        lp = torch.log_softmax(_logits(self.model, batch, self.real_vocab, self.what, False).float(), dim=-1)
        return _sampled(batch, lp)

    @torch.no_grad()
    def with_hidden(self, batch: kdata.Batch, layers: tuple[int, ...]) -> tuple[Tensor, dict[int, Tensor]]:
        """The logits [B, T, V] at the prediction positions and, by layer index (0 = the embeddings), the
        hidden states [B, T, H] there: one forward for both."""
        out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        hidden = {layer: out.hidden_states[layer][:, :-1] for layer in layers}
        return vocab_logits(out.logits[:, :-1], self.real_vocab, self.what), hidden


@dataclass
class ServedSignal:
    """A teacher served by vLLM: per batch one request for the top-K log-probs at every position of every
    row (:class:`TopK` with the tail mass 1 − Σ_K p). :meth:`prefetch` sends the requests
    of batches to come from a background thread, so they overlap the student's forward and backward."""

    server: Any
    top_k: int
    what: str = "teacher"
    scores_any_tokens: bool = True
    _pool: Any = field(default=None, repr=False)
    _pending: dict[bytes, Any] = field(default_factory=dict, repr=False)  # request → its answer (a future)

    @staticmethod
    def _rows(batch: kdata.Batch) -> list[list[int]]:
        lengths = batch.attention_mask.sum(-1).tolist()
        return [ids[:n] for ids, n in zip(batch.input_ids.tolist(), lengths, strict=True)]

    @staticmethod
    def _key(batch: kdata.Batch, sampled: bool) -> bytes:
        ids = batch.input_ids.cpu()
        head = f"{'sampled' if sampled else 'topk'}:{tuple(ids.shape)}:".encode()
        return head + ids.numpy().tobytes() + batch.attention_mask.cpu().numpy().tobytes()

    def prefetch(self, batches: list[kdata.Batch], sampled: bool = False) -> None:
        """Send the requests for ``batches`` now (``sampled``: each target token's log-prob, else the top-K);
        a call for one of them then waits for its answer."""
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:  # one request in flight per server (a fleet has several)
            self._pool = ThreadPoolExecutor(max_workers=getattr(self.server, "width", 1),
                                            thread_name_prefix="kdkit-served-teacher")
        for b in batches:
            key = self._key(b, sampled)
            if key not in self._pending:
                self._pending[key] = self._pool.submit(self._ask, self._rows(b), sampled)

    def wait(self, batches: list[kdata.Batch], sampled: bool = False) -> None:
        """Every answer for ``batches`` is in (a failed request raises here, before the step computes)."""
        self.prefetch(batches, sampled)
        for b in batches:
            self._pending[self._key(b, sampled)].result()

    def _ask(self, rows: list[list[int]], sampled: bool) -> list[Any]:
        return self.server.token_logprobs(rows) if sampled else self.server.prompt_topk(rows, self.top_k)

    def _answer(self, batch: kdata.Batch, sampled: bool) -> list[Any]:
        pending = self._pending.pop(self._key(batch, sampled), None)
        return pending.result() if pending is not None else self._ask(self._rows(batch), sampled)

    def sampled(self, batch: kdata.Batch) -> SampledTokens:
        """The teacher's log-prob of each target token, from the server's prompt log-probs (which always
        hold the prompt's own token)."""
        bsz, seq = batch.targets.shape
        lp = torch.zeros((bsz, seq), dtype=torch.float32)
        for b, row in enumerate(self._answer(batch, True)):
            lp[b, :len(row)] = row
        return SampledTokens(batch.targets, lp.to(batch.targets.device))

    @torch.no_grad()
    def __call__(self, batch: kdata.Batch, student: torch.nn.Module, at_targets: bool = False) -> TopK:
        per_row = self._answer(batch, False)
        bsz, seq = batch.targets.shape
        ids = torch.zeros((bsz, seq, self.top_k), dtype=torch.long)
        lps = torch.full((bsz, seq, self.top_k), float("-inf"), dtype=torch.float32)
        tail = torch.full((bsz, seq), float("-inf"), dtype=torch.float32)
        for b, tk in enumerate(per_row):
            n = len(tk.ids)
            ids[b, :n], lps[b, :n], tail[b, :n] = tk.ids, tk.logprobs, tk.tail
        device = batch.input_ids.device
        topk = TopK(ids.to(device), lps.to(device), tail.to(device))
        return topk.select(batch.targets != kdata.IGNORE_INDEX) if at_targets else topk


@dataclass
class AdapterOffSignal:
    """The student with its LoRA adapters switched off: the base model, without a second copy in memory."""

    real_vocab: int
    what: str = "reference"
    scores_any_tokens: bool = True

    @torch.no_grad()
    def __call__(self, batch: kdata.Batch, student: torch.nn.Module, at_targets: bool = False) -> Tensor:
        inner = unwrap(student)  # no gradient flows here, so DDP's synchronisation is not needed
        with inner.disable_adapter():
            return _logits(inner, batch, self.real_vocab, self.what, at_targets)


@dataclass
class CrossSignal:
    """A live teacher with another tokenizer: each row's text tokenised its way, its positions aligned with
    the student's by character offsets (:mod:`kdkit.loss.crosstok`), its logits at the aligned positions."""

    model: torch.nn.Module
    tokenizer: Any
    rows: list[kdata.TokenizedRow]
    vmap: VocabMap
    loss: str
    what: str = "teacher"
    scores_any_tokens: bool = False  # its rows are the dataset's: on-policy needs one tokenizer
    _aligned: dict[int, tuple[list[int], list[tuple[int, int]]]] = field(default_factory=dict)

    def _row(self, index: int) -> tuple[list[int], list[tuple[int, int]]]:
        """The teacher's ids of row ``index`` and its aligned (student token, teacher token) pairs."""
        if index not in self._aligned:
            row = self.rows[index]
            self._aligned[index] = teacher_view(row.text, row.offsets, row.loss_mask, self.tokenizer)
        return self._aligned[index]

    @torch.no_grad()
    def __call__(self, batch: kdata.Batch, student: torch.nn.Module, at_targets: bool = False) -> CrossTeacher:
        _whole_rows_only(at_targets, self.what)
        views = [self._row(i) for i in batch.row_index]
        logits, rows, pos = aligned_teacher_logits(self.model, self.tokenizer, views, batch.input_ids.device, self.what)
        return CrossTeacher(logits, rows, pos, self.vmap, self.loss)


@dataclass(frozen=True)
class Deferred:
    """A live source opened and checked, its weights not read yet: ``load`` reads them (given the student: the
    reference ``base`` is the student as it starts)."""

    load: Callable[[torch.nn.Module], Signal]


@dataclass
class Sources:
    """The run's signals: the KD teacher, the barrier's reference (either may be absent) and the teachers that
    rows name. Opened once (:func:`open_sources`); a live model's weights are read by :meth:`load`."""

    teacher: Signal | None = None
    reference: Signal | None = None
    teachers: dict[str, Signal] = field(default_factory=dict)  # more teachers by name (rows route to them)
    validation: Signal | None = None  # the teacher's cache of the validation rows (teacher.validation_cache)
    pending: dict[str, Deferred] = field(default_factory=dict, repr=False)  # by config field, until :meth:`load`

    def place(self, field: str, opened: Signal | Deferred) -> None:
        """A source opened for ``field`` (teacher, teachers.<name>, reference): its signal, or its loader."""
        if isinstance(opened, Deferred):
            self.pending[field] = opened
            return
        if field.startswith("teachers."):
            opened.what = f"teacher {field.split('.', 1)[1]}"
            self.teachers[field.split(".", 1)[1]] = opened
        else:
            setattr(self, field, opened)

    def load(self, student: torch.nn.Module) -> None:
        """Read the live sources' weights, in the config's order (teacher, teachers, reference)."""
        pending, self.pending = self.pending, {}
        for name, deferred in pending.items():
            self.place(name, deferred.load(student))

    def modules(self) -> list[torch.nn.Module]:
        """The frozen models the sources hold (to move them to the run's device)."""
        return [s.model for s in (self.teacher, self.reference, *self.teachers.values())
                if isinstance(s, LiveSignal | CrossSignal)]

    def prefetch(self, batches: list[kdata.Batch]) -> None:
        """Let a KD teacher that answers from elsewhere (a served one) start on the next step's batches."""
        if isinstance(self.teacher, Prefetching):
            self.teacher.prefetch(batches)

    def prepare(self, batches: list[kdata.Batch], sampled: bool = False) -> None:
        """Before a step computes: every answer of the KD teacher it will read is in (a served one's, sent ahead)."""
        if isinstance(self.teacher, Prefetching):
            self.teacher.wait(batches, sampled)

    def ask(self, batch: kdata.Batch, student: torch.nn.Module, *, sampled: bool = False, at_targets: bool = False,
            hidden_layers: tuple[int, ...] = ()) -> Signals:
        """Every signal one micro-batch needs, each source asked once: the KD teacher's (its log-prob of each
        sampled token on a ``sampled`` on-policy step; with ``hidden_layers``, its hidden states from the same
        forward; with ``at_targets``, at the target positions alone), the barrier's reference, and each named
        teacher's. The step does not know the signals' kinds: a new kind is a class here."""
        teacher, hidden = None, None
        if self.teacher is not None:
            if sampled:
                teacher = self.teacher.sampled(batch)
            elif hidden_layers:
                teacher, hidden = self.teacher.with_hidden(batch, hidden_layers)
            else:
                teacher = self.teacher(batch, student, at_targets=at_targets)
        return Signals(teacher=teacher, teacher_hidden=hidden,
                       reference=self.reference(batch, student) if self.reference is not None else None,
                       teachers={n: s(batch, student) for n, s in self.teachers.items()})


@dataclass(frozen=True)
class Signals:
    """What the sources answered for one micro-batch (:meth:`Sources.ask`)."""

    teacher: Any = None  # dense logits [B, T-1, V], a TopK, a CrossTeacher / CrossTopK, or SampledTokens
    teacher_hidden: dict[int, Tensor] | None = None  # the teacher's hidden states by layer (hidden-state KD)
    reference: Any = None  # the barrier's reference, dense or TopK
    teachers: dict[str, Any] = field(default_factory=dict)  # each named teacher's, for the rows that name it


@runtime_checkable
class Prefetching(Protocol):
    """A signal that answers from another process (a served teacher): asked ahead, waited for before a step."""

    def prefetch(self, batches: list[kdata.Batch]) -> None: ...

    def wait(self, batches: list[kdata.Batch], sampled: bool = False) -> None: ...


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _check_live_vocab(path: str, field: str, student_tok_sha: str, real_vocab: int, cross: str = "none") -> Any:
    """A live model must share the student's tokenizer — or, with ``objective.kd.cross_tokenizer``, have
    another one — and have a logit for every token of its own; rows past the tokenizer's vocabulary
    (padding) are dropped. Returns the model's tokenizer."""
    tok = load_tokenizer(path)
    same = tokenizer_fingerprint(tok)["sha256"] == student_tok_sha
    if not same and cross == "none":
        raise SourceError(f"{field}: {path} has another tokenizer than the student (ids would mean different "
                          f"text); set objective.kd.cross_tokenizer: gold or uld to distil across tokenizers")
    if same and cross != "none":
        raise SourceError(f"objective.kd.cross_tokenizer: {cross} is for a teacher with another tokenizer, and "
                          f"{path} shares the student's; use the same-tokenizer loss (cross_tokenizer: none)")
    cfg_path = Path(path) / "config.json"
    rows = json.loads(cfg_path.read_text()).get("vocab_size") if cfg_path.is_file() else None
    if isinstance(rows, int) and rows < len(tok):
        raise SourceError(f"{field}: {path} has {rows} output rows but the tokenizer has {len(tok)} tokens")
    return tok


def _cache_cross(cache: TeacherCache, tokenizer: Any, cross: str) -> tuple[VocabMap, str] | None:
    """A cache of a teacher with another tokenizer needs a cross-tokenizer loss, and the reverse."""
    from kdkit.teacher.cache.reader import TEACHER_TOKENIZER, teacher_tokenizer_problems

    is_cross = "teacher_tokenizer" in cache.components
    if is_cross and cross == "none":
        raise SourceError(f"teacher.cache: {cache.path} holds a teacher with another tokenizer; set "
                          f"objective.kd.cross_tokenizer: gold or uld")
    if not is_cross and cross != "none":
        raise SourceError(f"objective.kd.cross_tokenizer: {cross} is for a teacher with another tokenizer, and the "
                          f"cache {cache.path} was captured with the student's; use cross_tokenizer: none")
    if not is_cross:
        return None
    problems = teacher_tokenizer_problems(cache.path, cache.manifest)
    if problems:
        raise SourceError(f"teacher.cache: {cache.path} is not the cache precompute wrote: {'; '.join(problems)} "
                          f"(run `kdkit cache verify {cache.path}`, then precompute again)")
    t_tok = load_tokenizer(cache.path / TEACHER_TOKENIZER)
    return VocabMap.build(tokenizer, t_tok, len(tokenizer), len(t_tok)), cross


def _open_teacher(cfg: TrainConfig, t: Any, field: str, rows: list[kdata.TokenizedRow], tokenizer: Any,
                  vocab_rows: int, verify: bool) -> Signal | Deferred:
    """One teacher (``field``: where the config names it) checked against the student and the data: its signal,
    or for a live model the loader that reads its weights (:meth:`Sources.load`)."""
    tok_sha, real_vocab = tokenizer_fingerprint(tokenizer)["sha256"], len(tokenizer)
    if t.url:
        return open_served(cfg, t, field, tokenizer, rows)
    if t.model:
        if verify:
            check_model_dir(t.model, f"{field}.model:")
        cross = cfg.objective.kd.cross_tokenizer
        t_tok = _check_live_vocab(t.model, f"{field}.model", tok_sha, real_vocab, cross)
        check_quantisation(t.load_in, f"{field}.load_in")

        def load(student: torch.nn.Module) -> Signal:
            model = _frozen(load_causal_lm(t.model, t.dtype, t.load_in, f"{field}.load_in"))
            return LiveSignal(model, real_vocab, "teacher") if cross == "none" else CrossSignal(
                model, t_tok, rows, VocabMap.build(tokenizer, t_tok, real_vocab, len(t_tok)), cross)
        return Deferred(load)
    signal = CachedSignal.open(t.cache, rows, tok_sha, vocab_rows, cfg.objective.kd.temperature,
                               "objective.kd.temperature", field, verify, cfg.data)
    signal.cross = _cache_cross(signal.cache, tokenizer, cfg.objective.kd.cross_tokenizer)
    return signal


def open_validation(cfg: TrainConfig, val_rows: list[kdata.TokenizedRow], tokenizer: Any, vocab_rows: int,
                    verify: bool = False) -> CachedSignal | None:
    """``teacher.validation_cache``, checked against the validation rows as the training cache is against the
    training rows (None without one)."""
    t = cfg.teacher
    if t is None or t.validation_cache is None:
        return None
    return CachedSignal.open(t.validation_cache, val_rows, tokenizer_fingerprint(tokenizer)["sha256"], vocab_rows,
                             cfg.objective.kd.temperature, "objective.kd.temperature", "teacher.validation_cache",
                             verify, cfg.data)


def open_sources(cfg: TrainConfig, rows: list[kdata.TokenizedRow], tokenizer: Any, vocab_rows: int,
                 verify: bool = False) -> Sources:
    """Open every source once, after checking it against the student and the data (a cache opened, a served
    teacher asked); a live model's weights are read later, by :meth:`Sources.load`, when a run trains.
    ``verify`` (``kdkit validate``): also re-hash cache shards and check model directories."""
    tok_sha, real_vocab = tokenizer_fingerprint(tokenizer)["sha256"], len(tokenizer)
    src, t, ref = Sources(), cfg.teacher, cfg.reference
    if verify:
        check_model_dir(cfg.student.path, "student.path:")
    for name, section in (("teacher", t), *((f"teachers.{n}", other) for n, other in cfg.teachers.items())):
        if section is not None:
            src.place(name, _open_teacher(cfg, section, name, rows, tokenizer, vocab_rows, verify))
    if ref is not None and ref.kind == "model":
        if verify:
            check_model_dir(ref.path, "reference.path:")
        _check_live_vocab(ref.path, "reference.path", tok_sha, real_vocab)
        src.place("reference", Deferred(lambda student: LiveSignal(
            _frozen(load_causal_lm(ref.path, cfg.student.dtype)), real_vocab, "reference")))
    elif ref is not None and ref.kind == "cache":
        src.reference = CachedSignal.open(ref.path, rows, tok_sha, vocab_rows, cfg.objective.barrier.temperature,
                                          "objective.barrier.temperature", "reference", verify, cfg.data)
    elif ref is not None:  # kind "base": the student as it starts
        src.place("reference", Deferred(lambda student: (
            AdapterOffSignal(real_vocab) if cfg.student.lora is not None else
            LiveSignal(_frozen(copy.deepcopy(unwrap(student))), real_vocab, "reference"))))
    return src


def open_served(cfg: TrainConfig, t: Any, field: str, tokenizer: Any, rows: list[kdata.TokenizedRow]
                ) -> ServedSignal:
    """The served teacher, after its checks: it serves the model named, answers K log-probs per position at
    temperature 1 for rows this long, tokenises the data as the student does and — when ``model`` names the
    local copy of its weights — gives the same log-probs on a few rows (:mod:`kdkit.teacher.parity`)."""
    from kdkit.teacher import parity
    from kdkit.teacher.fleet import connect
    from kdkit.teacher.served import ServedError

    kd = cfg.objective.kd
    server = connect(t.url, t.served_model, t.timeout_s, t.retries)
    if kd.cross_tokenizer != "none":
        raise SourceError(f"objective.kd.cross_tokenizer with {field}.url: a served teacher must share the "
                          "student's tokenizer (distil across tokenizers from a local model or a cache)")
    try:
        refused = server.refusal(t.top_k, kd.temperature, max((len(r.input_ids) for r in rows), default=0))
    except ServedError as e:
        raise ServedError(f"{field}.url: {e}") from None
    if refused is not None:
        what, why = refused
        name = {"temperature": "objective.kd.temperature", "top_k": f"{field}.top_k", "max_length": "data.max_length"}
        given = {"temperature": kd.temperature, "top_k": t.top_k, "max_length": cfg.data.max_length}
        raise SourceError(f"{name[what]} is {given[what]}: {why}")
    try:
        parity.check_servers(server, tokenizer, cfg.data.train, [r.input_ids for r in rows[:parity.PARITY_ROWS]],
                      min(t.top_k, 8), parity.TOLERANCE)
    except ServedError as e:
        raise SourceError(f"{field}.url: {e}") from None
    if t.model:
        parity.teacher_parity(server, t.model, cfg.data.train, parity.PARITY_ROWS, min(t.top_k, 8), t.dtype,
                              cfg.data.max_length).raise_if_failed()
    return ServedSignal(server, t.top_k)


def check_objective_data(cfg: TrainConfig, rows: list[kdata.TokenizedRow]) -> None:
    """Every role, task and teacher the objective names occurs in the data, and every teacher a row names is
    in the config; the optional packages it needs are here."""
    for r in rows:
        if r.teacher and r.teacher not in cfg.teachers:
            known = ", ".join(sorted(cfg.teachers)) or "none: add a 'teachers' section"
            raise SourceError(f"{cfg.data.train}:{r.line}: field 'teacher': {r.teacher!r} is not one of the "
                              f"config's teachers ({known})")
    named = {r.teacher for r in rows}
    for name in cfg.teachers:
        if name not in named:
            raise SourceError(f"teachers.{name}: no row of {cfg.data.train} names teacher {name!r}")
    seen_roles = {r.role for r in rows}
    for role in cfg.objective.roles:
        if role not in seen_roles:
            raise SourceError(f"objective.roles.{role}: role {role!r} never occurs in {cfg.data.train} "
                              f"(roles there: {', '.join(sorted(seen_roles))})")
    seen_tasks = {r.task for r in rows}
    for task in cfg.objective.task_weights:
        if task not in seen_tasks:
            raise SourceError(f"objective.task_weights.{task}: task {task!r} never occurs in {cfg.data.train}")
    check_quantisation(cfg.student.load_in, "student.load_in")
