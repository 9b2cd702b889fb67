"""``kdkit gate``: compare a candidate with production task by task, decide KEEP, REVERT or UNDECIDED, record it.

The default rule is the seeds': no anchor task that the baseline passes may fail,
and the pass count may not fall. The exact paired test (McNemar's, i.e. a
two-sided binomial test on the discordant pairs) and both Wilson intervals are
reported so that a regression can be told from sampling noise. A suite too small (or a baseline
too weak) for that test to see any drop cannot support a KEEP: the decision is UNDECIDED.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kdkit.decide.registry import Pack, Registry, RegistryError
from kdkit.decide.stats import paired_drop_bounds
from kdkit.evaluate.passrate import (
    GenerationSettings,
    evaluate_model,
    evaluation_key,
    load_tasks,
    read_eval_dir,
    tasks_fingerprint,
)
from kdkit.evaluate.sandbox import Limits
from kdkit.evaluate.served import CannotServe, ServedCandidate, ServerSpec
from kdkit.util.errors import UsageError


@dataclass(frozen=True)
class GateRule:
    max_regressions: int | None = 0  # None under the noise rule (drop_alpha)
    require_not_worse: bool = True
    require_gain_p: float | None = None  # the improvement rule: KEEP only a pass count that rises with p below it
    drop_alpha: float | None = None  # the noise rule: REVERT only a pass count that falls with p below it
    max_drop: float | None = None  # the margin rule: KEEP only a pass rate shown to fall by at most this

    @classmethod
    def parse(cls, text: str | None) -> GateRule:
        """``max_regressions=1,require_not_worse=false``; ``drop_alpha=0.05`` (the noise rule, in place of the
        other two: a suite large enough that single tasks flip both ways under any change); ``max_drop=0.03``
        (the margin rule, in their place too: KEEP only when the pass rate is shown to fall by at most 3
        points, REVERT when it is shown to fall by more, else UNDECIDED)."""
        if not text:
            return cls()
        kw: dict[str, Any] = {}
        for part in text.split(","):
            if "=" not in part:
                raise UsageError(f"--rule {text!r}: expected key=value pairs separated by commas")
            k, v = (s.strip() for s in part.split("=", 1))
            if k == "max_regressions":
                if not v.isdigit():
                    raise UsageError(f"--rule max_regressions={v!r}: expected a whole number >= 0")
                kw[k] = int(v)
            elif k == "require_not_worse":
                if v.lower() not in ("true", "false"):
                    raise UsageError(f"--rule require_not_worse={v!r}: expected true or false")
                kw[k] = v.lower() == "true"
            elif k in ("require_gain_p", "drop_alpha", "max_drop"):
                try:
                    kw[k] = float(v)
                except ValueError:
                    kw[k] = -1.0
                if not 0 < kw[k] < 1:
                    raise UsageError(f"--rule {k}={v!r}: expected " + ("a fraction of the tasks in (0, 1), e.g. 0.03"
                                     if k == "max_drop" else "a p-value threshold in (0, 1), e.g. 0.05"))
            else:
                raise UsageError(f"--rule: unknown key {k!r}; valid: max_regressions, require_not_worse, "
                                 f"require_gain_p, drop_alpha, max_drop")
        for own in ("drop_alpha", "max_drop"):
            if own in kw and {"max_regressions", "require_not_worse", *({"drop_alpha", "max_drop"} - {own})} & set(kw):
                what = "a fall beyond noise" if own == "drop_alpha" else "a fall within a margin"
                raise UsageError(f"--rule {text!r}: {own} ({what}) replaces max_regressions and require_not_worse, "
                                 f"and is one of drop_alpha and max_drop; give one of them or the others")
            if own in kw:
                kw.update(max_regressions=None, require_not_worse=False)
        return cls(**kw)


@dataclass(frozen=True)
class SuiteRule:
    """The rule of every suite after the first (the anchors): the pass count may not fall by more than
    ``margin`` tasks, or, without a margin, may not fall with an exact paired p-value below ``alpha``
    (a drop the test calls noise is allowed)."""

    alpha: float = 0.05
    margin: int | None = None

    @classmethod
    def parse(cls, text: str | None) -> SuiteRule:
        """``alpha=0.05`` or ``margin=2``."""
        if not text:
            return cls()
        kw: dict[str, Any] = {}
        for part in text.split(","):
            k, _, v = (s.strip() for s in part.partition("="))
            try:
                if k == "alpha":
                    kw[k] = float(v)
                    if not 0 < kw[k] < 1:
                        raise UsageError
                elif k == "margin":
                    kw[k] = int(v)
                    if kw[k] < 0:
                        raise UsageError
                else:
                    raise KeyError
            except KeyError:
                raise UsageError(f"--suite-rule: unknown key {k!r}; valid: alpha, margin") from None
            except ValueError:
                raise UsageError(f"--suite-rule {part!r}: alpha in (0, 1) or margin a whole number >= 0") from None
        return cls(**kw)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of min(b, c) in b + c trials at p = 1/2."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2.0 * tail)


def fewest_significant(alpha: float) -> int:
    """The fewest discordant tasks, all one way, that the exact McNemar test calls beyond noise at ``alpha``:
    a suite can show a drop only if the baseline passes at least this many tasks, a gain only if it fails them."""
    k = 1
    while mcnemar_exact(k, 0) >= alpha:
        k += 1
    return k


def power(base: dict[str, bool], alpha: float) -> dict[str, Any]:
    """What this suite can show at ``alpha``: the fewest regressions (none fixed) and gains (none regressed)
    the exact test detects, against how many the baseline's passes and failures allow."""
    k, nb = fewest_significant(alpha), sum(base.values())
    return {"alpha": alpha, "fewest_detectable": k, "baseline_passes": nb, "baseline_fails": len(base) - nb,
            "can_show_drop": nb >= k, "can_show_gain": len(base) - nb >= k}


def power_line(pw: dict[str, Any]) -> str:
    k = pw["fewest_detectable"]
    drop = (f"a drop needs >= {k} of the baseline's {pw['baseline_passes']} passes to fail" if pw["can_show_drop"]
            else f"a drop cannot be shown (the baseline passes {pw['baseline_passes']} < {k} tasks)")
    gain = (f"a gain needs >= {k} of its {pw['baseline_fails']} failures fixed" if pw["can_show_gain"]
            else f"a gain cannot be shown (it fails {pw['baseline_fails']} < {k})")
    return f"power at p < {pw['alpha']:g} (exact McNemar, none the other way): {drop}; {gain}"


def task_order(task_id: str) -> tuple[str, int | float, str]:
    """Sort key: by prefix, then number (ANCHOR/2 before ANCHOR/19); ids without a number last in their prefix."""
    m = re.match(r"^(.*?)/(\d+)$", task_id)
    return (m.group(1), int(m.group(2)), task_id) if m else (task_id, math.inf, task_id)


def format_tasks(task_ids: list[str]) -> str:
    """The seeds' compact list: ``MBPP/20, /53, HE/27, /45`` (prefix written once per run of a prefix)."""
    out, prev = [], None
    for tid in sorted(task_ids, key=task_order):
        prefix, num, _ = task_order(tid)
        if prefix == prev and num != math.inf:
            out.append(f"/{num}")
        else:
            out.append(tid)
        prev = prefix
    return ", ".join(out) if out else "—"


@dataclass
class GateResult:
    decision: str
    candidate: str
    baseline: str
    candidate_passed: int
    baseline_passed: int
    n_tasks: int
    candidate_interval: tuple[float, float]
    baseline_interval: tuple[float, float]
    regressed: list[str]
    fixed: list[str]
    p_value: float
    reason: str
    rule: dict[str, Any] = field(default_factory=dict)
    gate_id: int = 0
    candidate_outcomes: dict[str, bool] = field(default_factory=dict)
    suites: list[dict[str, Any]] = field(default_factory=list)  # one entry per task file, the anchors first
    drift: dict[str, Any] | None = None  # the candidate's KL from the baseline (drift_figures), when asked

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


EvalFn = Callable[[Pack, Path], tuple[dict[str, bool], tuple[float, float]]]


def _from_eval_dir(reg: Registry, pack: Pack, tasks: Path, sha: str, key: str, d: Path,
                   log: Callable[[str], None]) -> dict[str, Any] | None:
    """A ``kdkit eval --out`` directory of this pack's files, task file and settings, stored as the pack's
    evaluation (None, saying why, when it is of something else)."""
    try:
        summary, rows = read_eval_dir(d)
    except (OSError, json.JSONDecodeError) as e:
        log(f"not reusing {d}: unreadable ({type(e).__name__})")
        return None
    if summary.get("model_sha256") != pack.weights_sha256:
        return None  # another model: silently another pack's
    why = next((w for w, bad in (("another task file", summary.get("tasks_sha256") != sha),
                                 ("--limit", summary.get("limit") is not None),
                                 ("other generation settings or timeout", summary.get("evaluation_key") != key)) if bad),
               None)
    if why:
        log(f"not reusing {d} for {pack.name} on {tasks.name}: {why}")
        return None
    log(f"reusing `kdkit eval --out {d}` for {pack.name} on {tasks.name} (same model files, tasks and settings)")
    first = [r for r in rows if r.get("sample", 0) == 0]
    return reg.add_evaluation(pack.id, sha, str(tasks), key, {r["task_id"]: r["passed"] for r in first},
                              tuple(summary["interval"]), {"statuses": summary["statuses"], "imported_from": str(d),
                                                           "completions": {r["task_id"]: r["completion"] for r in first}})


def evaluate_pack(reg: Registry, pack: Pack, tasks: Path, settings: GenerationSettings, limits: Limits,
                  unsafe_no_isolation: bool = False, log: Callable[[str], None] = print,
                  progress: bool = False, eval_dirs: list[Path] | None = None,
                  server: ServerSpec | None = None) -> dict[str, Any]:
    """Evaluate a pack on a task file, reusing a stored evaluation of the same weights, tasks and settings (or a
    ``kdkit eval --out`` directory of them among ``eval_dirs``). ``server``: the answers are written by a vLLM
    server (:mod:`kdkit.evaluate.served`) — a LoRA adapter pack always; a whole model where the server serves
    it or can load it in place, else here."""
    reg.check_weights(pack)  # a stored evaluation is about the registered weights; refuse changed files
    sha = tasks_fingerprint(tasks)
    key = evaluation_key(settings, limits.timeout_s)
    found = reg.find_evaluation(pack.id, sha, key)
    if found is not None:
        log(f"reusing stored evaluation of {pack.name} on {tasks.name}")
        return found
    for d in eval_dirs or []:
        found = _from_eval_dir(reg, pack, tasks, sha, key, Path(d), log)
        if found is not None:
            return found
    kw = dict(settings=settings, limits=limits, unsafe_no_isolation=unsafe_no_isolation, progress=progress, log=log)
    served = _open_served(pack, server, log) if server is not None else None
    if served is None:
        if pack.adapter:
            raise RegistryError(f"pack {pack.name!r} is a LoRA adapter: it is evaluated through a vLLM server "
                                f"(--server), or merged first (kdkit merge)")
        log(f"evaluating {pack.name} on {tasks.name}")
        results, summary, _ = evaluate_model(pack.path, tasks, **kw)
    else:
        with served:
            log(f"evaluating {pack.name} on {tasks.name} through {served.server.url} ({served.describe()})")
            results, summary, _ = evaluate_model(pack.path, tasks, served=served, **kw)
    outcomes = {r.task_id: r.passed for r in results if r.sample == 0}
    completions = {r.task_id: r.completion for r in results if r.sample == 0}  # kept: the report quotes them
    where = {} if served is None else {"served": {"url": served.server.url, "how": served.how}}
    return reg.add_evaluation(pack.id, sha, str(tasks), key, outcomes, summary.interval,
                              {"statuses": summary.statuses, "completions": completions, **where})


def _open_served(pack: Pack, server: ServerSpec, log: Callable[[str], None]) -> ServedCandidate | None:
    """The server answering as ``pack``; None for a whole model it can neither serve nor load in place (then
    it is evaluated here, as said in the log)."""
    try:
        return ServedCandidate.open(server.url, pack.path, server.model)
    except CannotServe as e:
        if pack.adapter:
            raise
        log(f"{pack.name}: the server cannot answer as it ({e}); evaluating it on this machine")
        return None


def side_by_side(tasks: list[str], ev_c: dict[str, Any], ev_b: dict[str, Any], prompts: dict[str, str] | None = None
                 ) -> dict[str, dict[str, str]]:
    """Each task's prompt and the candidate's and the baseline's completion (evaluations stored before
    completions were kept say so)."""
    missing = "(not stored: evaluated by an earlier kdkit)"
    cc, bc = ev_c["metrics"].get("completions", {}), ev_b["metrics"].get("completions", {})
    return {t: {"prompt": (prompts or {}).get(t, ""), "candidate": cc.get(t, missing), "baseline": bc.get(t, missing)}
            for t in tasks}


def decide(base: dict[str, bool], cand: dict[str, bool], rule: GateRule | SuiteRule
           ) -> tuple[str, list[str], list[str], float, str]:
    if set(base) != set(cand):
        raise UsageError("candidate and baseline were evaluated on different task sets")
    regressed = sorted((t for t in base if base[t] and not cand[t]), key=task_order)  # ANCHOR/2 before ANCHOR/19
    fixed = sorted((t for t in base if cand[t] and not base[t]), key=task_order)
    p = mcnemar_exact(len(regressed), len(fixed))
    nb, nc = sum(base.values()), sum(cand.values())
    reasons = []
    alpha = rule.alpha if isinstance(rule, SuiteRule) and rule.margin is None else getattr(rule, "drop_alpha", None)
    if isinstance(rule, SuiteRule) and rule.margin is not None and nb - nc > rule.margin:
        reasons.append(f"pass count fell {nb} → {nc}, more than the margin of {rule.margin}")
    elif alpha is not None and nc < nb and p < alpha:
        reasons.append(f"pass count fell {nb} → {nc}, beyond noise (p < {alpha:g})")
    elif isinstance(rule, GateRule) and rule.max_regressions is not None and len(regressed) > rule.max_regressions:
        reasons.append(f"{len(regressed)} task(s) that the baseline passes now fail (allowed: {rule.max_regressions})")
    if isinstance(rule, GateRule) and rule.require_not_worse and nc < nb:
        reasons.append(f"pass count fell {nb} → {nc}")
    if isinstance(rule, GateRule) and rule.require_gain_p is not None and not (nc > nb and p < rule.require_gain_p):
        reasons.append(f"no gain beyond noise: pass count {nb} → {nc} (the improvement rule needs a rise with "
                       f"p < {rule.require_gain_p:g})")
    if isinstance(rule, GateRule) and rule.max_drop is not None:
        verdict, why = margin_verdict(len(regressed), len(fixed), len(base), nb, nc, rule.max_drop)
        return ("REVERT" if reasons else verdict), regressed, fixed, p, "; ".join([*reasons, why]) + \
            f" (exact McNemar p = {p:.3g})"
    decision = "REVERT" if reasons else "KEEP"
    if not reasons:
        reasons.append(f"no fall beyond noise (p < {alpha:g}): {len(regressed)} regressed, {len(fixed)} fixed; pass "
                       f"count {nb} → {nc}" if alpha is not None else f"no disallowed regression; pass count {nb} → {nc}")
    return decision, regressed, fixed, p, "; ".join(reasons) + f" (exact McNemar p = {p:.3g})"


MARGIN_ALPHA = 0.05
"""The margin rule's bounds are one-sided at 95% each way."""


def margin_verdict(regressed: int, fixed: int, n: int, nb: int, nc: int, max_drop: float) -> tuple[str, str]:
    """The margin rule (``max_drop``): KEEP when the fall of the pass rate is at most ``max_drop`` at 95%, REVERT
    when it is more than ``max_drop`` at 95%, else UNDECIDED (the suite cannot tell); with the reason."""
    lo, hi = paired_drop_bounds(regressed, fixed, n, MARGIN_ALPHA)
    bounds = (f"pass count {nb} → {nc} of {n} ({regressed} regressed, {fixed} fixed): the fall is between "
              f"{lo:+.1%} and {hi:+.1%} (exact 95% one-sided bounds)")
    if lo > max_drop:
        return "REVERT", f"the pass rate fell by more than the margin of {max_drop:.1%}: {bounds}"
    if hi <= max_drop:
        return "KEEP", f"the pass rate fell by at most {hi:.1%}, within the margin of {max_drop:.1%}: {bounds}"
    return "UNDECIDED", (f"the suite cannot show that the pass rate fell by at most {max_drop:.1%} (it may have "
                         f"fallen by {hi:.1%}): {bounds}")


def blind_keep(decision: str, reason: str, pw: dict[str, Any], tasks: Path) -> tuple[str, str]:
    """A KEEP on a suite whose test cannot show a drop is no KEEP: (``UNDECIDED``, what the suite would need).

    The suite can show a drop when the baseline passes at least the fewest tasks the exact test calls beyond
    noise; below that, "no disallowed regression" says nothing about the candidate. A REVERT stands."""
    if decision != "KEEP" or pw["can_show_drop"]:
        return decision, reason
    k, nb, n = pw["fewest_detectable"], pw["baseline_passes"], pw["baseline_passes"] + pw["baseline_fails"]
    more = (f"at the baseline's pass rate about {math.ceil(k * n / nb)} tasks" if nb else
            "tasks that the baseline passes: it passes none of these")
    return "UNDECIDED", (f"{tasks.name} cannot show a drop at p < {pw['alpha']:g}: the baseline passes {nb} of "
                         f"{n} tasks and the exact test needs >= {k} to see one; it needs {more} "
                         f"(the rule alone said: {reason})")


def overall(decisions: list[str]) -> str:
    """One decision for all suites: any REVERT reverts; else any UNDECIDED leaves it undecided; else KEEP."""
    return next((d for d in ("REVERT", "UNDECIDED") if d in decisions), "KEEP")


def gate(reg: Registry, candidate: str, tasks: str | Path, *, against: str = "production",
         rule: GateRule = GateRule(), settings: GenerationSettings = GenerationSettings(), limits: Limits = Limits(),
         unsafe_no_isolation: bool = False, candidate_meta: dict[str, Any] | None = None,
         log: Callable[[str], None] = print, progress: bool = False,
         suite_rule: SuiteRule = SuiteRule(), eval_dirs: list[Path] | None = None,
         promote_undecided: bool = False, server: ServerSpec | None = None, drift: bool = False,
         origin: dict[str, Any] | None = None) -> GateResult:
    """Evaluate candidate and baseline on every task file, decide, and record + apply ONE decision in one
    transaction. ``tasks``: a file or a list of files; the first (the anchors) is judged by ``rule``, the
    others by ``suite_rule``; a REVERT in any suite reverts; a suite that cannot show a drop makes a KEEP
    ``UNDECIDED`` (:func:`blind_keep`): recorded, nothing promoted or archived — unless ``promote_undecided``,
    which promotes it and records that it was asked for.

    The decision is applied only if production is still what it was when the gate started. ``server``: answers
    written by a vLLM server; a LoRA run as the candidate is then judged as its adapter, unmerged, and only a
    KEEP merges it — the merged pack, evaluated again, is promoted when its answers are the adapter's on every
    task, and the decision is UNDECIDED (nothing promoted) when they are not. ``drift``: the candidate's KL from
    the baseline on the anchors with the baseline's answers and, for a run, on its training rows
    (:func:`drift_figures`). ``origin``: where the candidate came from (a ladder's rung), recorded with the
    decision."""
    files = [Path(t) for t in (tasks if isinstance(tasks, list | tuple) else [tasks])]
    prod = reg.production()
    if against == "production":
        base = prod
        if base is None:
            raise RegistryError("there is no production pack yet: `kdkit registry promote MODEL_DIR` first")
    else:
        base = _resolve(reg, against)
    meta = {**_pack_origin(candidate), **(candidate_meta or {})}
    run = lora_run(candidate) if server is not None else None
    if run is not None:
        meta = {"source_run": str(run), "config": (run / "config.yaml").read_text(), **meta}
    cand = _resolve(reg, str(run / "final") if run is not None else candidate, parent_id=base.id, **meta)
    if cand.id == base.id:
        raise RegistryError(f"candidate and baseline are the same pack ({cand.name}: identical weights)")
    how = (settings, limits, unsafe_no_isolation, log, progress, eval_dirs, server)
    suites = [_suite(reg, base, cand, f, rule if i == 0 else suite_rule, "anchors" if i == 0 else "suite", how)
              for i, f in enumerate(files)]
    first = suites[0]
    decision = overall([s["decision"] for s in suites])
    reason = first["reason"] if len(suites) == 1 else "; ".join(f"{Path(s['tasks']).name}: {s['decision']} — "
                                                                f"{s['reason']}" for s in suites)
    regressed = [t for s in suites for t in s["regressed"]]
    fixed = [t for s in suites for t in s["fixed"]]
    rule_json = asdict(rule) if len(suites) == 1 else {**asdict(rule), "suites": [
        {k: s[k] for k in ("tasks", "rule", "decision", "candidate_passed", "baseline_passed", "n_tasks", "p_value")}
        for s in suites]}
    if cand.adapter and (decision == "KEEP" or decision == "UNDECIDED" and promote_undecided):
        merged, differ = _merge_keep(reg, cand, run, base, files, (settings, limits, unsafe_no_isolation, log,
                                                                    progress, None, server))
        if differ:
            decision, promote_undecided = "UNDECIDED", False
            reason = (f"the merged pack {merged.name} answers {len(differ)} task(s) otherwise than the adapter the "
                      f"gate judged ({format_tasks(differ)}): nothing promoted; " + reason)
        else:
            cand = merged
    if decision == "UNDECIDED" and promote_undecided:
        decision, rule_json = "KEEP", {**rule_json, "promote_undecided": True}
        reason = "UNDECIDED, promoted as asked (--promote-undecided): " + reason
    figures = None
    if drift:
        train_rows = load_train_config_text(meta.get("config")) if meta.get("config") else None
        figures = drift_figures(reg, cand.path, base, files, reg.workspace / "drift" / f"{base.id}-"
                                f"{tasks_fingerprint(files[0])[:16]}.jsonl", *(train_rows or (None, 1024)),
                                (settings, limits), log)
    gid = reg.record_gate(cand.id, base.id, rule_json, decision, regressed, fixed, first["p_value"], reason,
                          expected_production=None if prod is None else prod.id,
                          metrics={"suites": [{k: s[k] for k in RECORDED} for s in suites], "drift": figures,
                                   **({"origin": origin} if origin else {})})
    return GateResult(decision, cand.name, base.name, first["candidate_passed"], first["baseline_passed"],
                      first["n_tasks"], first["candidate_interval"], first["baseline_interval"], regressed, fixed,
                      first["p_value"], reason, rule_json, gid, first["candidate_outcomes"], suites, figures)


RECORDED = ("tasks", "tasks_sha256", "decision", "reason", "regressed", "fixed", "p_value", "candidate_passed",
            "baseline_passed", "n_tasks", "candidate_interval", "baseline_interval", "power")
"""What the registry keeps of each suite of a gate (beside the decision): what a model card is written from."""


def _suite(reg: Registry, base: Pack, cand: Pack, f: Path, suite_r: GateRule | SuiteRule, kind: str,
           how: tuple[Any, ...]) -> dict[str, Any]:
    """One task file judged: both packs evaluated (``how``: :func:`evaluate_pack`'s arguments after the task
    file), the decision under ``suite_r`` (no KEEP without power: :func:`blind_keep`), what regressed and
    what was fixed, side by side."""
    ev_b = evaluate_pack(reg, base, f, *how)
    ev_c = evaluate_pack(reg, cand, f, *how)
    decision, regressed, fixed, p, reason = decide(ev_b["outcomes"], ev_c["outcomes"], suite_r)
    pw = power(ev_b["outcomes"], getattr(suite_r, "require_gain_p", None) or getattr(suite_r, "alpha", 0.05))
    decision, reason = blind_keep(decision, reason, pw, f)
    prompts = {t.task_id: t.prompt for t in load_tasks(f)}
    return {"tasks": str(f), "tasks_sha256": tasks_fingerprint(f), "rule": {"kind": kind, **asdict(suite_r)},
            "decision": decision, "regressed": regressed, "fixed": fixed, "p_value": p, "reason": reason,
            "candidate_passed": ev_c["n_passed"], "baseline_passed": ev_b["n_passed"],
            "n_tasks": ev_c["n_tasks"], "candidate_interval": (ev_c["ci_low"], ev_c["ci_high"]),
            "baseline_interval": (ev_b["ci_low"], ev_b["ci_high"]), "candidate_outcomes": ev_c["outcomes"],
            "regressed_completions": side_by_side(regressed, ev_c, ev_b, prompts),
            "fixed_completions": side_by_side(fixed, ev_c, ev_b, prompts), "power": pw}


def drift_figures(reg: Registry, candidate: str | Path, baseline: Pack, tasks: Any, rows: Path,
                  train_rows: str | None, max_length: int, how: tuple[GenerationSettings, Limits],
                  log: Callable[[str], None]) -> dict[str, Any]:
    """KL(base ‖ cand) and KL(cand ‖ base), mean and p95 (:mod:`kdkit.evaluate.drift`): on the anchors with the
    baseline's stored answers (written to ``rows`` once) and, when given, on the training rows — one forward of
    each model, no generation. A figure that cannot be measured is None, with the reason in the log."""
    from kdkit.evaluate.drift import answer_rows, drift
    from kdkit.util.errors import KdkitError

    anchors = Path(tasks[0] if isinstance(tasks, list | tuple) else tasks)
    if not rows.is_file():
        rows.parent.mkdir(parents=True, exist_ok=True)
        ev = reg.find_evaluation(baseline.id, tasks_fingerprint(anchors), evaluation_key(how[0], how[1].timeout_s))
        answer_rows(load_tasks(anchors), (ev or {}).get("metrics", {}).get("completions", {}), rows)
    figures: dict[str, Any] = {}
    for name, data in (("train", train_rows), ("anchors", rows)):
        if data is None:
            continue
        if not Path(data).stat().st_size:
            log(f"drift on {name} not measured: the baseline answered no anchor")
            figures[name] = None
            continue
        try:
            d = drift(candidate, baseline.path, data, max_length=max_length, log=log)
        except KdkitError as e:  # the candidate was judged: a drift that cannot be measured is said, not fatal
            log(f"drift on {name} not measured: {e}")
            figures[name] = None
            continue
        figures[name] = {k: v for k, v in d.as_dict().items() if k.startswith("kl_") or k == "tokens"}
    return figures


def _pack_origin(candidate: str) -> dict[str, str]:
    """A merged pack's run and that run's config (what a model card says of its training), where both exist."""
    from kdkit.models.load import PACK_FILE

    f = Path(candidate) / PACK_FILE
    run = Path(json.loads(f.read_text()).get("source_run") or "") if f.is_file() else None
    if run is None or not (run / "config.yaml").is_file():
        return {}
    return {"source_run": str(run), "config": (run / "config.yaml").read_text()}


def lora_run(candidate: str) -> Path | None:
    """A finished LoRA run directory named as a candidate (its ``final/`` is the adapter), else None."""
    meta = Path(candidate) / "final" / "kdkit.json"
    return Path(candidate) if meta.is_file() and json.loads(meta.read_text()).get("kind") == "lora" else None


def run_server(candidate: str) -> ServerSpec | None:
    """The server a LoRA run's config names for its evaluation (``eval.server`` in its config.yaml), else None."""
    import yaml
    from pydantic import ValidationError

    from kdkit.config.load import ConfigError
    from kdkit.config.schema import EvalConfig

    run = lora_run(candidate)
    section = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("eval") if run else None
    if not section:
        return None
    try:
        e = EvalConfig.model_validate(section)
    except ValidationError as err:
        raise ConfigError(f"{run / 'config.yaml'}: eval: {err.errors()[0]['msg']}") from None
    return ServerSpec(e.server, e.served_model)


def _merge_keep(reg: Registry, adapter: Pack, run: Path | None, base: Pack, files: list[Path],
                how: tuple[Any, ...]) -> tuple[Pack, list[str]]:
    """The pack a KEEP of an adapter promotes: its run merged (``kdkit merge``), registered and evaluated on every
    task file (``how``: :func:`evaluate_pack`'s arguments after the task file); and the tasks whose verdict or
    extracted code differs from the adapter's, which the gate judged."""
    import os
    import shutil

    from kdkit.models.load import merge

    if run is None:
        raise RegistryError(f"pack {adapter.name!r} is a LoRA adapter without its run: gate the run directory")
    tmp = reg.workspace / f".tmp-merge-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # ours: a merge that was cut short
    try:
        merge(run, tmp)
        merged = reg.register(tmp, name=f"{adapter.name}-merged", parent_id=base.id, source_run=str(run),
                              config=(run / "config.yaml").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    settings, limits = how[0], how[1]
    differ = []
    for f in files:
        ev_m = evaluate_pack(reg, merged, f, *how)
        ev_a = reg.find_evaluation(adapter.id, tasks_fingerprint(f), evaluation_key(settings, limits.timeout_s))
        code_m, code_a = ev_m["metrics"].get("completions", {}), ev_a["metrics"].get("completions", {})
        differ += [t for t in ev_a["outcomes"] if ev_m["outcomes"].get(t) != ev_a["outcomes"][t]
                   or code_m.get(t) != code_a.get(t)]
    return merged, differ


def load_train_config_text(text: str) -> tuple[str, int] | None:
    """The training rows and their max_length of a run's saved config (its text), or None when unreadable."""
    import yaml

    try:
        data = yaml.safe_load(text)["data"]
        return str(data["train"]), int(data.get("max_length", 1024))
    except (yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def _resolve(reg: Registry, ref: str, **register_kw: Any) -> Pack:
    """A registered pack by name/id, or a model directory (registered on the fly)."""
    if Path(ref).is_dir():
        return reg.register(ref, **register_kw)
    return reg.pack(ref)
