"""Hidden-state distillation (DistillKit, NVIDIA ModelOpt): student layer outputs, projected to the teacher's
width, pulled toward the live teacher's at the same positions.

    cosine:  1 − cos(P·h_s, h_t)            mse:  (1/H_t) · ‖P·h_s − h_t‖²

per prediction position and layer pair, summed over the pairs; :func:`kdkit.train.objective.hidden_term` weights
and normalises it like KD. ``P`` is one ``Linear(H_s → H_t, bias=False)`` per pair (``projection:
linear``), trained with the student and saved in the run (``hidden_projection.safetensors``), never
merged into a pack; ``projection: none`` compares the states as they are (equal widths only).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdkit.config.schema import HiddenConfig


def per_position(a: Tensor, b: Tensor, loss: str) -> Tensor:
    """[B, T] loss between projected student states ``a`` and teacher states ``b`` ([B, T, H]), float32."""
    a, b = a.float(), b.float()
    if loss == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8)
    return (a - b).pow(2).mean(dim=-1)


class HiddenDistill(torch.nn.Module):
    """The projections of one run, and the per-position loss over its layer pairs."""

    def __init__(self, cfg: HiddenConfig, student_width: int, teacher_width: int) -> None:
        super().__init__()
        self.cfg = cfg
        # layer ranges and widths are checked by kdkit.train.preflight (validate and train), before any weight loads
        self.proj = torch.nn.ModuleDict({str(s): torch.nn.Linear(student_width, teacher_width, bias=False)
                                         for s in cfg.layers} if cfg.projection == "linear" else {})

    @property
    def teacher_layers(self) -> tuple[int, ...]:
        """The teacher's layers the pairs read (each once)."""
        return tuple(sorted(set(self.cfg.layers.values())))

    def forward(self, student: tuple[Tensor, ...], teacher: dict[int, Tensor]) -> Tensor:
        """Σ over pairs of the per-position loss, [B, T] (prediction positions: the last input dropped)."""
        total = None
        for s, t in self.cfg.layers.items():
            h = student[s][:, :-1]
            if self.cfg.projection == "linear":
                h = self.proj[str(s)](h.to(self.proj[str(s)].weight.dtype))
            v = per_position(h, teacher[t], self.cfg.loss)
            total = v if total is None else total + v
        return total
