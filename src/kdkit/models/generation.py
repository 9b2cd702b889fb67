"""Text generation with every setting explicit: one module for evaluation and everything that generates.

Nothing is inherited from a model's ``generation_config.json`` (a repetition penalty there would
silently change "greedy" outputs); the settings used are a :class:`GenerationSettings`, recorded by
the callers with their results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kdkit.util.errors import UsageError

PROMPT_STYLES = ("raw", "chat")
DEFAULT_INSTRUCTION = ("Complete the following Python function. Answer with the whole function, including any "
                       "imports it needs, in one Python code block.")
StopRule = Callable[[str], "int | None"]
"""Given a row's generated text so far: the index to cut it at once it is complete, else None."""


@dataclass(frozen=True)
class GenerationSettings:
    """Every setting generation uses. Nothing is taken from the model's ``generation_config.json``:
    greedy means greedy (no repetition penalty, no forced tokens, no top-k/top-p), as the seeds' lever F."""

    max_new_tokens: int = 256
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off (sampling only)
    repetition_penalty: float = 1.0
    n_samples: int = 1
    seed: int = 0
    prompt_style: str = "raw"  # raw: the task's prompt as is; chat: inside the model's chat template
    instruction: str = DEFAULT_INSTRUCTION
    system: str | None = None

    def __post_init__(self) -> None:
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt style {self.prompt_style!r}; valid: {', '.join(PROMPT_STYLES)}")
        # one place for the ranges, whichever command built the settings (generate, eval, gate, probes)
        for flag, ok, valid in (("--top-p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
                                ("--temperature", self.temperature > 0.0, "> 0 (0 means greedy: leave sampling off)"),
                                ("--top-k", self.top_k >= 0, ">= 0 (0 = off)"),
                                ("--repetition-penalty", self.repetition_penalty > 0.0, "> 0 (1.0 = off)"),
                                ("--max-new-tokens", self.max_new_tokens >= 1, ">= 1"),
                                ("--batch-size", self.batch_size >= 1, ">= 1"),
                                ("--n-samples", self.n_samples >= 1, ">= 1")):
            if not ok:
                value = getattr(self, flag[2:].replace("-", "_"))
                raise UsageError(f"{flag} must be {valid}, got {value}")


def render_prompts(tokenizer: Any, prompts: Sequence[str], settings: GenerationSettings) -> list[str]:
    """The text the model is given: the prompt itself (raw), or a user turn holding the instruction and
    the prompt in a code block, rendered by the model's own chat template with the generation prompt
    (chat; with the system message first when there is one)."""
    if settings.prompt_style == "raw":
        return list(prompts)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("--prompt-style chat: the model's tokenizer has no chat template (use --prompt-style raw)")
    head = [{"role": "system", "content": settings.system}] if settings.system else []
    return [tokenizer.apply_chat_template(head + [{"role": "user", "content": f"{settings.instruction}\n\n```python\n"
                                                   f"{p.rstrip()}\n```"}], tokenize=False, add_generation_prompt=True)
            for p in prompts]


class RealVocabOnly:
    """A logits processor: ids past the tokenizer's vocabulary (padded rows of an LM head, e.g. 49,280 rows
    for 49,152 tokens) get -inf, so neither sampling nor greedy decoding can pick an id that decodes to
    nothing. A head without padded rows is left as it is (bit for bit)."""

    def __init__(self, real_vocab: int) -> None:
        self.real_vocab = real_vocab

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if scores.shape[-1] > self.real_vocab:
            scores[..., self.real_vocab:] = float("-inf")
        return scores


def real_vocab_processors(tokenizer: Any) -> Any:
    from transformers import LogitsProcessorList

    return LogitsProcessorList([RealVocabOnly(len(tokenizer))])


def explicit_generation_config(settings: GenerationSettings, model: Any, tokenizer: Any) -> Any:
    """A GenerationConfig built only from ``settings`` and the special-token ids (EOS, pad, BOS).

    transformers fills every unset field of a passed config from the model's own generation config,
    so the model's config is swapped for this one during generation (see :func:`generate`)."""
    from transformers import GenerationConfig

    own = getattr(model, "generation_config", None)
    eos = getattr(own, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        eos[0] if isinstance(eos, list) else eos)
    kw: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample, "num_beams": 1,
                          "repetition_penalty": settings.repetition_penalty, "eos_token_id": eos, "pad_token_id": pad,
                          "bos_token_id": getattr(own, "bos_token_id", None)}
    if settings.do_sample:
        kw.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    return GenerationConfig(**kw)


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], settings: GenerationSettings = GenerationSettings(),
             on_batch: Callable[[int], None] | None = None, stop: StopRule | None = None,
             add_special_tokens: bool = True,
             on_texts: Callable[[int, int, list[str]], None] | None = None) -> list[list[str]]:
    """Continuations of each prompt (``n_samples`` each). Greedy by default: deterministic.

    Batches are left-padded and use the KV cache; each row stops on its own at EOS or where
    ``stop(text)`` returns a cut index (its text is cut there); a batch ends when every row has
    stopped. The same model + prompts + settings give the same text. ``add_special_tokens=False`` for
    prompts that already carry them (a rendered chat template). ``on_texts(sample, first_prompt, texts)``
    receives each batch's texts as soon as it is done (to verify them while the next batch generates).
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    device = next(model.parameters()).device
    config = explicit_generation_config(settings, model, tokenizer)
    own_config = model.generation_config
    model.generation_config = config  # nothing of the model's own generation config may leak in
    prev_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outs: list[list[str]] = [[] for _ in prompts]

    class _AllStopped(StoppingCriteria):
        def __init__(self, start: int) -> None:
            self.start = start

        def __call__(self, input_ids, scores, **kw):  # noqa: ANN001
            # EOS is handled by generate itself; this adds the caller's per-row rule
            if stop is None:
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            texts = tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
            return torch.tensor([stop(t) is not None for t in texts], device=input_ids.device)

    try:
        model.eval()
        for sample in range(settings.n_samples):
            if settings.do_sample:
                torch.manual_seed(settings.seed + sample)
            for lo in range(0, len(prompts), settings.batch_size):
                chunk = list(prompts[lo:lo + settings.batch_size])
                enc = tokenizer(chunk, return_tensors="pt", padding=True,
                                add_special_tokens=add_special_tokens).to(device)
                start = enc["input_ids"].shape[1]
                gen = _generate_compacting(model, enc["input_ids"], enc["attention_mask"], config,
                                           StoppingCriteriaList([_AllStopped(start)]), _finished(stop, tokenizer, start),
                                           real_vocab_processors(tokenizer))
                texts = tokenizer.batch_decode(gen, skip_special_tokens=True)
                texts = [t if (cut := stop(t) if stop is not None else None) is None else t[:cut] for t in texts]
                for j, t in enumerate(texts):
                    outs[lo + j].append(t)
                if on_texts is not None:
                    on_texts(sample, lo, texts)
                if on_batch is not None:
                    on_batch(len(chunk))
    finally:
        tokenizer.padding_side = prev_side
        model.generation_config = own_config
    return outs


SEGMENT = 16
"""New tokens per ``model.generate`` call in :func:`_generate_compacting`: between calls the rows that
have finished leave the batch, so no row waits more than this many steps for the longest one."""


def _finished(stop: StopRule | None, tokenizer: Any, start: int) -> Callable[[Any, set[int]], list[bool]]:
    """Which rows of a batch have finished: an EOS among their new tokens, or their text complete by ``stop``."""

    def done(seqs: Any, eos: set[int]) -> list[bool]:
        new = seqs[:, start:]
        out = [any(t in eos for t in row) for row in new.tolist()]
        if stop is not None:
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            out = [o or stop(t) is not None for o, t in zip(out, texts, strict=True)]
        return out

    return done


def _generate_compacting(model: Any, ids: Any, att: Any, config: Any, criteria: Any,
                         finished: Callable[[Any, set[int]], list[bool]], processors: Any) -> list[Any]:
    """Each row's new tokens (the prompt's left-padded width cut off). Generation runs :data:`SEGMENT`
    tokens at a time over the KV cache; after each call the finished rows leave the batch and the cache,
    so a batch costs what its unfinished rows cost. A row's tokens are what one ``model.generate`` call
    over the batch would give (continuing from the cache feeds only the last token), up to the batch
    composition's effect on float rounding."""
    import copy
    import warnings

    import torch

    width, budget = ids.shape[1], config.max_new_tokens
    eos = config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    alive, out, cache = list(range(ids.shape[0])), [None] * ids.shape[0], None
    while alive:
        step = copy.copy(config)
        step.max_new_tokens = min(SEGMENT, budget - (ids.shape[1] - width))
        step.return_dict_in_generate = True  # for the KV cache
        # past_key_values is the name every supported transformers release takes; 5.x's rename notice is not
        # the user's to act on
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`past_key_values` is deprecated", category=FutureWarning)
            res = model.generate(input_ids=ids, attention_mask=att, past_key_values=cache, generation_config=step,
                                 stopping_criteria=criteria, logits_processor=processors)
        seqs, cache = res.sequences, res.past_key_values
        done = finished(seqs, eos)
        full = seqs.shape[1] - width >= budget or seqs.shape[1] - ids.shape[1] < step.max_new_tokens
        keep = [i for i, d in enumerate(done) if not (d or full)]
        for i, row in enumerate(alive):
            if i not in keep:
                out[row] = seqs[i, width:]
        if not keep:
            break
        index = torch.tensor(keep, device=seqs.device)
        att = torch.cat([att, att.new_ones(att.shape[0], seqs.shape[1] - ids.shape[1])], dim=1)[index]
        ids, alive = seqs[index], [alive[i] for i in keep]
        cache.batch_select_indices(index)
    return out


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every token id that ends a completion: the model's generation EOS ids and the tokenizer's EOS."""
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(own if isinstance(own, list) else [own]) | {tokenizer.eos_token_id}
    return {int(i) for i in ids if i is not None}


def generate_ids(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]],
                 settings: GenerationSettings) -> list[list[int]]:
    """Token-level :func:`generate` for prompts already tokenised: one batch, left-padded, KV cache; each
    completion is cut after its first EOS (kept: it is a token the model chose). Sampling draws from
    torch's global generator: seed it (inside ``torch.random.fork_rng``) before calling."""
    import torch

    device = next(model.parameters()).device
    config = explicit_generation_config(settings, model, tokenizer)
    from kdkit.data.rows import pad

    ids, att = pad(prompts, int(config.pad_token_id), side="left")
    width = ids.shape[1]
    stops = eos_ids(model, tokenizer)
    own_config, was_training = model.generation_config, model.training
    model.generation_config = config  # nothing of the model's own generation config may leak in
    try:
        model.eval()
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), generation_config=config,
                                 logits_processor=real_vocab_processors(tokenizer))
    finally:
        model.generation_config = own_config
        model.train(was_training)
    completions = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        completions.append(row[:end])
    return completions
