"""The request path's two forms (setup.py): compiled by Cython, and the pure-Python source
it is compiled from. The suite runs against whatever `make` built (compiled, where a C
compiler exists); this checks that the pure-Python source, with no compiled module next to
it, still serves a request, and that the proxy says which form it runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from deploy_support import REPO, free_port, http_get

from proxy.version import compiled


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hello() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _pure_tree(dest: Path) -> Path:
    shutil.copytree(
        REPO / "proxy", dest / "proxy", ignore=shutil.ignore_patterns("*.so", "__pycache__")
    )
    assert not list((dest / "proxy").rglob("*.so"))
    return dest


def _env(src: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESILIENCE_PROXY_")}
    env["PYTHONPATH"] = str(src)
    return env


def test_the_pure_python_source_serves_a_request(tmp_path: Path, hello: int) -> None:
    src = _pure_tree(tmp_path / "src")
    port, admin = free_port(), free_port()
    config = tmp_path / "proxy.yaml"
    config.write_text(
        f"""\
version: 1
listen: 127.0.0.1:{port}
admin: {{listen: 127.0.0.1:{admin}, token: {"t" * 32}}}
shutdown: {{quiet_period: 100ms, drain_timeout: 2s}}
upstreams:
  hello: {{url: "http://127.0.0.1:{hello}"}}
routes:
  - name: r
    match: {{path_prefix: /r/}}
    upstream: hello
    retry: {{max_attempts: 2}}
    breaker: {{consecutive_failures: 5}}
    bulkhead: {{max_concurrent: 4}}
    fallback: {{stale_if_error: 1m}}
""",
        "utf-8",
    )
    # The copy is imported, not the checkout: PYTHONPATH comes before the editable install.
    where = subprocess.run(
        [sys.executable, "-c", "import proxy, proxy.version as v; print(proxy.__file__, v.compiled())"],
        env=_env(src), cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    origin, flag = where.stdout.split()
    assert Path(origin).is_relative_to(src) and flag == "False", where.stdout
    err = (tmp_path / "stderr").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "--config", str(config)],
        env=_env(src), cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=err,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if http_get(f"http://127.0.0.1:{admin}/healthz", timeout=1.0)[0] == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, (
                (tmp_path / "stderr").read_text()
            )
            time.sleep(0.1)
        status, body = http_get(f"http://127.0.0.1:{port}/r/x?y=1")
        assert status == 200 and json.loads(body) == {"path": "/x?y=1"}
        request = urllib.request.Request(
            f"http://127.0.0.1:{admin}/status", headers={"Authorization": "Bearer " + "t" * 32}
        )
        with urllib.request.urlopen(request, timeout=2) as resp:
            assert json.load(resp)["compiled"] is False
    finally:
        process.terminate()
        process.wait(timeout=15)
        err.close()


def test_the_request_path_is_compiled_where_a_compiler_exists() -> None:
    # `make` compiles the request path wherever a C compiler exists (CI has one), so a
    # silent fallback to pure Python there (a build that broke) fails here.
    if shutil.which("cc") or shutil.which("gcc") or os.environ.get("CI") == "true":
        assert compiled(), "the request path is not compiled: see `make .venv/.built`"
    else:
        assert not compiled() and not list((REPO / "proxy").rglob("*.so"))
