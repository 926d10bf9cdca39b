"""PyGithub through the sidecar: `Github(base_url="http://127.0.0.1:8080/github")` and no
token in the agent. PyGithub reads no environment variable for its base URL (it has no
GITHUB_API_URL setting), so `base_url` is the setting the docs give."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.providers import GITHUB_TOKEN, FakeProvider, SdkFailed, Sidecar, run_sdk

GET_REPO = """
    import json, sys
    from github import Github
    g = Github(base_url=sys.argv[1] if len(sys.argv) > 1 else "{BASE}")
    repo = g.get_repo("octo-org/agent")
    print(json.dumps({"full_name": repo.full_name, "stars": repo.stargazers_count,
                      "branch": repo.default_branch}))
"""

SEARCH = """
    import json
    from github import Github
    g = Github(base_url="{BASE}", per_page=2)
    print(json.dumps([r.name for r in g.search_repositories("agent")]))
"""

FOLLOW_BODY_URL = """
    import json
    from github import Github
    repo = Github(base_url="{BASE}").get_repo("octo-org/agent")
    try:
        repo.get_branches()[0]  # built from the `url` field of the JSON body
        print(json.dumps("ok"))
    except AssertionError:
        print(json.dumps("AssertionError"))
"""


async def test_get_repo_carries_the_token_the_proxy_injects(
    provider: FakeProvider, sidecar: Sidecar, tmp_path: Path
) -> None:
    result = await run_sdk(GET_REPO.replace("{BASE}", f"{sidecar.url}/github"), tmp_path)
    assert result == {"full_name": "octo-org/agent", "stars": 42, "branch": "main"}
    [seen] = provider.requests_to("/github/repos/")
    assert seen.path == "/github/repos/octo-org/agent"
    assert seen.headers["authorization"] == f"Bearer {GITHUB_TOKEN}"
    assert seen.headers["via"] == "1.1 resilience-proxy"


async def test_the_sdk_alone_holds_no_credential(provider: FakeProvider, tmp_path: Path) -> None:
    # The same script straight at the provider: GitHub's 401, so the token above came from
    # the proxy and nowhere else.
    script = GET_REPO.replace("{BASE}", f"{provider.url}/github")
    with pytest.raises(SdkFailed, match="Bad credentials"):
        await run_sdk(script, tmp_path)
    [seen] = provider.requests_to("/github/repos/")
    assert "authorization" not in seen.headers


async def test_pagination_follows_link_headers_through_the_sidecar(
    provider: FakeProvider, sidecar: Sidecar, tmp_path: Path
) -> None:
    names = await run_sdk(SEARCH.replace("{BASE}", f"{sidecar.url}/github"), tmp_path)
    assert names == ["alpha", "beta", "gamma"]
    pages = provider.requests_to("/github/search/repositories")
    assert [p.query.get("page", "1") for p in pages] == ["1", "2"]
    # Page 2 was fetched through the proxy too (the Link URL was rewritten onto it).
    assert all(p.headers["authorization"] == f"Bearer {GITHUB_TOKEN}" for p in pages)
    assert all(p.headers.get("via") == "1.1 resilience-proxy" for p in pages)


async def test_calls_built_from_body_urls_are_refused_by_pygithub(
    provider: FakeProvider, sidecar: Sidecar, tmp_path: Path
) -> None:
    # The documented limit (docs/deployment.md): PyGithub builds follow-up calls from the
    # `url` fields of JSON bodies, which name the provider's API (the proxy never rewrites
    # bodies), and asserts they point at its own base URL. Nothing of it reaches the provider.
    result = await run_sdk(FOLLOW_BODY_URL.replace("{BASE}", f"{sidecar.url}/github"), tmp_path)
    assert result == "AssertionError"
    assert [s.path for s in provider.seen] == ["/github/repos/octo-org/agent"]
