"""``kdkit ladder``: sweep config values as rungs of train → merge → gate, ending in one table.

Every rung gates against the production pack recorded when the ladder started, so
rungs are compared with the same baseline. Each finished rung writes
``rungs/NN.json`` atomically; a rerun skips finished rungs, and a rung that fails
is recorded as failed without stopping the ladder.
"""

from __future__ import annotations

import itertools
import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from kdkit.config.load import load_train_config, split_assignment
from kdkit.decide.gate import GateRule, gate, lora_run
from kdkit.decide.registry import Registry, RegistryError
from kdkit.decide.tables import SEED_KEY, identical_seeds, write_table
from kdkit.evaluate.passrate import GenerationSettings
from kdkit.evaluate.sandbox import Limits
from kdkit.evaluate.served import ServerSpec
from kdkit.models.load import sha256_file
from kdkit.train.rundir import read_log
from kdkit.util.errors import UsageError
from kdkit.util.io import atomic_write_json, check_output_dir


def parse_vary(specs: list[str]) -> list[tuple[str, list[Any]]]:
    """``key.sub=v1,v2,v3`` → (key, [parsed values]); values are parsed as YAML scalars."""
    out = []
    for spec in specs:
        key, vals = split_assignment(spec, "--vary", "key.sub=v1,v2,...")
        values = [yaml.safe_load(v) for v in vals.split(",") if v.strip()]
        if not values:
            raise UsageError(f"--vary {spec!r}: no values")
        out.append((key, values))
    return out


def configured_server(cfg: Any, given: ServerSpec | None, where: str,
                      log: Callable[[str], None]) -> ServerSpec | None:
    """The server that writes the answers: ``--server`` when given, else the config's ``eval.server``."""
    if cfg.eval is None:
        return given
    if given is not None:
        if given.url != cfg.eval.server:
            log(f"--server {given.url} is used; {where}'s eval.server ({cfg.eval.server}) is not")
        return given
    log(f"answers from {cfg.eval.server} ({where}: eval.server)")
    return ServerSpec(cfg.eval.server, cfg.eval.served_model)


def rungs(vary: list[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
    keys = [k for k, _ in vary]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*[v for _, v in vary])]


def logged_mean(steps: list[dict[str, Any]], key: str) -> float | None:
    """The mean of ``key`` over the logged steps that have it (None when none has)."""
    vals = [s[key] for s in steps if key in s]
    return sum(vals) / len(vals) if vals else None


def barrier_active(steps: list[dict[str, Any]], epochs: list[dict[str, Any]], barrier: Any) -> dict[str, Any]:
    """[steps the barrier was above τ, steps] from every step, as each epoch's row counts them; a run from
    before those counts: of its logged steps only, and ``barrier_counted`` says so."""
    if epochs and all("barrier_steps" in e for e in epochs):
        return {"barrier_active": [sum(e["barrier_active_steps"] for e in epochs),
                                   sum(e["barrier_steps"] for e in epochs)], "barrier_counted": "steps"}
    key = f"barrier_div_{barrier.aggregate}"
    divs = [s[key] for s in steps if key in s]
    return {"barrier_active": [sum(d > barrier.tau for d in divs), len(divs)], "barrier_counted": "logged steps"}


def _epoch_means(run_dir: Path, barrier: Any = None) -> dict[str, Any]:
    """avg CE / avg KL over the training steps (as the seeds' table), the barrier's divergence to the reference
    under its aggregate averaged likewise (its weight may be 0), on how many steps it was above τ (the hinge
    active: below τ the barrier does nothing; :func:`barrier_active`), val loss of the last epoch."""
    steps, epochs = read_log(run_dir / "metrics.jsonl"), read_log(run_dir / "epochs.jsonl")
    rounds = [s for s in steps if s.get("probe_round")]
    last = epochs[-1] if epochs else {}
    key = barrier and f"barrier_div_{barrier.aggregate}"
    return {"avg_ce": logged_mean(steps, "ce_loss"), "avg_kl": logged_mean(steps, "kl_loss"),
            "avg_barrier_div": logged_mean(steps, key) if barrier else None,
            **(barrier_active(steps, epochs, barrier) if barrier else {"barrier_active": None}),
            "val_loss": last.get("val_loss"), "val_kl": last.get("val_kl"), "val_top1": last.get("val_top1"),
            "coherence": rounds[-1]["probe_coherence"] if rounds else None,
            "coherence_min": min(r["probe_coherence"] for r in rounds) if rounds else None}


def run_ladder(config: str | Path, vary_specs: list[str], tasks: str | Path | list[str | Path], out: str | Path, *,
               registry: Registry, rule: GateRule = GateRule(), settings: GenerationSettings = GenerationSettings(),
               limits: Limits = Limits(), unsafe_no_isolation: bool = False, progress: bool = False,
               log: Callable[[str], None] = print, overrides: list[str] | None = None,
               server: ServerSpec | None = None, drift: bool = True, served_lora: str = "adapter",
               draft: bool = False) -> list[dict[str, Any]]:
    """Train → merge → gate each rung (``overrides``: ``--set`` for every rung, before the rung's own values);
    ``tasks``: the anchors, or a list whose first file is the anchors and the others suites (as ``kdkit gate``).
    ``server``: a vLLM server writes the answers; a LoRA rung is gated as its adapter and merged only if kept, or
    with ``served_lora="merged"`` merged first and its weights loaded in place (faster on vLLM's CPU build).
    ``drift``: each rung's KL from the baseline on its training rows and on the anchors with the baseline's answers
    (:func:`kdkit.decide.gate.drift_figures`). ``draft``: each rung as a draft for its run's teacher
    (:func:`kdkit.decide.draft.rung_draft`)."""
    from kdkit.train import merge, train

    out = Path(out)
    check_output_dir(out, "--out", marker="ladder.json")  # a new ladder, or this ladder's rerun; never a user's dir
    vary = parse_vary(vary_specs)
    if any(k.split(".")[0] == "eval" for k, _ in vary):
        raise UsageError("--vary eval.*: every rung of a ladder is evaluated alike (one server, or none); set "
                         "eval.server in the config or give --server")
    plan = rungs(vary)
    base_cfg = load_train_config(config, overrides)  # fail early on a bad config, before anything is written
    server = _ladder_server(base_cfg, server, served_lora, config, log)
    baseline = _start(out, config, vary, overrides, tasks, registry)

    results = []
    for i, values in enumerate(plan):
        done = out / "rungs" / f"{i:02d}.json"
        if done.is_file():
            rec = json.loads(done.read_text())
            if rec["status"] == "done":
                log(f"rung {i + 1}/{len(plan)} {values}: finished earlier ({rec['decision']}), skipped")
                results.append(rec)
                continue
        log(f"rung {i + 1}/{len(plan)} {values}: train → merge → gate")
        run_dir, pack_dir = out / f"rung-{i:02d}" / "run", out / f"rung-{i:02d}" / "pack"
        rec: dict[str, Any] = {"rung": i, "values": values, "run_dir": str(run_dir)}
        try:
            seeded = seed_settings(base_cfg, values)
            cfg = load_train_config(config, [*(overrides or []),
                                             *(f"{k}={json.dumps(v)}" for k, v in {**values, **seeded}.items())])
            t0 = time.perf_counter()
            trained = train(cfg, run_dir, resume=run_dir.exists(), progress=progress, log=log)
            rec["train_s"] = trained.get("seconds", time.perf_counter() - t0)
            adapter = server is not None and served_lora == "adapter" and lora_run(str(run_dir)) is not None
            if not adapter:  # with a server, a LoRA rung is merged by the gate, and only when it is kept
                merge(run_dir, pack_dir)
            rec.update(seeded=seeded, weights_sha256=_weights_sha(run_dir / "final"))
            res = gate(registry, str(run_dir if adapter else pack_dir), tasks, against=baseline.name, rule=rule,
                       settings=settings, limits=limits, unsafe_no_isolation=unsafe_no_isolation, log=log,
                       progress=progress, server=server, drift=drift,
                       origin={"ladder": str(out.resolve()), "rung": i, "values": values},
                       candidate_meta={"name": f"{out.name}-rung{i:02d}", "source_run": str(run_dir),
                                       "config": (run_dir / "config.yaml").read_text()})
            if drift:
                rec["drift"] = res.drift
            if draft:
                from kdkit.decide.draft import rung_draft

                rec["draft"] = rung_draft(cfg, run_dir / "final" if adapter else pack_dir, log)
            rec.update(status="done", **_epoch_means(run_dir, cfg.objective.barrier), **_gate_fields(res))
            log(rung_line(i, len(plan), rec))
        except Exception as e:  # a failed rung must not stop the ladder
            rec.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:])
            log(f"rung {i} failed: {type(e).__name__}: {e}")
        atomic_write_json(done, rec)
        results.append(rec)
    for note in identical_seeds(vary, results):
        log(f"warning: {note}")
    write_table(out, vary, results)
    from kdkit.decide.report import write_report

    write_report(out)
    return results


def _ladder_server(cfg: Any, server: ServerSpec | None, served_lora: str, config: str | Path,
                   log: Callable[[str], None]) -> ServerSpec | None:
    """The ladder's server (--server, else the config's eval.server), checked against --served-lora."""
    server = configured_server(cfg, server, str(config), log)
    if served_lora not in ("adapter", "merged"):
        raise UsageError(f"--served-lora {served_lora!r}: expected adapter or merged")
    if served_lora == "merged" and server is None:
        raise UsageError("--served-lora merged: there is no server (--server or eval.server); without one every "
                         "rung is merged and evaluated here")
    return server


def _gate_fields(res: Any) -> dict[str, Any]:
    """A finished rung's record of its gate: decision, passes, flips, the exact test, each suite."""
    return dict(decision=res.decision, passed=res.candidate_passed, n_tasks=res.n_tasks,
                interval=list(res.candidate_interval), regressed=res.regressed, fixed=res.fixed, p_value=res.p_value,
                baseline_passed=res.baseline_passed, pack=res.candidate, reason=res.reason,
                suites=[{k: s[k] for k in SUITE_FIELDS} for s in res.suites],
                regressed_completions=res.suites[0]["regressed_completions"],
                fixed_completions=res.suites[0]["fixed_completions"])


def _start(out: Path, config: str | Path, vary: list[tuple[str, list[Any]]], overrides: list[str] | None,
           tasks: Any, registry: Registry) -> Any:
    """The ladder's baseline: the production pack recorded in ``ladder.json`` when the ladder started (a rerun
    of another config, --vary or --set is refused), or today's production, recorded now."""
    state_path = out / "ladder.json"
    if state_path.is_file():
        state = json.loads(state_path.read_text())
        if (state["vary"] != [[k, v] for k, v in vary] or state["config"] != str(Path(config).resolve())
                or state.get("set", []) != list(overrides or [])):
            raise UsageError(f"{out}: holds a ladder of another config, --vary or --set; use another --out")
        return registry.pack(state["baseline_pack"])
    baseline = registry.production()
    if baseline is None:
        raise RegistryError("there is no production pack yet: `kdkit registry promote MODEL_DIR` first")
    state = {"config": str(Path(config).resolve()), "vary": [[k, v] for k, v in vary],
             "baseline_pack": baseline.name, "set": list(overrides or []),
             "tasks": [str(Path(t).resolve()) for t in (tasks if isinstance(tasks, list) else [tasks])],
             "workspace": str(registry.workspace.resolve())}
    (out / "rungs").mkdir(parents=True, exist_ok=True)
    atomic_write_json(state_path, state)
    return baseline


SUITE_FIELDS = ("tasks", "decision", "candidate_passed", "baseline_passed", "n_tasks", "p_value", "reason")
"""What a rung records of each suite of its gate (the anchors first)."""


def rung_line(i: int, n: int, rec: dict[str, Any]) -> str:
    """A finished rung as the ladder prints it: its decision, pass counts, with a barrier how often it acted, and
    as a draft for its teacher when measured."""
    line = (f"rung {i + 1}/{n} {rec['values']}: {rec['decision']} — anchors {rec['passed']}/{rec['n_tasks']} "
            f"(baseline {rec['baseline_passed']})")
    for s in rec["suites"][1:]:
        line += f", {Path(s['tasks']).name} {s['candidate_passed']}/{s['n_tasks']} (baseline {s['baseline_passed']})"
    if rec.get("barrier_active"):
        k, m = rec["barrier_active"]
        line += (f"; barrier above τ on {k}/{m} {rec.get('barrier_counted', 'logged steps')}"
                 + (" (it never acted)" if k == 0 else ""))
    if rec.get("draft"):
        line += (f"; as a draft for the teacher: acceptance {rec['draft']['alpha_sample']:.3f} (sampling), "
                 f"{rec['draft']['alpha_greedy']:.3f} (greedy)")
    return line


def seed_settings(base: Any, values: dict[str, Any]) -> dict[str, Any]:
    """A rung's seed s varies everything a seed should: the initialisation and dropout (optim.seed = s), the
    data order (data.shuffle_seed = the config's + s) and on-policy sampling (objective.on_policy.seed, the
    same way), unless the ladder varies one of them itself."""
    if SEED_KEY not in values:
        return {}
    s = int(values[SEED_KEY])
    out = {"data.shuffle_seed": base.data.shuffle_seed + s}
    if base.objective.on_policy is not None:
        out["objective.on_policy.seed"] = base.objective.on_policy.seed + s
    return {k: v for k, v in out.items() if k not in values}


def _weights_sha(final: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in sorted(final.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()
