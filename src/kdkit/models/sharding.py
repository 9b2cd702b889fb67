"""Sharded training: FSDP2 through Accelerate, and the full tensors that checkpoints and final/ need.

A launcher asks for FSDP with an Accelerate config file (``accelerate launch --config_file
examples/accelerate/fsdp2.yaml -m kdkit train ...``): it exports ``ACCELERATE_USE_FSDP=true`` and the
``FSDP_*`` settings. On GPUs Accelerate turns that into a sharded model. On CPUs Accelerate silently
falls back to plain data parallelism; :func:`make_accelerator` promotes the run to FSDP2 there too
(PyTorch's ``fully_shard`` runs on gloo), so the option does what it says on every device.

Under FSDP2 every parameter is a DTensor holding this rank's shard. What kdkit writes (checkpoints,
``initial_trainable``, ``final/``) holds full tensors in the same files as an unsharded run, so a run
saved under one layout reads back under another: :func:`full_trainable` and :func:`full_optimizer`
gather (collectives: every rank calls them), :func:`load_full` scatters back.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from kdkit.util.errors import UsageError


def fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def make_accelerator(**kw: Any) -> Any:
    """An Accelerator that honours an FSDP launch on every device (see the module's docstring)."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    acc = Accelerator(**kw)
    if acc.distributed_type == DistributedType.DEEPSPEED:
        raise UsageError("DeepSpeed is not supported by kdkit train; shard with FSDP2 "
                         "(accelerate launch --config_file examples/accelerate/fsdp2.yaml)")
    if fsdp_requested() and acc.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* settings
        # both singletons: every AcceleratorState() copies PartialState's fields back over its own
        acc.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
        if acc.state.mixed_precision != "no":
            plugin.set_mixed_precision(acc.state.mixed_precision)
        acc.state.fsdp_plugin = plugin
    if acc.distributed_type == DistributedType.FSDP and acc.state.fsdp_plugin.fsdp_version != 2:
        raise UsageError(f"kdkit shards with FSDP2; the launch config asks for fsdp_version "
                         f"{acc.state.fsdp_plugin.fsdp_version}: set fsdp_version: 2 (examples/accelerate/fsdp2.yaml)")
    return acc


# What a sharded run cannot do yet: each generates with, or reads the weights of, the whole model on one rank.
_NOT_SHARDED = {"probes": "probes", "routing": "routing", "objective.on_policy": "on-policy rollouts",
                "objective.hidden": "hidden-state distillation"}


def check_supported(cfg: dict[str, Any], acc: Any) -> None:
    """Refuse, by field, what a sharded (FSDP) run does not support instead of running it wrongly."""
    from accelerate.utils import DistributedType

    if acc.distributed_type != DistributedType.FSDP:
        return
    for field, what in _NOT_SHARDED.items():
        value: Any = cfg
        for part in field.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            e = UsageError(f"{field}: {what} is not supported under FSDP yet; run it with data parallelism "
                           f"(accelerate launch without the FSDP config) or in one process")
            e.same_on_every_rank = True  # printed once, by rank 0
            raise e


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters as full CPU tensors, by name. Sharded: a collective; rank 0 gets the
    tensors, the other ranks an empty dict."""
    if not is_sharded(model):
        return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters()
                if p.requires_grad}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    names = {n for n, p in model.named_parameters() if p.requires_grad}
    sd = get_model_state_dict(model, options=_options(cpu_offload=True, ignore_frozen_params=True))
    return {n: t.contiguous() for n, t in sd.items() if n in names}


def full_model(model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor] | None:
    """The whole state dict of a sharded model on rank 0 (a collective; ``trainable_only``: the
    trainable parameters, e.g. LoRA's); None when the model is not sharded (it saves itself)."""
    if not is_sharded(model):
        return None
    if trainable_only:
        return full_trainable(model)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return {n: t.contiguous() for n, t in get_model_state_dict(model, options=_options(cpu_offload=True)).items()}


def full_optimizer(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict keyed by parameter index, as ``opt.state_dict()`` is unsharded.
    Sharded: a collective; rank 0 gets the full state, the other ranks an empty dict."""
    if not is_sharded(model):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, opt, options=_options(cpu_offload=True))
    if not sd:
        return {}
    index = {n: i for i, n in enumerate(_param_names(model, opt))}
    return {"state": {index[n]: st for n, st in sd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]]}


def load_full(model: torch.nn.Module, opt: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
              opt_state: dict[str, Any]) -> None:
    """Put full trainable weights and an index-keyed optimizer state back (every rank reads the files)."""
    if not is_sharded(model):
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in weights.items():
                params[n].copy_(t)
        opt.load_state_dict(opt_state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, weights, options=_options(strict=False))
    names = _param_names(model, opt)
    set_optimizer_state_dict(model, opt, {
        "state": {names[int(i)]: st for i, st in opt_state["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in opt_state["param_groups"]]},
        options=_options())


def _param_names(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The parameter names in the optimizer's order (the index its state dict uses)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for g in opt.param_groups for p in g["params"]]


def grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """The global gradient norm (clipping to ``max_norm`` when > 0) over plain or sharded gradients."""
    from torch.distributed.tensor import DTensor

    with_grad = [p for p in params if p.grad is not None]
    total = torch.nn.utils.clip_grad_norm_(with_grad, max_norm if max_norm > 0 else float("inf"))
    return float(total.full_tensor() if isinstance(total, DTensor) else total)
