"""Coherence of generated text: how much of it is not a loop.

    coherence = (1 − looped / n) · min(1, distinct_3 / 0.5)

over the text's units: words and single punctuation marks (``\w+`` or one non-space character),
whitespace dropped — so indentation and a tokenizer's quirks (a character-level model's spaces are
tokens) are not loops, while "return x return x return x" and "= = = =" are.

* ``looped``: tokens inside a tandem repeat — a unit of p tokens (1 ≤ p ≤ ``max_period``) repeated
  back to back so that it occurs at least ``min_repeats`` times in a row ("the the the", "ab ab ab ab",
  a line written three times). The first occurrence counts as looped too: the whole run is the loop.
* ``distinct_3``: distinct 3-grams ÷ 3-grams. It catches a degenerate text whose repeats are too long
  or too irregular to be a tandem repeat; ordinary text and code stay above 0.5, where the factor is 1.

1.0 = no loop and no degeneration; a text that is one loop from its first token gives 0.0; fewer than
two tokens give 1.0 (nothing to judge). The seeds (002) watch this number per probe round and plot
1 − coherence on a log axis ("log-incoherence": down is coherent).
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence

MAX_PERIOD = 16
MIN_REPEATS = 3
DISTINCT_N = 3
DISTINCT_FLOOR = 0.5


def loop_mask(tokens: Sequence[Hashable], max_period: int = MAX_PERIOD, min_repeats: int = MIN_REPEATS) -> list[bool]:
    """True for every token inside a tandem repeat of period ≤ ``max_period`` seen ≥ ``min_repeats`` times."""
    n = len(tokens)
    looped = [False] * n
    for p in range(1, min(max_period, n // min_repeats) + 1):
        run = 0  # consecutive positions j with tokens[j] == tokens[j - p]
        for j in range(p, n + 1):
            if j < n and tokens[j] == tokens[j - p]:
                run += 1
                continue
            if run >= (min_repeats - 1) * p:  # the unit and min_repeats − 1 copies of it
                for k in range(j - run - p, j):
                    looped[k] = True
            run = 0
    return looped


def distinct_n(tokens: Sequence[Hashable], n: int = DISTINCT_N) -> float:
    """Distinct n-grams ÷ n-grams (1.0 when the text is shorter than n)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def units(text: str) -> list[str]:
    """Words and single punctuation marks, whitespace dropped."""
    return re.findall(r"\w+|[^\w\s]", text)


def coherence_of(seq: Sequence[Hashable]) -> float:
    """The coherence of a sequence of units (see the module docstring)."""
    if len(seq) < 2:
        return 1.0
    loop_free = 1.0 - sum(loop_mask(seq)) / len(seq)
    return loop_free * min(1.0, distinct_n(seq) / DISTINCT_FLOOR)


def coherence(text: str) -> float:
    """The coherence of a generated text (see the module docstring)."""
    return coherence_of(units(text))
