"""An httpx.Auth that calls an upstream API with a delegated grant."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from ._context import AccessContext
    from ._exchange import Exchanger


class UpstreamAuth(httpx.Auth):
    """Sends ``Authorization: Bearer <grant>``; on a 401 it forgets that grant and retries once
    with a fresh one (the upstream API may have revoked it before its expiry)."""

    def __init__(
        self, context: AccessContext, exchanger: Exchanger, resource: str, scope: str | None
    ) -> None:
        self._context = context
        self._exchanger = exchanger
        self._resource = resource
        self._scope = scope

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        raise RuntimeError("delegated grants are obtained asynchronously: use httpx.AsyncClient")
        yield request  # pragma: no cover - makes this a generator, as httpx expects

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        grant = await self._context.exchange(self._resource, scope=self._scope)
        request.headers["Authorization"] = f"Bearer {grant.access_token}"
        response = yield request
        if response.status_code == 401:
            self._exchanger.forget(self._context, self._resource, self._scope, grant)
            grant = await self._context.exchange(self._resource, scope=self._scope)
            request.headers["Authorization"] = f"Bearer {grant.access_token}"
            yield request

    def __repr__(self) -> str:
        return f"UpstreamAuth(resource={self._resource!r})"
