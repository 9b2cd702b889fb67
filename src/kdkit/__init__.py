"""kdkit: distil language models and fine-tune them on a KL leash, with the evidence to decide what ships."""

__version__ = "0.1.0"
