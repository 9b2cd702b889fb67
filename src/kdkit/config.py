"""Validated configuration models. YAML in, resolved YAML out.

The divergence kinds, aggregations and tail policies accepted here are read from
the registries in :mod:`kdkit.losses`, so the schema cannot drift from the math.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kdkit.losses import AGGREGATIONS, KINDS, TAIL_POLICIES


class _Strict(BaseModel):
    # Unknown keys are errors: a misspelt option must never silently do nothing.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _one_of(value: str, valid: Any, what: str) -> str:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
    return value


class DivergenceConfig(_Strict):
    """Which divergence, at which temperature, with which top-K tail policy."""

    kind: str = Field("kl_fwd", description=f"one of: {', '.join(KINDS)}")
    temperature: float = Field(1.0, gt=0.0, description="loss temperature T (divides the logits)")
    t2_scale: bool = Field(True, description="multiply the divergence by T^2")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="jsd mixture weight (0 = kl_fwd, 1 = kl_rev)")
    alpha: float = Field(0.1, gt=0.0, lt=1.0, description="skew_fwd/skew_rev skew")
    tail: str = Field("bucket", description=f"top-K tail policy: {', '.join(TAIL_POLICIES)}")

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        return _one_of(v, KINDS, "divergence kind")

    @field_validator("tail")
    @classmethod
    def _tail(cls, v: str) -> str:
        return _one_of(v, TAIL_POLICIES, "tail policy")


class BarrierConfig(_Strict):
    """λ_b · relu(aggregate(divergence-to-reference per position) − τ)."""

    kind: str = Field("kl_rev", description="kl_fwd (reference ‖ student) or kl_rev (student ‖ reference)")
    aggregate: str = Field("mean", description=f"one of: {', '.join(AGGREGATIONS)}")
    tau: float = Field(0.0, ge=0.0, description="hinge threshold τ")
    weight: float = Field(1.0, ge=0.0, description="λ_b")
    temperature: float = Field(1.0, gt=0.0)

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        return _one_of(v, ("kl_fwd", "kl_rev"), "barrier kind")

    @field_validator("aggregate")
    @classmethod
    def _agg(cls, v: str) -> str:
        return _one_of(v, AGGREGATIONS, "aggregation")


class RoleTerms(_Strict):
    """Which terms apply to rows of one role."""

    ce: bool = True
    kd: bool = True
    barrier: bool = True


class ObjectiveConfig(_Strict):
    """total = ce_coef·CE + kd_weight·w(row)·KD + barrier (see ``kdkit.objective``)."""

    ce_coef: float = Field(1.0, ge=0.0, description="coefficient of the cross-entropy term")
    ce_norm: str = Field("token", description="'token' (each target token weighs 1) or 'sqrt_row' (1/sqrt(row tokens))")
    kd_weight: float = Field(1.0, ge=0.0, description="λ, the coefficient of the KD term")
    kd: DivergenceConfig = Field(default_factory=DivergenceConfig)
    task_weights: dict[str, float] = Field(default_factory=dict, description="per-task KD multipliers w(task)")
    roles: dict[str, RoleTerms] = Field(
        default_factory=dict,
        description="per-role terms; a role not listed gets every term (rows without a role have role 'default')",
    )
    barrier: BarrierConfig | None = None
    chunk_size: int = Field(0, ge=0, description="tokens per chunk for the memory-lean loss; 0 = dense")

    @field_validator("ce_norm")
    @classmethod
    def _ce_norm(cls, v: str) -> str:
        return _one_of(v, ("token", "sqrt_row"), "ce_norm")

    @field_validator("task_weights")
    @classmethod
    def _tw(cls, v: dict[str, float]) -> dict[str, float]:
        for task, w in v.items():
            if not (w >= 0.0):
                raise ValueError(f"task_weights[{task!r}] must be >= 0, got {w!r}")
        return v

    @model_validator(mode="after")
    def _something_to_train(self) -> ObjectiveConfig:
        if self.ce_coef == 0.0 and self.kd_weight == 0.0 and self.barrier is None:
            raise ValueError("ce_coef and kd_weight are both 0 and there is no barrier: nothing to train")
        return self

    def terms_for(self, role: str) -> RoleTerms:
        return self.roles.get(role, RoleTerms())
