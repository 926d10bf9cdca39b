"""huggingface_hub through the sidecar, with no token in the agent:

- the Hub API with `HF_ENDPOINT=http://127.0.0.1:8080/huggingface-hub` (read once, when
  huggingface_hub is imported; it has no HF_BASE_URL setting);
- inference with `InferenceClient(base_url="http://127.0.0.1:8080/huggingface/models/<id>")`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.providers import HF_TOKEN, FakeProvider, SdkFailed, Sidecar, run_sdk

MODEL_INFO = """
    import json
    from huggingface_hub import model_info
    info = model_info("acme/agent-7b")
    print(json.dumps({"id": info.id, "private": info.private, "sha": info.sha}))
"""

CHAT = """
    import json
    from huggingface_hub import InferenceClient
    client = InferenceClient(base_url="{BASE}/models/acme/agent-7b")
    out = client.chat_completion(messages=[{"role": "user", "content": "ping"}], max_tokens=5)
    print(json.dumps(out.choices[0].message.content))
"""


async def test_model_info_via_hf_endpoint_carries_the_injected_token(
    provider: FakeProvider, sidecar: Sidecar, tmp_path: Path
) -> None:
    result = await run_sdk(MODEL_INFO, tmp_path, HF_ENDPOINT=f"{sidecar.url}/huggingface-hub")
    assert result == {
        "id": "acme/agent-7b",
        "private": True,
        "sha": "0123456789abcdef0123456789abcdef01234567",
    }
    [seen] = provider.requests_to("/huggingface-hub/")
    assert seen.path == "/huggingface-hub/api/models/acme/agent-7b"
    assert seen.headers["authorization"] == f"Bearer {HF_TOKEN}"
    assert seen.headers["via"] == "1.1 resilience-proxy"


async def test_hf_base_url_is_not_read_by_huggingface_hub(
    provider: FakeProvider, sidecar: Sidecar, tmp_path: Path
) -> None:
    # The old docs' setting: huggingface_hub ignores it and calls https://huggingface.co.
    # HF_HUB_OFFLINE makes it fail at once instead of reaching the internet, and shows where
    # it was going.
    with pytest.raises(SdkFailed, match=r"Cannot reach https://huggingface\.co/api/models/acme"):
        await run_sdk(
            MODEL_INFO,
            tmp_path,
            HF_BASE_URL=f"{sidecar.url}/huggingface-hub",
            HF_HUB_OFFLINE="1",
        )
    assert provider.seen == []


async def test_without_the_proxy_the_hub_refuses_the_sdk(
    provider: FakeProvider, tmp_path: Path
) -> None:
    with pytest.raises(SdkFailed, match="401"):
        await run_sdk(MODEL_INFO, tmp_path, HF_ENDPOINT=f"{provider.url}/huggingface-hub")
    [seen] = provider.seen
    assert "authorization" not in seen.headers


async def test_inference_client_base_url_carries_the_injected_token(
    provider: FakeProvider, sidecar: Sidecar, tmp_path: Path
) -> None:
    answer = await run_sdk(CHAT.replace("{BASE}", f"{sidecar.url}/huggingface"), tmp_path)
    assert answer == "echo: ping"
    [seen] = provider.requests_to("/huggingface/")
    assert (seen.method, seen.path) == (
        "POST",
        "/huggingface/models/acme/agent-7b/v1/chat/completions",
    )
    assert seen.headers["authorization"] == f"Bearer {HF_TOKEN}"
    assert seen.headers["via"] == "1.1 resilience-proxy"


async def test_without_the_proxy_inference_is_refused(
    provider: FakeProvider, tmp_path: Path
) -> None:
    with pytest.raises(SdkFailed, match="401"):
        await run_sdk(CHAT.replace("{BASE}", f"{provider.url}/huggingface"), tmp_path)
    [seen] = provider.seen
    assert "authorization" not in seen.headers
