"""Gradient routing with a refreshed direction (seed 003).

Each routed module m (a LoRA-wrapped linear layer) has a unit direction v_m in its output space: where
"hack" completions differ from "clean" ones for the same prompts — the mean activation difference
(``act``) or the mean gradient difference of their CE (``grad``), or a random unit vector (``control:
random``, the seeds' random-V control). After backward and before clipping, every step:

    main adapter       G_B ← (I − v vᵀ) G_B      (it cannot learn along v)
    quarantine adapter G_Bq ← v vᵀ G_Bq          (it can learn only along v)

where G_B is the gradient of a LoRA B matrix [d_out, r]. The quarantine adapter is a LoRA of its own (a
distinct basis), in the forward during training and dropped at deployment (``kdkit merge --drop-adapter
quarantine``). A direction extracted once goes stale as the model moves (seed 003: the teacher-side
cosine decays to the student-side one within ~6 steps), so ``refresh_every: N`` re-extracts it from the
current model every N steps, with the quarantine ablated and without leaving any ``.grad`` behind.

Logged per step: ``route_cin`` (the share of the main adapter's gradient along the directions, before
routing: √Σ‖vᵀG‖² / √Σ‖G‖², a cosine in [0, 1]), ``route_cin_t`` / ``route_cin_s`` (the same for the
gradient of the KD term alone — the teacher side — and of the CE term alone — the student side — on
the step's first micro-batch), ``route_cout`` (after routing: 0 when routing works) and
``route_refresh`` (1.0 on a step whose directions were re-extracted).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdkit.config.schema import RoutingConfig
from kdkit.data import rows as kdata
from kdkit.loss.divergences import token_ce
from kdkit.util.errors import KdkitError

MAIN, QUARANTINE = "default", "quarantine"


class RoutingError(KdkitError, ValueError):
    """A contrast-pairs file or a routing setting that cannot be used; the message names file, line, field."""


def load_pairs(path: str | Path, tokenizer: Any) -> list[tuple[kdata.TokenizedRow, kdata.TokenizedRow]]:
    """(hack, clean) rows: the same prompt with each completion as the target."""
    from kdkit.util.io import read_jsonl_objects

    pairs = []
    for line, obj in read_jsonl_objects(path, RoutingError):
        for f in ("prompt", "hack", "clean"):
            if not isinstance(obj.get(f), str) or (f != "prompt" and not obj[f]):
                raise RoutingError(f"{path}:{line}: field '{f}': a contrast pair needs non-empty strings prompt, "
                                   f"hack and clean")
        rows = []
        for f in ("hack", "clean"):
            ex = kdata.Example(line, "prompt_completion", {"prompt": obj["prompt"], "completion": obj[f]})
            rows.append(kdata.TokenizedRow(*kdata.tokenize_example(tokenizer, Path(path), ex)))
        if rows[0].input_ids == rows[1].input_ids:
            raise RoutingError(f"{path}:{line}: fields 'hack' and 'clean': the two sides are the same tokens, so "
                               f"the pair gives no direction to route")
        pairs.append((rows[0], rows[1]))
    if not pairs:
        raise RoutingError(f"{path}: no contrast pairs")
    return pairs


def add_quarantine(model: Any, cfg: RoutingConfig) -> None:
    """A second LoRA on the routed modules; both adapters are active and trained."""
    from peft import LoraConfig

    model.add_adapter(QUARANTINE, LoraConfig(r=cfg.quarantine.r, lora_alpha=cfg.quarantine.alpha, lora_dropout=0.0,
                                             target_modules=list(cfg.target_modules), task_type="CAUSAL_LM"))
    model.base_model.set_adapter([MAIN, QUARANTINE])


def routed_layers(model: torch.nn.Module, targets: list[str]) -> dict[str, Any]:
    layers = {n: m for n, m in model.named_modules() if n.split(".")[-1] in targets and hasattr(m, "lora_B")
              and QUARANTINE in m.lora_B}
    if not layers:
        raise RoutingError(f"routing.target_modules: no LoRA module named {targets} in the student")
    return layers


@contextmanager
def quarantine_off(layers: dict[str, Any]) -> Iterator[None]:
    """The quarantine adapter contributes nothing (its scaling set to 0) inside the block."""
    saved = {n: m.scaling[QUARANTINE] for n, m in layers.items()}
    try:
        for m in layers.values():
            m.scaling[QUARANTINE] = 0.0
        yield
    finally:
        for n, m in layers.items():
            m.scaling[QUARANTINE] = saved[n]


def _capture(layers: dict[str, Any]) -> tuple[dict[str, Tensor], list[Any]]:
    outs: dict[str, Tensor] = {}

    def hook(name: str) -> Any:
        def f(module: Any, args: Any, output: Tensor) -> None:
            outs[name] = output
        return f

    return outs, [m.register_forward_hook(hook(n)) for n, m in layers.items()]


def _side(model: torch.nn.Module, layers: dict[str, Any], rows: list[kdata.TokenizedRow], method: str,
          pad_id: int) -> dict[str, Tensor]:
    """Per routed module, the mean over rows of the mean activation at the completion tokens (act), or of the
    gradient of the completion's summed CE with respect to the module's output (grad): float64 [d_out]."""
    batch = kdata.collate(rows, pad_id)
    device = next(model.parameters()).device
    ids, att, tgt = batch.input_ids.to(device), batch.attention_mask.to(device), batch.targets.to(device)
    outs, handles = _capture(layers)
    try:
        with torch.set_grad_enabled(method == "grad"):
            logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
            if method == "grad":
                loss = token_ce(logits, tgt).sum()
                names = list(outs)
                # gradients with respect to activations only: no parameter's .grad is touched
                grads = dict(zip(names, torch.autograd.grad(loss, [outs[n] for n in names]), strict=True))
    finally:
        for h in handles:
            h.remove()
    mask = torch.zeros(ids.shape, dtype=torch.bool, device=device)
    mask[:, 1:] = tgt != kdata.IGNORE_INDEX  # the completion tokens themselves
    w = mask.double() / mask.sum(dim=1, keepdim=True).clamp(min=1)
    src = grads if method == "grad" else {n: t.detach() for n, t in outs.items()}
    return {n: torch.einsum("bl,bld->d", w, t.double()) / len(rows) for n, t in src.items()}


def extract(model: torch.nn.Module, layers: dict[str, Any], pairs: list[tuple[kdata.TokenizedRow, kdata.TokenizedRow]],
            method: str, pad_id: int) -> dict[str, Tensor]:
    """Unit directions hack − clean per routed module, from the current model with the quarantine ablated."""
    was_training = model.training
    model.eval()
    try:
        with quarantine_off(layers):
            hack = _side(model, layers, [h for h, _ in pairs], method, pad_id)
            clean = _side(model, layers, [c for _, c in pairs], method, pad_id)
    finally:
        model.train(was_training)
    out = {}
    for n in layers:
        d = hack[n] - clean[n]
        if not torch.isfinite(d).all() or float(d.norm()) == 0.0:
            raise RoutingError(f"routing: hack and clean completions give the same {method} at {n}; the pairs "
                               f"carry no direction")
        out[n] = (d / d.norm()).float()
    return out


def random_directions(layers: dict[str, Any], seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, m in layers.items():
        v = torch.randn(m.lora_B[MAIN].weight.shape[0], generator=g, dtype=torch.float64)
        out[n] = (v / v.norm()).float()
    return out


def project_out(grad: Tensor, v: Tensor) -> Tensor:
    """(I − v vᵀ) G for G [d_out, r] and a unit v [d_out]."""
    return grad - torch.outer(v, v @ grad)


def project_onto(grad: Tensor, v: Tensor) -> Tensor:
    """v vᵀ G."""
    return torch.outer(v, v @ grad)


def share(grads: dict[str, Tensor], dirs: dict[str, Tensor]) -> float:
    """√Σ‖vᵀG‖² / √Σ‖G‖² over the routed modules: the cosine between the gradient and its projection on v."""
    along = sum(float((dirs[n].double() @ g.double()).pow(2).sum()) for n, g in grads.items())
    total = sum(float(g.double().pow(2).sum()) for g in grads.values())
    return (along / total) ** 0.5 if total > 0 else 0.0


class Router:
    """The routing gradient hook (``kdkit.train.GradHook``), its directions and their refresh."""

    def __init__(self, model: torch.nn.Module, cfg: RoutingConfig, tokenizer: Any, pad_id: int) -> None:
        self.cfg, self.pad_id = cfg, pad_id
        self.layers = routed_layers(model, list(cfg.target_modules))
        if cfg.control == "random":
            self.pairs: list[Any] = []
            self.dirs = random_directions(self.layers, cfg.seed)
        else:
            self.pairs = load_pairs(cfg.pairs, tokenizer)
            self.dirs = extract(model, self.layers, self.pairs, cfg.method, pad_id)
        self.dirs = {n: v.to(next(model.parameters()).device) for n, v in self.dirs.items()}
        self.pending: dict[str, float] = {}

    def _main_grads(self) -> dict[str, Tensor]:
        return {n: m.lora_B[MAIN].weight.grad for n, m in self.layers.items() if m.lora_B[MAIN].weight.grad is not None}

    def observe_terms(self, terms: dict[str, Tensor]) -> None:
        """cin_t (the KD term's gradient) and cin_s (the CE term's) on a micro-batch, before its backward."""
        params = {n: m.lora_B[MAIN].weight for n, m in self.layers.items()}
        for key, term in (("route_cin_t", terms.get("kd")), ("route_cin_s", terms.get("ce"))):
            if term is None or not term.requires_grad:
                continue
            grads = torch.autograd.grad(term, list(params.values()), retain_graph=True, allow_unused=True)
            self.pending[key] = share({n: g for n, g in zip(params, grads, strict=True) if g is not None}, self.dirs)

    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        refresh = bool(self.cfg.refresh_every) and step > 0 and step % self.cfg.refresh_every == 0
        if refresh:
            fresh = extract(model, self.layers, self.pairs, self.cfg.method, self.pad_id)
            self.dirs = {n: v.to(self.dirs[n].device) for n, v in fresh.items()}
        metrics = {**self.pending, "route_cin": share(self._main_grads(), self.dirs)}
        self.pending = {}
        with torch.no_grad():
            for n, m in self.layers.items():
                v = self.dirs[n].to(m.lora_B[MAIN].weight.dtype)
                for name, proj in ((MAIN, project_out), (QUARANTINE, project_onto)):
                    w = m.lora_B[name].weight
                    if w.grad is not None:
                        w.grad.copy_(proj(w.grad, v))
        metrics.update(route_cout=share(self._main_grads(), self.dirs), route_refresh=float(refresh))
        return metrics

    def state(self) -> dict[str, Tensor]:
        return {f"dir.{n}": v.detach().cpu().contiguous() for n, v in self.dirs.items()}

    def load(self, state: dict[str, Tensor]) -> None:
        self.dirs = {n: state[f"dir.{n}"].to(self.dirs[n].device) for n in self.dirs}
