"""HTTP header vocabulary shared by forwarding, the fallback store and config validation."""

from __future__ import annotations

# Hop-by-hop headers (RFC 9110 §7.6.1): they describe one connection, so a proxy removes them
# in both directions (plus every header named in `Connection`) and never stores them.
HOP_BY_HOP: frozenset[str] = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    )
)

VIA_VALUE = "1.1 resilience-proxy"
