"""``kdkit export``: a pack leaves kdkit as a Hugging Face model directory with its evidence attached.

The directory is the pack's files (config, tokenizer, chat template, generation config) with each
``*.safetensors`` written again with kdkit's provenance in its ``__metadata__`` (strings; nested values
JSON-encoded), a model card (``README.md``) written from the registry's records only — the newest gate
that judged the pack, each suite's evaluations, the training config it was registered with — and
``kdkit_export.json``, the sha256 of every file, which ``verify_export`` checks against the registry.
A pack no gate kept exports only when asked (``ungated``), and its card says so first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from kdkit.decide.card import cache_key, model_card
from kdkit.decide.registry import Pack, Registry, RegistryError
from kdkit.util.identity import sha256_file
from kdkit.util.io import atomic_write_json, check_output_dir

EXPORT_FILE = "kdkit_export.json"


def newest_gate(reg: Registry, pack: Pack) -> dict[str, Any] | None:
    """The newest gate that judged ``pack`` as its candidate (its metrics decoded), or None."""
    gates = [g for g in reg.gates() if g["candidate_id"] == pack.id]
    if not gates:
        return None
    g = dict(gates[-1])
    for k in ("rule", "regressed", "fixed", "metrics"):
        g[k] = json.loads(g[k] or "{}")
    return g


def provenance(reg: Registry, pack: Pack, gate: dict[str, Any] | None) -> dict[str, str]:
    """What each exported safetensors file carries: the pack, its base, its config, its teacher, its gate."""
    from kdkit import __version__

    config = reg.pack_config(pack.id)
    base = reg.pack(pack.parent_id) if pack.parent_id is not None else None
    return {"kdkit.pack": json.dumps({"id": pack.id, "name": pack.name}),
            "kdkit.pack_sha256": pack.weights_sha256,
            "kdkit.base_sha256": base.weights_sha256 if base else "",
            "kdkit.config_sha256": hashlib.sha256(config.encode()).hexdigest() if config else "",
            "kdkit.teacher_cache_key": cache_key(yaml.safe_load(config) or {}) if config else "",
            "kdkit.gate": json.dumps({"id": gate["id"], "decision": gate["decision"]} if gate else None),
            "kdkit.version": __version__}


def export_pack(reg: Registry, ref: str, out: str | Path, *, ungated: bool = False) -> Path:
    """Write ``out`` (a new directory, or an earlier export): see the module docstring."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    pack = reg.check_weights(reg.pack(ref))
    if pack.adapter:
        raise RegistryError(f"pack {pack.name!r} is a LoRA adapter: export its merged pack (the gate promotes that "
                            f"one on a KEEP; or `kdkit merge RUN`)")
    gate = newest_gate(reg, pack)
    if (gate is None or gate["decision"] != "KEEP") and not ungated:
        said = "no gate judged it" if gate is None else f"its newest gate said {gate['decision']}"
        raise RegistryError(f"pack {pack.name!r}: {said}; export it anyway with --ungated (its card says so first)")
    out = Path(out)
    check_output_dir(out, "--out", marker=EXPORT_FILE)
    tmp = out.with_name(f".kdkit-tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = provenance(reg, pack, gate)
    for f in sorted(Path(pack.path).iterdir()):
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as fh:
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
                own = fh.metadata() or {}
            save_file(tensors, str(tmp / f.name), metadata={**own, **meta})
        elif f.is_file() and f.name not in ("README.md", EXPORT_FILE):
            shutil.copyfile(f, tmp / f.name)
    (tmp / "README.md").write_text(model_card(reg, pack, gate))
    atomic_write_json(tmp / EXPORT_FILE, {"pack": pack.id, "pack_sha256": pack.weights_sha256,
                                          "files": _hashes(tmp)})
    if out.is_dir():
        shutil.rmtree(out)  # an earlier export (check_output_dir), or an empty directory
    tmp.rename(out)
    return out


def _hashes(d: Path) -> dict[str, str]:
    return {f.name: sha256_file(f) for f in sorted(d.iterdir()) if f.is_file() and f.name != EXPORT_FILE}


def verify_export(reg: Registry, directory: str | Path) -> list[str]:
    """What differs between an exported directory and the registry (empty: it is what kdkit exported): files
    changed, added or removed since, a pack the registry does not know or whose files changed, provenance or a
    model card that the registry's records no longer give."""
    from safetensors import safe_open

    d = Path(directory)
    if not (d / EXPORT_FILE).is_file():
        return [f"{d}: no {EXPORT_FILE}: not a directory `kdkit export` wrote"]
    record = json.loads((d / EXPORT_FILE).read_text())
    now = _hashes(d)
    problems = [f"{name}: {'removed' if name not in now else 'changed'} since the export"
                for name, sha in record["files"].items() if now.get(name) != sha]
    problems += [f"{name}: added since the export" for name in now if name not in record["files"]]
    try:
        pack = reg.check_weights(reg.pack(record["pack"]))
    except RegistryError as e:
        return [*problems, str(e)]
    if pack.weights_sha256 != record["pack_sha256"]:
        problems.append(f"pack {pack.name!r} in {reg.db_path} is not the pack exported here")
    gate = newest_gate(reg, pack)
    want = provenance(reg, pack, gate)
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            got = fh.metadata() or {}
        problems += [f"{f.name}: __metadata__[{k!r}] is {got.get(k)!r}, the registry says {v!r}"
                     for k, v in want.items() if got.get(k) != v]
    if (d / "README.md").is_file() and (d / "README.md").read_text() != model_card(reg, pack, gate):
        problems.append("README.md: the model card is not the one the registry's records give (a newer gate, or "
                        "an edit)")
    return problems
