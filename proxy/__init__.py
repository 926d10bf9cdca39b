"""resilience-proxy: a sidecar reverse proxy that applies timeouts, retries, circuit
breakers, bulkheads and cached fallbacks per route, declared in one YAML file."""

__version__ = "0.1.0"


def version_info() -> tuple[str, str]:
    """(release, git revision or "unknown") for `build_info{version, revision}` (proxy.version)."""
    from proxy.version import version_info as info

    return info()
