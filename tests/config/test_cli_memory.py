"""What the serving process costs in memory before any traffic (issue 11: idle RSS): the
optional clients stay unimported until configured, and the C heap's free pages go back to
the OS once the proxy started (`proxy.cli.trim_heap`). Each check runs in a fresh
interpreter, whose imports and heap are its own."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_serving_modules_leave_redis_and_asyncpg_unimported() -> None:
    out = python(
        "import sys, proxy.cli, proxy.server.app, proxy.server.admin, proxy.state, proxy.pgprobe\n"
        "print(sorted(m for m in ('redis', 'asyncpg') if m in sys.modules))\n"
    )
    assert out.split() == ["[]"]


def test_the_redis_backend_and_asyncpg_load_when_asked_for() -> None:
    out = python(
        "import sys\n"
        "from proxy.clock import SYSTEM_CLOCK\n"
        "from proxy.config.model import StateSettings\n"
        "from proxy.state import RedisBackend, make_backend\n"
        "from proxy.pgprobe.prober import classify\n"
        "backend = make_backend(StateSettings(backend='redis', url='redis://127.0.0.1:1/0'),"
        " SYSTEM_CLOCK)\n"
        "import asyncpg\n"
        "print(type(backend) is RedisBackend, 'redis' in sys.modules,"
        " classify(asyncpg.InvalidAuthorizationSpecificationError('no'), connecting=True),"
        " classify(asyncpg.TooManyConnectionsError('full'), connecting=False))\n"
    )
    assert out.split() == ["True", "True", "auth", "connect"]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_trim_heap_gives_freed_heap_pages_back() -> None:
    # 50 MB of 1,000-byte objects (malloc'd from the heap, not mmap), the last one kept so
    # that free() alone cannot shrink the heap from its top.
    out = python(
        "import json\n"
        "from proxy.cli import trim_heap\n"
        "def rss():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmRSS'):\n"
        "            return int(line.split()[1])\n"
        "blocks = [bytes([i % 256]) * 1000 for i in range(50_000)]\n"
        "keep = blocks[-1]\n"
        "del blocks\n"
        "before = rss()\n"
        "trimmed = trim_heap()\n"
        "print(json.dumps([trimmed, before, rss(), len(keep)]))\n"
    )
    trimmed, before, after, _ = json.loads(out)
    assert trimmed is True
    assert before - after > 20_000, f"RSS {before} kB -> {after} kB"
