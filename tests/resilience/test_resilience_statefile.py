"""Breaker state file: atomic, private, and forgiving of missing, corrupt or foreign files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from proxy.clock import FakeClock
from proxy.config.model import BreakerPolicy
from proxy.resilience import statefile
from proxy.resilience.breaker import Breaker, BreakerState
from proxy.resilience.classify import Attempt
from proxy.resilience.statefile import (
    FORMAT,
    breakers_state,
    load_state,
    restore_breakers,
    save_state,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_round_trip_with_private_permissions(tmp_path: Path) -> None:
    path = tmp_path / "state" / "nested" / "state.json"
    save_state(str(path), {"breakers": [], "saved_at": 1.5})
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    data, warning = load_state(str(path))
    assert warning is None
    assert data == {"breakers": [], "saved_at": 1.5, "format": FORMAT}


def test_an_existing_world_readable_file_is_replaced_by_a_private_one(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("{}")
    path.chmod(0o644)
    save_state(str(path), {"breakers": []})
    assert mode(path) == 0o600
    assert os.listdir(tmp_path) == ["state.json"]


def test_a_failed_write_leaves_the_old_file_intact_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.json"
    save_state(str(path), {"breakers": [], "generation": 1})
    before = path.read_bytes()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(statefile.os, "replace", broken_replace)
    with pytest.raises(OSError):
        save_state(str(path), {"breakers": [], "generation": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["state.json"]
    with pytest.raises(TypeError):  # not JSON-serialisable: fails before touching the file
        save_state(str(path), {"breakers": object()})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["state.json"]


def test_a_missing_file_is_not_a_warning(tmp_path: Path) -> None:
    assert load_state(str(tmp_path / "absent.json")) == (None, None)


@pytest.mark.parametrize(
    "content",
    [
        b'{"format": "resilience-proxy/breakers/v1", "breakers": [',  # truncated
        b"\xff\xfe garbage",
        b"[1, 2, 3]",
        b'{"breakers": []}',  # no marker
        b'{"format": "someone-else/v9"}',
    ],
)
def test_corrupt_or_foreign_files_are_warnings(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    data, warning = load_state(str(path))
    assert data is None
    assert warning is not None and str(path) in warning


def test_an_unreadable_path_is_a_warning(tmp_path: Path) -> None:
    data, warning = load_state(str(tmp_path))  # a directory
    assert data is None and warning is not None


POLICY = BreakerPolicy(consecutive_failures=1, failure_rate=None, open_for=60.0)


def test_breakers_survive_a_restart_through_the_file(tmp_path: Path) -> None:
    clock = FakeClock()
    hf = Breaker("hf", "huggingface", POLICY, clock)
    gh = Breaker("gh", "github", POLICY, clock)
    gone = Breaker("old", "github", POLICY, clock)
    permit = hf.acquire()
    assert permit is not None
    hf.record(permit, Attempt.response(503))
    gh.force("forced_closed")
    gone.force("forced_open")
    path = tmp_path / "state.json"
    save_state(str(path), breakers_state([hf, gh, gone], clock.wall()))
    clock.advance(20.0)

    data, warning = load_state(str(path))
    assert warning is None and data is not None
    fresh = {
        ("hf", "huggingface"): Breaker("hf", "huggingface", POLICY, clock),
        ("gh", "github"): Breaker("gh", "github", POLICY, clock),
    }
    assert restore_breakers(data, fresh, clock.wall()) == []
    assert fresh["hf", "huggingface"].state is BreakerState.OPEN
    assert fresh["hf", "huggingface"].retry_after() == 40
    assert fresh["gh", "github"].state is BreakerState.FORCED_CLOSED


def test_bad_entries_are_reported_and_skipped() -> None:
    clock = FakeClock()
    live = {("hf", "huggingface"): Breaker("hf", "huggingface", POLICY, clock)}
    data = {
        "format": FORMAT,
        "breakers": ["nonsense", {"route": "hf", "upstream": "huggingface", "state": "???"}],
    }
    warnings = restore_breakers(data, live, clock.wall())
    assert len(warnings) == 2
    assert live["hf", "huggingface"].state is BreakerState.CLOSED
    assert restore_breakers({"format": FORMAT}, live, clock.wall()) != []


def test_the_file_is_readable_json_for_operators(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    clock = FakeClock()
    save_state(str(path), breakers_state([Breaker("hf", "hf", POLICY, clock)], clock.wall()))
    doc = json.loads(path.read_text())
    assert doc["format"] == FORMAT
    assert doc["breakers"][0]["state"] == "closed"
