"""The teacher cache: top-K teacher log-probs on disk, content-addressed, resumable, byte-deterministic.

Layout of a cache directory::

    key.json                 the content key and its components (written first)
    shard-00000.safetensors  ids [N, K], logprobs [N, K], tail [N], pos [N], row_offsets [R+1]
    shard-00000.json         sidecar: sha256, row range, token count, partial statistics
    ...
    manifest.json            written last: everything above, summarised and hashed

``manifest.json`` exists only when every shard is complete.
"""

from kdkit.teacher.cache.format import FORMAT_VERSION, CacheError, CacheMismatch
from kdkit.teacher.cache.reader import TeacherCache, verify_cache

__all__ = ["FORMAT_VERSION", "CacheError", "CacheMismatch", "TeacherCache", "verify_cache"]
