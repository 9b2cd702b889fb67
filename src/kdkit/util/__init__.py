"""The plumbing every stage uses: one error base (``errors``), files written whole or not at all (``io``),
fingerprints of every input (``identity``), fault injection for tests (``faults``), owned random streams
(``rng``), thread counts (``threads``), progress lines (``progress``) and the compute environment a result
came from (``environment``). Nothing here imports torch at import time but ``rng`` and ``environment``
(``kdkit.util.threads`` must run before torch starts its thread pool), so they are not re-exported."""

from kdkit.util.errors import KdkitError, OutputDirError, StorageError, TrainingError, UsageError
from kdkit.util.identity import changed_inputs, path_identity, run_inputs
from kdkit.util.io import atomic_write_bytes, atomic_write_json, check_output_dir

__all__ = ["KdkitError", "UsageError", "TrainingError", "OutputDirError", "StorageError", "atomic_write_bytes",
           "atomic_write_json", "check_output_dir", "path_identity", "run_inputs", "changed_inputs"]
