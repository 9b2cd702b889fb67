"""The ladder's tables: one row per rung (ladder.md / .csv), one per setting over seeds (ladder_seeds.md),
each rung against the first on the validation rows, and the plot (ladder.png); read by :mod:`kdkit.decide.report`."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from kdkit.decide.gate import format_tasks
from kdkit.evaluate.passrate import pass_cell
from kdkit.util.io import atomic_write_bytes


def _fmt(v: float | None, nd: int = 4) -> str:
    return "—" if v is None else f"{v:.{nd}f}"


def table_rows(vary: list[tuple[str, list[Any]]], results: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    keys = [k for k, _ in vary]
    probed = any(r.get("coherence") is not None for r in results)  # runs with probes: a coherence column
    scored = _scored(results)  # a teacher scored the validation rows: its KL and top-1 agreement
    barred, suites = _barred(results), _suite_names(results)
    drifted, drafted = any(r.get("drift") for r in results), any(r.get("draft") for r in results)
    header = ["rung", *keys, "avg CE", "avg KL", *(["avg barrier div", "barrier active"] if barred else []), "val loss",
              *(["val KL", "val top-1"] if scored else []), *(["coherence (last / min)"] if probed else []),
              *([f"drift {w} (KL b‖c / c‖b)" for w in DRIFT_ROWS] if drifted else []),
              *(["as a draft (1−TVD / top-1)"] if drafted else []), "anchor pass", *suites, "gate", "regressed"]
    rows = []
    for r in results:
        vals = [str(r["values"][k]) for k in keys]
        if r["status"] != "done":
            rows.append([str(r["rung"]), *vals, "—", "—", *(["—", "—"] if barred else []), "—",
                         *(["—", "—"] if scored else []), *(["—"] if probed else []),
                         *(["—"] * len(DRIFT_ROWS) if drifted else []), *(["—"] if drafted else []), "—",
                         *(["—"] * len(suites)),
                         "FAILED", r.get("error", "")[:80]])
            continue
        coh = [f"{_fmt(r.get('coherence'), 3)} / {_fmt(r.get('coherence_min'), 3)}"] if probed else []
        rows.append([str(r["rung"]), *vals, _fmt(r["avg_ce"]), _fmt(r["avg_kl"]),
                     *([_fmt(r.get("avg_barrier_div")), active_cell([r])] if barred else []), _fmt(r["val_loss"]),
                     *([_fmt(r.get("val_kl")), _fmt(r.get("val_top1"))] if scored else []), *coh,
                     *([drift_cell(r, w) for w in DRIFT_ROWS] if drifted else []),
                     *([draft_cell(r)] if drafted else []), pass_cell(r["passed"], r["n_tasks"], tuple(r["interval"])),
                     *(_pooled_suite([r], j) for j in range(1, len(suites) + 1)), r["decision"],
                     format_tasks(r["regressed"])])
    return header, rows


DRIFT_ROWS = ("train", "anchors")  # where a rung's KL from the baseline is measured (kdkit.decide.ladder.rung_drift)


def draft_cell(r: dict[str, Any]) -> str:
    """The rung as a draft for its teacher: expected acceptance of speculative sampling / greedy drafting."""
    d = r.get("draft")
    return "—" if not d else f"{_fmt(d['alpha_sample'], 3)} / {_fmt(d['alpha_greedy'], 3)}"


def drift_cell(r: dict[str, Any], where: str) -> str:
    """``KL(base‖cand) / KL(cand‖base)``, the means over the target tokens, or — when not measured."""
    d = (r.get("drift") or {}).get(where)
    return "—" if not d else f"{_fmt(d['kl_base_cand_mean'], 4)} / {_fmt(d['kl_cand_base_mean'], 4)}"


def _mean_drift(done: list[dict[str, Any]], where: str) -> dict[str, Any]:
    """The seeds' drift means, averaged (the seeds that measured it)."""
    ds = [r["drift"][where] for r in done if (r.get("drift") or {}).get(where)]
    if not ds:
        return {}
    return {where: {k: sum(d[k] for d in ds) / len(ds) for k in ("kl_base_cand_mean", "kl_cand_base_mean")}}


def active_cell(done: list[dict[str, Any]]) -> str:
    """On how many steps the barrier's divergence was above τ (its hinge active), summed over ``done`` (every
    step; of the logged steps only for a run from before kdkit counted every step); "0/n (inert)" says that
    the leash never acted."""
    counts = [r["barrier_active"] for r in done if r.get("barrier_active")]
    if not counts:
        return "—"
    k, n = sum(c[0] for c in counts), sum(c[1] for c in counts)
    return f"{k}/{n}" + (" (inert)" if k == 0 else "")


def _barred(results: list[dict[str, Any]]) -> bool:
    return any(r.get("avg_barrier_div") is not None for r in results)


def _suite_names(results: list[dict[str, Any]]) -> list[str]:
    """Column names of the gate's suites after the anchors (their task files' names), from the first done rung."""
    done = next((r for r in results if r["status"] == "done"), {})
    return [f"{Path(s['tasks']).name} pass" for s in done.get("suites", [])[1:]]


def _scored(results: list[dict[str, Any]]) -> bool:
    return any(r.get("val_kl") is not None for r in results)


SEED_KEY = "optim.seed"


SEEDED = ("data.shuffle_seed", "objective.on_policy.seed")  # what a seed also sets (from the config's value on)


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
    drifted = any(r.get("drift") for r in results)
    header = [*keys, "seeds", "avg CE", "avg KL", *(["avg barrier div", "barrier active"] if barred else []),
              "val loss ± 95%",
              *(["val KL ± 95%", "val top-1 ± 95%"] if scored else []),
              *(["coherence (mean of last)"] if probed else []),
              *([f"drift {w} (mean KL b‖c / c‖b)" for w in DRIFT_ROWS] if drifted else []), "anchor pass (pooled)",
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
                     *([_fmt(mean("avg_barrier_div")), active_cell(done)] if barred else []), spread("val_loss"),
                     *([spread("val_kl"), spread("val_top1")] if scored else []),
                     *([_fmt(mean("coherence"), 3)] if probed else []),
                     *([drift_cell({"drift": _mean_drift(done, w)}, w) for w in DRIFT_ROWS] if drifted else []),
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
