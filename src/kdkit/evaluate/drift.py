"""Drift from the base: how far a candidate's next-token distributions moved from the base's, on rows, with one
forward of each model and no generation.

At every target token of the rows (what training reads as targets: a completion, an assistant turn),
at temperature 1 over the tokenizer's real vocabulary, in float32:

    KL(base ‖ candidate) = Σ_v p_base(v) · (log p_base(v) − log p_cand(v))      (forward, from the base)
    KL(candidate ‖ base) = Σ_v p_cand(v) · (log p_cand(v) − log p_base(v))      (reverse)

each reported as its mean and its 95th percentile (linear interpolation, as numpy's default) over all the
target tokens. At matched new-task accuracy, the forward KL from the base on the new task's distribution
predicts forgetting (Shenfeld et al., "RL's Razor", arXiv 2509.04259): a cheap number to set beside the
expensive anchor pass counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kdkit.data import rows as kdata
from kdkit.loss.divergences import aggregate, token_divergence
from kdkit.models.load import (
    check_model_dir,
    load_causal_lm,
    load_tokenizer,
    pad_id,
    target_logits,
    tokenizer_fingerprint,
)
from kdkit.util.errors import KdkitError
from kdkit.util.progress import Ticker

DRIFT_FILE = "drift.json"


class DriftError(KdkitError, ValueError):
    """Two models that cannot be compared token by token, or rows with nothing to compare on."""


@dataclass(frozen=True)
class Drift:
    """The two KLs' mean and p95 over ``tokens`` target tokens of ``rows`` (nats per token)."""

    rows: str
    row_count: int
    tokens: int
    kl_base_cand_mean: float
    kl_base_cand_p95: float
    kl_cand_base_mean: float
    kl_cand_base_p95: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        return (f"drift on {self.tokens} target tokens of {self.row_count} rows: KL(base‖cand) mean "
                f"{self.kl_base_cand_mean:.4g} p95 {self.kl_base_cand_p95:.4g}, KL(cand‖base) mean "
                f"{self.kl_cand_base_mean:.4g} p95 {self.kl_cand_base_p95:.4g} nats")


def per_token(candidate: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(base ‖ candidate) and KL(candidate ‖ base) per position, float32, from logits [..., V] of each."""
    forward = token_divergence(candidate, base, "kl_fwd", temperature=1.0, t2_scale=False)
    reverse = token_divergence(candidate, base, "kl_rev", temperature=1.0, t2_scale=False)
    return forward, reverse


def summarise(forward: torch.Tensor, reverse: torch.Tensor, rows: str, row_count: int) -> Drift:
    """The mean and p95 of each KL over all the target tokens (flat float32 vectors)."""
    everywhere = torch.ones_like(forward, dtype=torch.bool)
    figures = [float(aggregate(v, everywhere, how)) for v in (forward, reverse) for how in ("mean", "p95")]
    return Drift(rows, row_count, int(forward.numel()), *figures)


def load_candidate(candidate: str | Path, dtype: str) -> Any:
    """A model directory, or a LoRA adapter (a PEFT adapter directory, a LoRA run or its ``final/``) on its base
    model: the adapter applied, not merged."""
    from kdkit.evaluate.served import ADAPTER_FILE, adapter_dir

    adapter = adapter_dir(Path(candidate))
    if adapter is None:
        return load_causal_lm(candidate, dtype)
    import json

    from peft import PeftModel

    base = json.loads((adapter / ADAPTER_FILE).read_text()).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise DriftError(f"{adapter}: its base model {base!r} is not a directory here (adapter_config.json)")
    return PeftModel.from_pretrained(load_causal_lm(base, dtype), str(adapter))


def answer_rows(tasks: list[Any], completions: dict[str, str], path: str | Path) -> Path:
    """A data file of the tasks' prompts with the answers given (``prompt`` + ``completion`` rows): drift is then
    measured where production answers — the anchors — not where the candidate was trained."""
    import json

    from kdkit.util.io import atomic_write_bytes

    rows = [{"prompt": t.prompt, "completion": completions[t.task_id], "task": t.task_id} for t in tasks
            if completions.get(t.task_id, "").strip()]
    atomic_write_bytes(Path(path), "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())
    return Path(path)


def same_tokenizer(candidate: str | Path, base: str | Path) -> Any:
    """The tokenizer the two models share (a KL per token compares one vocabulary); refused otherwise."""
    from kdkit.evaluate.served import adapter_dir

    tok, other = load_tokenizer(adapter_dir(Path(candidate)) or candidate), load_tokenizer(base)
    if tokenizer_fingerprint(tok)["sha256"] != tokenizer_fingerprint(other)["sha256"]:
        raise DriftError(f"--drift-from {base}: its tokenizer is not {candidate}'s; a per-token KL needs one "
                         f"vocabulary (drift is measured from the model the candidate was trained from)")
    return tok


@torch.no_grad()
def drift(candidate: str | Path, base: str | Path, rows_path: str | Path, *, max_length: int = 1024,
          batch_size: int = 8, dtype: str = "float32", device: str | None = None,
          log: Callable[[str], None] = lambda m: None) -> Drift:
    """KL(base ‖ candidate) and KL(candidate ‖ base) over the target tokens of ``rows_path`` (any data file
    ``kdkit train`` reads), the rows tokenised as training tokenises them (``max_length``, left truncation)."""
    from kdkit.evaluate.served import adapter_dir

    if adapter_dir(Path(candidate)) is None:
        check_model_dir(candidate)
    check_model_dir(base, "--drift-from")
    tok = same_tokenizer(candidate, base)
    rows, _ = kdata.load_dataset(tok, rows_path, max_length=max_length)
    if not rows:
        raise DriftError(f"--rows {rows_path}: no row with a target token to measure drift on")
    models = [load_candidate(candidate, dtype), load_causal_lm(base, dtype)]
    for m in models:
        m.eval()
        if device is not None:
            m.to(device)
    pad, real_vocab = pad_id(tok), len(tok)
    forward, reverse = [], []
    ticker = Ticker("drift", len(rows), "rows", log)
    for start in range(0, len(rows), batch_size):
        index = list(range(start, min(start + batch_size, len(rows))))
        batch = kdata.collate([rows[i] for i in index], pad, index).to(device or "cpu")
        c, b = (target_logits(m, batch, real_vocab, what) for m, what in zip(models, ("candidate", "base"),
                                                                               strict=True))
        f, r = per_token(c, b)
        forward.append(f.cpu())
        reverse.append(r.cpu())
        ticker.update(index[-1] + 1)
    return summarise(torch.cat(forward), torch.cat(reverse), str(rows_path), len(rows))



def write_drift(out: str | Path, figures: Drift, candidate: str | Path, base: str | Path) -> Path:
    """``kdkit eval --drift-from ... --out``: drift.json, with what the figures are of (both models' and the
    rows' sha256)."""
    from kdkit.util.identity import path_identity
    from kdkit.util.io import atomic_write_json

    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_json(d / DRIFT_FILE, {**figures.as_dict(), "candidate": str(candidate), "base": str(base),
                                       "candidate_sha256": path_identity(candidate)["sha256"],
                                       "base_sha256": path_identity(base)["sha256"],
                                       "rows_sha256": path_identity(figures.rows)["sha256"]})
    return d / DRIFT_FILE
