"""Fixtures for tests/deploy: a real proxy process for the checks that scrape it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from deploy_support import RunningProxy, start_proxy, stop_proxy


@pytest.fixture(scope="module")
def running_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProxy]:
    """The proxy serving the minimal config, shared by one test module."""
    proxy = start_proxy(tmp_path_factory.mktemp("proxy"))
    try:
        yield proxy
    finally:
        stop_proxy(proxy)
