"""A student as a draft model for speculative decoding with its teacher as the target.

Expected, from the two distributions along the target's own greedy continuation of each prompt:

* speculative sampling accepts a drafted token with probability Σ_v min(p_t(v), p_s(v)) = 1 − TVD(p_t, p_s)
  (Leviathan et al. 2023; DistillSpec, Zhou et al. 2023), softmax at temperature 1, in float32;
* greedy drafting accepts it when the draft's top-1 is the target's.

With a per-token acceptance α and γ drafted tokens a step, a target forward yields (1 − α^(γ+1)) / (1 − α)
tokens on average (γ + 1 at α = 1), and the wall time improves by that over (γ·c + 1) for a draft that costs
c of the target per forward (Leviathan et al. 2023, Theorem 3.8): the i.i.d. approximation, stated as such.

Measured: transformers' assisted generation (``assistant_model=``, greedy, γ constant) on the same prompts,
whose output is the target's greedy output; the target's forward calls are counted, so tokens per target
forward and tokens per second with and without the draft sit beside the expected values.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdkit.decide.stats import mean_interval
from kdkit.util.errors import UsageError


def acceptance(target_logits: Any, draft_logits: Any) -> tuple[Any, Any]:
    """Per position (the last axis is the vocabulary): 1 − TVD of the two softmaxes, and whether the top-1s agree.
    Float32 whatever the logits' dtype; a -inf logit is probability 0 in either."""
    import torch

    pt = torch.softmax(target_logits.float(), dim=-1)
    ps = torch.softmax(draft_logits.float(), dim=-1)
    return torch.minimum(pt, ps).sum(-1), (target_logits.argmax(-1) == draft_logits.argmax(-1)).float()


def tokens_per_step(alpha: float, gamma: int) -> float:
    """Expected tokens per target forward with γ drafted tokens at per-token acceptance α (i.i.d.)."""
    if not 0.0 <= alpha <= 1.0 or gamma < 1:
        raise ValueError(f"alpha in [0, 1] and gamma >= 1, got {alpha}, {gamma}")
    return float(gamma + 1) if alpha == 1.0 else (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def speedup(alpha: float, gamma: int, cost_ratio: float) -> float:
    """Expected wall-time improvement factor: tokens per step over the step's cost, γ·c + 1 target forwards."""
    return tokens_per_step(alpha, gamma) / (gamma * cost_ratio + 1.0)


@dataclass
class DraftFigures:
    rows: int
    positions: int
    gamma: int
    cost_ratio: float
    alpha_sample: float
    alpha_sample_halfwidth: float | None  # 95% Student-t over the rows' means
    alpha_greedy: float
    alpha_greedy_halfwidth: float | None
    expected_tokens_per_step: float  # greedy drafting, the mode `measured` runs
    expected_speedup: float
    measured: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _same_vocabulary(target: Any, draft: Any) -> None:
    vt, vd = target.get_output_embeddings().weight.shape[0], draft.get_output_embeddings().weight.shape[0]
    if vt != vd:
        raise UsageError(f"the draft's vocabulary has {vd} rows and the target's {vt}: speculative decoding needs "
                         f"one tokenizer (a cross-tokenizer draft is not measured here)")


def expected(target: Any, draft: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, gamma: int,
             cost_ratio: float) -> DraftFigures:
    """Acceptance along the target's greedy continuation of each prompt (see the module docstring)."""
    import torch

    from kdkit.models.generation import GenerationSettings, generate_ids

    _same_vocabulary(target, draft)
    per_row: list[tuple[float, float]] = []
    n = 0
    for ids in prompts:
        cont = generate_ids(target, tokenizer, [ids], GenerationSettings(max_new_tokens=max_new_tokens))[0]
        if not cont:
            continue
        seq = torch.tensor([list(ids) + cont])
        with torch.no_grad():
            lt, ld = target(seq).logits[0], draft(seq).logits[0]
        at = slice(len(ids) - 1, len(ids) - 1 + len(cont))  # the positions that predict the continuation
        s, g = acceptance(lt[at], ld[at])
        per_row.append((float(s.mean()), float(g.mean())))
        n += len(cont)
    if not per_row:
        raise UsageError("the target wrote no token for any prompt: nothing to measure")
    a_s, a_g = (np.array([r[i] for r in per_row]) for i in (0, 1))
    hw = [(mean_interval(list(a)) or (None, None))[1] for a in (a_s, a_g)]
    ag = float(a_g.mean())
    return DraftFigures(len(per_row), n, gamma, cost_ratio, float(a_s.mean()), hw[0], ag, hw[1],
                        tokens_per_step(ag, gamma), speedup(ag, gamma, cost_ratio))


def measured(target: Any, draft: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int,
             gamma: int) -> dict[str, Any]:
    """Greedy assisted generation against plain greedy generation on the same prompts: tokens per target forward,
    tokens per second of each, and whether the outputs are the same (they must be: greedy assisted decoding
    returns the target's greedy output)."""
    import torch

    calls = {"n": 0}
    hook = target.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    out: dict[str, Any] = {"tokens": 0, "target_forwards": 0, "seconds_plain": 0.0, "seconds_assisted": 0.0,
                           "same_output": True}
    eos = tokenizer.eos_token_id
    draft.generation_config.num_assistant_tokens = gamma
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    try:
        for ids in prompts:
            x = torch.tensor([list(ids)])
            kw = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": eos, "eos_token_id": eos}
            with torch.no_grad():
                t0 = time.perf_counter()
                plain = target.generate(x, **kw)
                t1 = time.perf_counter()
                before = calls["n"]
                assisted = target.generate(x, assistant_model=draft, **kw)
                t2 = time.perf_counter()
            out["target_forwards"] += calls["n"] - before
            out["tokens"] += assisted.shape[1] - x.shape[1]
            out["seconds_plain"] += t1 - t0
            out["seconds_assisted"] += t2 - t1
            out["same_output"] &= torch.equal(plain, assisted)
    finally:
        hook.remove()
    out["tokens_per_forward"] = out["tokens"] / max(1, out["target_forwards"])
    out["tokens_per_s_plain"] = out["tokens"] / max(out["seconds_plain"], 1e-9)
    out["tokens_per_s_assisted"] = out["tokens"] / max(out["seconds_assisted"], 1e-9)
    out["wall_time_ratio"] = out["seconds_assisted"] / max(out["seconds_plain"], 1e-9)
    return out


def teacher_dir(cfg: Any) -> Path | None:
    """The run's teacher as a local model directory: ``teacher.model``, or the model a teacher cache was made from."""
    import json

    from kdkit.teacher.cache.format import MANIFEST_FILE

    t = cfg.teacher
    if t is None:
        return None
    if t.model and Path(t.model).is_dir():
        return Path(t.model)
    man = Path(t.cache) / MANIFEST_FILE if t.cache else None
    path = json.loads(man.read_text())["teacher"]["path"] if man is not None and man.is_file() else None
    return Path(path) if path and Path(path).is_dir() else None


def rung_draft(cfg: Any, candidate: Path, log: Any, rows: int = 16, max_new_tokens: int = 32) -> dict[str, Any] | None:
    """A ladder rung as a draft for its run's teacher: the expected acceptance (sampling and greedy) along the
    teacher's greedy continuation of the first ``rows`` training prompts; None, said in the log, where there is
    no local teacher or the rows have no prompt."""
    from kdkit.evaluate.drift import load_candidate
    from kdkit.models.load import load_causal_lm, load_tokenizer
    from kdkit.teacher.seqkd import prompt_tokens, read_prompts
    from kdkit.util.errors import KdkitError

    target = teacher_dir(cfg)
    if target is None:
        log("as a draft: not measured (the run has no teacher model on this machine)")
        return None
    try:
        tok = load_tokenizer(target)
        prompts = [prompt_tokens(tok, obj, cfg.data.train, line) for line, obj in read_prompts(cfg.data.train)[:rows]]
        fig = expected(load_causal_lm(target).eval(), load_candidate(candidate, "float32").eval(), tok, prompts,
                       max_new_tokens, gamma=4, cost_ratio=1.0)
    except KdkitError as e:  # rows without a prompt, another vocabulary: said, not fatal
        log(f"as a draft: not measured ({e})")
        return None
    return {"alpha_sample": fig.alpha_sample, "alpha_greedy": fig.alpha_greedy, "rows": fig.rows,
            "positions": fig.positions, "teacher": str(target)}
