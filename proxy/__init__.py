"""resilience-proxy: a sidecar reverse proxy that applies timeouts, retries, circuit
breakers, bulkheads and cached fallbacks per route, declared in one YAML file."""

__version__ = "0.1.0"
