"""The training config's reference, generated from its pydantic models (the one source): every field with
its type, default and description, as a commented YAML (``kdkit config defaults``), a JSON Schema
(``kdkit config schema``), a Markdown table (``kdkit config reference``, README's), and the valid keys an
unknown one is compared with."""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from kdkit.config.schema import RESOLVED_MARK, TrainConfig

REQUIRED = "<required>"
# names other trainers use for a kdkit field (TRL / transformers TrainingArguments, axolotl)
OTHER_NAMES = {"learning_rate": "lr", "batch_size": "micro_batch", "per_device_train_batch_size": "micro_batch",
               "gradient_accumulation_steps": "grad_accum", "num_train_epochs": "epochs", "max_seq_length": "max_length",
               "max_grad_norm": "grad_clip", "lr_scheduler_type": "schedule", "warmup": "warmup_steps",
               "logging_steps": "every", "save_steps": "every", "save_total_limit": "keep", "eval": "validation",
               "eval_dataset": "validation", "train_dataset": "train", "lora_r": "r", "lora_alpha": "alpha", "rank": "r",
               "lora_dropout": "dropout", "targets": "target_modules", "temp": "temperature"}


@dataclass(frozen=True)
class FieldDoc:
    key: str  # dotted; a dict's entries as <name>
    type: str
    default: Any  # REQUIRED when there is none
    description: str
    section: bool  # a sub-model (its fields follow)
    optional_section: bool  # a section that is absent unless written (None by default)


def _submodel(annotation: Any) -> tuple[type[BaseModel] | None, bool, bool]:
    """(the model a field holds, whether it may be None, whether it is a dict of them)."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False, False
    if origin is dict and len(args) == 2 and isinstance(args[1], type) and issubclass(args[1], BaseModel):
        return args[1], False, True
    if origin in (typing.Union, types.UnionType):
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if models:
            return models[0], type(None) in args, False
    return None, False, False


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("NoneType", "None")
    for prefix in ("<class '", "'>"):
        text = text.replace(prefix, "")
    return text.replace("kdkit.config.schema.", "")


def fields(model: type[BaseModel], prefix: str = "") -> list[FieldDoc]:
    """Every field of ``model``, depth first, in declaration order."""
    out = []
    for name, f in model.model_fields.items():
        sub, optional, many = _submodel(f.annotation)
        default = (REQUIRED if f.is_required() else
                   f.default_factory() if f.default is PydanticUndefined and f.default_factory else f.default)
        if isinstance(default, BaseModel):
            default = None
        key = f"{prefix}{name}"
        desc = " ".join((f.description or ((sub.__doc__ or "").split("\n\n")[0] if sub else "")).split())
        out.append(FieldDoc(key, _type_name(f.annotation), default, desc, sub is not None, optional))
        if sub is not None:
            out += fields(sub, f"{key}.<name>." if many else f"{key}.")
    return out


def schema() -> dict[str, Any]:
    return TrainConfig.model_json_schema()


def _yaml_value(v: Any) -> str:
    """One value as YAML reads it back (a float keeps its dot: 3.0e-05, not 3e-05, which YAML reads as text)."""
    import yaml

    text = yaml.safe_dump(list(v) if isinstance(v, tuple) else v, default_flow_style=True, width=10**6).strip()
    return text[:-3].strip() if text.endswith("\n...") or text.endswith("...") else text


def defaults_yaml() -> str:
    """A complete, commented YAML of every field at its default. Sections that are absent unless written
    (teacher, reference, probes, ...) and dict entries are commented out; required fields say so."""
    # the resolved-config mark: a field written at its default does not count as set (kdkit.config.schema._set)
    lines = [RESOLVED_MARK, "# kdkit config defaults: every training-config field with its default.",
             f"# Fields marked {REQUIRED} must be given; commented sections are off until written."]
    off: list[str] = []  # key prefixes of commented-out sections
    for d in fields(TrainConfig):
        depth = d.key.count(".")
        hidden = any(d.key.startswith(p) for p in off)
        if d.section and (d.optional_section or "<name>" in d.key or d.default == {}):
            off.append(d.key + ".")
        comment = "# " if hidden or (d.section and d.key + "." in off) else ""
        name = d.key.rsplit(".", 1)[-1]
        if d.section:
            value = ""
        elif d.default == REQUIRED:
            value = f" {REQUIRED}"
        else:
            value = " " + _yaml_value(d.default)
        note = f"  # {d.description}" if d.description else ""
        if depth == 0 and (d.section or lines[-1].startswith(("  ", "# "))):
            lines.append("")
        if d.section and d.key.endswith("<name>") is False and d.type.startswith("dict["):
            lines.append(f"{'  ' * depth}{comment}{name}: {{}}{note}")
            lines.append(f"{'  ' * (depth + 1)}# <name>:")
            continue
        lines.append(f"{'  ' * depth}{comment}{name}:{value}{note}")
    return "\n".join(lines) + "\n"


def reference_table() -> str:
    """The Markdown table README shows: field, type, default, what it does."""
    rows = ["| field | type | default | what it does |", "|---|---|---|---|"]
    for d in fields(TrainConfig):
        if d.section:
            continue
        default = "required" if d.default == REQUIRED else f"`{_yaml_value(d.default)}`"
        desc = d.description.replace("|", "\\|")
        rows.append(f"| `{d.key}` | `{d.type.replace('|', 'or')}` | {default} | {desc} |")
    return "\n".join(rows) + "\n"


def valid_keys(loc: list[str]) -> list[str]:
    """The field names valid at ``loc`` (the dotted location of a key's section), [] when unknown."""
    model: type[BaseModel] | None = TrainConfig
    parts = list(loc)
    while parts and model is not None:
        part = parts.pop(0)
        if part not in model.model_fields:
            return []
        model, _, many = _submodel(model.model_fields[part].annotation)
        if many:
            if not parts:
                return []  # a dict's entry: any name
            parts.pop(0)
    return list(model.model_fields) if model is not None else []


def suggestion(loc: list[str], key: str) -> str:
    """", did you mean ...?" and the section's valid keys, for an unknown ``key`` at ``loc``."""
    valid = valid_keys(loc)
    if not valid:
        return ""
    near = [OTHER_NAMES[key]] if OTHER_NAMES.get(key) in valid else []
    near += [n for n in valid if len(key) >= 3 and n.startswith(key)]
    near += difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    near = list(dict.fromkeys(near))[:3]
    hint = f" (did you mean {' or '.join(repr('.'.join([*loc, n])) for n in near)}?)" if near else ""
    where = f"the fields of {'.'.join(loc)}" if loc else "the top-level fields"
    return f"unknown field{hint}; {where}: {', '.join(valid)} (every field: kdkit config defaults)"
