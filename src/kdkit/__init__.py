"""kdkit: distil language models and fine-tune them on a KL leash, with the evidence to decide what ships."""

from kdkit.util.threads import configure as _configure_threads

_configure_threads()  # before torch starts its thread pool (kdkit.util.threads)

__version__ = "0.1.0"
