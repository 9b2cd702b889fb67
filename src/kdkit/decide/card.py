"""A model card (``README.md``) for an exported pack, written from the registry's records only.

YAML front matter as the Hugging Face Hub reads it (``base_model``, ``library_name``, ``tags``, a
``model-index`` with each gate suite's pass@1, the task file's sha256 as the dataset's revision), then
what a reader needs to trust it: the gate's decision and rule, each suite's pass counts with intervals and
the exact paired test, what regressed and what was fixed, how the pack was trained (teacher, cache key,
objective, steps), its drift from the base, and its provenance. No figure is typed by hand: the same
records give the same card, byte for byte, which ``kdkit export --verify`` checks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from kdkit.decide.registry import Pack, Registry
from kdkit.evaluate.passrate import pass_cell


def model_card(reg: Registry, pack: Pack, gate: dict[str, Any] | None) -> str:
    config = yaml.safe_load(reg.pack_config(pack.id) or "") or {}
    suites = (gate or {}).get("metrics", {}).get("suites") or []
    parts = [_front_matter(pack, config, suites), f"# {pack.name}\n", _warning(gate), _gate(reg, gate, suites),
             _training(pack, config), _origin(gate), _drift(gate), _provenance(reg, pack)]
    return "\n".join(p for p in parts if p)


def _front_matter(pack: Pack, config: dict[str, Any], suites: list[dict[str, Any]]) -> str:
    tags = ["kdkit"] + (["distillation"] if config.get("teacher") else []) + (
        ["lora"] if (config.get("student") or {}).get("lora") else [])
    meta: dict[str, Any] = {"library_name": "transformers", "tags": tags}
    base = (config.get("student") or {}).get("path")
    if base:
        meta["base_model"] = str(base)
    if suites:
        meta["model-index"] = [{"name": pack.name, "results": [{
            "task": {"type": "text-generation", "name": "Code generation"},
            "dataset": {"name": Path(s["tasks"]).name, "type": Path(s["tasks"]).name.split(".")[0],
                        "revision": s["tasks_sha256"]},
            "metrics": [{"type": "pass@1", "name": "pass@1 (greedy, sandboxed)",
                         "value": round(s["candidate_passed"] / s["n_tasks"], 6), "verified": False}]}
            for s in suites]}]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _warning(gate: dict[str, Any] | None) -> str:
    if gate is None:
        return "> **Never gated.** No kdkit gate judged this model; nothing below says it keeps its base's skills.\n"
    if gate["decision"] != "KEEP":
        return (f"> **Not kept.** Its newest gate said {gate['decision']}: {gate['reason']}\n")
    if gate["rule"].get("promote_undecided"):
        return "> **Undecided, promoted as asked.** The gate could not decide; a person promoted it anyway.\n"
    return ""


def _gate(reg: Registry, gate: dict[str, Any] | None, suites: list[dict[str, Any]]) -> str:
    if gate is None:
        return ""
    base = reg.pack(gate["baseline_id"])
    rule = {k: v for k, v in gate["rule"].items() if k != "suites"}
    lines = ["## The gate", "", f"**{gate['decision']}** against `{base.name}` (gate {gate['id']}; rule "
             f"`{json.dumps(rule, sort_keys=True)}`): {gate['reason']}", ""]
    if suites:
        lines += ["| suite | this model | baseline | exact McNemar p | decision | regressed | fixed |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {Path(s['tasks']).name} | {pass_cell(s['candidate_passed'], s['n_tasks'], s['candidate_interval'])}"
                  f" | {pass_cell(s['baseline_passed'], s['n_tasks'], s['baseline_interval'])} | {s['p_value']:.3g} | "
                  f"{s['decision']} | {', '.join(s['regressed']) or '—'} | {', '.join(s['fixed']) or '—'} |"
                  for s in suites]
        lines += ["", "Pass counts with 95% Wilson intervals; greedy answers, each run in a sandbox against the "
                  "task's tests; the task file's sha256 is the dataset revision above."]
    return "\n".join(lines) + "\n"


def _training(pack: Pack, config: dict[str, Any]) -> str:
    if not config:
        return ""
    t, o, opt = config.get("teacher") or {}, config.get("objective") or {}, config.get("optim") or {}
    steps = _pack_steps(pack)
    teacher = t.get("cache") or t.get("model") or t.get("url")
    key = cache_key(config)
    lines = ["## How it was trained", "",
             f"- student: `{(config.get('student') or {}).get('path')}`"
             + (f", LoRA r {config['student']['lora'].get('r')}" if (config.get("student") or {}).get("lora") else ""),
             f"- teacher: `{teacher}`" + (f" (cache key `{key}`)" if key else "") if teacher else "- teacher: none",
             f"- objective: CE × {o.get('ce_coef', 1.0)}, KD × {o.get('kd_weight', 0.0 if not teacher else 1.0)} "
             f"({(o.get('kd') or {}).get('kind', 'kl_fwd')})"
             + (f", barrier `{json.dumps(o['barrier'], sort_keys=True)}`" if o.get("barrier") else ""),
             f"- optimizer: lr {opt.get('lr')}, {steps if steps is not None else '?'} steps",
             f"- rows: `{(config.get('data') or {}).get('train')}`", f"- source run: `{pack.source_run}`"]
    return "\n".join(lines) + "\n"


def _origin(gate: dict[str, Any] | None) -> str:
    o = (gate or {}).get("metrics", {}).get("origin")
    if not o:
        return ""
    values = ", ".join(f"`{k}` = {json.dumps(v)}" for k, v in o["values"].items())
    return f"From the ladder `{o['ladder']}`, rung {o['rung']} ({values}): its row is `rungs/{o['rung']:02d}.json` there.\n"


def cache_key(config: dict[str, Any]) -> str:
    """The content key of the teacher cache a run was distilled from ('' without one, or when it is gone)."""
    from kdkit.teacher.cache.format import MANIFEST_FILE

    cache = (config.get("teacher") or {}).get("cache")
    man = Path(cache) / MANIFEST_FILE if cache else None
    return json.loads(man.read_text())["key"] if man is not None and man.is_file() else ""


def _pack_steps(pack: Pack) -> int | None:
    from kdkit.models.load import PACK_FILE

    f = Path(pack.path) / PACK_FILE
    return json.loads(f.read_text()).get("steps") if f.is_file() else None


def _drift(gate: dict[str, Any] | None) -> str:
    drift = (gate or {}).get("metrics", {}).get("drift") or {}
    rows = [(w, d) for w, d in drift.items() if d]
    if not rows:
        return ""
    lines = ["## Drift from the base", "", "KL per target token, one forward of each model, no generation:", "",
             "| on | KL(base‖this) mean | p95 | KL(this‖base) mean | p95 | tokens |", "|---|---|---|---|---|---|"]
    lines += [f"| {w} | {d['kl_base_cand_mean']:.4g} | {d['kl_base_cand_p95']:.4g} | {d['kl_cand_base_mean']:.4g} | "
              f"{d['kl_cand_base_p95']:.4g} | {d['tokens']} |" for w, d in rows]
    return "\n".join(lines) + "\n"


def _provenance(reg: Registry, pack: Pack) -> str:
    return ("## Provenance\n\n"
            f"kdkit pack `{pack.name}` (id {pack.id}, files sha256 `{pack.weights_sha256}`) of the registry at "
            f"`{reg.workspace.resolve()}`. Each `*.safetensors` file's `__metadata__` carries the pack, its base, its "
            "config's hash, its teacher cache's key and its gate (`kdkit.*`); `kdkit export --verify DIR` checks "
            "this directory against the registry.\n")
