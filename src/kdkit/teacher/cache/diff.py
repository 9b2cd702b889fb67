"""``kdkit cache diff A B``: two caches of the same rows, compared where they can differ.

What a team needs when two machines, or a server and a local capture, disagree: the key fields and the
compute environments that differ (from the manifests), then at every stored position: whether the top-K
ids are the same set, |Δ log-prob| over the ids both hold (max and mean), top-1 agreement (a tie within
the tolerance counts), and the bucket KL(A ‖ B) over A's K ids and the rest of the mass (B's probability
of an id it did not keep is its share of B's tail, spread evenly over the ids it did not keep; on both
sides the rest is 1 − Σ of the probabilities at A's ids, so that a cache against itself gives 0). The
statistics are teacher parity's (:class:`kdkit.teacher.parity.Agreement`), the KL is
:func:`kdkit.loss.divergences.token_divergence`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdkit.loss.divergences import TopK, token_divergence
from kdkit.teacher.cache.format import KEY_FIELDS
from kdkit.teacher.cache.reader import CachedRow, TeacherCache
from kdkit.teacher.parity import Agreement
from kdkit.util.environment import differences

_CHUNK = 64  # positions per dense slice of B: 64 × V float32 (39 MB at V = 152k)


@dataclass
class CacheDiff:
    a: str
    b: str
    key_fields: list[str]  # "field: A vs B" for each key component that differs
    environment: list[str]  # the same for the compute environments the manifests record
    rows: int
    positions: int
    ids_differ: int  # positions whose top-K ids are not the same set
    max_abs: float
    mean_abs: float
    top1: float
    bucket_kl_mean: float
    bucket_kl_max: float
    tolerance: float
    first_difference: str | None  # rows that are not the same rows, or the first position beyond the tolerance

    @property
    def passed(self) -> bool:
        return self.first_difference is None and self.max_abs <= self.tolerance

    def summary(self) -> list[str]:
        lines = [f"cache diff {self.a} vs {self.b}: {'agree' if self.passed else 'DIFFER'} within |Δ log-prob| <= "
                 f"{self.tolerance:g} on {self.rows} rows, {self.positions} positions",
                 f"key fields that differ: {'; '.join(self.key_fields) or 'none (the same key)'}",
                 f"compute environments: {'; '.join(self.environment) or 'the same'}",
                 f"top-K ids differ at {self.ids_differ} of {self.positions} positions; top-1 agreement "
                 f"{self.top1:.4f}",
                 f"|Δ log-prob| max {self.max_abs:.3g}, mean {self.mean_abs:.3g}; bucket KL(A ‖ B) mean "
                 f"{self.bucket_kl_mean:.3g}, max {self.bucket_kl_max:.3g} nats"]
        return lines + ([f"first difference: {self.first_difference}"] if self.first_difference else [])

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def _tensors(row: CachedRow) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(row.ids.astype(np.int64)), torch.from_numpy(row.logprobs.astype(np.float32)),
            torch.from_numpy(row.tail.astype(np.float32)))


def _dense(ids: torch.Tensor, lps: torch.Tensor, tail: torch.Tensor, vocab: int) -> torch.Tensor:
    """Log-probs [P, V]: the K stored ones, the tail's mass spread evenly over the other V − K ids."""
    rest = tail - math.log(max(vocab - ids.shape[-1], 1))
    out = rest[:, None].expand(len(ids), vocab).clone()
    return out.scatter_(1, ids, lps)


def _row(ra: CachedRow, rb: CachedRow, vocab: int, tol: float, agreement: Agreement
         ) -> tuple[int, torch.Tensor, int | None]:
    """One row: (positions whose id sets differ, bucket KL per position, first position beyond ``tol``)."""
    ia, la, _ = _tensors(ra)
    ib, lb, tb = _tensors(rb)
    match = ia[:, :, None] == ib[:, None, :]  # [P, Ka, Kb]
    held = match.any(-1)
    lb_at_a = torch.where(match, lb[:, None, :], torch.zeros(())).sum(-1)
    both = held & torch.isfinite(la) & torch.isfinite(lb_at_a)
    delta = torch.where(both, (la - torch.where(both, lb_at_a, la)).abs(), torch.zeros(()))
    la_at_b0 = torch.where(ia == ib[:, :1], la, torch.full_like(la, -math.inf)).max(-1).values
    same = (ia[:, 0] == ib[:, 0]) | (la_at_b0 >= la[:, 0] - tol)
    agreement.add(delta, same)
    differ = int((~held.all(-1)).sum()) if ia.shape[-1] == ib.shape[-1] else len(ia)
    rest_a = torch.log((1 - la.double().exp().sum(-1)).clamp(min=1e-12)).float()  # as B's rest is taken
    kl = torch.cat([token_divergence(_dense(ib[s], lb[s], tb[s], vocab), TopK(ids=ia[s], logprobs=la[s], tail=rest_a[s]),
                                     "kl_fwd", t2_scale=False, normalized=True)
                    for s in (slice(i, i + _CHUNK) for i in range(0, len(ia), _CHUNK))]) if len(ia) else torch.zeros(0)
    bad = ((delta > tol).any(-1) | ~same).nonzero().flatten()
    return differ, kl, int(bad[0]) if len(bad) else None


def diff_caches(a: str | Path, b: str | Path, tolerance: float = 1e-3) -> CacheDiff:
    """Compare cache ``b`` with cache ``a`` (both complete, every shard re-hashed as it is read)."""
    ca, cb = TeacherCache(a), TeacherCache(b)
    keys = [f"{f}: {ca.components.get(f)!r} vs {cb.components.get(f)!r}" for f in KEY_FIELDS
            if ca.components.get(f) != cb.components.get(f)]
    env_a, env_b = ca.manifest.get("environment"), cb.manifest.get("environment")
    env = (differences(env_a, env_b) if isinstance(env_a, dict) and isinstance(env_b, dict)
           else [] if env_a == env_b else [f"environment: {env_a!r} vs {env_b!r}"])
    agreement, kls, differ, first = Agreement(), [], 0, None
    if len(ca) != len(cb):
        first = f"A holds {len(ca)} rows, B {len(cb)}: not the same rows"
    vocab = max(ca.vocab_size, cb.vocab_size)
    for r in range(len(ca) if first is None else 0):
        ra, rb = ca.row(r), cb.row(r)
        if not np.array_equal(ra.pos, rb.pos):
            first = f"row {r}: the stored positions differ ({len(ra.pos)} vs {len(rb.pos)}): not the same rows"
            break
        n, kl, bad = _row(ra, rb, vocab, tolerance, agreement)
        differ, kls = differ + n, [*kls, kl]
        if first is None and bad is not None:
            first = (f"row {r}, position {int(ra.pos[bad])}: A's top-1 id {int(ra.ids[bad, 0])} "
                     f"({float(ra.logprobs[bad, 0]):.6f}), B's {int(rb.ids[bad, 0])} ({float(rb.logprobs[bad, 0]):.6f})")
    every = torch.cat(kls) if kls else torch.zeros(1)
    return CacheDiff(str(a), str(b), keys, env, len(ca), agreement.positions, differ, agreement.max_abs,
                     agreement.mean_abs, agreement.top1, float(every.double().mean()), float(every.max()), tolerance,
                     first)
