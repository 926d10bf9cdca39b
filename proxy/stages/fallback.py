"""Fallback stage, the outermost: serves the last good response (or a static one) when the
outcome matches `fallback.on`, and stores good responses as they stream to the client.

A response is replaced only here, before any byte of it reached the client.
"""

from __future__ import annotations

import hashlib

from proxy.cache import FallbackStore
from proxy.config.model import FallbackPolicy, Route
from proxy.stages.call import Call, Result, Stage


class FallbackStage(Stage):
    __slots__ = ("policy", "route", "store", "url_base")

    def __init__(self, next_stage: Stage, route: Route, store: FallbackStore) -> None:
        super().__init__(next_stage)
        assert route.fallback is not None
        self.policy: FallbackPolicy = route.fallback
        self.route = route
        self.store = store
        self.url_base = route.upstream.url[
            : len(route.upstream.url) - len(route.upstream.base_path)
        ]

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
        key = self.store.request_key(
            route=self.route.name,
            method=call.method,
            url=self.url_base + call.path_qs,
            headers=call.request_headers,
            policy=policy,
            body_hash=body_hash,
            upstream_injects_credentials=self.route.upstream.injects_credentials,
        )
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
