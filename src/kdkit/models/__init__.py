"""Models: loading, fingerprints, head checks and LoRA merges (``load``), greedy and sampled generation
(``generation``), checkpoints and resume (``checkpoint``), sharded training's state (``sharding``), and a
student made from its teacher (``student``)."""

from kdkit.models.generation import GenerationSettings, generate
from kdkit.models.load import ModelError, load_causal_lm, load_tokenizer, merge, model_fingerprint
from kdkit.models.student import init_student

__all__ = ["load_causal_lm", "load_tokenizer", "model_fingerprint", "merge", "ModelError", "GenerationSettings",
           "generate", "init_student"]
