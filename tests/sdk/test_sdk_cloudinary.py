"""cloudinary (Python SDK) through the sidecar.

The SDK reads `CLOUDINARY_URL` (its query parameters become settings, so
`?upload_prefix=http://127.0.0.1:8080/cloudinary` moves every API call onto the sidecar), or,
when `CLOUDINARY_CLOUD_NAME` is set, every `CLOUDINARY_*` variable (so
`CLOUDINARY_UPLOAD_PREFIX` does the same). It refuses to call without a key and a secret, so
the agent holds dummy ones; the proxy replaces the Admin API's Basic credentials with the real
ones (URL userinfo in config/proxy.yaml). Uploads are signed by the SDK with its own secret:
a signed upload needs the real secret in the agent, an unsigned one (an upload preset) none.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.providers import (
    CLOUD,
    CLOUDINARY_KEY,
    CLOUDINARY_SECRET,
    DUMMY_KEY,
    DUMMY_SECRET,
    FakeProvider,
    SdkFailed,
    Sidecar,
    basic_auth,
    run_sdk,
)

RESOURCES = """
    import json
    import cloudinary, cloudinary.api
    result = cloudinary.api.resources(max_results=10)
    print(json.dumps([r["public_id"] for r in result["resources"]]))
"""

UPLOAD = """
    import json, pathlib
    import cloudinary, cloudinary.uploader
    path = pathlib.Path("pixel.png")
    path.write_bytes(b"\\x89PNG\\r\\n\\x1a\\n" + b"\\x00" * 32)
    result = cloudinary.uploader.upload(str(path), public_id="agent/pixel")
    print(json.dumps(result["public_id"]))
"""

UNSIGNED_UPLOAD = """
    import json, pathlib
    import cloudinary, cloudinary.uploader
    path = pathlib.Path("pixel.png")
    path.write_bytes(b"\\x89PNG\\r\\n\\x1a\\n" + b"\\x00" * 32)
    result = cloudinary.uploader.unsigned_upload(str(path), "agent-unsigned", public_id="agent/u")
    print(json.dumps(result["public_id"]))
"""


def url_env(prefix: str, key: str = DUMMY_KEY, secret: str = DUMMY_SECRET) -> dict[str, str]:
    return {"CLOUDINARY_URL": f"cloudinary://{key}:{secret}@{CLOUD}?upload_prefix={prefix}"}


def split_env(prefix: str) -> dict[str, str]:
    return {
        "CLOUDINARY_CLOUD_NAME": CLOUD,
        "CLOUDINARY_API_KEY": DUMMY_KEY,
        "CLOUDINARY_API_SECRET": DUMMY_SECRET,
        "CLOUDINARY_UPLOAD_PREFIX": prefix,
    }


@pytest.mark.parametrize("form", [url_env, split_env], ids=["CLOUDINARY_URL", "CLOUDINARY_*"])
async def test_admin_api_gets_the_credentials_the_proxy_injects(
    provider: FakeProvider, sidecar: Sidecar, tmp_path: Path, form: Callable[[str], dict[str, str]]
) -> None:
    env = form(f"{sidecar.url}/cloudinary")
    assert CLOUDINARY_SECRET not in str(env)
    assert await run_sdk(RESOURCES, tmp_path, **env) == ["samples/kitten"]
    [seen] = provider.requests_to("/cloudinary/")
    assert seen.path == f"/cloudinary/v1_1/{CLOUD}/resources/image"
    assert seen.headers["authorization"] == basic_auth(CLOUDINARY_KEY, CLOUDINARY_SECRET)
    assert seen.headers["via"] == "1.1 resilience-proxy"


async def test_without_the_proxy_the_dummy_credentials_are_refused(
    provider: FakeProvider, tmp_path: Path
) -> None:
    with pytest.raises(SdkFailed, match="Invalid credentials"):
        await run_sdk(RESOURCES, tmp_path, **url_env(f"{provider.url}/cloudinary"))
    [seen] = provider.seen
    assert seen.headers["authorization"] == basic_auth(DUMMY_KEY, DUMMY_SECRET)


async def test_a_signed_upload_needs_the_real_secret_in_the_agent(
    provider: FakeProvider, sidecar: Sidecar, tmp_path: Path
) -> None:
    prefix = f"{sidecar.url}/cloudinary"
    # With a dummy secret the SDK signs with the wrong one: the proxy cannot fix that.
    with pytest.raises(SdkFailed, match="Invalid Signature"):
        await run_sdk(UPLOAD, tmp_path, **url_env(prefix, CLOUDINARY_KEY, DUMMY_SECRET))
    # With the real key and secret in the agent the upload goes through the sidecar.
    env = url_env(prefix, CLOUDINARY_KEY, CLOUDINARY_SECRET)
    assert await run_sdk(UPLOAD, tmp_path, **env) == "agent/pixel"
    uploads = provider.requests_to(f"/cloudinary/v1_1/{CLOUD}/image/upload")
    assert len(uploads) == 2
    assert uploads[1].form["public_id"] == "agent/pixel" and uploads[1].form["file"] == "<file>"
    assert all(u.headers["via"] == "1.1 resilience-proxy" for u in uploads)


async def test_an_unsigned_upload_needs_no_secret(
    provider: FakeProvider, sidecar: Sidecar, tmp_path: Path
) -> None:
    env = split_env(f"{sidecar.url}/cloudinary")
    assert await run_sdk(UNSIGNED_UPLOAD, tmp_path, **env) == "agent/u"
    [upload] = provider.requests_to("/cloudinary/")
    assert "signature" not in upload.form and upload.form["upload_preset"] == "agent-unsigned"
    assert upload.headers["via"] == "1.1 resilience-proxy"
