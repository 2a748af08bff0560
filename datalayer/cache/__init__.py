"""Caching: one API over Redis, in-process memory and PostgreSQL (``dl.cache``).

```python
users = dl.cache.namespace(Namespace("profiles", ttl=300, sensitive=True))
await users.set("u1", {"name": "Ada"}, tags=["org:42"])
await users.get("u1")                               # {"name": "Ada"}
await users.get_or_set("u2", load_u2, tags=["org:42"])   # one load for concurrent misses
await dl.cache.invalidate_tags("org:42")            # both gone, in every process
dl.cache.stats()["profiles"].hit_rate
```

Modules: ``core`` (the front: namespaces, single-flight, refresh-ahead, tags, statistics,
degradation), ``memory``/``redis``/``postgres`` (backends), ``_codec`` (orjson, zlib,
encryption), ``lookups`` (read-through repository lookups and their keying rule), ``ai``
(typed AI namespaces).
"""

from datalayer.cache._backend import Backend, BackendUnavailable
from datalayer.cache.core import Cache, CacheStats, Loaded, Namespace, NamespaceCache
from datalayer.cache.memory import MemoryBackend

__all__ = [
    "Backend",
    "BackendUnavailable",
    "Cache",
    "CacheStats",
    "Loaded",
    "MemoryBackend",
    "Namespace",
    "NamespaceCache",
]
