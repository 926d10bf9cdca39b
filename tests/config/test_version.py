"""`resilience-proxy --version` / `version` and `proxy.version_info()` (DESIGN §3, §9
build_info): the release, plus the git revision when the code runs from a checkout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import proxy
from proxy.version import UNKNOWN, _git_revision

ROOT = Path(__file__).resolve().parents[2]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(cwd), *args], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True, text=True, timeout=60, cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A git work tree with a committed `proxy/` package, as a fresh clone has."""
    repo = tmp_path / "repo"
    (repo / "proxy").mkdir(parents=True)
    (repo / "proxy" / "__init__.py").write_text("x = 1\n")
    git(repo.parent, "init", "-q", str(repo))
    git(repo, "add", "proxy")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", "one")
    return repo


def test_revision_is_the_short_commit_of_the_checkout(checkout: Path) -> None:
    assert _git_revision(checkout) == git(checkout, "rev-parse", "--short=7", "HEAD")


def test_a_modified_tracked_file_marks_the_revision_dirty(checkout: Path) -> None:
    (checkout / "proxy" / "__init__.py").write_text("x = 2\n")
    assert _git_revision(checkout) == git(checkout, "rev-parse", "--short=7", "HEAD") + "-dirty"
    # Untracked files (a .venv, build outputs) do not make a build dirty.
    git(checkout, "checkout", "--", "proxy")
    (checkout / "notes.txt").write_text("scratch\n")
    assert not _git_revision(checkout).endswith("-dirty")


def test_a_package_installed_inside_another_repository_has_no_revision(checkout: Path) -> None:
    # e.g. a virtualenv inside some project's work tree: not that project's commit.
    nested = checkout / ".venv" / "lib" / "site-packages"
    nested.mkdir(parents=True)
    assert _git_revision(nested) == UNKNOWN


def test_no_checkout_means_unknown(tmp_path: Path) -> None:
    assert _git_revision(tmp_path) == UNKNOWN


def test_version_info_is_release_and_revision() -> None:
    release, revision = proxy.version_info()
    assert release == proxy.__version__
    assert revision  # a label value for build_info: never empty
    assert proxy.version_info() == (release, revision)


def test_version_flag_and_command_print_the_same_line() -> None:
    flag, command = cli("--version"), cli("version")
    assert flag.returncode == 0 and command.returncode == 0, flag.stderr + command.stderr
    assert flag.stdout == command.stdout
    release, revision = proxy.version_info()
    expected = release if revision == UNKNOWN else f"{release} (rev {revision})"
    assert flag.stdout.strip() == expected


def test_from_this_checkout_the_version_names_its_commit() -> None:
    assert (ROOT / ".git").exists(), "the suite runs from a git checkout (CI: a fresh clone)"
    head = git(ROOT, "rev-parse", "--short=7", "HEAD")
    line = cli("--version").stdout.strip()
    assert line.startswith(f"{proxy.__version__} (rev {head}"), line
    assert proxy.version_info()[1].removesuffix("-dirty") == head


def test_version_needs_no_config(tmp_path: Path) -> None:
    # From a directory with no config/proxy.yaml and no environment: still answers.
    result = cli("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith(proxy.__version__)
