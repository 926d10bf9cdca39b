"""A scripted provider that meters requests like GitHub, Cloudinary, Hugging Face, an IETF
RateLimit API or a generic X-RateLimit API: it counts a quota down per window, sends that
provider's headers on every answer, and refuses like the provider once it is spent
(GitHub 403, Cloudinary 420, Hugging Face and IETF 429, generic 429 with Retry-After).

It runs on real wall time; the window is short so tests finish quickly. Resets given as
epoch seconds or HTTP-dates have one-second resolution, so windows end on whole seconds.
"""

from __future__ import annotations

import json
import math
import time
from email.utils import formatdate

from tests.support.upstream import Reply, Seen


class MeteredProvider:
    def __init__(self, kind: str, limit: int, window: float = 1.5) -> None:
        self.kind = kind
        self.limit = limit
        self.window = window
        self.remaining = limit
        self.reset_at = self._next_reset(time.time())
        self.served = 0  # answered within the quota
        self.refused = 0  # answered with the provider's refusal: the proxy should prevent these
        self.served_at: list[tuple[float, str]] = []

    def _next_reset(self, now: float) -> float:
        # whole seconds, at least `window` ahead: epoch and HTTP-date resets are exact then
        return float(math.ceil(now + self.window))

    def __call__(self, seen: Seen) -> Reply:
        now = time.time()
        if now >= self.reset_at:
            self.remaining = self.limit
            self.reset_at = self._next_reset(now)
        if self.remaining <= 0:
            self.refused += 1
            return self._refusal(now)
        self.remaining -= 1
        self.served += 1
        self.served_at.append((now, seen.target))
        return Reply(200, self._headers(now), body=b'{"ok": true}')

    def _headers(self, now: float) -> dict[str, str]:
        left = max(0.0, self.reset_at - now)
        if self.kind == "github":
            return {
                "x-ratelimit-limit": str(self.limit),
                "x-ratelimit-remaining": str(self.remaining),
                "x-ratelimit-used": str(self.limit - self.remaining),
                "x-ratelimit-reset": str(int(self.reset_at)),
                "x-ratelimit-resource": "core",
            }
        if self.kind == "cloudinary":
            return {
                "X-FeatureRateLimit-Limit": str(self.limit),
                "X-FeatureRateLimit-Remaining": str(self.remaining),
                "X-FeatureRateLimit-Reset": formatdate(self.reset_at, usegmt=True),
            }
        if self.kind in ("huggingface", "ietf"):
            return {
                "RateLimit": f'"api";r={self.remaining};t={math.ceil(left)}',
                "RateLimit-Policy": f'"fixed window";"api";q={self.limit};w={math.ceil(self.window)}',
            }
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(int(self.reset_at)),
        }

    def _refusal(self, now: float) -> Reply:
        headers = self._headers(now)
        if self.kind == "github":
            body = {"message": "API rate limit exceeded for user ID 1.", "documentation_url": "https://docs.github.com/rest"}
            return Reply(403, headers, json.dumps(body).encode())
        if self.kind == "cloudinary":
            return Reply(420, headers, b'{"error": {"message": "Rate Limit Exceeded"}}')
        if self.kind == "generic":
            headers["Retry-After"] = str(math.ceil(self.reset_at - now))
        return Reply(429, headers, b'{"error": "rate limited"}')
