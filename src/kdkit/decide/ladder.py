"""``kdkit ladder``: sweep config values as rungs of train → merge → gate, ending in one table.

Every rung gates against the production pack recorded when the ladder started, so
rungs are compared with the same baseline. Each finished rung writes
``rungs/NN.json`` atomically; a rerun skips finished rungs, and a rung that fails
is recorded as failed without stopping the ladder.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from kdkit.config.schema import load_train_config, split_assignment
from kdkit.decide.gate import GateRule, format_tasks, gate
from kdkit.decide.registry import Registry, RegistryError
from kdkit.evaluate.passrate import GenerationSettings, pass_cell
from kdkit.evaluate.sandbox import Limits
from kdkit.models.load import sha256_file
from kdkit.train.rundir import read_log
from kdkit.util.errors import UsageError
from kdkit.util.io import atomic_write_bytes, atomic_write_json, check_output_dir


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


def rungs(vary: list[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
    keys = [k for k, _ in vary]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*[v for _, v in vary])]


def logged_mean(steps: list[dict[str, Any]], key: str) -> float | None:
    """The mean of ``key`` over the logged steps that have it (None when none has)."""
    vals = [s[key] for s in steps if key in s]
    return sum(vals) / len(vals) if vals else None


def _epoch_means(run_dir: Path, barrier_aggregate: str | None = None) -> dict[str, float | None]:
    """avg CE / avg KL over the training steps (as the seeds' table), the barrier's divergence to the reference
    under its aggregate averaged likewise (its weight may be 0), val loss of the last epoch."""
    steps, epochs = read_log(run_dir / "metrics.jsonl"), read_log(run_dir / "epochs.jsonl")
    rounds = [s for s in steps if s.get("probe_round")]
    last = epochs[-1] if epochs else {}
    return {"avg_ce": logged_mean(steps, "ce_loss"), "avg_kl": logged_mean(steps, "kl_loss"),
            "avg_barrier_div": logged_mean(steps, f"barrier_div_{barrier_aggregate}") if barrier_aggregate else None,
            "val_loss": last.get("val_loss"), "val_kl": last.get("val_kl"), "val_top1": last.get("val_top1"),
            "coherence": rounds[-1]["probe_coherence"] if rounds else None,
            "coherence_min": min(r["probe_coherence"] for r in rounds) if rounds else None}


def run_ladder(config: str | Path, vary_specs: list[str], tasks: str | Path | list[str | Path], out: str | Path, *,
               registry: Registry, rule: GateRule = GateRule(), settings: GenerationSettings = GenerationSettings(),
               limits: Limits = Limits(), unsafe_no_isolation: bool = False, progress: bool = False,
               log: Callable[[str], None] = print, overrides: list[str] | None = None) -> list[dict[str, Any]]:
    """Train → merge → gate each rung (``overrides``: ``--set`` for every rung, before the rung's own values);
    ``tasks``: the anchors, or a list whose first file is the anchors and the others suites (as ``kdkit gate``)."""
    from kdkit.train import merge, train

    out = Path(out)
    check_output_dir(out, "--out", marker="ladder.json")  # a new ladder, or this ladder's rerun; never a user's dir
    vary = parse_vary(vary_specs)
    plan = rungs(vary)
    state_path = out / "ladder.json"
    if state_path.is_file():
        state = json.loads(state_path.read_text())
        if (state["vary"] != [[k, v] for k, v in vary] or state["config"] != str(Path(config).resolve())
                or state.get("set", []) != list(overrides or [])):
            raise UsageError(f"{out}: holds a ladder of another config, --vary or --set; use another --out")
        baseline = registry.pack(state["baseline_pack"])
    else:
        baseline = registry.production()
        if baseline is None:
            raise RegistryError("there is no production pack yet: `kdkit registry promote MODEL_DIR` first")
        state = {"config": str(Path(config).resolve()), "vary": [[k, v] for k, v in vary],
                 "baseline_pack": baseline.name, "set": list(overrides or []),
                 "tasks": [str(Path(t).resolve()) for t in (tasks if isinstance(tasks, list) else [tasks])],
                 "workspace": str(registry.workspace.resolve())}
        load_train_config(config, overrides)  # fail early on a bad config, before anything is written
        (out / "rungs").mkdir(parents=True, exist_ok=True)
        atomic_write_json(state_path, state)
    base_cfg = load_train_config(config, overrides)

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
            merge(run_dir, pack_dir)
            rec.update(seeded=seeded, weights_sha256=_weights_sha(run_dir / "final"))
            res = gate(registry, str(pack_dir), tasks, against=baseline.name, rule=rule, settings=settings,
                       limits=limits, unsafe_no_isolation=unsafe_no_isolation, log=log, progress=progress,
                       candidate_meta={"name": f"{out.name}-rung{i:02d}", "source_run": str(run_dir),
                                       "config": (run_dir / "config.yaml").read_text()})
            barrier = cfg.objective.barrier
            rec.update(status="done", **_epoch_means(run_dir, barrier and barrier.aggregate),
                       decision=res.decision, passed=res.candidate_passed,
                       n_tasks=res.n_tasks, interval=list(res.candidate_interval), regressed=res.regressed,
                       fixed=res.fixed, p_value=res.p_value, baseline_passed=res.baseline_passed, pack=res.candidate,
                       reason=res.reason, suites=[{k: s[k] for k in SUITE_FIELDS} for s in res.suites],
                       regressed_completions=res.suites[0]["regressed_completions"],
                       fixed_completions=res.suites[0]["fixed_completions"])
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


def _fmt(v: float | None, nd: int = 4) -> str:
    return "—" if v is None else f"{v:.{nd}f}"


def table_rows(vary: list[tuple[str, list[Any]]], results: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    keys = [k for k, _ in vary]
    probed = any(r.get("coherence") is not None for r in results)  # runs with probes: a coherence column
    scored = _scored(results)  # a teacher scored the validation rows: its KL and top-1 agreement
    barred, suites = _barred(results), _suite_names(results)
    header = ["rung", *keys, "avg CE", "avg KL", *(["avg barrier div"] if barred else []), "val loss",
              *(["val KL", "val top-1"] if scored else []), *(["coherence (last / min)"] if probed else []),
              "anchor pass", *suites, "gate", "regressed"]
    rows = []
    for r in results:
        vals = [str(r["values"][k]) for k in keys]
        if r["status"] != "done":
            rows.append([str(r["rung"]), *vals, "—", "—", *(["—"] if barred else []), "—",
                         *(["—", "—"] if scored else []), *(["—"] if probed else []), "—", *(["—"] * len(suites)),
                         "FAILED", r.get("error", "")[:80]])
            continue
        coh = [f"{_fmt(r.get('coherence'), 3)} / {_fmt(r.get('coherence_min'), 3)}"] if probed else []
        rows.append([str(r["rung"]), *vals, _fmt(r["avg_ce"]), _fmt(r["avg_kl"]),
                     *([_fmt(r.get("avg_barrier_div"))] if barred else []), _fmt(r["val_loss"]),
                     *([_fmt(r.get("val_kl")), _fmt(r.get("val_top1"))] if scored else []), *coh,
                     pass_cell(r["passed"], r["n_tasks"], tuple(r["interval"])),
                     *(_pooled_suite([r], j) for j in range(1, len(suites) + 1)), r["decision"],
                     format_tasks(r["regressed"])])
    return header, rows


def _barred(results: list[dict[str, Any]]) -> bool:
    return any(r.get("avg_barrier_div") is not None for r in results)


def _suite_names(results: list[dict[str, Any]]) -> list[str]:
    """Column names of the gate's suites after the anchors (their task files' names), from the first done rung."""
    done = next((r for r in results if r["status"] == "done"), {})
    return [f"{Path(s['tasks']).name} pass" for s in done.get("suites", [])[1:]]


def _scored(results: list[dict[str, Any]]) -> bool:
    return any(r.get("val_kl") is not None for r in results)


SUITE_FIELDS = ("tasks", "decision", "candidate_passed", "baseline_passed", "n_tasks", "p_value", "reason")
"""What a rung records of each suite of its gate (the anchors first)."""
SEED_KEY = "optim.seed"
SEEDED = ("data.shuffle_seed", "objective.on_policy.seed")  # what a seed also sets (from the config's value on)


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


def identical_seeds(vary: list[tuple[str, list[Any]]], results: list[dict[str, Any]]) -> list[str]:
    """Rungs that differ only in their seed and trained identical weights: their seeds measured nothing."""
    keys = [k for k, _ in vary if k != SEED_KEY]
    if len(keys) == len(vary):
        return []
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in results:
        if r["status"] == "done" and r.get("weights_sha256"):
            groups.setdefault(tuple(str(r["values"][k]) for k in keys), []).append(r)
    notes = []
    for vals, rs in groups.items():
        by_sha: dict[str, list[Any]] = {}
        for r in rs:
            by_sha.setdefault(r["weights_sha256"], []).append(r["values"][SEED_KEY])
        for seeds in by_sha.values():
            if len(seeds) > 1:
                where = ", ".join(f"{k}={v}" for k, v in zip(keys, vals, strict=True)) or "the config"
                notes.append(f"{where}: seeds {', '.join(map(str, seeds))} trained identical weights; these runs do "
                             f"not measure seed noise (nothing random in this config changes with the seed)")
    return notes


def seed_rows(vary: list[tuple[str, list[Any]]], results: list[dict[str, Any]]
              ) -> tuple[list[str], list[list[str]]] | None:
    """Rungs that differ only in ``optim.seed`` as one row: mean losses over the seeds, the pooled anchor
    pass count with its Wilson interval, and how many seeds the gate kept. None without a seed axis."""
    from kdkit.decide.stats import mean_interval

    keys = [k for k, _ in vary if k != SEED_KEY]
    if len(keys) == len(vary):
        return None
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(tuple(str(r["values"][k]) for k in keys), []).append(r)
    probed, scored = any(r.get("coherence") is not None for r in results), _scored(results)
    barred, suites = _barred(results), _suite_names(results)
    header = [*keys, "seeds", "avg CE", "avg KL", *(["avg barrier div"] if barred else []), "val loss ± 95%",
              *(["val KL ± 95%", "val top-1 ± 95%"] if scored else []),
              *(["coherence (mean of last)"] if probed else []), "anchor pass (pooled)",
              *(f"{name} (pooled)" for name in suites), "KEEP", "train s (mean)"]
    rows = []
    for vals, rs in groups.items():
        done = [r for r in rs if r["status"] == "done"]

        def mean(name: str, done: list[dict[str, Any]] = done) -> float | None:
            xs = [r[name] for r in done if r.get(name) is not None]
            return sum(xs) / len(xs) if xs else None

        def spread(name: str, done: list[dict[str, Any]] = done) -> str:
            xs = [r[name] for r in done if r.get(name) is not None]
            mi = mean_interval(xs)  # over seeds: Student's t
            return _fmt(mean(name)) if mi is None else f"{mi[0]:.4f} ± {mi[1]:.4f}"

        k, n = sum(r["passed"] for r in done), sum(r["n_tasks"] for r in done)
        rows.append([*vals, f"{len(done)}/{len(rs)}", _fmt(mean("avg_ce")), _fmt(mean("avg_kl")),
                     *([_fmt(mean("avg_barrier_div"))] if barred else []), spread("val_loss"),
                     *([spread("val_kl"), spread("val_top1")] if scored else []),
                     *([_fmt(mean("coherence"), 3)] if probed else []),
                     pass_cell(k, n) if n else "—",
                     *(_pooled_suite(done, j) for j in range(1, len(suites) + 1)),
                     f"{sum(r['decision'] == 'KEEP' for r in done)}/{len(done)}", _fmt(mean("train_s"), 1)])
    return header, rows


def _pooled_suite(done: list[dict[str, Any]], j: int) -> str:
    """Suite j's pass count summed over the finished rungs given (a rung's own, or its seeds'); — without it."""
    ss = [r["suites"][j] for r in done if len(r.get("suites", [])) > j]
    return f"{sum(s['candidate_passed'] for s in ss)}/{sum(s['n_tasks'] for s in ss)}" if ss else "—"


def paired_against_first(d: Path) -> dict[str, Any] | None:
    """Each rung of the ladder in ``d`` (its seeds together) against the first, on the validation rows: the
    difference of validation CE and KL per token (b − first) with a 95% paired bootstrap :class:`Interval` over
    seeds and rows (None for KL without a scoring teacher). Rungs without the same seeds and rows are left out;
    None when fewer than two rungs have per-row validation sums."""
    import numpy as np

    from kdkit.decide.stats import paired_difference
    from kdkit.train.metrics import VALIDATION_ROWS

    groups: dict[str, list[tuple[Any, dict[str, Any]]]] = {}
    for f in sorted((d / "rungs").glob("*.json")):
        r = json.loads(f.read_text())
        vf = Path(r.get("run_dir", "")) / VALIDATION_ROWS
        if r.get("status") == "done" and vf.is_file():
            key = ", ".join(f"{k}={v}" for k, v in r["values"].items() if k != SEED_KEY) or "the config"
            groups.setdefault(key, []).append((r["values"].get(SEED_KEY, 0), json.loads(vf.read_text())))
    if len(groups) < 2:
        return None
    names = list(groups)
    first = sorted(groups[names[0]], key=lambda x: x[0])
    out = []
    for name in names[1:]:
        other = sorted(groups[name], key=lambda x: x[0])
        if [s for s, _ in other] != [s for s, _ in first] or any(o["line"] != f["line"] for (_, o), (_, f) in
                                                                  zip(other, first, strict=True)):
            continue  # not the same seeds and rows: no pairing
        found: dict[str, Any] = {"name": name}
        for key in ("ce", "kl"):
            col = f"{key}_sum"
            arr = [np.stack([[v[col], v["tokens"]] for _, v in g], 0).transpose(0, 2, 1)
                   for g in (first, other)] if all(v.get(col) for _, v in first + other) else None
            found[key] = None if arr is None else paired_difference(arr[0], arr[1])
        out.append(found)
    return {"first": names[0], "rows": len(first[0][1]["line"]), "seeds": len(first), "rungs": out} if out else None


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    return "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n" + "".join(
        "| " + " | ".join(r) + " |\n" for r in rows)


def write_table(out: Path, vary: list[tuple[str, list[Any]]], results: list[dict[str, Any]]) -> None:
    by_seed = seed_rows(vary, results)
    if by_seed is not None:
        notes = "".join(f"\n> {n}\n" for n in identical_seeds(vary, results))
        atomic_write_bytes(out / "ladder_seeds.md", (_markdown(*by_seed) + f"\nA seed s sets optim.seed = s and, "
                           f"from the config's values, {' and '.join(SEEDED)} + s.\n" + notes).encode())
    header, rows = table_rows(vary, results)
    atomic_write_bytes(out / "ladder.md", _markdown(header, rows).encode())
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    atomic_write_bytes(out / "ladder.csv", buf.getvalue().encode())
    _plot(out, vary, results)


def _plot(out: Path, vary: list[tuple[str, list[Any]]], results: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = vary[0][0]
    done = [r for r in results if r["status"] == "done"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    if done:
        xs = [r["values"][key] for r in done]
        labels = [", ".join(f"{v}" for v in r["values"].values()) for r in done]
        pos = list(range(len(done))) if len(vary) > 1 or not all(isinstance(x, int | float) for x in xs) else xs
        rate = [r["passed"] / max(r["n_tasks"], 1) for r in done]
        err_lo = [max(0.0, p - r["interval"][0]) for p, r in zip(rate, done, strict=True)]
        err_hi = [max(0.0, r["interval"][1] - p) for p, r in zip(rate, done, strict=True)]
        ax1.errorbar(pos, rate, yerr=[err_lo, err_hi], fmt="o-", capsize=4, label="candidate")
        base = done[0]["baseline_passed"] / max(done[0]["n_tasks"], 1)
        ax1.axhline(base, color="grey", ls="--", label="baseline")
        for name in ("avg_ce", "avg_kl", "avg_barrier_div", "val_loss"):
            ys = [r[name] for r in done]
            if all(y is not None for y in ys):
                ax2.plot(pos, ys, "o-", label=name)
        if pos is not xs:
            for ax in (ax1, ax2):
                ax.set_xticks(pos, labels, rotation=30)
    ax1.set(title="anchor pass rate (95% Wilson)", xlabel=key, ylabel="share of anchor tasks passed", ylim=(0, 1.05))
    # from zero: rungs 3.92 and 3.97 apart look as close as they are, not like a trend
    ax2.set(title="losses (averages over the run)", xlabel=key, ylabel="nats per target token")
    ax2.set_ylim(bottom=0)
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(out / "ladder.png", buf.getvalue())


