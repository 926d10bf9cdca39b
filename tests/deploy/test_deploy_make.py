"""The Makefile's two entry points install what each needs (`make -n`: the commands make
would run for a fresh virtualenv, nothing executed): `make run` only the runtime, from the
hash-checked lock; `make test` the dev tools on top."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from deploy_support import REPO


def dry_run(target: str, venv: Path) -> list[str]:
    make = shutil.which("make")
    assert make is not None, "make is required (the project's entry points are make targets)"
    # Not the settings of a `make test` this suite may run under (MAKEFLAGS, MAKELEVEL).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    result = subprocess.run(
        [make, "--no-print-directory", "-n", target, f"VENV={venv}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return result.stdout.splitlines()


@pytest.mark.parametrize("target", ["run", "check"])
def test_serving_installs_only_the_locked_runtime(target: str, tmp_path: Path) -> None:
    commands = dry_run(target, tmp_path / "venv")
    installs = [c for c in commands if " pip install" in c]
    assert any("--require-hashes -r requirements.lock" in c for c in installs), commands
    assert any("--no-deps -e ." in c for c in installs), commands
    assert not [c for c in installs if "[dev]" in c], "make run must not install dev tools"
    assert commands[-1].endswith(f"resilience-proxy {target} --config config/proxy.yaml")


@pytest.mark.parametrize("target", ["unit", "lint", "typecheck", "test"])
def test_checks_install_the_dev_tools_on_a_fresh_machine(target: str, tmp_path: Path) -> None:
    commands = dry_run(target, tmp_path / "venv")
    installs = [c for c in commands if " pip install" in c]
    assert any("requirements.lock" in c for c in installs), "the runtime pins come first"
    assert any("-e '.[dev]'" in c for c in installs), commands
    # Separate stamps: a served venv is not taken for a dev one, and vice versa.
    touched = [c.split()[-1] for c in commands if c.startswith("touch ")]
    assert touched == [str(tmp_path / "venv" / ".installed-run"), str(tmp_path / "venv" / ".installed")]
