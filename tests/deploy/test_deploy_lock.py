"""requirements.lock: the runtime dependencies the image installs, pinned with hashes.

It is generated from pyproject.toml (`make lock`), so it must cover every runtime dependency
pyproject declares, at a version the declaration allows, and nothing may be installed from it
without a hash. tests/deploy/test_deploy_wheel.py installs it with `--require-hashes`.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass

import pytest
from deploy_support import REPO
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

LOCK = REPO / "requirements.lock"


@dataclass
class Pin:
    name: str
    version: str
    marker: str
    hashes: list[str]


def parse_lock() -> dict[str, Pin]:
    text = LOCK.read_text("utf-8")
    pins: dict[str, Pin] = {}
    for entry in re.split(r"\n(?=[A-Za-z0-9])", text):
        lines = [line.split("#", 1)[0].strip() for line in entry.splitlines()]
        body = " ".join(line.rstrip("\\").strip() for line in lines if line)
        if not body:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)(?:\s*;\s*([^-]+?))?((?:\s+--hash=\S+)+)", body)
        assert match, f"not a pinned, hashed requirement: {body[:120]}"
        name = canonicalize_name(match.group(1))
        hashes = re.findall(r"--hash=(\S+)", match.group(4))
        pins[name] = Pin(name, match.group(2), (match.group(3) or "").strip(), hashes)
    return pins


@pytest.fixture(scope="module")
def pins() -> dict[str, Pin]:
    return parse_lock()


@pytest.fixture(scope="module")
def runtime() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))["project"]
    return [Requirement(r) for r in project["dependencies"]]


def test_every_pin_has_sha256_hashes(pins: dict[str, Pin]) -> None:
    assert pins
    for pin in pins.values():
        assert pin.hashes, pin.name
        assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in pin.hashes), pin.name


def test_the_lock_covers_every_runtime_dependency(
    pins: dict[str, Pin], runtime: list[Requirement]
) -> None:
    # The image's platform: CPython 3.11 on linux x86_64.
    linux = default_environment() | {"sys_platform": "linux", "platform_system": "Linux",
                                     "python_version": "3.11", "platform_machine": "x86_64"}  # fmt: skip
    for requirement in runtime:
        if requirement.marker is not None and not requirement.marker.evaluate(linux):
            continue
        pin = pins.get(canonicalize_name(requirement.name))
        assert pin is not None, f"{requirement.name} is a runtime dependency missing from the lock"
        assert requirement.specifier.contains(pin.version, prereleases=True), (
            f"{requirement.name}=={pin.version} does not satisfy pyproject's {requirement}"
        )


def test_the_lock_holds_no_dev_tool(pins: dict[str, Pin]) -> None:
    # make run and the image install exactly this: no test runner, linter or SDK.
    project = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))["project"]
    dev = {canonicalize_name(Requirement(r).name) for r in project["optional-dependencies"]["dev"]}
    runtime = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    assert not (dev - runtime) & set(pins), sorted((dev - runtime) & set(pins))


def test_the_lock_says_how_it_was_made() -> None:
    header = "\n".join(LOCK.read_text("utf-8").splitlines()[:8])
    assert "pip-compile" in header and "--generate-hashes" in header and "pyproject.toml" in header
