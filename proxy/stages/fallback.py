"""Fallback stage, the outermost: serves the last good response (or a static one) when the
outcome matches `fallback.on`, and stores good responses as they stream to the client.

A response is replaced only here, before any byte of it reached the client.
"""

from __future__ import annotations

import hashlib

from proxy.cache import FallbackStore, RequestKey, StaleHit
from proxy.config.model import FallbackPolicy, Route
from proxy.stages.call import Call, Result, Stage


class FallbackStage(Stage):
    __slots__ = ("injects_credentials", "policy", "route", "store", "url_base")

    def __init__(self, next_stage: Stage, route: Route, store: FallbackStore) -> None:
        super().__init__(next_stage)
        assert route.fallback is not None
        self.policy: FallbackPolicy = route.fallback
        self.route = route
        self.store = store
        self.url_base = route.upstream.url[
            : len(route.upstream.url) - len(route.upstream.base_path)
        ]
        # Any target that adds credentials makes the store that principal's private cache.
        self.injects_credentials = any(t.injects_credentials for t in route.targets)

    def _key(self, call: Call, method: str, body_hash: str | None) -> RequestKey:
        return self.store.request_key(
            route=self.route.name,
            method=method,
            url=self.url_base + call.path_qs,
            headers=call.request_headers,
            policy=self.policy,
            body_hash=body_hash,
            upstream_injects_credentials=self.injects_credentials,
        )

    async def __call__(self, call: Call) -> Result:
        policy = self.policy
        assert self.next is not None
        if call.method not in policy.methods:
            return await self.next(call)
        body_hash = None
        if call.method not in ("GET", "HEAD"):
            if call.body.buffered is None:
                return await self.next(call)  # a streamed body cannot be keyed
            body_hash = hashlib.sha256(call.body.buffered).hexdigest()
        key = self._key(call, call.method, body_hash)
        result = await self.next(call)
        response = result.response
        if response is not None:
            if response.status not in policy.statuses:
                result.writer = self.store.begin(
                    key,
                    status=response.status,
                    headers=response.headers,
                    request_headers=call.request_headers,
                    policy=policy,
                )
                return result
        elif result.failure not in policy.conditions:
            return result
        hit = self.store.lookup(key, call.request_headers, policy)
        if hit is None and call.method == "HEAD":
            hit = self._get_answer_for_head(call)
        if hit is None and policy.static is None:
            return result  # the proxy's own error, or the upstream's failing answer
        result.discard()
        replaced = Result(failure=result.failure)
        replaced.attempt = result.attempt  # what failed, for X-Resilience-Reason and Cache-Status
        if hit is not None:
            replaced.stale = hit
        else:
            replaced.static = policy.static
        return replaced

    def _get_answer_for_head(self, call: Call) -> StaleHit | None:
        """A HEAD may be answered with the headers a GET would get (RFC 9110 §9.3.2): the
        stored GET answer of the same key (same partition, Vary and URL), without its body."""
        if "GET" not in self.policy.methods:
            return None
        key = self._key(call, "GET", None)
        hit = self.store.lookup(key, call.request_headers, self.policy)
        return hit.for_head() if hit is not None else None
