"""``kdkit gate``, ``ladder``, ``registry``, ``export``, ``report`` and ``demo``: what ships, and the evidence for
it."""

from __future__ import annotations

from pathlib import Path as _P

import typer
from rich.table import Table

from kdkit.cli.group import (
    PROMPT_STYLE_HELP,
    UNSAFE_HELP,
    WORKSPACE_HELP,
    _prompting,
    _registry,
    app,
    console,
    draft_app,
    fail,
    print_rows,
    registry_app,
)


def _print_packs(reg) -> None:
    """A narrow table (fits 80 columns), then each pack's paths in full on its own line (never cut)."""
    prod = reg.production()
    console.print(f"packs in {reg.db_path}")
    t = Table()
    for c in ("id", "name", "status", "prod", "weights sha256", "parent"):
        t.add_column(c, overflow="fold")
    packs = reg.packs()
    for p in packs:
        t.add_row(str(p.id), p.name, p.status, "★" if prod and prod.id == p.id else "", p.weights_sha256[:12],
                  str(p.parent_id or ""))
    console.print(t)
    for p in packs:
        console.print(f"{p.id}: {p.path}" + (f" (from run {p.source_run})" if p.source_run else ""), highlight=False)


@registry_app.command("list")
def registry_list(workspace: str = typer.Option(None, help=WORKSPACE_HELP)) -> None:
    """List packs, their status (active/archived) and which one is production, then where each pack is stored."""
    _print_packs(_registry(workspace))


@registry_app.command("show")
def registry_show(
    pack: str = typer.Argument(None, help="Pack name or id (default: production)."),
    workspace: str = typer.Option(None, help=WORKSPACE_HELP),
) -> None:
    """Show one pack: its evaluations, the gate decisions about it, and the production history."""
    import json as _json

    from kdkit.decide.gate import format_tasks

    reg = _registry(workspace)
    p = reg.pack(pack) if pack else reg.production()
    if p is None:
        fail("no production pack yet")
    console.print(f"[bold]{p.name}[/] (id {p.id}, {p.status}) {p.path}\nweights sha256 {p.weights_sha256}")
    t = Table(title="evaluations")
    for c in ("id", "tasks", "passed", "95% interval"):
        t.add_column(c, overflow="fold")
    for e in reg.evaluations(p.id):
        t.add_row(str(e["id"]), e["tasks_path"], f"{e['n_passed']}/{e['n_tasks']}",
                  f"{100 * e['ci_low']:.1f}–{100 * e['ci_high']:.1f}%")
    console.print(t)
    g = Table(title="gate decisions")
    for c in ("id", "candidate", "baseline", "decision", "regressed", "fixed", "p", "reason"):
        g.add_column(c, overflow="fold")
    for row in reg.gates():
        if p.id in (row["candidate_id"], row["baseline_id"]):
            g.add_row(str(row["id"]), reg.pack(row["candidate_id"]).name, reg.pack(row["baseline_id"]).name,
                      row["decision"], format_tasks(_json.loads(row["regressed"])), format_tasks(_json.loads(row["fixed"])),
                      f"{row['p_value']:.3g}", row["reason"])
    console.print(g)
    h = Table(title="production history")
    for c in ("#", "pack", "reason"):
        h.add_column(c, overflow="fold")
    for row in reg.production_history():
        h.add_row(str(row["id"]), reg.pack(row["pack_id"]).name, row["reason"])
    console.print(h)


@registry_app.command("promote")
def registry_promote(
    pack: str = typer.Argument(..., help="A model directory (registered first) or a pack name/id."),
    name: str = typer.Option(None, help="Name for a newly registered pack (default: the directory name)."),
    workspace: str = typer.Option(None, help=WORKSPACE_HELP),
) -> None:
    ("Make a pack production (registering a model directory first). The first production pack is usually the "
     "teacher or the untouched student.")
    from pathlib import Path as _P


    reg = _registry(workspace, create=True)
    p = reg.register(pack, name=name) if _P(pack).is_dir() else reg.pack(pack)
    reg.promote(p.id, reason="manual promote")
    console.print(f"production is now {p.name} (id {p.id})")


@registry_app.command("rollback")
def registry_rollback(workspace: str = typer.Option(None, help=WORKSPACE_HELP)) -> None:
    """Restore the previous production pack (recorded as a new production entry)."""

    reg = _registry(workspace)
    p = reg.rollback()
    console.print(f"production rolled back to {p.name} (id {p.id})")


@registry_app.command("archive")
def registry_archive(
    pack: str = typer.Argument(..., help="Pack name or id."),
    workspace: str = typer.Option(None, help=WORKSPACE_HELP),
) -> None:
    """Mark a pack archived (its files stay in the workspace; production cannot be archived)."""

    reg = _registry(workspace)
    p = reg.archive(pack)
    console.print(f"archived {p.name} (id {p.id})")


RULE_HELP = ("Gate rule as key=value pairs: max_regressions=N (anchor tasks the baseline passes that may fail; "
             "default 0), require_not_worse=true|false (pass count may not fall; default true), require_gain_p=P "
             "(the improvement rule: KEEP only when the pass count rises with an exact McNemar p below P, e.g. 0.05), "
             "drop_alpha=A (the noise rule, instead of the first two: REVERT only when the pass count falls with "
             "an exact McNemar p below A; single tasks may flip both ways; it cannot see a fall at a low pass rate), "
             "max_drop=D (the margin rule, instead of the first two: KEEP only when exact 95% bounds show the pass "
             "rate fell by at most D, a fraction such as 0.03; REVERT when they show it fell by more; else UNDECIDED). "
             "The gate prints each suite's power: the fewest regressions or gains its size lets the test detect.")


SUITE_RULE_HELP = ("Rule of every --tasks file after the first: alpha=0.05 (default: the pass count may not fall "
                   "with an exact paired p below alpha; a drop the test calls noise is allowed) or margin=N (it may "
                   "fall by at most N tasks).")


GATE_EXIT = {"KEEP": 0, "REVERT": 1, "UNDECIDED": 3}


SERVER_HELP = ("A vLLM server's URL that writes every answer (greedy; the same prompts, stop rule, extraction and "
               "sandbox as without it): a LoRA run is judged as its adapter, loaded at run time and never merged "
               "unless kept (the merged pack is promoted only when its answers are the adapter's); a whole model is "
               "the served one or loaded in place (VLLM_SERVER_DEV_MODE=1), else evaluated here. Default: the "
               "config's eval.server (the ladder's config; for `kdkit gate`, a LoRA run's config.yaml).")


@app.command("gate")
def gate_cmd(
    candidate: str = typer.Argument(..., help=("Candidate: a model directory (e.g. from `kdkit merge`), a pack name, "
                                               "or with --server a LoRA run directory.")),
    tasks: list[str] = typer.Option(..., help=("Task file (HumanEval or MBPP format), or a ready-made suite: humaneval "
                                               "(164 tasks), mbpp-test (500; $KDKIT_MBPP). Repeat for several suites "
                                               "in one decision: the first is the anchors (--rule), the others are "
                                               "judged by --suite-rule.")),
    against: str = typer.Option("production", help=("Baseline: 'production', a pack name/id, or a model directory "
                                                    "(registered; a first gate against one starts the workspace).")),
    rule: str = typer.Option(None, help=RULE_HELP),
    suite_rule: str = typer.Option(None, help=SUITE_RULE_HELP),
    max_new_tokens: int = typer.Option(256, help="Generation budget per task (greedy decoding)."),
    batch_size: int = typer.Option(8, min=1, help=("Prompts per generation batch (part of the evaluation's key: a "
                                                   "stored evaluation is reused only at the same batch size).")),
    prompt_style: str = typer.Option("raw", help=PROMPT_STYLE_HELP),
    instruction: str = typer.Option(None, help="The instruction of --prompt-style chat."),
    system: str = typer.Option(None, help="A system message for --prompt-style chat."),
    timeout: float = typer.Option(10.0, help="Wall-clock seconds per program in the sandbox."),
    workspace: str = typer.Option(None, help=WORKSPACE_HELP),
    json_out: str = typer.Option(None, "--json", help="Also write the decision as JSON here."),
    unsafe_no_isolation: bool = typer.Option(False, "--unsafe-no-isolation", help=UNSAFE_HELP),
    progress: bool = typer.Option(True, help="Show progress bars while the packs are evaluated."),
    reuse_eval: list[str] = typer.Option([], "--reuse-eval", help=("A `kdkit eval --out` directory to reuse instead "
                                                                   "of evaluating again, where its model files, "
                                                                   "task file and every generation setting (and "
                                                                   "--timeout) match the gate's; repeatable. The "
                                                                   "log says which it reused and why not the others.")),
    promote_undecided: bool = typer.Option(False, "--promote-undecided", help=("Promote a candidate the gate cannot "
                                                                               "decide (a suite on which the exact test "
                                                                               "cannot show a drop) as if it were kept; "
                                                                               "the registry records that this was "
                                                                               "asked for.")),
    server: str = typer.Option(None, help=SERVER_HELP),
    served_model: str = typer.Option(None, help="With --server: the served base model's name, when it serves several."),
    drift: bool = typer.Option(False, help=("Also measure the candidate's KL from the baseline, both ways, on the "
                                            "anchors with the baseline's answers (and, for a run, on its training "
                                            "rows): one forward of each model, no generation.")),
) -> None:
    ("Evaluate candidate and baseline on every task file (reusing stored evaluations), compare task by task, run "
     "the exact paired test per suite, decide once for all suites and record it: KEEP (promote), REVERT (archive), "
     "or UNDECIDED when a suite cannot show a drop (the baseline passes fewer tasks than the exact test needs to "
     "see one): nothing promoted or archived. Exit code 0 on KEEP, 1 on REVERT, 3 on UNDECIDED.")
    from kdkit.decide.gate import GateRule, SuiteRule, format_tasks, gate, power_line, run_server
    from kdkit.evaluate.passrate import GenerationSettings
    from kdkit.evaluate.sandbox import Limits
    from kdkit.evaluate.tasks import resolve_tasks
    from kdkit.util.io import atomic_write_json

    if suite_rule is not None and len(tasks) < 2:
        fail("--suite-rule only takes effect with a second --tasks file")
    spec = _server(server, served_model) or run_server(candidate)
    if server is None and spec is not None:
        console.print(f"answers from {spec.url} ({candidate}/config.yaml: eval.server)")
    reg = _registry(workspace, create=_P(against).is_dir())  # a baseline directory needs no production yet
    tasks = [str(resolve_tasks(t)) for t in tasks]
    res = gate(reg, candidate, tasks, against=against, rule=GateRule.parse(rule),
               suite_rule=SuiteRule.parse(suite_rule),
               settings=GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size,
                                           **_prompting(prompt_style, instruction, system)),
               limits=Limits(timeout_s=timeout), unsafe_no_isolation=unsafe_no_isolation, log=console.print,
               progress=progress, eval_dirs=[_P(d) for d in reuse_eval], promote_undecided=promote_undecided,
               server=spec, drift=drift)
    for s in res.suites:
        t = Table(title=f"{_P(s['tasks']).name} ({'anchors' if s is res.suites[0] else 'suite'}): {s['decision']}")
        for c in ("model", "pass", "95% interval"):
            t.add_column(c, overflow="fold")
        for name, k, (lo, hi) in ((res.baseline, s["baseline_passed"], s["baseline_interval"]),
                                  (res.candidate, s["candidate_passed"], s["candidate_interval"])):
            t.add_row(name, f"{k}/{s['n_tasks']}", f"{100 * lo:.1f}–{100 * hi:.1f}%")
        console.print(t)
        console.print(f"regressed: {format_tasks(s['regressed'])}\nfixed: {format_tasks(s['fixed'])}\n"
                      f"exact McNemar p = {s['p_value']:.3g}\n{power_line(s['power'])}")
    for where, d in (res.drift or {}).items():
        console.print(f"drift from {res.baseline} on {where}: " + ("not measured" if d is None else
                      f"KL(base‖cand) mean {d['kl_base_cand_mean']:.4g} p95 {d['kl_base_cand_p95']:.4g}, KL(cand‖base) "
                      f"mean {d['kl_cand_base_mean']:.4g} p95 {d['kl_cand_base_p95']:.4g} ({d['tokens']} tokens)"))
    console.print(f"[bold]{res.decision}[/]: {res.reason}")
    if json_out:
        atomic_write_json(json_out, res.to_json())
    raise typer.Exit(GATE_EXIT[res.decision])


@app.command("ladder")
def ladder_cmd(
    config: str = typer.Argument(..., help="Training config YAML (the rungs override it)."),
    vary: list[str] = typer.Option(..., help="key.sub=v1,v2,v3 — one rung per value (repeat for a grid)."),
    seeds: int = typer.Option(1, help=("Run every rung with seeds 0..N-1 and add a table that aggregates each rung "
                                       "over its seeds (mean losses, pooled anchor pass with its Wilson interval, "
                                       "KEEP count). A seed s sets optim.seed = s and shifts data.shuffle_seed (and "
                                       "objective.on_policy.seed) by s, so the data order varies too; seeds that "
                                       "train identical weights are named. The same as --vary optim.seed=0,1,...")),
    tasks: list[str] = typer.Option(..., help=("Task file for the gate, or a ready-made suite (humaneval, mbpp-test); "
                                               "repeat for several suites (the first is the anchors, judged by --rule; "
                                               "the others by the gate's suite rule).")),
    set_: list[str] = typer.Option([], "--set", help=("Override a config field for every rung: --set optim.lr=1e-4 "
                                                      "(repeatable; a rung's --vary value wins).")),
    out: str = typer.Option(None, help="Ladder directory (default: ladders/<config name>)."),
    rule: str = typer.Option(None, help=RULE_HELP),
    max_new_tokens: int = typer.Option(256, help="Generation budget per anchor task."),
    prompt_style: str = typer.Option("raw", help=PROMPT_STYLE_HELP),
    instruction: str = typer.Option(None, help="The instruction of --prompt-style chat."),
    system: str = typer.Option(None, help="A system message for --prompt-style chat."),
    timeout: float = typer.Option(10.0, help="Wall-clock seconds per program in the sandbox."),
    workspace: str = typer.Option(None, help=WORKSPACE_HELP),
    unsafe_no_isolation: bool = typer.Option(False, "--unsafe-no-isolation", help=UNSAFE_HELP),
    progress: bool = typer.Option(True, help="Show progress bars for each rung's training and evaluation."),
    server: str = typer.Option(None, help=SERVER_HELP),
    served_model: str = typer.Option(None, help="With --server: the served base model's name, when it serves several."),
    drift: bool = typer.Option(True, help=("Measure each rung's KL from the baseline, both ways, on its training rows "
                                           "and on the anchors with the baseline's answers (one forward of each "
                                           "model; the tables' drift columns, the report's drift plot).")),
    served_lora: str = typer.Option("adapter", help=("With a server, how a LoRA rung is answered: 'adapter' "
                                                     "(loaded at run time, merged only if kept) or 'merged' (merged "
                                                     "first, its weights loaded in place: VLLM_SERVER_DEV_MODE=1; "
                                                     "faster on vLLM's CPU build, docs/benchmarks.md).")),
    draft: bool = typer.Option(False, help=("Also measure each rung as a draft for its run's teacher (a local "
                                            "teacher model, or the one its cache was made from): expected "
                                            "acceptance on 16 training prompts, a table column (`kdkit draft "
                                            "measure`).")),
) -> None:
    ("For each rung: train → merge (with --server, a LoRA run only when kept) → gate against the production at the "
     "ladder's start → KEEP/REVERT/UNDECIDED (as "
     "`kdkit gate`: an UNDECIDED rung promotes and archives nothing). A failed rung does not stop the ladder; a "
     "rerun skips finished rungs. Writes ladder.md, ladder.csv and ladder.png (anchor pass and losses against the "
     "varied value).")
    from pathlib import Path as _P

    from kdkit.decide.gate import GateRule
    from kdkit.decide.ladder import parse_vary, run_ladder
    from kdkit.decide.tables import seed_rows, table_rows
    from kdkit.evaluate.passrate import GenerationSettings
    from kdkit.evaluate.sandbox import Limits
    from kdkit.evaluate.tasks import resolve_tasks

    if seeds < 1:
        fail("--seeds must be >= 1")
    spec = _server(server, served_model)
    if seeds > 1:
        if any(v.split("=", 1)[0].strip() == "optim.seed" for v in vary):
            fail("--seeds and --vary optim.seed=... both set the seed axis; give one")
        vary = [*vary, "optim.seed=" + ",".join(str(i) for i in range(seeds))]
    reg = _registry(workspace)
    out_dir = out or str(_P("ladders") / _P(config).stem)
    tasks = [str(resolve_tasks(t)) for t in tasks]
    results = run_ladder(config, vary, tasks if len(tasks) > 1 else tasks[0], out_dir, registry=reg,
                         rule=GateRule.parse(rule),
                         settings=GenerationSettings(max_new_tokens=max_new_tokens,
                                                     **_prompting(prompt_style, instruction, system)),
                         limits=Limits(timeout_s=timeout), unsafe_no_isolation=unsafe_no_isolation,
                         progress=progress, log=console.print, overrides=set_, server=spec, drift=drift,
                         served_lora=served_lora, draft=draft)
    header, rows = table_rows(parse_vary(vary), results)
    tables = [(f"ladder {out_dir}", header, rows)]
    by_seed = seed_rows(parse_vary(vary), results)
    if by_seed is not None:
        tables.append((f"ladder {out_dir}, over seeds", *by_seed))
    for title, header, rows in tables:
        print_rows(title, header, rows)
    console.print(f"wrote {out_dir}/ladder.md, ladder.csv, ladder.png")


@app.command("export")
def export_cmd(
    pack: str = typer.Argument(None, help="The pack to export: a name or id (see `kdkit registry list`)."),
    out: str = typer.Option(None, help="The directory to write (new, or an earlier export; never another)."),
    verify: str = typer.Option(None, help="Instead: check a directory `kdkit export` wrote against the registry "
                                          "(files, provenance, model card); exit 1 and list what differs."),
    ungated: bool = typer.Option(False, "--ungated", help="Export a pack no gate kept (never gated, REVERT or "
                                                          "UNDECIDED); its model card says so first."),
    workspace: str = typer.Option(None, help=WORKSPACE_HELP),
) -> None:
    ("Write a pack as a Hugging Face model directory that transformers and vLLM load as it is: its files, each "
     "safetensors file with kdkit's provenance in its __metadata__ (pack, base, config hash, teacher cache key, "
     "gate), a model card (README.md: the gate's decision and rule, each suite's pass@1 with its interval and "
     "the exact test, regressions and fixes, how it was trained, its drift from the base) written from the "
     "registry's records only, and kdkit_export.json (every file's sha256).")
    from kdkit.decide.export import export_pack, verify_export

    reg = _registry(workspace)
    if verify is not None:
        if pack is not None or out is not None or ungated:
            fail("--verify checks a directory; give it alone (no PACK, --out or --ungated)")
        problems = verify_export(reg, verify)
        for p in problems:
            console.print(f"[red]✗[/] {p}", highlight=False)
        if problems:
            raise typer.Exit(1)
        console.print(f"{verify}: as exported, and as the registry {reg.db_path} records it")
        return
    if pack is None or out is None:
        fail("give PACK and --out (or --verify DIR)")
    d = export_pack(reg, pack, out, ungated=ungated)
    console.print(f"exported {pack} to {d} (model card: {d / 'README.md'})", highlight=False)


@draft_app.command("measure")
def draft_measure(
    target: str = typer.Option(..., help="The target model directory (the teacher the draft speeds up)."),
    draft: str = typer.Option(..., help="The draft model directory (a student with the target's tokenizer)."),
    data: str = typer.Option(..., help="Prompt rows (JSONL: prompt, or messages rendered by the chat template)."),
    rows: int = typer.Option(32, min=1, help="The first N prompt rows."),
    max_new_tokens: int = typer.Option(64, min=1, help="Length of the target's greedy continuation per prompt."),
    gamma: int = typer.Option(4, min=1, help="γ: drafted tokens per step."),
    cost_ratio: float = typer.Option(None, help="c: a draft forward's cost over the target's (default: the ratio "
                                                "of their parameter counts, a rough proxy)."),
    assisted: bool = typer.Option(True, help="Also run transformers' assisted generation and time it."),
    json_out: str = typer.Option(None, "--json", help="Also write the figures as JSON here."),
) -> None:
    ("Acceptance of the draft along the target's own greedy continuation of each prompt: expected for speculative "
     "sampling (1 − TVD, temperature 1) and for greedy drafting (top-1 agreement), mean with a 95% interval over "
     "rows; the expected tokens per target forward (1 − α^(γ+1))/(1 − α) and the speed-up it implies for cost "
     "ratio c (Leviathan et al. 2023); then, measured, transformers' greedy assisted generation on the same "
     "prompts: tokens per target forward and tokens per second with and without the draft.")
    from kdkit.decide.draft import expected, measured
    from kdkit.models.load import load_causal_lm, load_tokenizer
    from kdkit.teacher.seqkd import prompt_tokens, read_prompts
    from kdkit.util.io import atomic_write_json

    tok = load_tokenizer(target)
    t_model, d_model = load_causal_lm(target).eval(), load_causal_lm(draft).eval()
    prompts = [prompt_tokens(tok, obj, data, line) for line, obj in read_prompts(data)[:rows]]
    c = cost_ratio if cost_ratio is not None else (sum(p.numel() for p in d_model.parameters()) /
                                                   sum(p.numel() for p in t_model.parameters()))
    fig = expected(t_model, d_model, tok, prompts, max_new_tokens, gamma, c)
    if assisted:
        fig.measured = measured(t_model, d_model, tok, prompts, max_new_tokens, gamma)

    def cell(m: float, hw: float | None) -> str:
        return f"{m:.3f}" + ("" if hw is None else f" ± {hw:.3f}")

    console.print(f"{fig.rows} prompts, {fig.positions} positions of the target's greedy continuation; γ = {gamma}, "
                  f"c = {c:.3g}")
    console.print(f"acceptance, speculative sampling (1 − TVD): {cell(fig.alpha_sample, fig.alpha_sample_halfwidth)}")
    console.print(f"acceptance, greedy drafting (top-1 agreement): {cell(fig.alpha_greedy, fig.alpha_greedy_halfwidth)}")
    console.print(f"expected, greedy: {fig.expected_tokens_per_step:.2f} tokens per target forward, speed-up "
                  f"{fig.expected_speedup:.2f}×")
    if fig.measured:
        m = fig.measured
        console.print(f"measured, assisted generation: {m['tokens_per_forward']:.2f} tokens per target forward; "
                      f"{m['tokens_per_s_assisted']:.1f} tokens/s against {m['tokens_per_s_plain']:.1f} without the "
                      f"draft (wall time × {m['wall_time_ratio']:.2f}); same output as plain greedy: "
                      f"{'yes' if m['same_output'] else 'NO'}")
    if json_out:
        atomic_write_json(json_out, fig.to_json())


@app.command("report")
def report_cmd(
    path: str = typer.Argument(..., help="A run, demo or ladder directory."),
    out: str = typer.Option(None, help="HTML file to write (default: PATH/report.html)."),
) -> None:
    ("Write a self-contained HTML report (plots embedded as PNG): loss curves per step and epoch, per-task pass "
     "grids, the ladder table and plot, and the resolved configs.")
    from kdkit.decide.report import write_report

    target = write_report(path, out)
    console.print(f"wrote {target}")


@app.command("demo")
def demo_cmd(
    out: str = typer.Option("demo-out", help="Directory for the world, cache, runs, packs, registry and report."),
    seed: int = typer.Option(0, help="Seed of the student initialisation and the data order (the world is the teacher's)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    ("Distil the bundled tiny teacher into a smaller student, train the same student without the teacher (same "
     "init, data, steps, seed), evaluate all three on anchors and holdout in the sandbox, gate the distilled "
     "student against the baseline, and print the table. Minutes on a laptop CPU, no download.")
    from kdkit.demo.run import DemoSettings, run_demo

    res = run_demo(out, DemoSettings(seed=seed), progress=progress, log=console.print)
    t = Table(title=f"kdkit demo (seed {seed})")
    for c in ("model", "parameters", "anchor pass [95%]", "holdout pass", "val loss", "KL to teacher",
              "precompute s", "train s"):
        t.add_column(c, overflow="fold")
    for m in res["models"]:
        lo, hi = m["anchor_interval"]
        kl = "—" if m["kl_to_teacher"] is None else f"{m['kl_to_teacher']:.4f}"
        t.add_row(m["model"], f"{m['parameters']:,}", f"{m['anchor_passed']}/{m['anchor_total']} [{100 * lo:.0f}–"
                  f"{100 * hi:.0f}%]", f"{m['holdout_passed']}/{m['holdout_total']}", f"{m['val_loss']:.4f}", kl,
                  f"{m.get('precompute_s', 0.0):.1f}", f"{m['wall_s']:.1f}")
    console.print(t)
    g = res["gate"]
    console.print(f"gate (distilled vs production = baseline, on the anchors only): [bold]{g['decision']}[/] — "
                  f"{g['reason']}")
    verdict = ("distillation beats the CE-only baseline on holdout" if res["distillation_wins_holdout"] else
               "distillation does NOT beat the CE-only baseline on holdout this time")
    console.print(f"{verdict} (Δ = {res['holdout_delta']:+d} tasks). Report: {res['report']}. "
                  f"Total {res['total_seconds']:.0f} s.")


def _server(url: str | None, served_model: str | None) -> object:
    """--server and --served-model as one server spec (None without --server)."""
    from kdkit.evaluate.served import ServerSpec

    if url is None:
        if served_model is not None:
            fail("--served-model names a model of --server; without --server it does nothing")
        return None
    return ServerSpec(url, served_model)
