"""Fallback stage, the outermost: serves the last good response (or a static one) when the
outcome matches `fallback.on`, and stores good responses as they stream to the client.

A response is replaced only here, before any byte of it reached the client.
"""

from __future__ import annotations

import hashlib

from proxy.cache import FallbackStore, StaleHit
from proxy.config.model import FallbackPolicy, Route
from proxy.stages.call import Call, Result, Stage


class FallbackStage(Stage):
    __slots__ = ("keys", "methods", "policy", "statuses", "store")

    def __init__(self, next_stage: Stage, route: Route, store: FallbackStore) -> None:
        super().__init__(next_stage)
        assert route.fallback is not None
        self.policy: FallbackPolicy = route.fallback
        self.store = store
        # Per route, once: the key parts (URL base, partitioning headers, shared or private
        # cache: any target that adds credentials makes the store that principal's private
        # cache) and the policy's sets, read on every request.
        upstream = route.upstream
        self.keys = store.keys_for(
            route=route.name,
            url_base=upstream.url[: len(upstream.url) - len(upstream.base_path)],
            policy=self.policy,
            upstream_injects_credentials=any(t.injects_credentials for t in route.targets),
        )
        self.methods = self.policy.methods
        self.statuses = self.policy.statuses.statuses

    async def __call__(self, call: Call) -> Result:
        assert self.next is not None
        method = call.method
        if method not in self.methods:
            return await self.next(call)
        body_hash = None
        if method != "GET" and method != "HEAD":
            if call.body.buffered is None:
                return await self.next(call)  # a streamed body cannot be keyed
            body_hash = hashlib.sha256(call.body.buffered).hexdigest()
        key = self.keys.key(method, call.path_qs, call.request_headers, body_hash)
        result = await self.next(call)
        policy = self.policy
        response = result.response
        if response is not None:
            if response.status not in self.statuses:
                result.writer = self.store.begin(
                    key,
                    status=response.status,
                    fields=response.raw,
                    request_headers=call.request_headers,
                    policy=policy,
                )
                return result
        elif result.failure not in policy.conditions:
            return result
        hit = self.store.lookup(key, call.request_headers, policy)
        if hit is None and method == "HEAD":
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
        key = self.keys.key("GET", call.path_qs, call.request_headers, None)
        hit = self.store.lookup(key, call.request_headers, self.policy)
        return hit.for_head() if hit is not None else None
