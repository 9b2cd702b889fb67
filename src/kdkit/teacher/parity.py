"""Teacher parity: is the served teacher the teacher the user thinks it is?

On the first rows of a data file, both sides are asked the same things: the token ids of each row's
rendered text (the tokenizer), the ids of each chat row as each side's chat template renders it (the
template), and at every position of each row the top-K log-probs (the weights, the dtype, the server's
processing). A served teacher that differs beyond the tolerance is refused before anything is captured
or trained, naming the first difference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdkit.data import rows as kdata
from kdkit.models.load import load_causal_lm, load_tokenizer
from kdkit.util.errors import KdkitError

PARITY_ROWS = 4  # rows precompute and train check when a served teacher's local weights are given
TOLERANCE = 1e-3  # max |Δ log-prob| (float32 on both sides agrees to ~1e-5)
MIN_TOP1 = 0.99  # share of positions whose server top-1 is the local argmax (ties within the tolerance count)


class ParityError(KdkitError, RuntimeError):
    """The served teacher is not the local one: other tokens, another chat template, or other log-probs."""

    exit_code = 1


@dataclass
class Agreement:
    """Two teachers' log-probs compared position by position: |Δ log-prob| over the entries both give, and how
    often their top-1 agrees (a tie within the tolerance counts as agreement). Teacher parity and
    ``kdkit cache diff`` both report these."""

    deltas: list[torch.Tensor] = field(default_factory=list)
    agree: int = 0
    positions: int = 0

    def add(self, delta: torch.Tensor, same_top1: torch.Tensor) -> None:
        """``delta``: float [P, K], |Δ| where both sides hold the entry, 0 elsewhere; ``same_top1``: bool [P]."""
        self.deltas.append(delta.flatten().double())
        self.agree, self.positions = self.agree + int(same_top1.sum()), self.positions + len(same_top1)

    def _all(self) -> torch.Tensor:
        return torch.cat(self.deltas) if self.deltas else torch.zeros(1, dtype=torch.float64)

    @property
    def max_abs(self) -> float:
        return float(self._all().max())

    @property
    def mean_abs(self) -> float:
        return float(self._all().mean())

    @property
    def top1(self) -> float:
        return self.agree / max(self.positions, 1)


@dataclass
class ParityReport:
    url: str
    teacher: str
    rows: int
    positions: int
    max_abs: float
    mean_abs: float
    top1: float
    tolerance: float
    min_top1: float
    first_difference: str | None

    @property
    def passed(self) -> bool:
        return self.first_difference is None and self.max_abs <= self.tolerance and self.top1 >= self.min_top1

    def summary(self) -> str:
        verdict = "agree" if self.passed else "DIFFER"
        line = (f"teacher parity ({self.url} vs {self.teacher}): {verdict} on {self.rows} rows, {self.positions} "
                f"positions: max |Δ log-prob| {self.max_abs:.3g}, mean {self.mean_abs:.3g} (tolerance "
                f"{self.tolerance:g}), top-1 agreement {self.top1:.4f} (at least {self.min_top1:g})")
        return line if self.first_difference is None else f"{line}; first difference: {self.first_difference}"

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise ParityError(self.summary())

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def _first_mismatch(server_ids: list[int], local_ids: list[int], tokenizer: Any) -> str | None:
    for i, (a, b) in enumerate(zip(server_ids, local_ids, strict=False)):
        if a != b:
            return (f"token {i}: server id {a} ({tokenizer.convert_ids_to_tokens(a)!r}), local id {b} "
                    f"({tokenizer.convert_ids_to_tokens(b)!r})")
    if len(server_ids) != len(local_ids):
        return f"the server gives {len(server_ids)} tokens, the local tokenizer {len(local_ids)}"
    return None


def _token_difference(server: Any, tokenizer: Any, ex: kdata.Example) -> str | None:
    """The tokenizer and, for a chat row, the chat template: the first token where the sides differ."""
    msgs, kw = kdata.chat_inputs(ex) if ex.format == "messages" else ([], {})
    if ex.format == "messages":
        text = tokenizer.apply_chat_template(msgs, tokenize=False, **kw)
    else:
        text = ex.fields["text"] if ex.format == "text" else ex.fields["prompt"] + ex.fields["completion"]
    local = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    diff = _first_mismatch(server.tokenize(text=text), local, tokenizer)
    if diff is not None:
        return f"line {ex.line}: the tokenizers differ on the row's text at {diff}"
    if ex.format == "messages":
        diff = _first_mismatch(server.tokenize(messages=msgs, tools=kw.get("tools")), local, tokenizer)
        if diff is not None:
            return f"line {ex.line}: the server's chat template renders the row otherwise, at {diff}"
    return None


def token_parity(server: Any, tokenizer: Any, data_path: str | Path, n_rows: int = PARITY_ROWS) -> str | None:
    """The first difference between the server's tokens and ``tokenizer``'s on the first rows (None: none)."""
    examples = kdata.read_examples(data_path)[:n_rows]
    return next((d for d in (_token_difference(server, tokenizer, ex) for ex in examples) if d), None)


def parity_prompts(tokenizer: Any, data_path: str | Path, n_rows: int = PARITY_ROWS, max_length: int = 1024
                   ) -> list[list[int]]:
    """The first rows' tokens as training reads them, cut to ``max_length`` (rows of fewer than 2 tokens left
    out: they have no prediction position)."""
    prompts = []
    for ex in kdata.read_examples(data_path)[:n_rows]:
        ids = kdata.tokenize_example(tokenizer, Path(data_path), ex)[0]
        prompts.append([ids[i] for i in kdata.kept_tokens(ids, max_length, "right", tokenizer.bos_token_id)])
    return [p for p in prompts if len(p) >= 2]


@torch.no_grad()
def teacher_parity(server: Any, teacher: str | Path, data_path: str | Path, n_rows: int = PARITY_ROWS,
                   top_k: int = 8, dtype: str = "float32", max_length: int = 1024,
                   tolerance: float = TOLERANCE, min_top1: float = MIN_TOP1) -> ParityReport:
    """Compare ``server`` with the model in ``teacher`` on the first ``n_rows`` rows of ``data_path``."""
    tokenizer = load_tokenizer(teacher)
    examples = kdata.read_examples(data_path)[:n_rows]
    first = token_parity(server, tokenizer, data_path, n_rows)
    prompts = parity_prompts(tokenizer, data_path, n_rows, max_length)
    served = server.prompt_topk(prompts, top_k)
    model = load_causal_lm(teacher, dtype).eval()
    agreement = Agreement()
    for ex, ids, tk in zip(examples, prompts, served, strict=False):
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), dim=-1)[:, :len(tokenizer)]
        mine = lp.gather(-1, tk.ids)  # the local log-prob of each token the server ranked in its top-K
        delta = (mine - tk.logprobs).abs().where(torch.isfinite(tk.logprobs), torch.zeros(()))
        same = mine[:, 0] >= lp.max(-1).values - tolerance  # the local argmax, up to a tie within the tolerance
        agreement.add(delta, same)
        bad = ((delta > tolerance).any(-1) | ~same).nonzero().flatten()
        if first is None and len(bad):
            j = int(bad[0])
            first = (f"line {ex.line}, position {j}: server top-1 id {int(tk.ids[j, 0])} "
                     f"(log-prob {float(tk.logprobs[j, 0]):.6f}), local top-1 id {int(lp[j].argmax())} "
                     f"(log-prob {float(lp[j].max()):.6f}), max |Δ| there {float(delta[j].max()):.3g}")
    return ParityReport(url=server.url, teacher=str(teacher), rows=len(prompts), positions=agreement.positions,
                        max_abs=agreement.max_abs, mean_abs=agreement.mean_abs, top1=agreement.top1,
                        tolerance=tolerance, min_top1=min_top1, first_difference=first)


def check_servers(server: Any, tokenizer: Any, data_path: Any, prompts: list[list[int]], k: int,
                  tolerance: float) -> None:
    """Before a capture or a run: each server tokenises the data's first rows as ``tokenizer`` does (raised
    naming the server otherwise), and a fleet's servers agree (:func:`kdkit.teacher.fleet.agreement`)."""
    from kdkit.teacher.fleet import agreement, servers_of
    from kdkit.teacher.served import ServedError

    for one in servers_of(server):
        tokens = token_parity(one, tokenizer, data_path)
        if tokens is not None:
            raise ServedError(f"{one.url} does not tokenise {data_path} as the local tokenizer does: {tokens}")
    agreement(server, prompts, k, tolerance)
