"""Build: the package, with its request-path modules compiled by Cython when possible.

The modules in COMPILED are the ones every proxied request runs through. They are
ordinary Python, type-checked and tested as such; Cython compiles the same source to C
extension modules (Python semantics kept: annotations are not turned into C types), which
cuts the proxy's CPU per request by about a third (bench/README.md). A module's compiled
form is imported in place of its .py when both are present.

Without Cython or a C compiler (the extensions are optional), or with
RESILIENCE_PROXY_PURE=1, the package installs as pure Python and behaves the same, slower.
`pip install -e .` (what the Makefile runs) builds the modules in place, next to their
sources; tests/conftest.py refuses to run against a compiled module older than its source.
"""

import hashlib
import os

from setuptools import Extension, setup

COMPILED = [
    "proxy/server/protocol.py",
    "proxy/server/handler.py",
    "proxy/server/forwarding.py",
    "proxy/server/runtime.py",
    "proxy/upstream.py",
    "proxy/stages/attempt.py",
    "proxy/stages/breaker.py",
    "proxy/stages/bulkhead.py",
    "proxy/stages/call.py",
    "proxy/stages/failover.py",
    "proxy/stages/fallback.py",
    "proxy/stages/quota.py",
    "proxy/stages/ratelimit.py",
    "proxy/stages/retry.py",
    "proxy/stages/timeout.py",
    "proxy/resilience/breaker.py",
    "proxy/resilience/budget.py",
    "proxy/resilience/bulkhead.py",
    "proxy/resilience/classify.py",
    "proxy/resilience/quota.py",
    "proxy/resilience/windows.py",
    "proxy/cache/key.py",
    "proxy/cache/rules.py",
    "proxy/cache/store.py",
    "proxy/observe/access.py",
    "proxy/observe/history.py",
    "proxy/observe/metrics.py",
    "proxy/state/bucket.py",
]


DIRECTIVES = {
    "language_level": 3,
    "binding": True,  # functions keep their Python introspection (signatures, __wrapped__)
    # Python semantics: annotations are not turned into C type checks (a `str` parameter
    # must still accept a str subclass such as multidict's istr).
    "annotation_typing": False,
}


def ext_modules() -> list[Extension]:
    if os.environ.get("RESILIENCE_PROXY_PURE"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        return []
    exts = [Extension(path[:-3].replace("/", "."), [path], optional=True) for path in COMPILED]
    # The generated C is reused while a module's source is unchanged; it lives under a
    # directory named after the directives, so changing them regenerates every module.
    tag = hashlib.sha256(repr(sorted(DIRECTIVES.items())).encode()).hexdigest()[:8]
    return cythonize(
        exts,
        compiler_directives=DIRECTIVES,
        build_dir=f"build/cython-{tag}",
        nthreads=os.cpu_count() or 1,
        quiet=True,
    )


setup(
    ext_modules=ext_modules(),
    options={"build_ext": {"parallel": os.cpu_count() or 1}},
)
