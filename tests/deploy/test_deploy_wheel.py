"""The image's install path without a Docker engine: copy exactly the files the Dockerfile's
builder stage copies, run the Dockerfile's own RUN commands on them (download the locked
wheels with their hashes, build the project's wheel; then, with no pip configuration and no
index, install the lock with --require-hashes and the wheel with --no-deps into a fresh
virtualenv), and run the installed CLI.

The slowest check of the suite (a wheel build, a download and an install of the locked
dependencies, about 45 s); it runs in `make test` because it is the only check of the
packaging itself.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from deploy_support import REPO, dockerignore_excludes, dockerignore_patterns, parse_dockerfile

import proxy

pytestmark = pytest.mark.timeout(600)


@dataclass
class Installed:
    wheel: Path
    venv: Path
    source: Path
    workdir: Path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The installed console script, with an empty environment, outside the repository."""
        env = {"PATH": f"{self.venv / 'bin'}:/usr/bin:/bin", "HOME": str(self.workdir)}
        return subprocess.run(
            [str(self.venv / "bin" / "resilience-proxy"), *args],
            cwd=self.workdir, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip


def builder_context(dest: Path) -> Path:
    """Copy what the builder stage COPYs (as .dockerignore filters it) into dest."""
    patterns = dockerignore_patterns()
    builder = [
        i for i in parse_dockerfile((REPO / "Dockerfile").read_text("utf-8")) if i.stage == 0
    ]
    copied = 0
    for instruction in builder:
        if instruction.keyword != "COPY":
            continue
        for source in instruction.args.split()[:-1]:
            root = REPO / source
            files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
            for file in files:
                rel = file.relative_to(REPO).as_posix()
                if dockerignore_excludes(rel, patterns):
                    continue
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, dest / rel)
                copied += 1
    assert copied, "the builder stage copies nothing"
    return dest


def pip(python: Path | str, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    options = ["--disable-pip-version-check", "--no-input"]
    if args[0] == "--python":  # a global option: before the command
        options, args = [*options, *args[:2]], args[2:]
    result = subprocess.run(
        [str(python), "-m", "pip", *options, *args],
        capture_output=True, text=True, timeout=540, env=env, cwd=cwd,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def image_install(source: Path, wheels: Path, venv: Path) -> list[list[str]]:
    """Run the Dockerfile's own install commands, RUN by RUN, with its paths mapped here:
    /src → `source` (the builder's context), /wheels → `wheels`, /opt/resilience-proxy →
    `venv`. The builder stage uses this machine's package index, as the builder uses PyPI;
    the final stage's pip sees no configuration at all, as in the image, so it can only
    install what the builder put in /wheels. Returns the commands run, as run."""
    image_venv = "/opt/resilience-proxy"
    isolated = {"PATH": "/usr/bin:/bin", "HOME": str(venv.parent), "PIP_CONFIG_FILE": os.devnull}
    ran: list[list[str]] = []
    for instruction in parse_dockerfile((REPO / "Dockerfile").read_text("utf-8")):
        if instruction.keyword != "RUN":
            continue
        final = instruction.stage > 0
        words = shlex.split(instruction.args)
        while words and words[0].startswith("--mount="):
            words.pop(0)
        parts: list[list[str]] = [[]]
        for word in words:
            if word == "&&":
                parts.append([])
            else:
                parts[-1].append(word.replace("/wheels", str(wheels)).replace(image_venv, str(venv)))
        for command in parts:
            if command[:3] == ["python", "-m", "pip"] and not final:
                pip(sys.executable, *command[3:], cwd=source)
            elif command[:3] == ["python", "-m", "venv"] and final:
                # Without its own pip (ensurepip alone takes ~20 s on a busy machine): this
                # interpreter's pip installs into it with --python, exactly as its own would.
                subprocess.run(
                    [sys.executable, "-m", "venv", "--without-pip", command[3]],
                    check=True, timeout=120,
                )  # fmt: skip
            elif command[0] == f"{venv}/bin/pip" and final:
                pip(sys.executable, "--python", str(venv / "bin" / "python"), *command[1:],
                    env=isolated)  # fmt: skip
            elif command[0] == "cp" and not final:
                shutil.copy(source / command[1], command[2])
            elif command[0] in {"groupadd", "useradd", "install"} and final:
                continue  # the image's user and state directory: nothing to install
            else:
                raise AssertionError(f"a RUN command this check does not know: {command}")
            ran.append(command)
    return ran


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    tmp = tmp_path_factory.mktemp("wheel")
    source = builder_context(tmp / "src")
    wheels = tmp / "wheels"
    venv = tmp / "venv"
    ran = image_install(source, wheels, venv)
    # The locked dependencies were installed with their hashes checked (pip refuses an
    # unpinned or unhashed requirement in this mode, so a dependency missing from the lock
    # fails above), and the project's wheel without resolving anything.
    assert any("--require-hashes" in c and c[0].endswith("/bin/pip") for c in ran), ran
    [wheel] = wheels.glob("resilience_proxy-*.whl")
    pip(sys.executable, "--python", str(venv / "bin" / "python"), "check")
    workdir = tmp / "work"
    workdir.mkdir()
    yield Installed(wheel, venv, source, workdir)


def test_the_image_installs_only_locked_wheels(installed: Installed) -> None:
    # Everything in /wheels is either the project's wheel or a file the lock pins by hash.
    from packaging.utils import canonicalize_name
    from test_deploy_lock import parse_lock

    pins = parse_lock()
    wheels = sorted(installed.wheel.parent.glob("*.whl"))
    assert installed.wheel in wheels
    names = {canonicalize_name(w.name.split("-")[0]) for w in wheels if w != installed.wheel}
    assert names == set(pins), "the builder downloads exactly the pinned distributions"
    assert not list(installed.wheel.parent.glob("*.tar.gz")), "no sdist may be built in the image"


def test_wheel_contains_every_module_and_package_file(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    package = installed.source / "proxy"
    expected = {
        p.relative_to(installed.source).as_posix()
        for p in package.rglob("*")
        if p.is_file() and (p.suffix == ".py" or p.suffix in {".html", ".typed"})
    }
    assert expected, "no package files found"
    assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"
    assert not [n for n in names if n.startswith(("tests/", "deploy/", "config/"))]


def test_installed_cli_reports_the_version(installed: Installed) -> None:
    result = installed.run("version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == proxy.__version__
    # Outside a checkout there is no revision to name: the flag prints the bare release too.
    flag = installed.run("--version")
    assert flag.returncode == 0 and flag.stdout == result.stdout, flag.stderr


def test_installed_package_is_the_wheel_not_the_repository(installed: Installed) -> None:
    python = installed.venv / "bin" / "python"
    result = subprocess.run(
        [str(python), "-c", "import proxy; print(proxy.__file__)"],
        cwd=installed.workdir, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_relative_to(installed.venv)


@pytest.mark.parametrize(
    "config",
    ["config/proxy.yaml", "deploy/docker/proxy.yaml", "deploy/kubernetes/base/proxy.yaml"],
)
def test_installed_cli_accepts_the_shipped_configs_with_no_environment(
    installed: Installed, config: str
) -> None:
    result = installed.run("check", "--config", str(REPO / config))
    assert result.returncode == 0, result.stdout + result.stderr


def test_installed_cli_rejects_an_invalid_config_with_exit_2(installed: Installed) -> None:
    bad = installed.workdir / "bad.yaml"
    bad.write_text("version: 1\nlisten: 127.0.0.1:8080\nno_such_key: true\n", "utf-8")
    result = installed.run("check", "--config", str(bad))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no_such_key" in result.stdout + result.stderr


def test_installed_cli_prints_the_schema(installed: Installed) -> None:
    import json

    result = installed.run("schema")
    assert result.returncode == 0, result.stderr
    assert isinstance(json.loads(result.stdout), dict)
