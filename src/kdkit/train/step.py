"""One optimizer step: for each micro-batch the sources' signals, the student's forward and the
objective, then backward; the gradient hooks, clipping and the optimizer. Returns the step's sums."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from kdkit.data import rows as kdata
from kdkit.models import sharding
from kdkit.models.load import vocab_logits
from kdkit.teacher.signals import unwrap
from kdkit.train.control import fault
from kdkit.train.metrics import Sums
from kdkit.train.objective import Inputs, Objective, ObjectiveOutput, StepDenominator, step_denominator
from kdkit.util.errors import TrainingError

if TYPE_CHECKING:
    from kdkit.train.run import Run


GradHook = Callable[[torch.nn.Module, int], dict[str, float] | None]
"""Called after backward and before clipping, once per optimizer step: the place for
gradient edits (projection, routing). May return metrics to log. A hook that is also :class:`ObservesTerms`
is shown the first micro-batch's loss terms (with their graph) before its backward."""


@runtime_checkable
class ObservesTerms(Protocol):
    """A gradient hook that needs the loss terms apart (routing's cin_t / cin_s)."""

    def observe_terms(self, terms: dict[str, torch.Tensor]) -> None: ...


def forward_loss(r: Run, model: torch.nn.Module, batch: kdata.Batch, objective: Objective,
                 denom: StepDenominator) -> ObjectiveOutput:
    """One micro-batch: the sources' signals (each asked once), the student's forward, the objective's terms.
    What is asked of each is what the run's objective needs (:attr:`kdkit.train.objective.Objective.needs`):
    the step does not know the terms or the signals' kinds."""
    needs = objective.needs
    sig = r.src.ask(batch, model, sampled=needs.sampled, at_targets=needs.teacher_at_targets,
                    hidden_layers=needs.teacher_layers)
    logits, states = student_forward(r, model, batch, needs.states or needs.head,
                                     last_hidden_only=needs.head and not needs.states)
    x = Inputs(batch.targets, sig, batch.roles, batch.tasks, batch.weights, batch.teachers, states=states)
    if needs.logits:
        x = replace(x, logits=vocab_logits(logits[:, :-1], r.real_vocab, "student"))
    if needs.head:  # the chunked loss runs the head itself; padded embedding rows are dropped from it
        head = unwrap(model).get_output_embeddings()  # checked once, by build
        x = replace(x, last_hidden=states[-1][:, :-1], head_weight=head.weight[:r.real_vocab],
                    head_bias=None if head.bias is None else head.bias[:r.real_vocab])
    return objective(x, denom)


def student_forward(r: Run, model: torch.nn.Module, batch: kdata.Batch, hidden_states: bool,
                    last_hidden_only: bool) -> tuple[torch.Tensor | None, tuple[torch.Tensor, ...] | None]:
    """The student's logits (None when ``last_hidden_only``: the chunked loss runs the head itself) and hidden
    states, in the batch's layout. With ``data.packing`` the rows run packed end to end and the outputs are put
    back (:class:`kdkit.data.rows.Packing`): the same values, without the padding's compute."""
    kw: dict[str, Any] = {"output_hidden_states": hidden_states, **({"logits_to_keep": 1} if last_hidden_only else {})}
    if not r.cfg.data.packing:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kw)
        return (None if last_hidden_only else out.logits), out.hidden_states
    pk = kdata.pack(batch, r.cfg.data.pack_length or r.cfg.data.max_length, r.pad_id)
    out = model(input_ids=pk.input_ids, position_ids=pk.position_ids, use_cache=False, **kw)  # no cache: packed masks
    states = out.hidden_states
    if states is not None:  # the chunked loss reads the last one alone
        states = (pk.unpack(states[-1]),) if last_hidden_only else tuple(pk.unpack(h) for h in states)
    return (None if last_hidden_only else pk.unpack(out.logits)), states


def optimizer_step(r: Run, step: int, batches: list[kdata.Batch], on_policy: bool,
                    grad_hooks: list[GradHook], last_ckpt: Path | None) -> tuple[Sums, dict[str, float]]:
    """Forward and backward over the step's micro-batches, gradient hooks, clipping, the optimizer step.
    Returns the step's sums over all ranks and the step's scalar metrics."""
    acc, cfg = r.acc, r.cfg
    objective = r.on_policy_objective if on_policy else r.objective
    r.src.prepare(batches, objective.needs.sampled)  # a served teacher: the step's answers are in before it computes
    # One denominator for the whole step: every micro-batch of every rank.
    local = step_denominator([b.targets for b in batches], cfg.objective).tokens
    denom = StepDenominator(float(acc.reduce(torch.tensor(local, dtype=torch.float64, device=acc.device), "sum")))
    hooks = r.grad_hooks + grad_hooks
    sums, losses = Sums(), []
    for j, b in enumerate(batches):
        # Sync gradients across ranks only on the last micro-step: earlier ones accumulate locally.
        with acc.no_sync(r.model) if j < len(batches) - 1 else nullcontext():
            out = forward_loss(r, r.model, b, objective, denom)
            if j == 0:  # a hook that needs the terms apart (routing's cin_t / cin_s) sees them before backward
                for hook in hooks:
                    if isinstance(hook, ObservesTerms):
                        hook.observe_terms(out.terms)
            losses.append(out.loss.detach())  # checked once, before the optimizer step
            # DDP averages gradients over ranks; the loss is already this rank's share of the
            # step's sum, so undo the average to get the gradient of the global loss.
            acc.backward(out.loss * r.world)
        sums.add_output(out)
        if j == 0:
            fault("mid_step", step + 1)
    if r.hidden is not None and r.world > 1:  # outside DDP's wrapper: average the projections' gradients here
        for p in r.hidden.parameters():
            if p.grad is not None:
                p.grad.copy_(acc.reduce(p.grad, "mean"))
    values = torch.stack(losses)
    bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
    if bad:
        raise TrainingError(f"non-finite loss ({float(values[bad[0]])}) at step {step + 1}, micro-batch {bad[0]}; "
                            f"the optimizer step was not taken; last good checkpoint: {last_ckpt or 'none'} "
                            f"(lower optim.lr or check the data)")
    metrics: dict[str, float] = {}
    for hook in hooks:
        metrics.update(hook(acc.unwrap_model(r.model), step) or {})
    acc.unscale_gradients()  # fp16-mixed: the norm and the clipping see the true gradients
    metrics["grad_norm"] = sharding.grad_norm(r.trainable, cfg.optim.grad_clip)
    metrics["lr"] = r.sched.get_last_lr()[0]
    r.opt.step()
    r.sched.step()
    r.opt.zero_grad(set_to_none=True)
    if cfg.objective.on_policy is not None:
        metrics["on_policy"] = 1.0 if on_policy else 0.0
    sums.reduce(acc)
    sums.v["steps"] = 1.0
    return sums, metrics
