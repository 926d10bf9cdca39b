"""The version the CLI prints and `build_info` exports: the release plus, when the code runs
from a git checkout, the commit it runs (`0.1.0 (rev abc1234)`).

The revision is read once, from git, and only when the `proxy` package sits at the top of
a work tree (an installed wheel inside some other repository is not that repository's
commit). Anywhere else (a wheel, the container image) it is `unknown` and the CLI prints the
bare release, which is what pip and the image tag also say.
"""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

from proxy import __version__

UNKNOWN = "unknown"
_REVISION = re.compile(r"[0-9a-f]{7,40}")


@functools.cache
def version_info() -> tuple[str, str]:
    """(release, revision): ("0.1.0", "abc1234"), or ("0.1.0", "unknown") outside a checkout."""
    return __version__, _git_revision(Path(__file__).resolve().parent.parent)


def version_text() -> str:
    """What `resilience-proxy --version` prints: `0.1.0 (rev abc1234)`, or `0.1.0`."""
    release, revision = version_info()
    return release if revision == UNKNOWN else f"{release} (rev {revision})"


def _git_revision(root: Path) -> str:
    """The short commit of the work tree whose top is `root`, with `-dirty` when tracked files
    differ from it; `unknown` without git, outside a work tree, or if git is slow."""
    if not (root / ".git").exists():  # a directory, or a file in a linked worktree
        return UNKNOWN
    try:
        top = _git(root, "rev-parse", "--show-toplevel")
        if Path(top).resolve() != root:
            return UNKNOWN
        revision = _git(root, "rev-parse", "--short=7", "HEAD")
        if not _REVISION.fullmatch(revision):
            return UNKNOWN
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    return revision + ("-dirty" if dirty else "")


def _git(root: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-C", str(root), *args],
        capture_output=True,
        text=True,
        timeout=3,
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return result.stdout.strip()
