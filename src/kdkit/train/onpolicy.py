"""On-policy distillation (GKD; Agarwal et al., ICLR 2024): the student writes, the teacher scores.

On a λ share of optimizer steps (``objective.on_policy.fraction``) every row of the step keeps its
prompt and gets a completion the student generates itself; the live teacher then scores those tokens
and the loss on them is ``objective.kd`` (``kl_rev`` and ``jsd`` with β are the usual choices). CE is
off on generated tokens: they are not ground truth. Which steps are on-policy is a function of the
seed and the step number alone, and sampling is seeded per (seed, step, rank, micro-batch), so a
resumed run makes the same choices and the same samples; with λ = 0 no step is on-policy and the run
is the off-policy run, bit for bit.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import torch

from kdkit.config.schema import ObjectiveConfig, OnPolicyConfig
from kdkit.data import rows as kdata
from kdkit.models.generation import GenerationSettings, eos_ids, generate_ids
from kdkit.util.rng import own_rng


def is_on_policy(op: OnPolicyConfig | None, step: int) -> bool:
    """Whether optimizer step ``step`` (0-based) is on-policy: a seeded draw per step, so it never depends
    on what ran before (a resume, a different world size)."""
    if op is None or op.fraction <= 0.0:
        return False
    if op.fraction >= 1.0:
        return True
    return random.Random(f"kdkit-on-policy:{op.seed}:{step}").random() < op.fraction


def sample_seed(op: OnPolicyConfig, step: int, rank: int, micro: int) -> int:
    digest = hashlib.sha256(f"kdkit-rollout:{op.seed}:{step}:{rank}:{micro}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def prompt_ids(row: kdata.TokenizedRow) -> list[int]:
    """The tokens before the row's first target (for a ``text`` row with loss everywhere: its first token)."""
    first = next((i for i, m in enumerate(row.loss_mask) if m), len(row.loss_mask))
    return row.input_ids[:max(first, 1)]


def settings(op: OnPolicyConfig) -> GenerationSettings:
    sample = op.temperature > 0
    return GenerationSettings(max_new_tokens=op.max_new_tokens, do_sample=sample,
                              temperature=op.temperature if sample else 1.0, top_p=op.top_p if sample else 1.0)


def rollouts(model: torch.nn.Module, tokenizer: Any, rows: list[kdata.TokenizedRow], op: OnPolicyConfig,
             seed: int, server: Any = None) -> list[kdata.TokenizedRow]:
    """Each row's prompt followed by the student's own completion, which is the only target; written by
    ``server`` (a :class:`kdkit.train.rollout.RolloutServer` holding the student's weights) when given."""
    prompts = [prompt_ids(r) for r in rows]
    if server is not None:
        s = settings(op)
        completions = server.generate(prompts, s.max_new_tokens, s.temperature if s.do_sample else 0.0, s.top_p,
                                      seed, sorted(eos_ids(model, tokenizer)))
    else:
        with own_rng():  # sampling neither reads nor moves the training RNG
            torch.manual_seed(seed)
            completions = generate_ids(model, tokenizer, prompts, settings(op))
    return [kdata.TokenizedRow(input_ids=list(p) + c, loss_mask=[False] * len(p) + [True] * len(c), role=r.role,
                               task=r.task, weight=r.weight, line=r.line, teacher=r.teacher)
            for p, c, r in zip(prompts, completions, rows, strict=True)]


def objective(cfg: ObjectiveConfig) -> ObjectiveConfig:
    """The objective of an on-policy step: the same KD and barrier, no CE (generated tokens are not labels)."""
    return cfg.model_copy(update={"ce_coef": 0.0})
