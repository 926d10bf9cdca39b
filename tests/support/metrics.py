"""Reading sample values out of a /metrics scrape, for tests that check a value moves."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def value(text: str, name: str, **labels: str) -> float:
    """The one sample named `name` whose labels include `labels` (0.0 when absent; more
    than one match is a test bug)."""
    found = [
        v for n, ls, v in samples(text) if n == name and all(ls.get(k) == w for k, w in labels.items())
    ]
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples"
    return found[0] if found else 0.0


async def scrape(http, admin: str) -> str:  # type: ignore[no-untyped-def]
    async with http.get(admin + "/metrics") as resp:
        assert resp.status == 200
        return await resp.text()
