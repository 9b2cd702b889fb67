r"""Coherence of generated text: how much of it is not a loop.

    coherence = (1 − looped) · min(1, distinct_3 / 0.5)

``looped`` is the larger of two shares: of the text's units (words and punctuation marks, ``\w+`` or
a run of one non-space character such as "..." or "==") inside a loop, and of its non-space characters inside a loop of
at least 4 repeats (a loop inside one "word", ``4747474747``, that the units cannot see). Whitespace
never counts: indentation and a character-level tokenizer's spaces are not loops, while
"return x return x return x", "= = = =" and "abababab" are. ``distinct_3`` is over the units.

* ``looped``: tokens inside a tandem repeat — a unit of p tokens (1 ≤ p ≤ ``max_period``) repeated
  back to back so that it occurs at least ``min_repeats`` times in a row ("the the the", "ab ab ab ab",
  a line written three times). The first occurrence counts as looped too: the whole run is the loop.
* ``distinct_3``: distinct 3-grams ÷ 3-grams. It catches a degenerate text whose repeats are too long
  or too irregular to be a tandem repeat; ordinary text and code stay above 0.5, where the factor is 1.

1.0 = no loop and no degeneration; a text that is one loop from its first unit gives 0.0; an empty (or
all-whitespace) text gives 0.0 — a probe that says nothing is not coherent; a text of one short unit
gives 1.0 (nothing to judge). The seeds (002) watch this number per probe round and plot
1 − coherence on a log axis ("log-incoherence": down is coherent).
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence

MAX_PERIOD = 16
MIN_REPEATS = 3
MIN_CHAR_REPEATS = 4
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
    """Words and punctuation marks (a run of one mark, "..." or "==", is one unit), whitespace dropped."""
    return [m.group(0) for m in re.finditer(r"\w+|([^\w\s])\1*", text)]


def looped_share(seq: Sequence[Hashable], min_repeats: int = MIN_REPEATS) -> float:
    return sum(loop_mask(seq, min_repeats=min_repeats)) / len(seq) if seq else 0.0


def coherence(text: str) -> float:
    """The coherence of a generated text (see the module docstring): empty 0.0, one short unit 1.0."""
    if not text.strip():
        return 0.0
    seq = units(text)
    if len(seq) < 2 and len(text.strip()) < 2:
        return 1.0
    chars = [c for c in text if not c.isspace()]
    looped = max(looped_share(seq), looped_share(chars, MIN_CHAR_REPEATS))
    return (1.0 - looped) * min(1.0, distinct_n(seq) / DISTINCT_FLOOR)
