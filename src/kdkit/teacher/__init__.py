"""The teacher: the signals the step asks for — cached, live, adapter-off, cross-tokenizer, served —
and their sources (``signals``), a vLLM server's client (``served``), its parity with a local copy
(``parity``), its completions as rows for sequence-level KD (``seqkd``), the cross-tokenizer forward
(``crosstok``), and the content-addressed cache of its top-K log-probs (``cache/``)."""

from kdkit.teacher.cache import TeacherCache, verify_cache
from kdkit.teacher.cache.precompute import PrecomputeSettings, precompute
from kdkit.teacher.parity import teacher_parity
from kdkit.teacher.seqkd import generate_rows
from kdkit.teacher.served import ServedError, Server
from kdkit.teacher.signals import Signal, Sources, open_sources

__all__ = ["Signal", "Sources", "open_sources", "Server", "ServedError", "teacher_parity", "generate_rows",
           "TeacherCache", "verify_cache", "PrecomputeSettings", "precompute"]
