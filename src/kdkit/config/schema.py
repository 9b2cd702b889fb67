"""Validated configuration models. YAML in, resolved YAML out.

The divergence kinds, aggregations and tail policies accepted here are read from
the registries in :mod:`kdkit.loss.divergences`, so the schema cannot drift from the math.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from kdkit.loss.divergences import AGGREGATIONS, KINDS, TAIL_POLICIES


class _Strict(BaseModel):
    # Unknown keys are errors: a misspelt option must never silently do nothing.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


DTYPES = ("float32", "bfloat16", "float16")
# The choices, as types: pydantic refuses anything else, naming the field and the valid values, and the JSON
# schema lists them. The divergence kinds, aggregations and tail policies come from kdkit.loss.divergences' registries.
Kind = Literal[tuple(KINDS)]
TailPolicy = Literal[tuple(TAIL_POLICIES)]
Aggregation = Literal[tuple(AGGREGATIONS)]
Dtype = Literal[DTYPES]
LoadIn = Literal["4bit", "8bit"]


class DivergenceConfig(_Strict):
    """Which divergence, at which temperature, with which top-K tail policy."""

    kind: Kind = Field("kl_fwd", description=f"one of: {', '.join(KINDS)}")
    temperature: float = Field(1.0, gt=0.0, description="loss temperature T (divides the logits)")
    t2_scale: bool = Field(True, description="multiply the divergence by T^2")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="jsd mixture weight (0 = kl_fwd, 1 = kl_rev)")
    alpha: float = Field(0.1, gt=0.0, lt=1.0, description="skew_fwd/skew_rev skew")
    tail: TailPolicy = Field("bucket", description=f"top-K tail policy: {', '.join(TAIL_POLICIES)}")
    cross_tokenizer: Literal["none", "uld", "gold"] = Field(
        "none", description="a teacher with another tokenizer: uld (sorted-probability L1 at aligned positions) or "
                            "gold (kind over the tokens both vocabularies share + uld on the rest); none: one tokenizer")




class BarrierConfig(_Strict):
    """λ_b · relu(aggregate(divergence-to-reference per position) − τ)."""

    kind: Literal["kl_fwd", "kl_rev"] = Field("kl_rev", description="kl_fwd (reference ‖ student) or kl_rev "
                                                                    "(student ‖ reference)")
    aggregate: Aggregation = Field("mean", description=f"one of: {', '.join(AGGREGATIONS)}")
    tau: float = Field(0.0, ge=0.0, description="hinge threshold τ")
    weight: float = Field(1.0, ge=0.0, description="λ_b")
    temperature: float = Field(1.0, gt=0.0, description="temperature of both distributions in the barrier's divergence")




class RoleTerms(_Strict):
    """Which terms apply to rows of one role."""

    ce: bool = Field(True, description="the role's rows take the CE term")
    kd: bool = Field(True, description="the role's rows take the KD term")
    barrier: bool = Field(True, description="the role's rows take the barrier term")


class OnPolicyConfig(_Strict):
    """On-policy distillation (GKD): on a λ share of optimizer steps the student writes the completions and
    the live teacher scores the student's own tokens; the loss on them is objective.kd (CE is off there)."""

    fraction: float = Field(0.5, ge=0.0, le=1.0, description="λ: the share of optimizer steps that are on-policy "
                                                             "(chosen from seed and step, so a resume is exact)")
    max_new_tokens: int = Field(64, ge=1, description="the most tokens the student writes per prompt")
    temperature: float = Field(1.0, ge=0.0, description="sampling temperature of the student's completions "
                                                        "(0 = greedy); not the loss temperature objective.kd.temperature")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling of the student's completions")
    seed: int = Field(0, description="seed of the on-policy step choice and of sampling")
    loss: Literal["kd", "sampled_kl_rev"] = Field(
        "kd", description="the loss on the student's own tokens: kd (objective.kd against the teacher's "
                          "distribution) or sampled_kl_rev (per sampled token, advantage −(log p_s − log p_t): "
                          "needs only the teacher's log-prob of each sampled token)")
    rollout_url: str | None = Field(
        None, description="a vLLM server of the student (http://HOST:PORT or its /v1 base URL) that writes the "
                          "completions, its weights kept in sync (docs: A served teacher); None: the student "
                          "generates here")
    sync_every: int = Field(1, ge=1, description="with rollout_url: optimizer steps between weight syncs (the "
                                                 "lag, logged as rollout_lag, is at most sync_every − 1)")


class HiddenConfig(_Strict):
    """Hidden-state distillation: student layer outputs, projected to the teacher's width, pulled toward the
    live teacher's at the KD positions. Layer l is ``hidden_states[l]``: 0 = the embeddings, i = after block i."""

    layers: dict[int, int] = Field(..., description="student layer → teacher layer, e.g. {2: 6}")
    loss: Literal["cosine", "mse"] = Field("cosine", description="cosine: 1 − cos(P·h_s, h_t); mse: mean over "
                                                                  "the teacher's width of (P·h_s − h_t)²")
    weight: float = Field(1.0, gt=0.0, description="coefficient of the hidden-state term")
    projection: Literal["linear", "none"] = Field(
        "linear", description="linear: a learned student-width → teacher-width map per layer pair, trained with "
                              "the student, saved in the run, not in the merged pack; none: equal widths only")

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: dict[int, int]) -> dict[int, int]:
        if not v:
            raise ValueError("give at least one student layer → teacher layer pair")
        if any(a < 0 or b < 0 for a, b in v.items()):
            raise ValueError(f"layer indices are >= 0 (0 = the embeddings), got {v}")
        return v


class ObjectiveConfig(_Strict):
    """total = ce_coef·CE + kd_weight·w(row)·KD + barrier (see ``kdkit.train.objective``)."""

    ce_coef: float = Field(1.0, ge=0.0, description="coefficient of the cross-entropy term")
    ce_norm: Literal["token", "sqrt_row"] = Field("token", description="'token' (each target token weighs 1) or "
                                                                       "'sqrt_row' (1/sqrt(row tokens))")
    kd_weight: float = Field(1.0, ge=0.0, description="λ, the coefficient of the KD term (0 without a teacher)")
    kd: DivergenceConfig = Field(default_factory=DivergenceConfig)
    task_weights: dict[str, float] = Field(default_factory=dict, description="per-task KD multipliers w(task)")
    roles: dict[str, RoleTerms] = Field(
        default_factory=dict,
        description="per-role terms; a role not listed gets every term (rows without a role have role 'default')",
    )
    barrier: BarrierConfig | None = None
    on_policy: OnPolicyConfig | None = Field(None, description="on-policy distillation; omit for off-policy only")
    hidden: HiddenConfig | None = Field(None, description="hidden-state distillation from a live teacher")
    chunk_size: int | Literal["auto"] = Field(
        "auto",
        description="target tokens per chunk of the memory-lean loss (at most chunk × V logits at once); 'auto' = "
                    "from the vocabulary (about 64 MiB of float32 logits per chunk, 256 to 1024 tokens); 0 = dense path",
    )

    @field_validator("chunk_size")
    @classmethod
    def _chunk_size(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError(f"must be >= 0 or 'auto', got {v}")
        return v


    @field_validator("task_weights")
    @classmethod
    def _tw(cls, v: dict[str, float]) -> dict[str, float]:
        for task, w in v.items():
            if not (w >= 0.0):
                raise ValueError(f"task_weights[{task!r}] must be >= 0, got {w!r}")
        return v

    @model_validator(mode="after")
    def _something_to_train(self) -> ObjectiveConfig:
        if self.ce_coef == 0.0 and self.kd_weight == 0.0 and self.barrier is None and self.hidden is None:
            raise ValueError("ce_coef and kd_weight are both 0 and there is no barrier or hidden term: nothing to train")
        if self.hidden is not None and self.on_policy is not None and self.on_policy.loss == "sampled_kl_rev":
            raise ValueError("hidden with on_policy.loss sampled_kl_rev: a sampled step asks the teacher for each "
                             "token's log-prob alone, not its hidden states; use on_policy.loss kd")
        return self

    def terms_for(self, role: str) -> RoleTerms:
        return self.roles.get(role, RoleTerms())


# --------------------------------------------------------------------------- training


class LoraConfig(_Strict):
    """LoRA adapters (peft) on the student; the base weights stay frozen."""

    r: int = Field(8, ge=1, description="the adapters' rank")
    alpha: float = Field(16.0, gt=0.0, description="the adapters' scale (update × alpha / r)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapters' input")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                      description="names of the linear layers that get adapters")


class StudentConfig(_Strict):
    """The model that trains."""

    path: str = Field(..., description="local Hugging Face model directory (safetensors)")
    dtype: Dtype = Field("float32", description="float32, bfloat16 or float16")
    lora: LoraConfig | None = Field(None, description="LoRA adapters via peft; omit for full fine-tuning")
    load_in: LoadIn | None = Field(None, description="'4bit' or '8bit' (bitsandbytes, GPU only)")




class TeacherConfig(_Strict):
    """Exactly one of ``cache`` (offline), ``model`` (online, in the training process) or ``url`` (online,
    served by vLLM; ``model`` may then name the local copy of its weights, checked against the server on a
    few rows, never loaded for training); omit the section for plain SFT."""

    cache: str | None = Field(None, description="teacher cache directory made by `kdkit precompute`")
    model: str | None = Field(None, description="teacher model directory, loaded once, frozen")
    url: str | list[str] | None = Field(None, description="a teacher served by vLLM (http://HOST:PORT or its /v1 base "
                                                          "URL), asked for top-K log-probs per batch; a list: several "
                                                          "servers of the same teacher, one request at a time each")
    served_model: str | None = Field(None, description="with url: the model name the server must serve "
                                                       "(default: its only one)")
    top_k: int = Field(64, ge=1, description="with url: log-probs asked per position (at most the server's "
                                             "--max-logprobs)")
    timeout_s: float = Field(120.0, gt=0, description="with url: seconds a request may take before a retry")
    retries: int = Field(3, ge=0, description="with url: retries of a failed request (backoff 1, 2, 4 s ...)")
    dtype: Dtype = Field("float32", description="float32, bfloat16 or float16 (a live teacher's weights)")
    load_in: LoadIn | None = Field(None, description="'4bit' or '8bit' for a live teacher (bitsandbytes, CUDA only)")
    validation_cache: str | None = Field(None, description="with cache: the teacher's cache of data.validation "
                                         "(kdkit precompute --data VALIDATION): each epoch then reports validation "
                                         "KL to the teacher and top-1 agreement, as a live teacher does")

    @model_validator(mode="after")
    def _one(self) -> TeacherConfig:
        if isinstance(self.url, list) and not self.url:
            raise ValueError("teacher.url: an empty list (name one server, or several of the same teacher)")
        if self.url is not None:
            if self.cache is not None:
                raise ValueError("teacher: set one of 'cache' or 'url' (a cache is captured once, by "
                                 "`kdkit precompute --teacher-url`)")
            if self.load_in is not None:
                raise ValueError("teacher.load_in quantises a teacher loaded here; a served teacher runs as "
                                 "vLLM serves it")
            return self
        if (self.cache is None) == (self.model is None):
            raise ValueError("teacher: set exactly one of 'cache', 'model' or 'url'")
        return self


class ReferenceConfig(_Strict):
    """The barrier's reference: ``base`` (the student before training; with LoRA, adapters
    disabled, no second copy), a ``model`` directory, or a ``cache``."""

    kind: Literal["base", "model", "cache"] = Field("base", description="base, model or cache")
    path: str | None = Field(None, description="with kind model: a model directory; with kind cache: a cache of "
                             "the reference made by `kdkit precompute`")

    @model_validator(mode="after")
    def _path(self) -> ReferenceConfig:
        if self.kind != "base" and not self.path:
            raise ValueError(f"reference.kind={self.kind!r} needs reference.path")
        if self.kind == "base" and self.path:
            raise ValueError("reference.kind='base' takes no path (it is the student before training)")
        return self


class DataConfig(_Strict):
    """The rows: JSONL, Parquet, Arrow, CSV/TSV, JSON or a save_to_disk directory."""

    train: str = Field(..., description="training rows: {prompt, completion}, {messages} or {text}, with optional "
                       "role, task, weight, teacher")
    validation: str | None = Field(None, description="held-out rows: validation loss (and KL to a live teacher) "
                                   "after each epoch")
    max_length: int = Field(512, ge=2, description="tokens per row at most (longer rows are cut, see truncation)")
    shuffle_seed: int = Field(0, description="seed of the row order in each epoch")
    on_empty: Literal["skip", "error"] = Field("skip", description="rows without a target token: 'skip' drops "
                                               "(and reports) them, 'error' refuses the file")
    truncation: Literal["left", "right"] = Field("left", description="rows over max_length: 'left' drops the oldest "
                                                                     "tokens (keeps the "
                                                "completion / latest turns; a leading BOS stays), 'right' the end")
    packing: bool = Field(False, description="run each micro-batch's rows packed end to end in sequences of up to "
                          "max_length tokens (positions restart per row, no attention across rows): the same losses, "
                          "without the padding's compute; off-policy steps only")
    pack_length: int | None = Field(None, ge=2, description="tokens per packed sequence (default: max_length); a "
                                    "row longer than it has a sequence of its own")




class OptimConfig(_Strict):
    """AdamW, its schedule, the batch and the arithmetic."""

    lr: float = Field(3e-5, gt=0.0, description="peak learning rate (AdamW)")
    schedule: Literal["constant", "linear", "cosine"] = Field("cosine",
                                                              description="constant, linear or cosine (after warm-up)")
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warm-up from 0 to lr")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW's decoupled weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW's β1, β2")
    grad_clip: float = Field(1.0, ge=0.0, description="max gradient norm; 0 disables clipping")
    micro_batch: int = Field(2, ge=1, description="rows per forward pass per process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    epochs: int = Field(1, ge=1, description="passes over the training rows (max_steps may stop earlier)")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    seed: int = Field(0, description="seed of the initialisation of new weights (LoRA), dropout and sampling")
    precision: Literal["fp32", "bf16-mixed", "bf16", "fp16-mixed"] = Field(
        "fp32", description="fp32; bf16-mixed / fp16-mixed: float32 master weights, the student's forward under "
                            "autocast (fp16 with loss scaling); bf16: pure bfloat16 weights and optimizer "
                            "(student.dtype: bfloat16), no float32 copy")
    gradient_checkpointing: bool = Field(False, description="recompute the student's activations in backward "
                                                            "(less memory, more time)")



class CheckpointConfig(_Strict):
    """Checkpoints during training (Ctrl-C and a crash resume from the newest)."""

    every: int = Field(50, ge=0, description="optimizer steps between checkpoints; 0 = only at the end")
    keep: int = Field(2, ge=1, description="newest checkpoints kept")


class LoggingConfig(_Strict):
    """What a run writes besides metrics.jsonl/epochs.jsonl: the experiment trackers (through Accelerate's),
    each given the same per-step and per-epoch figures and the resolved config."""

    every: int = Field(1, ge=1, description="optimizer steps between metrics.jsonl rows (and tracker points)")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=list, description="experiment trackers: tensorboard (RUN/kdkit/), wandb (RUN/wandb/; "
        "WANDB_MODE=offline), mlflow (MLFLOW_TRACKING_URI, else RUN/mlflow.db), trackio (TRACKIO_DIR)")
    project: str = Field("kdkit", min_length=1, description="the trackers' project (MLflow: experiment); the run "
                         "is named after its directory")
    tensorboard: bool = Field(False, description="the same as report_to: [tensorboard] (older configs)")

    @model_validator(mode="after")
    def _one_list(self) -> LoggingConfig:
        if len(set(self.report_to)) != len(self.report_to):
            raise ValueError(f"report_to names a tracker twice: {self.report_to}")
        if self.tensorboard and "tensorboard" not in self.report_to:
            self.report_to = ["tensorboard", *self.report_to]
        return self


class ProbesConfig(_Strict):
    """Probe generations during training (the seeds' per-round outputs): greedy completions of fixed
    prompts at step 0, every ``every`` steps and at the end, with their coherence and KL to the reference."""

    prompts: str = Field(..., description="JSONL of prompt rows: {\"prompt\": ...} or {\"messages\": [...]}")
    every: int = Field(50, ge=1, description="optimizer steps between probe rounds (also at step 0 and at the end)")
    max_new_tokens: int = Field(64, ge=1, description="the most tokens per probe generation (greedy)")


class EarlyStopConfig(_Strict):
    """Stop when the probes' mean coherence stays below the floor; final/ is the last round at or above it."""

    coherence_floor: float = Field(..., gt=0.0, le=1.0, description="the lowest acceptable mean probe coherence")
    patience: int = Field(1, ge=1, description="probe rounds in a row below the floor before the run stops")


class EvalConfig(_Strict):
    """Where this run's candidates are evaluated when it is gated (``kdkit ladder`` with this config, ``kdkit
    gate`` of its run directory): a vLLM server writes the answers, as ``--server`` (which wins when given)."""

    server: str | None = Field(None, min_length=1, description="the vLLM server's URL (http://HOST:PORT or its /v1 "
                               "base URL): a LoRA run is loaded as its adapter, a full fine-tune as weights in place; "
                               "checked before training (it answers, and serves a LoRA run's base)")
    served_model: str | None = Field(None, description="the served base model's name, when the server serves several")

    @model_validator(mode="after")
    def _a_server(self) -> EvalConfig:
        if self.server is None:
            raise ValueError("eval.server is not set" + (": served_model names one of its models" if self.served_model
                                                          else ""))
        return self


class QuarantineConfig(_Strict):
    """The quarantine adapter: its own LoRA (a basis distinct from the main adapter's), in the forward during
    training, dropped at deployment (`kdkit merge --drop-adapter quarantine`)."""

    r: int = Field(4, ge=1, description="the quarantine adapter's rank")
    alpha: float = Field(8.0, gt=0.0, description="the quarantine adapter's scale")


class RoutingConfig(_Strict):
    """Gradient routing (seed 003): the part of the main adapter's gradient along a "hack" direction goes to
    the quarantine adapter instead."""

    pairs: str = Field(..., description="JSONL contrast pairs: {\"prompt\", \"hack\", \"clean\"} completions")
    method: Literal["act", "grad"] = Field(
        "act", description="act: mean activation difference hack − clean per routed module; grad: mean CE-gradient "
                           "difference; both unit-normalised")
    target_modules: list[str] = Field(default_factory=lambda: ["v_proj"],
                                      description="routed modules (a subset of student.lora.target_modules)")
    quarantine: QuarantineConfig = Field(default_factory=QuarantineConfig)
    refresh_every: int = Field(0, ge=0, description="re-extract the directions every N steps from the current "
                                                    "model, quarantine ablated; 0 = extract once")
    control: Literal["none", "random"] = Field(
        "none", description="none, or random: a random unit direction per module (the control)")
    seed: int = Field(0, description="seed of the random control's directions")


class TrainConfig(_Strict):
    student: StudentConfig
    # where it was read (config.load): the file, its text and the keys given by --set, to name a field's line
    _origin: Any = PrivateAttr(default=None)
    teacher: TeacherConfig | None = None
    teachers: dict[str, TeacherConfig] = Field(
        default_factory=dict, description="more teachers, by name: a row whose 'teacher' field names one is "
                                          "distilled from it (rows without the field: from 'teacher'); each a "
                                          "cache, a model or a url; metrics are reported per teacher")
    reference: ReferenceConfig | None = None
    data: DataConfig
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    probes: ProbesConfig | None = Field(None, description="probe generations during training; omit for none")
    early_stop: EarlyStopConfig | None = Field(None, description="stop on a coherence floor (needs probes)")
    routing: RoutingConfig | None = Field(None, description="gradient routing into a quarantine adapter")
    eval: EvalConfig | None = Field(None, description="the gate's evaluation of this run (kdkit ladder, kdkit "
                                    "gate RUN_DIR): answers from a vLLM server; omit to evaluate here")
    drift_tolerance: float = Field(1e-7, ge=0.0, description="fail when no trainable weight moved more than this")

    @model_validator(mode="after")
    def _effective(self) -> TrainConfig:
        # Options that would silently do nothing are errors (torchtitan's rule).
        if self.objective.barrier is not None and self.reference is None:
            raise ValueError("objective.barrier is set but there is no 'reference' section")
        if self.reference is not None and self.objective.barrier is None:
            raise ValueError("'reference' is set but objective.barrier is not: the reference would be unused")
        if self.teacher is None and self.objective.ce_coef == 0.0 and self.objective.barrier is None:
            raise ValueError("no teacher and objective.ce_coef = 0: nothing to train")
        for field, why in _without_effect(self) + _teachers_unsupported(self):
            raise ValueError(f"{field}: {why}")
        if self.teacher is None and not _set(self.objective, "kd_weight"):
            self.objective.kd_weight = 0.0  # no teacher, no KD term: the resolved config says so (not its default 1)
        return self


def _teachers_unsupported(cfg: TrainConfig) -> list[tuple[str, str]]:
    """Several teachers route the KD term of the dense loss by row; what needs one teacher refuses them."""
    if not cfg.teachers:
        return []
    if cfg.teacher is None:
        return [("teachers", "set 'teacher' too: it distils the rows that name no teacher")]
    bad = [n for n in cfg.teachers if not n or n.strip() != n]
    if bad:
        return [("teachers", f"a teacher's name must be a non-empty string without surrounding spaces, got {bad[0]!r}")]
    one = [(f, why) for f, on, why in (
        ("objective.hidden", cfg.objective.hidden is not None, "hidden states come from one live teacher"),
        ("objective.on_policy", cfg.objective.on_policy is not None, "a rollout is scored by one teacher"),
        ("objective.kd.cross_tokenizer", cfg.objective.kd.cross_tokenizer != "none", "aligned across one tokenizer"))
        if on]
    return [(f, f"{why}; with 'teachers' set, leave it out") for f, why in one]


# A config a user wrote: a field written at all is set (``beta: 0.5`` with kl_rev is refused even though 0.5
# is the default). A resolved config.yaml (RESOLVED_MARK on its first line) lists every field with its value,
# defaults included: there a field counts as set only when it is away from its default, so that it loads.
RESOLVED: ContextVar[bool] = ContextVar("kdkit_resolved_config", default=False)
RESOLVED_MARK = "# kdkit resolved config: every field, defaults included"


def _set(model: BaseModel, name: str) -> bool:
    """Written in the config (away from its default, in a resolved config.yaml)."""
    if name not in model.model_fields_set:
        return False
    return not RESOLVED.get() or getattr(model, name) != type(model).model_fields[name].default


def _without_effect(cfg: TrainConfig) -> list[tuple[str, str]]:
    """(field, why) for every option set away from its default that cannot take effect in this configuration."""
    o, kd = cfg.objective, cfg.objective.kd
    out = []
    if cfg.student.load_in is not None and cfg.student.lora is None:
        out.append(("student.load_in", "quantised weights cannot be fine-tuned in full; add student.lora (QLoRA)"))
    if _set(kd, "beta") and kd.kind != "jsd":
        out.append(("objective.kd.beta", f"only jsd takes beta; objective.kd.kind is {kd.kind}"))
    if _set(kd, "alpha") and not kd.kind.startswith("skew_"):
        out.append(("objective.kd.alpha", f"only skew_fwd/skew_rev take alpha; objective.kd.kind is {kd.kind}"))
    if cfg.teacher is None:
        no_teacher = "there is no teacher section, so there is no KD term"
        if _set(o, "kd_weight") and o.kd_weight > 0:
            out.append(("objective.kd_weight", no_teacher))
        out += [(f"objective.kd.{f}", no_teacher) for f in sorted(kd.model_fields_set) if _set(kd, f)]
        out += [(f"objective.task_weights.{t}", f"{no_teacher} (task weights scale KD only)") for t in o.task_weights]
        out += [(f"objective.roles.{r}.kd", no_teacher) for r, t in o.roles.items() if _set(t, "kd")]
    else:
        if cfg.teacher.model and cfg.teacher.url is None and _set(kd, "tail"):
            out.append(("objective.kd.tail", "a live teacher gives the dense distribution: there is no top-K tail"))
    out += _on_policy_without_effect(cfg)
    out += _kd_off_without_effect(cfg)
    out += _cross_without_effect(cfg)
    if cfg.objective.hidden is not None and (cfg.teacher is None or not cfg.teacher.model or cfg.teacher.url):
        out.append(("objective.hidden", "hidden states come from a live teacher: set teacher.model (a cache or a "
                                        "server gives log-probs only)"))
    if cfg.early_stop is not None and cfg.probes is None:
        out.append(("early_stop", "the coherence floor is judged on probe generations: add a probes section"))
    if _set(cfg.checkpoint, "keep") and cfg.checkpoint.every == 0:
        out.append(("checkpoint.keep", "checkpoint.every is 0: no checkpoint is written during training"))
    out += _routing_without_effect(cfg)
    out += _precision_without_effect(cfg)
    if _set(cfg.logging, "project") and not cfg.logging.report_to:
        out.append(("logging.project", "logging.report_to names no tracker: nothing is logged under a project"))
    if cfg.data.pack_length is not None and not cfg.data.packing:
        out.append(("data.pack_length", "data.packing is false: no row is packed"))
    if cfg.data.packing and cfg.optim.micro_batch == 1:
        out.append(("data.packing", "optim.micro_batch is 1: a forward of one row has no padding to pack away"))
    if cfg.data.packing and cfg.objective.on_policy is not None:
        out.append(("data.packing", "on-policy steps score the student's own rollouts; pack off-policy runs only"))
    out += [w for name, t in [("teacher", cfg.teacher), *((f"teachers.{n}", t) for n, t in cfg.teachers.items())]
            if t is not None for w in _teacher_without_effect(name, t)]
    out += [(f"teachers.{n}.validation_cache", "validation is scored against the default teacher's cache only")
            for n, t in cfg.teachers.items() if t.validation_cache is not None]
    if cfg.teacher is not None and cfg.teacher.validation_cache is not None and cfg.data.validation is None:
        out.append(("teacher.validation_cache", "there is no data.validation: no row would be scored"))
    return out


def inapplicable(cfg: TrainConfig) -> list[str]:
    """Every field, at its default, that this configuration would not read: the fields the rules above refuse
    when written (``objective.kd.beta`` under kl_fwd, ``teacher.top_k`` of a cached teacher, ...). The
    resolved config.yaml leaves them out, so that it shows only what applies."""
    token = RESOLVED.set(False)
    try:
        out = []
        for dotted, model, name in _leaves(cfg, ""):
            if name in model.model_fields_set:
                continue  # written by the user: it passed the rules, so it applies
            model.model_fields_set.add(name)
            try:
                if any(f == dotted for f, _ in _without_effect(cfg)):
                    out.append(dotted)
            finally:
                model.model_fields_set.discard(name)
        return out
    finally:
        RESOLVED.reset(token)


def _leaves(model: BaseModel, prefix: str) -> list[tuple[str, BaseModel, str]]:
    """(dotted name, the model that holds it, its name) for every scalar field under ``model``."""
    out = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out += _leaves(value, f"{prefix}{name}.")
        elif isinstance(value, dict) and value and all(isinstance(v, BaseModel) for v in value.values()):
            for key, sub in value.items():
                out += _leaves(sub, f"{prefix}{name}.{key}.")
        else:
            out.append((f"{prefix}{name}", model, name))
    return out


def _teacher_without_effect(name: str, t: TeacherConfig) -> list[tuple[str, str]]:
    """One teacher's fields that its kind (cache, model, url) does not read."""
    out = []
    if t.url is None:
        out += [(f"{name}.{f}", f"applies to a served teacher ({name}.url) only")
                for f in ("served_model", "top_k", "timeout_s", "retries") if _set(t, f)]
    if t.cache and _set(t, "dtype"):
        out.append((f"{name}.dtype", "a cached teacher is not run; its capture dtype is in the cache"))
    if t.cache and t.load_in is not None:
        out.append((f"{name}.load_in", "a cached teacher is not run; quantise the teacher of a live run only"))
    if t.validation_cache is not None and not t.cache:
        out.append((f"{name}.validation_cache", "a live or served teacher scores the validation rows itself; a "
                                                "validation cache goes with a cached teacher"))
    return out


def _kd_off_without_effect(cfg: TrainConfig) -> list[tuple[str, str]]:
    """With a teacher but kd_weight 0, the KD term's settings shape nothing."""
    o, kd = cfg.objective, cfg.objective.kd
    if cfg.teacher is None or o.kd_weight != 0:
        return []
    why = "objective.kd_weight is 0: there is no KD term"
    out = [(f"objective.kd.{f}", why) for f in sorted(kd.model_fields_set) if _set(kd, f) and f != "cross_tokenizer"]
    out += [(f"objective.task_weights.{t}", f"{why} (task weights scale KD only)") for t in o.task_weights]
    out += [(f"objective.roles.{r}.kd", why) for r, t in o.roles.items() if _set(t, "kd")]
    return out


def _precision_without_effect(cfg: TrainConfig) -> list[tuple[str, str]]:
    p, dtype = cfg.optim.precision, cfg.student.dtype
    if p.endswith("-mixed") and dtype != "float32":
        return [("optim.precision", f"{p} keeps float32 master weights: student.dtype must be float32, not {dtype}")]
    if p == "bf16" and dtype != "bfloat16":
        return [("optim.precision", "bf16 trains pure bfloat16 weights: set student.dtype: bfloat16 too")]
    if p == "fp32" and dtype != "float32" and _set(cfg.optim, "precision"):
        return [("optim.precision", f"fp32 with student.dtype {dtype}: the weights would not be float32")]
    return []


def _routing_without_effect(cfg: TrainConfig) -> list[tuple[str, str]]:
    rt = cfg.routing
    if rt is None:
        return []
    if cfg.student.lora is None:
        return [("routing", "routing edits the main LoRA adapter's gradient: add student.lora")]
    out = [("routing.target_modules", f"{m!r} is not in student.lora.target_modules") for m in rt.target_modules
           if m not in cfg.student.lora.target_modules]
    if rt.control == "random":
        if rt.refresh_every:
            out.append(("routing.refresh_every", "a random direction does not depend on the model: a refresh "
                                                 "would change nothing (the seeds' silent no-op)"))
        if _set(rt, "method"):
            out.append(("routing.method", "routing.control is random: no direction is extracted"))
    elif _set(rt, "seed"):
        out.append(("routing.seed", "only the random control draws directions"))
    return out


def _cross_without_effect(cfg: TrainConfig) -> list[tuple[str, str]]:
    kd, o = cfg.objective.kd, cfg.objective
    if kd.cross_tokenizer == "none" or cfg.teacher is None:
        return []
    field = "objective.kd.cross_tokenizer"
    out = []
    if kd.cross_tokenizer == "uld":
        out += [(f"objective.kd.{f}", "uld compares sorted probabilities: it takes no kind, beta or alpha")
                for f in ("kind", "beta", "alpha") if _set(kd, f)]
    for name, section in (("objective.hidden", o.hidden), ("objective.on_policy", o.on_policy)):
        if section is not None:
            out.append((name, f"needs one tokenizer for teacher and student; {field} is {kd.cross_tokenizer}"))
    return out


def _on_policy_without_effect(cfg: TrainConfig) -> list[tuple[str, str]]:
    op = cfg.objective.on_policy
    if op is None:
        return []
    if cfg.teacher is None or not (cfg.teacher.model or cfg.teacher.url):
        return [("objective.on_policy", "the teacher must score the student's own tokens: set teacher.model or "
                                        "teacher.url (a cache holds the dataset's completions only)")]
    if cfg.objective.kd_weight == 0:
        return [("objective.on_policy", "objective.kd_weight is 0: on-policy steps would train nothing")]
    if cfg.reference is not None and cfg.reference.kind == "cache":
        return [("objective.on_policy", "reference.kind 'cache' cannot score the student's own tokens for the "
                                        "barrier; use reference.kind base or model")]
    if op.fraction == 0:
        return [(f"objective.on_policy.{f}", "objective.on_policy.fraction is 0: no step is on-policy")
                for f in sorted(op.model_fields_set) if f != "fraction" and _set(op, f)]
    if op.fraction == 1.0 and op.loss == "sampled_kl_rev":
        unused = [(f"objective.kd.{f}", "every step is on-policy with on_policy.loss sampled_kl_rev, which uses "
                                        "no divergence setting") for f in sorted(cfg.objective.kd.model_fields_set)
                  if _set(cfg.objective.kd, f)]
        if unused:
            return unused
    if _set(op, "sync_every") and op.rollout_url is None:
        return [("objective.on_policy.sync_every", "the student generates here (no rollout_url): nothing to sync")]
    if _set(op, "top_p") and op.temperature == 0:
        return [("objective.on_policy.top_p", "on_policy.temperature is 0 (greedy): top_p only shapes sampling")]
    return []
