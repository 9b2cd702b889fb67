"""The math, with no I/O and no config: per-position divergences and their aggregates (``divergences``),
CE + KD from hidden states in chunks (``chunked``), distributions over two vocabularies (``crosstok``),
and the numbers behind ``kdkit diag`` (``diag``). Every divergence is computed in float32."""

from kdkit.loss.chunked import chunked_ce_kd
from kdkit.loss.crosstok import gold, uld
from kdkit.loss.divergences import (
    AGGREGATIONS,
    IGNORE_INDEX,
    KINDS,
    TopK,
    aggregate,
    hinge,
    sampled_kl_rev,
    token_ce,
    token_divergence,
)

__all__ = ["TopK", "token_divergence", "token_ce", "aggregate", "hinge", "sampled_kl_rev", "chunked_ce_kd", "uld",
           "gold", "KINDS", "AGGREGATIONS", "IGNORE_INDEX"]
