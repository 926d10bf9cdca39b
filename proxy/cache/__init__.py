"""The fallback store: the last good response per request key, served as stale-if-error.

`rules` holds the pure RFC 9111 / RFC 5861 decisions, `key` the request keys and
partitions, `store` the LRU store the fallback stage streams responses into.
"""

from proxy.cache.key import RequestKey, body_digest
from proxy.cache.rules import Refusal
from proxy.cache.store import EntryWriter, FallbackStore, StaleHit, cache_status_value

__all__ = [
    "FallbackStore",
    "EntryWriter",
    "StaleHit",
    "RequestKey",
    "Refusal",
    "body_digest",
    "cache_status_value",
]
