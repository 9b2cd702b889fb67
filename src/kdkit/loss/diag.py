"""Diagnostics that explain a convention with numbers computed by the library itself.

``kl_agg_demo`` is the seeds' synthetic case for aggregating the per-position
barrier KL by an outlier-sensitive statistic instead of the mean: a *coherent*
student moves a little mass onto a plausible token at every position; an
*incoherent* one copies the reference except at a few positions where it spikes on
an improbable token (a token loop). The mean dilutes the loop under a hinge τ;
rmse / p95 / max do not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kdkit.loss.divergences import AGGREGATIONS, aggregate, hinge, token_divergence

DIAG_AGGREGATIONS = ("mean", "rmse", "p95", "max")


@dataclass
class KlAggResult:
    kind: str
    tau: float
    values: dict[str, dict[str, float]]  # student -> aggregation -> value
    ratio: dict[str, float]  # aggregation -> incoherent / coherent
    fires: dict[str, dict[str, bool]]  # student -> aggregation -> hinge(agg, tau) > 0


def _synthetic_logits(seed: int, vocab: int, positions: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((positions, vocab))
    p = np.exp(base - base.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    order = np.argsort(p.mean(0))
    plausible, improbable = order[len(order) // 2], order[3]
    coherent = base.copy()
    coherent[:, plausible] += 1.6
    incoherent = base.copy()
    for t in (12, 13, 14, 15):
        incoherent[t] = -10.0
        incoherent[t, improbable] = 12.0
    as_t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    return as_t(base), as_t(coherent), as_t(incoherent)


def kl_agg_demo(*, kind: str = "kl_rev", tau: float = 0.5, seed: int = 0, vocab: int = 200,
                positions: int = 60) -> KlAggResult:
    """Per-position divergence(student ‖ reference) aggregated every way; see module doc."""
    base, coherent, incoherent = _synthetic_logits(seed, vocab, positions)
    mask = torch.ones(positions, dtype=torch.bool)
    values: dict[str, dict[str, float]] = {}
    fires: dict[str, dict[str, bool]] = {}
    for name, student in (("coherent", coherent), ("incoherent", incoherent)):
        per_pos = token_divergence(student, base, kind)
        values[name] = {h: float(aggregate(per_pos, mask, h)) for h in DIAG_AGGREGATIONS}
        fires[name] = {h: bool(hinge(torch.tensor(v), tau) > 0) for h, v in values[name].items()}
    ratio = {h: values["incoherent"][h] / max(values["coherent"][h], 1e-30) for h in DIAG_AGGREGATIONS}
    assert set(DIAG_AGGREGATIONS) <= set(AGGREGATIONS)
    return KlAggResult(kind=kind, tau=tau, values=values, ratio=ratio, fires=fires)
