# resilience-proxy container image (DESIGN §11): docs/deployment.md explains how to run it.
#
#   docker build -t resilience-proxy .
#   docker run --rm -p 127.0.0.1:9901:9901 -e HF_TOKEN -e GITHUB_TOKEN \
#     -v resilience-proxy-state:/var/lib/resilience-proxy resilience-proxy
#
# The proxy listener is on the container's loopback (127.0.0.1:8080) by default: the agent
# reaches it from the same network namespace (a pod, or `docker run --network
# container:<proxy>`), and a published port cannot expose the injected tokens. To serve other
# containers, opt in explicitly with RESILIENCE_PROXY_LISTEN=0.0.0.0:8080 and
# RESILIENCE_PROXY_ALLOW_REMOTE_CLIENTS=true (deploy/compose.yaml does); the proxy then logs a
# warning at start.
#
# Stage 1 downloads the locked dependency wheels (requirements.lock: every version pinned,
# every file checked against its sha256) and builds the project's own wheel; stage 2 installs
# exactly those wheels (no compiler, no source tree, no index access) into a virtualenv,
# checking the hashes again.
# The base tag is pinned; pin it by digest too (python:3.11.11-slim-bookworm@sha256:...)
# when you mirror the image.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY requirements.lock pyproject.toml README.md ./
COPY proxy ./proxy
RUN python -m pip download --require-hashes --only-binary=:all: --dest /wheels \
      -r requirements.lock \
 && python -m pip wheel --no-deps --wheel-dir /wheels . \
 && cp requirements.lock /wheels/requirements.lock

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="resilience-proxy" \
      org.opencontainers.image.description="Sidecar reverse proxy: timeouts, retries, circuit breakers, bulkheads, cached fallbacks" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/resilience-proxy/bin:$PATH \
    RESILIENCE_PROXY_CONFIG=/etc/resilience-proxy/proxy.yaml \
    RESILIENCE_PROXY_STATE=/var/lib/resilience-proxy/state.json
# The wheels are bind-mounted from the builder (BuildKit, the default builder since Docker 23),
# so they never become a layer of this image.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/resilience-proxy \
 && /opt/resilience-proxy/bin/pip install --no-index --find-links=/wheels --require-hashes \
      -r /wheels/requirements.lock \
 && /opt/resilience-proxy/bin/pip install --no-index --find-links=/wheels --no-deps resilience-proxy \
 && groupadd --system --gid 10001 resilience-proxy \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin resilience-proxy \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/resilience-proxy
COPY deploy/docker/proxy.yaml /etc/resilience-proxy/proxy.yaml
VOLUME ["/var/lib/resilience-proxy"]
USER 10001:10001
WORKDIR /var/lib/resilience-proxy
# 8080: the proxy listener; 9901: the admin listener (/metrics, /healthz, /readyz, /status).
EXPOSE 8080 9901
# Liveness via the admin listener; slim images have no curl, so Python asks. Set
# RESILIENCE_PROXY_HEALTHCHECK_URL when your config moves the admin listener.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; url = os.environ.get('RESILIENCE_PROXY_HEALTHCHECK_URL', 'http://127.0.0.1:9901/healthz'); sys.exit(0 if urllib.request.urlopen(url, timeout=2).status == 200 else 1)"]
# SIGTERM starts the graceful drain (readiness fails, in-flight work finishes, state is saved);
# give `docker stop -t` more than shutdown.drain_timeout (20s): e.g. `docker stop -t 30`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["resilience-proxy"]
CMD ["run"]
