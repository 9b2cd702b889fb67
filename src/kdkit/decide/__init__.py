"""What ships: paired statistics (``stats``), the gate's rules and decision (``gate``), the registry of
packs and the production pointer (``registry``), ladders of runs (``ladder``) ending in tables
(``tables``), and the HTML report (``report``). The gate itself is :func:`kdkit.decide.gate.gate` (the
name ``kdkit.decide.gate`` is its module)."""

from kdkit.decide.gate import GateResult, GateRule, mcnemar_exact
from kdkit.decide.ladder import run_ladder
from kdkit.decide.registry import Registry, RegistryError
from kdkit.decide.report import write_report
from kdkit.decide.stats import mean_interval, paired_difference

__all__ = ["GateRule", "GateResult", "mcnemar_exact", "Registry", "RegistryError", "run_ladder",
           "write_report", "paired_difference", "mean_interval"]
