"""Fake providers and an SDK runner for tests/sdk: the real provider SDKs (PyGithub,
huggingface_hub, cloudinary) driven through the proxy.

The proxy serves the shipped `config/proxy.yaml`, in-process, with each upstream's URL moved
to a fake provider on 127.0.0.1 (a real aiohttp server that answers the calls the tests make
the way the provider does, and refuses them without the right credential). The tokens are
given to the proxy only; each SDK runs in a subprocess with a clean environment that holds
no token, configured only through the setting the docs tell users to use, because some of
those settings (HF_ENDPOINT, CLOUDINARY_*) are read once, when the SDK is imported.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from proxy.server.app import ProxyApp

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "config" / "proxy.yaml"

# What the proxy holds (from its environment) and the SDKs never see.
GITHUB_TOKEN = "ghp_proxy_only_github_token"
HF_TOKEN = "hf_proxy_only_hub_token"
CLOUDINARY_KEY = "614335564976464"
CLOUDINARY_SECRET = "proxy-only-cloudinary-secret"
CLOUD = "demo-cloud"
# What the agent's Cloudinary SDK holds: it refuses to call without a key and a secret.
DUMMY_KEY = "dummy-key"
DUMMY_SECRET = "dummy-secret"


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    form: dict[str, str] = field(default_factory=dict)


def basic_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def cloudinary_signature(params: dict[str, str], secret: str) -> str:
    """Cloudinary's upload signature (v2): SHA-1 of the sorted `k=v` pairs joined by `&`
    (an `&` inside a pair percent-encoded), followed by the API secret."""
    skip = {"file", "api_key", "signature", "resource_type", "cloud_name"}
    pairs = sorted(f"{k}={v}".replace("&", "%26") for k, v in params.items() if k not in skip and v)
    return hashlib.sha1(("&".join(pairs) + secret).encode()).hexdigest()


class FakeProvider:
    """GitHub, the Hugging Face Hub and inference API, and Cloudinary, each under its own
    base path (`/github`, `/huggingface-hub`, `/huggingface`, `/cloudinary`), on one loopback
    server. Every request is recorded; a wrong or missing credential gets the provider's 401."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests_to(self, prefix: str) -> list[Seen]:
        return [s for s in self.seen if s.path.startswith(prefix)]

    async def start(self) -> FakeProvider:
        app = web.Application()
        app.router.add_get("/github/repos/{owner}/{repo}", self.github_repo)
        app.router.add_get("/github/search/repositories", self.github_search_repositories)
        app.router.add_get("/huggingface-hub/api/models/{org}/{model}", self.hub_model_info)
        app.router.add_post(
            "/huggingface/models/{org}/{model}/v1/chat/completions", self.chat_completion
        )
        app.router.add_get("/cloudinary/v1_1/{cloud}/resources/image", self.cloudinary_resources)
        app.router.add_post("/cloudinary/v1_1/{cloud}/image/upload", self.cloudinary_upload)
        app.middlewares.append(self._record)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        seen = Seen(
            request.method,
            request.path,
            dict(request.query),
            {k.lower(): v for k, v in request.headers.items()},
        )
        if request.content_type == "multipart/form-data":
            form = await request.post()
            seen.form = {k: v if isinstance(v, str) else "<file>" for k, v in form.items()}
        self.seen.append(seen)
        response: web.StreamResponse = await handler(request)
        return response

    # --- GitHub ---------------------------------------------------------------------------

    def _github_denied(self, request: web.Request) -> web.Response | None:
        if request.headers.get("Authorization") != f"Bearer {GITHUB_TOKEN}":
            return web.json_response({"message": "Bad credentials", "status": "401"}, status=401)
        return None

    def _repo(self, owner: str, name: str) -> dict[str, Any]:
        api = f"{self.url}/github"
        return {
            "id": abs(hash((owner, name))) % 10**6,
            "name": name,
            "full_name": f"{owner}/{name}",
            "private": False,
            "owner": {"login": owner, "id": 1, "url": f"{api}/users/{owner}", "type": "User"},
            "url": f"{api}/repos/{owner}/{name}",
            "default_branch": "main",
            "stargazers_count": 42,
        }

    async def github_repo(self, request: web.Request) -> web.Response:
        denied = self._github_denied(request)
        if denied:
            return denied
        owner, repo = request.match_info["owner"], request.match_info["repo"]
        return web.json_response(self._repo(owner, repo))

    async def github_search_repositories(self, request: web.Request) -> web.Response:
        """Two pages, linked as GitHub links them: absolute URLs under the API's own base."""
        denied = self._github_denied(request)
        if denied:
            return denied
        page = int(request.query.get("page", "1"))
        names = {1: ["alpha", "beta"], 2: ["gamma"]}[page]
        base = f"{self.url}/github/search/repositories?q={request.query['q']}&per_page=2"
        links = {1: [(2, "next"), (2, "last")], 2: [(1, "prev"), (1, "first")]}[page]
        link = ", ".join(f'<{base}&page={n}>; rel="{rel}"' for n, rel in links)
        return web.json_response(
            {
                "total_count": 3,
                "incomplete_results": False,
                "items": [self._repo("octo-org", n) for n in names],
            },
            headers={"Link": link},
        )

    # --- Hugging Face ---------------------------------------------------------------------

    def _hf_denied(self, request: web.Request) -> web.Response | None:
        if request.headers.get("Authorization") != f"Bearer {HF_TOKEN}":
            return web.json_response(
                {"error": "Invalid credentials in Authorization header"},
                status=401,
                headers={"X-Error-Code": "InvalidCredentials"},
            )
        return None

    async def hub_model_info(self, request: web.Request) -> web.Response:
        denied = self._hf_denied(request)
        if denied:
            return denied
        repo_id = f"{request.match_info['org']}/{request.match_info['model']}"
        return web.json_response(
            {
                "_id": "65f0c0ffee",
                "id": repo_id,
                "modelId": repo_id,
                "author": request.match_info["org"],
                "sha": "0123456789abcdef0123456789abcdef01234567",
                "private": True,  # a gated/private model: only a token may read it
                "pipeline_tag": "text-generation",
                "tags": ["text-generation"],
                "downloads": 7,
                "likes": 3,
                "siblings": [{"rfilename": "config.json"}],
            }
        )

    async def chat_completion(self, request: web.Request) -> web.Response:
        denied = self._hf_denied(request)
        if denied:
            return denied
        body = await request.json()
        question = body["messages"][-1]["content"]
        return web.json_response(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1700000000,
                "model": body.get("model") or "tgi",
                "system_fingerprint": "fake",
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": f"echo: {question}"},
                    }
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            }
        )

    # --- Cloudinary -----------------------------------------------------------------------

    async def cloudinary_resources(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != basic_auth(CLOUDINARY_KEY, CLOUDINARY_SECRET):
            return web.json_response({"error": {"message": "Invalid credentials"}}, status=401)
        cloud = request.match_info["cloud"]
        return web.json_response(
            {
                "resources": [
                    {
                        "public_id": "samples/kitten",
                        "format": "jpg",
                        "resource_type": "image",
                        "type": "upload",
                        "secure_url": f"https://res.cloudinary.com/{cloud}/image/upload/samples/kitten.jpg",
                    }
                ],
                "rate_limit_allowed": 500,
            }
        )

    async def cloudinary_upload(self, request: web.Request) -> web.Response:
        """Signed uploads are checked against the account's secret, as Cloudinary does;
        unsigned ones need an upload preset."""
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        if "signature" in form:
            if form.get("api_key") != CLOUDINARY_KEY:
                return web.json_response({"error": {"message": "Unknown API key"}}, status=401)
            if form["signature"] != cloudinary_signature(form, CLOUDINARY_SECRET):
                return web.json_response({"error": {"message": "Invalid Signature"}}, status=401)
        elif form.get("upload_preset") != "agent-unsigned":
            return web.json_response(
                {"error": {"message": "Upload preset must be specified"}}, status=400
            )
        cloud = request.match_info["cloud"]
        public_id = form.get("public_id", "generated")
        return web.json_response(
            {
                "public_id": public_id,
                "version": 1700000000,
                "resource_type": "image",
                "secure_url": f"https://res.cloudinary.com/{cloud}/image/upload/{public_id}.png",
            }
        )


@dataclass
class Sidecar:
    app: ProxyApp
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def shipped_config_for(provider: FakeProvider, dest: Path) -> Path:
    """config/proxy.yaml with each upstream's host moved to the fake provider (scheme http,
    base path /<upstream name>); everything else, injected headers and URL userinfo
    included, byte for byte as shipped."""
    text = SHIPPED.read_text("utf-8")
    names = list(yaml.safe_load(text)["upstreams"])
    assert names == ["cloudinary", "huggingface", "huggingface-hub", "github"], names
    moved = iter(names)

    def move(match: re.Match[str]) -> str:
        _, _, rest = match.group(2).partition("://")
        userinfo, at, _host = rest.rpartition("@")
        return f"{match.group(1)}http://{userinfo}{at}127.0.0.1:{provider.port}/{next(moved)}"

    text, count = re.subn(r"(?m)^(    url: )(https://\S+)", move, text)
    assert count == len(names), "one url: line per upstream, in order"
    path = dest / "proxy.yaml"
    path.write_text(text, "utf-8")
    return path


class SdkFailed(AssertionError):
    pass


async def run_sdk(script: str, tmp_path: Path, **env: str) -> Any:
    """Run `script` (Python that ends by printing one JSON value) in a fresh interpreter with
    only PATH, an empty HOME and `env`: no token anywhere, no saved credentials, no
    proxy variables. Returns the printed value; a non-zero exit raises SdkFailed with the
    SDK's own error text."""
    home = tmp_path / "sdk-home"
    home.mkdir(exist_ok=True)
    clean = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "HF_HOME": str(home / "hf"),  # no saved Hugging Face token
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PYTHONPATH": "",
        **env,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        textwrap.dedent(script),
        env=clean,
        cwd=str(home),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(90):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()  # never leave an SDK process behind
        await process.wait()
        raise
    if process.returncode != 0:
        raise SdkFailed(err.decode("utf-8", "replace")[-3000:])
    return json.loads(out.decode().strip().splitlines()[-1])
