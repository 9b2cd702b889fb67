"""``kdkit report``: one self-contained HTML file for a run, a demo or a ladder.

Plots are drawn with matplotlib and embedded as base64 PNG; there are no external
links, scripts or fonts, so the file opens from disk in any browser.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from kdkit.train.rundir import read_log
from kdkit.util.errors import UsageError
from kdkit.util.io import atomic_write_bytes

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1,h2{font-weight:600} table{border-collapse:collapse;margin:1em 0} td,th{border:1px solid #ccc;padding:4px 8px}
th{background:#f4f4f4} .pass{background:#c8ebc8} .fail{background:#f5c6c6} .grid td{font-size:11px;text-align:center}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px} img{max-width:100%}
.keep{color:#17741a;font-weight:700} .revert{color:#a11;font-weight:700}
.undecided{color:#8a5a00;font-weight:700} .note{background:#fff6d6;padding:.5em}
.grid{table-layout:fixed;max-width:100%} .grid td:first-child{text-align:left;white-space:nowrap}
td pre{white-space:pre-wrap;word-break:break-word;max-width:32em;margin:0}
"""


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _img(src: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="{src}">'


STYLES = ("-", "--", "-.", ":")  # one line style per run, so that equal curves do not hide each other


def loss_curves(runs: dict[str, Path]) -> str | None:
    """Per-step loss (total and CE) and KD divergence, and per-epoch train and validation CE, of one or more runs,
    as a data: URI. Log axes (the end of training, where runs differ, stays visible); like is compared with
    like (CE with CE, never a total with a CE); a panel without data (no KD, a single epoch) is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {n: ([s for s in read_log(d / "metrics.jsonl") if "total_loss" in s], read_log(d / "epochs.jsonl"))
            for n, d in runs.items()}  # probe rounds have rows of their own
    if not any(m for m, _ in data.values()):
        return None
    has_kd = any(s.get("kl_loss") for steps, _ in data.values() for s in steps)
    has_epochs = any(len(e) >= 2 for _, e in data.values())
    panels = ["loss", *(["kd"] if has_kd else []), *(["epoch"] if has_epochs else [])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.6), squeeze=False)
    ax = dict(zip(panels, axes[0], strict=True))
    for i, (name, (steps, epochs)) in enumerate(data.items()):
        ls, xs = STYLES[i % len(STYLES)], [s["step"] for s in steps]
        line = ax["loss"].plot(xs, [s["total_loss"] for s in steps], ls=ls, lw=1.4, alpha=0.85, label=f"{name}: total")
        if any(abs(s["total_loss"] - s["ce_loss"]) > 1e-6 * abs(s["ce_loss"]) for s in steps):  # CE only: one line
            ax["loss"].plot(xs, [s["ce_loss"] for s in steps], ls=ls, lw=0.9, alpha=0.6, color=line[0].get_color(),
                            marker=".", markevery=max(1, len(xs) // 12), label=f"{name}: CE")
        if has_kd and any(s.get("kl_loss") for s in steps):
            ax["kd"].plot(xs, [s.get("kl_loss", float("nan")) for s in steps], ls=ls, color=line[0].get_color(),
                          label=name)
        if has_epochs and epochs:
            ex = [e["step"] for e in epochs]
            ax["epoch"].plot(ex, [e["ce_loss"] for e in epochs], "o" + ls, color=line[0].get_color(),
                             label=f"{name}: train CE")
            if all("val_loss" in e for e in epochs):
                ax["epoch"].plot(ex, [e["val_loss"] for e in epochs], "s" + ls, mfc="none", color=line[0].get_color(),
                                 label=f"{name}: validation CE")
    titles = {"loss": ("training loss per step", "loss (nats per target token)"),
              "kd": ("KD divergence per step", "divergence (nats per target token)"),
              "epoch": ("cross-entropy per epoch", "CE (nats per target token)")}
    for key, a in ax.items():
        a.set(title=titles[key][0], xlabel="optimizer step", ylabel=titles[key][1])
        _log_axis(a)
        a.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _log_axis(a: Any) -> None:
    """A log y axis labelled in plain numbers (0.18, not 1.8 × 10⁻¹); within one decade the minor ticks are
    labelled too, so a narrow range still has numbers on it."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    a.set_yscale("log")
    plain = FuncFormatter(lambda y, _: f"{y:.3g}")
    a.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # 0.1, 0.2, 0.5, 1, 2, ...
    a.yaxis.set_major_formatter(plain)
    lo, hi = a.get_ylim()
    a.yaxis.set_minor_formatter(plain if lo > 0 and hi / lo < 10 else NullFormatter())
    a.grid(True, which="both", alpha=0.25)


INCOHERENCE_FLOOR = 1e-3  # 1 − coherence is drawn at least this high on the log axis (a fully coherent round)


def coherence_trajectory(runs: dict[str, Path], colors: dict[str, str] | None = None) -> str | None:
    """Log-incoherence (1 − mean probe coherence, log axis, down = coherent) per probe round of each run
    (``colors``: a matplotlib colour per run name, e.g. one per arm of an experiment)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {n: [m for m in read_log(d / "metrics.jsonl") if m.get("probe_round")] for n, d in runs.items()}
    if not any(data.values()):
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for name, rounds in data.items():
        if rounds:
            ax.plot([m["step"] for m in rounds], [max(1.0 - m["probe_coherence"], INCOHERENCE_FLOOR) for m in rounds],
                    marker="o", label=name, color=(colors or {}).get(name))
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("1 − coherence (log)")
    ax.set_title(f"probe log-incoherence (down = coherent; {INCOHERENCE_FLOOR:g} = no loop)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


FOLD = 400  # characters of a probe text shown before the rest is folded away


def probe_outputs(run: Path) -> str:
    """The outputs-over-the-run appendix: each probe's generation per round, escaped, long texts folded."""
    rows = read_log(run / "probes.jsonl")
    if not rows:
        return ""
    parts = ["<h2>Probe outputs over the run</h2>"]
    for pid in dict.fromkeys(r["prompt_id"] for r in rows):
        body = []
        for r in (r for r in rows if r["prompt_id"] == pid):
            text = html.escape(r["text"])
            if len(r["text"]) > FOLD:
                text = (f"{html.escape(r['text'][:FOLD])}<details><summary>{len(r['text']) - FOLD} more characters"
                        f"</summary>{html.escape(r['text'][FOLD:])}</details>")
            body.append(f"<tr><td>{r['step']}</td><td>{r['coherence']:.3f}</td><td><pre>{text}</pre></td></tr>")
        parts.append(f"<h3>probe {html.escape(str(pid))}</h3><table><tr><th>step</th><th>coherence</th>"
                     f"<th>generation (greedy)</th></tr>{''.join(body)}</table>")
    return "".join(parts)


def regressions(title: str, pairs: dict[str, dict[str, str]], fixed: bool = False) -> str:
    """For each regressed (``fixed``: fixed) task, its prompt and the candidate's and the baseline's completion
    side by side (escaped), in task order (ANCHOR/2 before ANCHOR/19)."""
    if not pairs:
        return ""
    from kdkit.decide.gate import task_order

    rows = "".join(f"<tr><td>{html.escape(t)}</td>"
                   f"<td><pre>{html.escape(pairs[t].get('prompt') or '(not stored)')}</pre></td>"
                   f"<td><pre>{html.escape(pairs[t]['candidate'])}</pre></td>"
                   f"<td><pre>{html.escape(pairs[t]['baseline'])}</pre></td></tr>" for t in sorted(pairs, key=task_order))
    cand, base = ("candidate (passes)", "baseline (fails)") if fixed else ("candidate (fails)", "baseline (passes)")
    return (f"<h3>{html.escape(title)}</h3><table><tr><th>task</th><th>prompt</th><th>{cand}</th>"
            f"<th>{base}</th></tr>{rows}</table>")


def _table(header: list[str], rows: list[list[str]]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    b = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{b}</table>"


GRID_COLUMNS = 20  # tasks per grid block: a block fits the page width


def pass_grid(title: str, outcomes: dict[str, dict[str, bool]]) -> str:
    """Models × tasks, green = passed, red = failed; in blocks of :data:`GRID_COLUMNS` tasks."""
    tasks = sorted({t for o in outcomes.values() for t in o}, key=lambda t: (t.split("/")[0], int(t.split("/")[-1])
                                                                              if t.split("/")[-1].isdigit() else 0))
    blocks = []
    for lo in range(0, len(tasks), GRID_COLUMNS):
        part = tasks[lo:lo + GRID_COLUMNS]
        head = "<th>model</th>" + "".join(f"<th>{html.escape(t.split('/')[-1])}</th>" for t in part)
        body = ""
        for model, o in outcomes.items():
            cells = "".join(f'<td class="{"pass" if o.get(t) else "fail"}" title="{html.escape(t)}">'
                            f'{"✓" if o.get(t) else "✗"}</td>' for t in part)
            body += f"<tr><td>{html.escape(model)}</td>{cells}</tr>"
        blocks.append(f"<table class='grid'><tr>{head}</tr>{body}</table>")
    return f"<h3>{html.escape(title)}</h3>" + "".join(blocks)


def _config_block(run: Path) -> str:
    p = run / "config.yaml"
    return f"<details><summary>resolved config: {html.escape(str(run))}</summary><pre>{html.escape(p.read_text())}</pre>" \
           f"</details>" if p.is_file() else ""


def _demo_body(d: Path) -> str:
    s = json.loads((d / "demo.json").read_text())
    from kdkit.decide.gate import mcnemar_exact
    from kdkit.evaluate.passrate import wilson_interval

    rows = []
    for m in s["models"]:
        lo, hi = m["anchor_interval"]
        hlo, hhi = wilson_interval(m["holdout_passed"], m["holdout_total"])
        kl = "—" if m["kl_to_teacher"] is None else f"{m['kl_to_teacher']:.4f}"
        rows.append([m["model"], f"{m['parameters']:,}", f"{m['anchor_passed']}/{m['anchor_total']} "
                     f"[{100 * lo:.0f}–{100 * hi:.0f}%]", f"{m['holdout_passed']}/{m['holdout_total']} "
                     f"[{100 * hlo:.0f}–{100 * hhi:.0f}%]", f"{m['val_loss']:.4f}", kl,
                     f"{m.get('precompute_s', 0.0):.1f}", f"{m['wall_s']:.1f}"])
    g = s["gate"]
    by = {m["model"]: m.get("holdout_outcomes", {}) for m in s["models"]}
    dist, base = by.get("distilled", {}), by.get("baseline", {})
    won = sum(dist[t] and not base.get(t, False) for t in dist)
    lost = sum(base.get(t, False) and not dist[t] for t in dist)
    decided_on = ", ".join(Path(x["tasks"]).name for x in g.get("suites", [])) or "the anchors"
    verdict = ("distillation WINS on holdout" if s["distillation_wins_holdout"] else
               "distillation does NOT beat the baseline on holdout")
    verdict += f" (the holdout is not gated: the gate's {g['decision']} was decided on {decided_on})"
    paired = _paired_validation({m["model"]: m.get("val_rows") for m in s["models"]}, "baseline", "distilled")
    parts = [f"<h1>kdkit demo</h1><p>{html.escape(verdict)} (Δ holdout = {s['holdout_delta']:+d}: {won} tasks only "
             f"the distilled student passes, {lost} only the baseline, exact McNemar p = {mcnemar_exact(lost, won):.3g}; "
             f"Δ anchors = {s['anchor_delta']:+d}); total {s['total_seconds']:.0f} s.</p>",
             _table(["model", "parameters", "anchor pass [95%]", "holdout pass [95%]", "val loss", "KL to teacher",
                     "precompute s", "train s"], rows),
             paired,
             f"<p>Gate (distilled vs production = baseline): <span class='{g['decision'].lower()}'>{g['decision']}"
             f"</span> — {html.escape(g['reason'])}</p>", _gate_scope_note(s)]
    for suite in g.get("suites", []):
        parts.append(regressions(f"Regressed on {Path(suite['tasks']).name}: distilled vs baseline",
                                 suite.get("regressed_completions", {})))
        parts.append(regressions(f"Fixed on {Path(suite['tasks']).name}: distilled vs baseline",
                                 suite.get("fixed_completions", {}), fixed=True))
    curves = loss_curves({n: d / "runs" / n for n in ("distilled", "baseline")})
    if curves:
        parts.append("<h2>Training curves</h2>" + _img(curves, "loss curves"))
    parts.append(pass_grid("Anchors", {m["model"]: m["anchor_outcomes"] for m in s["models"]}))
    parts.append(pass_grid("Holdout", {m["model"]: m["holdout_outcomes"] for m in s["models"]}))
    parts += [_config_block(d / "runs" / n) for n in ("distilled", "baseline")]
    return "".join(parts)


def _paired_validation(rows: dict[str, dict[str, list] | None], a: str, b: str) -> str:
    """``b`` against ``a`` on the same validation rows: the difference of validation CE (and KL to the teacher)
    per token with its paired bootstrap interval over the rows; "" when either has no per-row sums."""
    from kdkit.decide.stats import paired_difference

    ra, rb = rows.get(a), rows.get(b)
    if not ra or not rb or ra["line"] != rb["line"]:
        return ""
    out = []
    for key, what in (("ce_sum", "validation CE"), ("kl_sum", "validation KL to the teacher")):
        if ra.get(key) and rb.get(key):
            iv = paired_difference(np.stack([ra[key], ra["tokens"]], -1), np.stack([rb[key], rb["tokens"]], -1))
            out.append(f"{what}, {b} − {a}: " + iv.text())
    return "<p>" + "<br>".join(html.escape(x) for x in out) + "</p>" if out else ""


def _gate_scope_note(s: dict[str, Any]) -> str:
    """The gate's rule looks at the anchors only; say so, loudly when the holdout disagrees with it."""
    note = "The gate decides on the anchor tasks only; the holdout is reported here, not gated."
    if s["gate"]["decision"] == "REVERT" and s["holdout_delta"] > 0:
        note = (f"Note: distillation wins on the holdout (Δ = {s['holdout_delta']:+d}) but the gate REVERTs: " + note +
                " A REVERT means an anchor the baseline passed now fails (or the anchor count fell).")
    elif s["gate"]["decision"] == "UNDECIDED":
        note += (" UNDECIDED: the baseline passes too few anchors for the exact test to show a drop, so no KEEP "
                 "can be supported and nothing was promoted.")
    return f"<p class='note'>{html.escape(note)}</p>"


def _ladder_body(d: Path) -> str:
    parts = [f"<h1>kdkit ladder {html.escape(d.name)}</h1>"]
    md = (d / "ladder.md").read_text() if (d / "ladder.md").is_file() else ""
    lines = [ln.strip().strip("|").split("|") for ln in md.splitlines() if ln.strip() and not ln.startswith("|---")]
    if lines:
        parts.append(_table([c.strip() for c in lines[0]], [[c.strip() for c in r] for r in lines[1:]]))
    if (d / "ladder.png").is_file():
        parts.append(_img("data:image/png;base64," + base64.b64encode((d / "ladder.png").read_bytes()).decode(),
                          "ladder plot"))
    rung_runs = {p.parent.name: p for p in sorted(d.glob("rung-*/run")) if (p / "metrics.jsonl").is_file()}
    curves = loss_curves(rung_runs)
    if curves:
        parts.append("<h2>Training curves</h2>" + _img(curves, "loss curves"))
    coh = coherence_trajectory(rung_runs)
    if coh:
        parts.append("<h2>Coherence of every rung</h2>" + _img(coh, "probe log-incoherence per rung"))
    outcomes, regressed = {}, []
    for f in sorted((d / "rungs").glob("*.json")):
        r = json.loads(f.read_text())
        if r.get("status") == "done" and r.get("pack"):
            outcomes[f"rung {r['rung']} {r['values']}"] = _rung_outcomes(d, r)
            regressed.append(regressions(f"rung {r['rung']} {r['values']}: regressed anchors",
                                         r.get("regressed_completions", {})))
            regressed.append(regressions(f"rung {r['rung']} {r['values']}: fixed anchors",
                                         r.get("fixed_completions", {}), fixed=True))
    if any(outcomes.values()):
        parts.append(pass_grid("Anchors per rung", outcomes))
    plot = drift_plot([json.loads(f.read_text()) for f in sorted((d / "rungs").glob("*.json"))])
    if plot:
        parts.append("<h2>Drift from the baseline against anchor pass</h2><p>Each point a rung (and seed); the line "
                     "is the least-squares fit with its 95% interval, r its correlation: whether the cheap KL "
                     "predicts the expensive pass count on this model.</p>" + _img(plot, "anchor pass against drift"))
    parts.append(_ladder_paired(d))
    parts += regressed
    parts += [_config_block(p) for p in rung_runs.values()]
    return "".join(parts)


def drift_plot(rungs: list[dict[str, Any]]) -> str | None:
    """Anchor pass count against each drift figure (KL(base‖cand) and KL(cand‖base), on the training rows and on
    the anchors' baseline answers), one point per finished rung and the baseline itself at 0 (a model does not
    drift from itself), with the least-squares line and its 95% interval where there are three points or more;
    None when no rung measured drift."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kdkit.decide.stats import line_fit

    done = [r for r in rungs if r.get("status") == "done" and r.get("drift")]
    panels = [(w, k) for w in ("train", "anchors") for k in ("kl_base_cand_mean", "kl_cand_base_mean")
              if any((r["drift"].get(w) or {}).get(k) is not None for r in done)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for a, (where, key) in zip(axes[0], panels, strict=True):
        pts = [(r["drift"][where][key], r["passed"]) for r in done if r["drift"].get(where)]
        base = sorted({r["baseline_passed"] for r in done if r.get("baseline_passed") is not None})
        a.scatter([p[0] for p in pts], [p[1] for p in pts], s=18, color="#1f77b4", label="rungs")
        if len(base) == 1:  # one baseline for every rung: its own point, at zero drift
            pts.append((0.0, base[0]))
            a.scatter([0.0], base, s=26, marker="s", color="#222", label="baseline")
            a.legend(fontsize=7)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        fit = line_fit(xs, ys)
        title = f"{'KL(base‖cand)' if key.startswith('kl_base') else 'KL(cand‖base)'} on {where}"
        if fit is not None:
            grid = np.linspace(min(xs), max(xs), 50)
            lo, hi = fit.band(grid)
            a.plot(grid, fit.intercept + fit.slope * grid, color="#d62728", lw=1.2)
            a.fill_between(grid, lo, hi, color="#d62728", alpha=0.15, lw=0)
            title += f"\nr = {fit.r:+.2f}, n = {fit.n}"
        a.set(title=title, xlabel="mean nats per target token", ylabel="anchor pass")
        a.title.set_fontsize(9)
    fig.tight_layout()
    return _png(fig)


def _ladder_paired(d: Path) -> str:
    """Each rung (its seeds together) against the first on the validation rows (`tables.paired_against_first`)."""
    from kdkit.decide.tables import paired_against_first

    found = paired_against_first(d)
    if found is None:
        return ""

    def cell(iv: Any) -> str:
        return "—" if iv is None else f"{iv.delta:+.4f} [{iv.low:+.4f}, {iv.high:+.4f}]"

    rows = [[r["name"], cell(r["ce"]), cell(r["kl"])] for r in found["rungs"]]
    seeds = found["seeds"]
    return (f"<h2>Validation against {html.escape(found['first'])}</h2><p>Differences per token, 95% paired bootstrap "
            f"over {found['rows']} validation rows{f' × {seeds} seeds' if seeds > 1 else ''}.</p>" +
            _table(["rung", "Δ validation CE", "Δ validation KL"], rows))


def _rung_outcomes(d: Path, r: dict[str, Any]) -> dict[str, bool]:
    reg_dir = Path(json.loads((d / "ladder.json").read_text()).get("workspace", ".kdkit"))
    try:
        from kdkit.decide.registry import Registry

        reg = Registry(reg_dir)
        ev = reg.evaluations(reg.pack(r["pack"]).id)
        return ev[-1]["outcomes"] if ev else {}
    except Exception:
        return {}


def _run_body(d: Path) -> str:
    parts = [f"<h1>kdkit run {html.escape(str(d))}</h1>"]
    epochs = read_log(d / "epochs.jsonl")
    if epochs:
        keys = [k for k in ("epoch", "step", "train_loss", "val_loss", "ce_loss", "kl_loss", "val_kl", "barrier")
                if k in epochs[0] and not (k == "barrier" and not any(e.get(k) for e in epochs))]  # no barrier: no column
        parts.append(_table(keys, [[f"{e[k]:.4f}" if isinstance(e[k], float) else str(e[k]) for k in keys]
                                   for e in epochs]))
    curves = loss_curves({d.name: d})
    if curves:
        parts.append(_img(curves, "loss curves"))
    meta = json.loads((d / "run.json").read_text()) if (d / "run.json").is_file() else {}
    if meta.get("early_stop"):
        e = meta["early_stop"]
        parts.append(f"<p class='note'>Early stop after step {e['stopped_after_step']}: probe coherence below the "
                     f"floor {e['coherence_floor']} for {e['patience']} round(s); final/ holds the weights of step "
                     f"{e['final_step']}, the last round at or above it.</p>")
    coh = coherence_trajectory({d.name: d})
    if coh:
        parts.append("<h2>Coherence</h2>" + _img(coh, "probe log-incoherence"))
    parts.append(probe_outputs(d))
    parts.append(_config_block(d))
    return "".join(parts)


def write_report(path: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` for a demo dir (demo.json), a ladder dir (ladder.json) or a run dir (metrics.jsonl)."""
    d = Path(path)
    if (d / "demo.json").is_file():
        body, title = _demo_body(d), "kdkit demo"
    elif (d / "ladder.json").is_file():
        body, title = _ladder_body(d), "kdkit ladder"
    elif (d / "metrics.jsonl").is_file():
        body, title = _run_body(d), "kdkit run"
    else:
        raise UsageError(f"{d}: not a demo, ladder or run directory (no demo.json, ladder.json or metrics.jsonl)")
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{CSS}</style></head>"
           f"<body>{body}</body></html>")
    target = Path(out) if out else d / "report.html"
    atomic_write_bytes(target, doc.encode())
    return target
