"""Loading and saving Hugging Face models and tokenizers; fingerprints; vocabulary alignment."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from kdkit.data.rows import IGNORE_INDEX
from kdkit.util.errors import KdkitError
from kdkit.util.identity import sha256_file
from kdkit.util.rng import own_rng

PACK_FILE = "kdkit_pack.json"  # written by merge into every pack: the pack's marker
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(KdkitError, ValueError):
    """A model or tokenizer cannot be used as asked; the message says why and what would work."""


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ModelError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def _require_dir(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise ModelError(f"{what} {p}: not a directory (kdkit loads local Hugging Face model directories)")
    if (p / "run.json").is_file() and (p / "config.yaml").is_file() and not (p / "config.json").is_file():
        raise ModelError(f"{what} {p}: a kdkit training run, not a model; merge it first: kdkit merge {p} --out PACK")
    return p


def _quiet_transformers() -> None:
    # transformers prints a progress bar per weights load; kdkit draws its own progress. Its notice that
    # generate's past_key_values is renamed (kdkit passes the name every supported release takes) is not the
    # user's to act on.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.get_logger("transformers")  # transformers attaches its handler here
    for handler in logging.getLogger("transformers").handlers:
        if not any(isinstance(f, _RenameNotice) for f in handler.filters):
            handler.addFilter(_RenameNotice())


class _RenameNotice(logging.Filter):
    """Drops transformers' "`past_key_values`/`cache_params` are deprecated" notice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "are deprecated. Use `cache` instead" not in record.getMessage()


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    p = _require_dir(path, "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(str(p))
    except Exception as e:  # transformers raises many types; name the directory
        raise ModelError(f"{p}: cannot load a tokenizer ({type(e).__name__}: {e})") from e


def check_model_dir(path: str | Path, what: str = "model") -> Path:
    """What loading will need, without loading: config.json and every safetensors weights file.

    A sharded checkpoint's index must name only files that exist."""
    p = _require_dir(path, what)
    if p.name == "final" and (p / "kdkit.json").is_file() and not (p / "config.json").is_file():
        raise ModelError(f"{what} {p}: a LoRA run's final/ holds its adapters, not a model; merge it first: "
                         f"kdkit merge {p.parent} --out PACK")
    if not (p / "config.json").is_file():
        raise ModelError(f"{what} {p}: no config.json (not a Hugging Face model directory)")
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ModelError(f"{what} {index}: not a valid safetensors index (no 'weight_map')") from None
        missing = sorted(f for f in files if not (p / f).is_file())
        if missing:
            raise ModelError(f"{what} {p}: weights files named by {index.name} are missing: {', '.join(missing)}")
    elif not any(f.stat().st_size > 0 for f in p.glob("*.safetensors")):
        raise ModelError(f"{what} {p}: no *.safetensors weights (kdkit never unpickles .bin files; convert them first)")
    return p


def check_quantisation(load_in: str | None, field: str) -> None:
    """4/8-bit loading runs with bitsandbytes on a CUDA GPU; anywhere else it is refused, never ignored."""
    if load_in is None:
        return
    if not torch.cuda.is_available():
        raise ModelError(f"{field}={load_in!r} needs bitsandbytes on a CUDA GPU; this machine has none "
                         f"(remove {field} to load the weights in the configured dtype)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError(f"{field}={load_in!r} needs bitsandbytes: pip install bitsandbytes") from None


def load_causal_lm(path: str | Path, dtype: str = "float32", load_in: str | None = None,
                   field: str = "load_in") -> Any:
    """Load a causal LM from a local directory of safetensors weights, in eval mode (``load_in``: '4bit' or
    '8bit' with bitsandbytes on the current CUDA device, compute in ``dtype``)."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    p = check_model_dir(path)
    kw: dict[str, Any] = {}
    if load_in is not None:
        from transformers import BitsAndBytesConfig

        check_quantisation(load_in, field)
        kw["quantization_config"] = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch_dtype(dtype))
                                     if load_in == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
        kw["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch_dtype(dtype), use_safetensors=True, **kw)
    model.eval()
    return model


def model_fingerprint(path: str | Path) -> dict[str, Any]:
    """Config + sha256 of every weights file: identifies the teacher a cache was made from."""
    p = _require_dir(path, "model")
    cfg_path = p / "config.json"
    config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    # transformers writes its own version into config.json; it does not change the function.
    config.pop("transformers_version", None)
    weights = {f.name: sha256_file(f) for f in sorted(p.glob("*.safetensors"))}
    digest = hashlib.sha256(json.dumps({"config": config, "weights": weights}, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, "weights": weights, "model_type": config.get("model_type"),
            "vocab_size": config.get("vocab_size")}


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """sha256 of the vocabulary (token → id) and the special tokens: equal iff ids mean the same text."""
    vocab = tokenizer.get_vocab()
    special = {k: getattr(tokenizer, k, None) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    blob = json.dumps({"vocab": sorted(vocab.items(), key=lambda kv: kv[1]), "special": special}, sort_keys=True)
    return {"sha256": hashlib.sha256(blob.encode()).hexdigest(), "vocab_size": len(vocab)}


def pad_id(tokenizer: Any) -> int:
    """The id padding is written with: the tokenizer's pad token, else its EOS, else 0 (masked out anyway)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id or 0)


def vocab_logits(logits: torch.Tensor, real_vocab: int, what: str = "model") -> torch.Tensor:
    """The logits of the tokenizer's real vocabulary: [..., :real_vocab].

    Models often pad the embedding matrix (e.g. 151,936 tokens in 152,064 rows), and a teacher may be
    padded more than its student; padded rows are never a target and must take no probability mass.
    Dropping them equals a -inf logit on either side, which removes an entry from both distributions.
    """
    v = logits.shape[-1]
    if v < real_vocab:
        raise ModelError(f"the {what} has {v} output rows but the tokenizer has {real_vocab} tokens: tokens "
                         f"{v}..{real_vocab - 1} have no logit (is this the tokenizer the {what} was trained with?)")
    return logits if v == real_vocab else logits[..., :real_vocab]


@torch.no_grad()
def head_reads_last_hidden(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> bool:
    """Whether ``model``'s logits are its LM head applied to its last hidden state: the one check, with one
    tolerance, behind every path that runs the head itself (the chunked loss, a teacher's head at the
    target positions). Checked on one row, outside any autocast (a mixed-precision run is checked in its
    float32 master weights), against the head recomputed in float64: the bound is 8 ulps of |h|·|w| in
    the weights' dtype, so a scale, a softcap or a norm after the last hidden state is caught."""
    head = model.get_output_embeddings()
    dev = input_ids.device.type
    # its own RNG: a dropout in this extra forward must not shift the run's stream (resume stays bitwise)
    # Accelerate's mixed precision wraps the instance's forward in an autocast of its own (and keeps the
    # original): the check calls the original, through the module's hooks (FSDP's among them)
    patched, original = model.__dict__.get("forward"), getattr(model, "_original_forward", None)
    with own_rng(), torch.autocast(dev, enabled=False):
        if original is not None:
            model.forward = original
        try:
            out = model(input_ids=input_ids[:1], attention_mask=attention_mask[:1], output_hidden_states=True,
                        logits_to_keep=1)
        finally:
            if original is not None:
                model.forward = patched
    h, w = out.hidden_states[-1][:, -1].double(), head.weight.double()
    ref, scale = h @ w.T, h.abs() @ w.abs().T
    if head.bias is not None:
        ref, scale = ref + head.bias.double(), scale + head.bias.double().abs()
    eps = torch.finfo(head.weight.dtype).eps
    got = out.logits[:, -1].double()
    # a non-finite entry is the same on both sides when the head is the input (a NaN weight: the NaN check
    # of the loss names the step, this check is not the place)
    same = ((ref - got).abs() <= 8 * eps * scale + 1e-12) | (ref.isnan() & got.isnan()) | (ref == got)
    return bool(same.all())


@torch.no_grad()
def target_logits(model: Any, batch: Any, real_vocab: int, what: str = "teacher") -> torch.Tensor:
    """A frozen model's logits at the batch's target positions only, row-major: [N_targets, V].

    The LM head runs on the target positions' final hidden states (a third of all positions on
    typical prompt/completion rows), not on every position; a model whose last hidden state is not
    the head's input (checked once per model) gets the full logits, indexed. ``batch``: a
    :class:`kdkit.data.rows.Batch`."""
    sel = batch.targets != IGNORE_INDEX
    head = model.get_output_embeddings()
    if getattr(model, "_kdkit_head_on_hidden", True) and isinstance(head, torch.nn.Linear):
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True,
                    logits_to_keep=1)
        hidden = out.hidden_states[-1]
        if not hasattr(model, "_kdkit_head_on_hidden"):
            model._kdkit_head_on_hidden = head_reads_last_hidden(model, batch.input_ids, batch.attention_mask)
        if model._kdkit_head_on_hidden:
            return vocab_logits(head(hidden[:, :-1][sel]), real_vocab, what)
    return vocab_logits(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1][sel],
                        real_vocab, what)


def _merged_lora(final: Path, base_path: str, drop: list[str]) -> torch.nn.Module:
    """The base with the run's adapters merged in: the main one and every extra adapter saved beside it
    (``final/<name>/``, e.g. routing's quarantine) that ``drop`` does not name."""
    from peft import PeftModel

    extra = sorted(p.name for p in final.iterdir() if (p / "adapter_config.json").is_file())
    unknown = [d for d in drop if d not in extra]
    if unknown:
        raise ModelError(f"--drop-adapter {', '.join(unknown)}: {final} has no such adapter "
                         f"(its extra adapters: {', '.join(extra) or 'none'})")
    model = PeftModel.from_pretrained(load_causal_lm(base_path), str(final))
    keep = [a for a in extra if a not in drop]
    for name in keep:
        model.load_adapter(str(final / name), adapter_name=name)
    return model.merge_and_unload(adapter_names=["default", *keep])


def merge(run_dir: str | Path, out: str | Path, drop: list[str] | None = None) -> Path:
    """Write a full HF model dir (a "pack") from a run's ``final/``: LoRA merged into the base; ``drop``
    names extra adapters to leave out (routing's ``quarantine``: the deployment "knob off")."""
    from kdkit.util.io import atomic_write_json, check_output_dir

    run, out = Path(run_dir), Path(out)
    replace = check_output_dir(out, "--out", marker=PACK_FILE)  # an earlier pack may be replaced; nothing else
    final = run / "final"
    meta_path = final / "kdkit.json"
    if not meta_path.is_file():
        raise ModelError(f"{run}: no final/kdkit.json — the run did not finish")
    meta = json.loads(meta_path.read_text())
    tokenizer = load_tokenizer(final)
    if meta["kind"] == "lora":
        model = _merged_lora(final, meta["base"], list(drop or []))
    elif drop:
        raise ModelError(f"--drop-adapter: {run} was fully fine-tuned; it has no adapters to drop")
    else:
        model = load_causal_lm(final)
    tmp = out.with_name(f".kdkit-tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    atomic_write_json(tmp / PACK_FILE, {"source_run": str(run.resolve()), "steps": meta["steps"],
                                        "config_sha256": sha256_file(run / "config.yaml"),
                                        "dropped_adapters": sorted(drop or [])})
    if replace or out.is_dir():  # our earlier pack, or an empty directory
        shutil.rmtree(out)
    tmp.rename(out)
    return out
