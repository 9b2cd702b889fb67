"""Probe rounds: what the model writes as training goes on (seeds 002 and 004).

A round generates greedy completions of fixed prompts, scores each with :mod:`kdkit.evaluate.coherence`, and
measures the per-position divergence KL(student ‖ reference) on the generated tokens, aggregated over all
of them by mean, rmse, p95 and max (``kdkit.loss.divergences.aggregate``) — the reference is the barrier's, else a
live teacher, else none. ``probes.jsonl`` gets one row per prompt and round; ``metrics.jsonl`` one row
per round (``probe_round: true``). :class:`EarlyStop` turns the rounds into the coherence-floor stop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kdkit.config.schema import EarlyStopConfig, ProbesConfig
from kdkit.data import rows as kdata
from kdkit.evaluate.coherence import coherence
from kdkit.loss.divergences import aggregate, token_divergence
from kdkit.models.generation import GenerationSettings, generate_ids
from kdkit.models.load import pad_id, vocab_logits
from kdkit.teacher.seqkd import prompt_tokens, read_prompts
from kdkit.teacher.signals import Signal

AGGREGATES = ("mean", "rmse", "p95", "max")
BATCH = 8  # prompts per generation batch


@dataclass
class Probe:
    prompt_id: str
    ids: list[int]


def load_probes(cfg: ProbesConfig, tokenizer: Any) -> list[Probe]:
    """The probe prompts, tokenised as training would (a prompt's special tokens, or the chat template)."""
    return [Probe(str(obj.get("id", line)), prompt_tokens(tokenizer, obj, cfg.prompts, line))
            for line, obj in read_prompts(cfg.prompts)]


@torch.no_grad()
def probe_round(model: torch.nn.Module, tokenizer: Any, probes: list[Probe], cfg: ProbesConfig, step: int,
                reference: Signal | None, real_vocab: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One round: the probes.jsonl rows and the metrics row."""
    settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens)
    records, divs = [], []
    pad = pad_id(tokenizer)
    for lo in range(0, len(probes), BATCH):
        chunk = probes[lo:lo + BATCH]
        outs = generate_ids(model, tokenizer, [p.ids for p in chunk], settings)
        for p, ids in zip(chunk, outs, strict=True):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            records.append({"step": step, "prompt_id": p.prompt_id, "text": text, "tokens": len(ids),
                            "coherence": coherence(text)})
        if reference is not None:
            divs.append(_divergence(model, chunk, outs, reference, pad, real_vocab))
    row: dict[str, Any] = {"step": step, "probe_round": True,
                           "probe_coherence": sum(r["coherence"] for r in records) / len(records),
                           "probe_coherence_min": min(r["coherence"] for r in records),
                           "probe_tokens": sum(r["tokens"] for r in records) / len(records)}
    if divs:
        kl = torch.cat(divs)
        every = torch.ones_like(kl, dtype=torch.bool)
        row.update({f"probe_kl_{how}": float(aggregate(kl, every, how)) for how in AGGREGATES})
    return records, row


def _divergence(model: torch.nn.Module, chunk: list[Probe], outs: list[list[int]], reference: Signal, pad: int,
                real_vocab: int) -> torch.Tensor:
    """KL(student ‖ reference) at every generated position of a batch of probes, flattened."""
    rows = [kdata.TokenizedRow(p.ids + o, [False] * len(p.ids) + [True] * len(o)) for p, o in zip(chunk, outs,
                                                                                                   strict=True)]
    batch = kdata.collate(rows, pad).to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    student = vocab_logits(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1],
                           real_vocab, "student")
    ref = reference(batch, model)
    model.train(was_training)
    div = token_divergence(student, ref, "kl_rev", t2_scale=False)
    return div[batch.targets != kdata.IGNORE_INDEX].float().cpu()


@dataclass
class EarlyStop:
    """The coherence floor: counts rounds in a row below it and remembers the last round at or above it."""

    cfg: EarlyStopConfig
    below: int = 0
    last_good_step: int | None = None
    history: list[tuple[int, float]] = field(default_factory=list)

    def update(self, step: int, coh: float) -> str:
        """'good' (at or above the floor: snapshot these weights), 'below', or 'stop'."""
        self.history.append((step, coh))
        if coh >= self.cfg.coherence_floor:
            self.below, self.last_good_step = 0, step
            return "good"
        self.below += 1
        return "stop" if self.below >= self.cfg.patience else "below"

    def state(self) -> dict[str, Any]:
        return {"below": self.below, "last_good_step": self.last_good_step, "history": self.history}

    def load(self, state: dict[str, Any]) -> None:
        self.below, self.last_good_step = int(state["below"]), state["last_good_step"]
        self.history = [tuple(h) for h in state["history"]]
