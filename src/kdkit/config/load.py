"""Reading a training config: YAML (a key given twice refused), ``--set`` overrides, validation with errors
that name file, line and field, relative paths resolved against the file, and the resolved dump a run saves."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from kdkit.config.reference import suggestion
from kdkit.config.schema import RESOLVED, RESOLVED_MARK, TrainConfig, inapplicable
from kdkit.util.errors import KdkitError


class ConfigError(KdkitError, ValueError):
    """A configuration error; the message names the file, line and dotted field."""

    same_on_every_rank = True


def _yaml_line(text: str, dotted: str) -> int | None:
    """1-based line of a dotted key in YAML text, when it is there."""
    import yaml

    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in dotted.split("."):
        if not isinstance(node, yaml.MappingNode):
            break
        for k, v in node.value:
            if k.value == part:
                line, node = k.start_mark.line + 1, v
                break
        else:
            break
    return line


def split_assignment(spec: str, flag: str, example: str) -> tuple[str, str]:
    """``key.sub=text`` → (``key.sub``, ``text``): the one parser of the command line's assignments
    (``--set``, ``--vary``)."""
    key, sep, text = spec.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{flag} {spec!r}: expected {example}")
    return key.strip(), text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``key.sub=value`` (value parsed as YAML) onto a nested dict."""
    import copy

    import yaml

    out = copy.deepcopy(raw)
    for ov in overrides:
        key, val = split_assignment(ov, "--set", "key.sub=value")
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {} if node.get(p) is None else node[p]
                if not isinstance(node[p], dict):
                    raise ConfigError(f"--set {key}: '{p}' is not a section")
            node = node[p]
        node[parts[-1]] = yaml.safe_load(val)
    return out


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read YAML, apply ``--set`` overrides, validate; errors name file, line and field.

    Relative paths inside the file are resolved against the file's directory.
    """
    from pydantic import ValidationError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8") from None
    raw = load_yaml_mapping(path, text)
    raw = apply_overrides(raw, overrides or [])
    token = RESOLVED.set(text.startswith(RESOLVED_MARK))
    try:
        cfg = TrainConfig.model_validate(raw)
    except ValidationError as e:
        set_keys = [split_assignment(ov, "--set", "key.sub=value")[0] for ov in overrides or []]
        raise ConfigError("\n".join(_field_error(err, path, text, set_keys) for err in e.errors())) from None
    finally:
        RESOLVED.reset(token)
    cfg = resolve_paths(cfg, path.parent)
    cfg._origin = (path, text, [split_assignment(ov, "--set", "key.sub=value")[0] for ov in overrides or []])
    return cfg


def located(cfg: TrainConfig, message: str) -> str:
    """``message``, when it begins with a field (``teacher.cache: ...``), prefixed with where that field was
    written: the config file and line (``run.yaml:7: teacher.cache: ...``) or the ``--set`` that gave it."""
    m = re.match(r"([A-Za-z_]\w*(?:\.\w+)*): ", message)
    if cfg._origin is None or m is None:
        return message
    path, text, set_keys = cfg._origin
    dotted = m.group(1)
    given = [k for k in set_keys if k == dotted or dotted.startswith(k + ".")]
    if given:
        return f"--set {given[-1]}: {message}"
    line = _yaml_line(text, dotted)
    return f"{path}:{line}: {message}" if line else message


def _field_error(err: Any, path: Path, text: str, set_keys: list[str]) -> str:
    """One validation error, where it came from (``--set key`` or file:line) and, for an unknown key, the
    nearest valid ones. A rule over several fields (an option without effect) names the field it refuses
    first in its message: that field, as the user wrote it, says where."""
    loc = [str(p) for p in err["loc"]]
    dotted = ".".join(loc)
    msg = err["msg"]
    rule = re.match(r"Value error, ([A-Za-z_][\w.]*): (.*)", msg, re.S) if not dotted else None
    if rule:
        dotted, msg = rule.group(1), rule.group(2)
    if err["type"] == "extra_forbidden":
        msg = suggestion(loc[:-1], loc[-1]) or msg
    given = [k for k in set_keys if dotted and (k == dotted or k.startswith(dotted + ".") or dotted.startswith(k + "."))]
    line = None if given else _yaml_line(text, dotted)
    where = f"--set {given[-1]}" if given else f"{path}:{line}" if line else str(path)
    if rule:
        return f"{where}: {msg}" if given and given[-1] == dotted else f"{where}: {dotted}: {msg}"
    return f"{where}: field '{dotted or '<root>'}': {msg}"


def load_yaml_mapping(path: Path, text: str) -> dict[str, Any]:
    """YAML text whose top level is a mapping; a key given twice in one mapping is refused, naming both
    lines (PyYAML would keep the last one silently)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for k, _ in node.value:
            key = loader.construct_object(k)
            if key in seen:
                raise ConfigError(f"{path}:{k.start_mark.line + 1}: key {key!r} is given twice in one section (lines "
                                  f"{seen[key]} and {k.start_mark.line + 1}); keep one")
            seen[key] = k.start_mark.line + 1
        return loader.construct_mapping(node)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        raw = yaml.load(text, Loader=Loader) or {}  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return raw


def resolve_paths(cfg: TrainConfig, base: Path) -> TrainConfig:
    def r(p: str | None) -> str | None:
        if p is None:
            return None
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (base / q).resolve())

    cfg = cfg.model_copy(deep=True)
    cfg.student.path = r(cfg.student.path)
    cfg.data.train = r(cfg.data.train)
    cfg.data.validation = r(cfg.data.validation)
    for t in (cfg.teacher, *cfg.teachers.values()):
        if t is not None:
            t.cache, t.model = r(t.cache), r(t.model)
    if cfg.reference is not None and cfg.reference.path:
        cfg.reference.path = r(cfg.reference.path)
    if cfg.probes is not None:
        cfg.probes.prompts = r(cfg.probes.prompts)
    if cfg.routing is not None:
        cfg.routing.pairs = r(cfg.routing.pairs)
    return cfg


def dump_config(cfg: TrainConfig) -> str:
    """The resolved config as YAML: every field that applies, with its value (defaults included), marked so
    that it loads as resolved; the fields this configuration does not read are left out (they load back at
    their defaults)."""
    import yaml

    data = cfg.model_dump(mode="json")
    for dotted in inapplicable(cfg):
        *path, last = dotted.split(".")
        node = data
        for part in path:
            node = node[part]
        node.pop(last, None)
    return (RESOLVED_MARK + "\n# (fields that do not apply to this configuration are left out)\n"
            + yaml.safe_dump(data, sort_keys=False))
