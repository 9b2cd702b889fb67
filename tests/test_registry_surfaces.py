"""The seeds' "3-surface drift" test: every registered kind and aggregation is exposed by
the CLI, accepted by the config schema, and covered by the float64 reference."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from kdkit.cli import app
from kdkit.config.schema import BarrierConfig, DivergenceConfig
from kdkit.loss.divergences import AGGREGATIONS, KINDS, TAIL_POLICIES
from tests import reference


def test_every_kind_has_a_reference():
    assert set(KINDS) == set(reference.REFERENCE_KINDS)
    assert set(AGGREGATIONS) == set(reference.REFERENCE_AGGREGATIONS)


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_is_accepted_by_the_config(kind):
    assert DivergenceConfig(kind=kind).kind == kind


@pytest.mark.parametrize("how", list(AGGREGATIONS))
def test_every_aggregation_is_accepted_by_the_barrier_config(how):
    assert BarrierConfig(aggregate=how).aggregate == how


def test_every_name_is_exposed_by_the_cli():
    runner = CliRunner()
    listing = runner.invoke(app, ["diag", "kinds"], terminal_width=200)
    assert listing.exit_code == 0
    for name in [*KINDS, *AGGREGATIONS, *TAIL_POLICIES]:
        assert name in listing.output, name
    helptext = runner.invoke(app, ["diag", "kl-agg", "--help"], terminal_width=400)
    assert helptext.exit_code == 0
    flat = " ".join(helptext.output.split())
    for name in KINDS:
        assert name in flat, name
