"""Durations, sizes and ratios as written in the YAML."""

from __future__ import annotations

import pytest

from proxy.config.units import format_duration, parse_duration, parse_ratio, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("2s", 2.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        (" 10s ", 10.0),
        (3, 3.0),  # a bare number is seconds
        (0.5, 0.5),
        ("60", 60.0),  # what ${CIRCUIT_BREAKER_RECOVERY_TIMEOUT:-60} expands to
        ("0", 0.0),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5x", "s", "", "1d", "ms5", "1 s s", True, None, [1]])
def test_not_a_duration_names_the_value_and_the_spellings(text: object) -> None:
    with pytest.raises(ValueError, match=r"not a duration: .* \(use 250ms, 2s, 5m, 1h"):
        parse_duration(text)


def test_negative_duration_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be negative, got -1"):
        parse_duration(-1)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512KiB", 512 * 1024),
        ("10MiB", 10 * 1024 * 1024),
        ("1GiB", 1024**3),
        ("64KB", 64_000),
        ("10MB", 10_000_000),
        ("1GB", 1_000_000_000),
        ("100B", 100),
        ("100", 100),
        (2048, 2048),  # a bare number is bytes
        ("1.5KiB", 1536),
        ("16kib", 16 * 1024),
    ],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10XB", "not a size: '10XB'"),
        ("lots", "not a size: 'lots'"),
        (False, "not a size: false"),
        (-5, "must not be negative"),
        ("0.5", "not a whole number of bytes: '0.5'"),
    ],
)
def test_bad_sizes(text: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "ratio"),
    [("50%", 0.5), ("0.5", 0.5), (0.25, 0.25), (1, 1.0), ("100%", 1.0), ("0%", 0.0)],
)
def test_ratios(text: object, ratio: float) -> None:
    assert parse_ratio(text) == pytest.approx(ratio)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("150%", r"must be between 0% and 100%, got '150%'"),
        (1.5, r"must be between 0 and 1 \(or 0% and 100%\), got 1.5"),
        ("half", r"not a ratio: 'half' \(use 50% or 0.5\)"),
    ],
)
def test_bad_ratios(text: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_ratio(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.001, "1ms"), (0.5, "500ms"), (1.0, "1s"), (90.0, "90s"), (600.0, "10m")],
)
def test_format_duration_is_exact(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)
