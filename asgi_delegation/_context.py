"""The per-request access context the middleware hands to the application."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from functools import partial
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import anyio

from ._errors import ExchangeError
from ._exchange import Exchanger, check_subject, normalize_scope
from ._grant import Grant
from ._tokens import ValidToken
from ._upstream_auth import UpstreamAuth

if TYPE_CHECKING:
    import httpx


class AccessContext:
    """Who is calling, as the validated bearer token says, and the way to act as them upstream.

    Found at ``scope["state"]["access_context"]`` (Starlette: ``request.state.access_context``).
    Its ``repr`` shows the subject and scopes, never the token.
    """

    __slots__ = ("_errors", "_exchanger", "_grants", "_token", "_valid", "token_digest")

    def __init__(
        self,
        valid: ValidToken,
        token: bytes,
        token_digest: bytes,
        exchanger: Exchanger[AccessContext],
    ) -> None:
        self._valid = valid
        self._token = token  # the subject token for exchanges; never shown
        self.token_digest = token_digest  # SHA-256 of the token: cache keys
        self._exchanger = exchanger
        self._grants: dict[str, Grant] | None = None  # allocated on first use: most requests
        self._errors: dict[str, ExchangeError] | None = None  # never exchange anything

    @property
    def subject(self) -> str:
        """The token's ``sub`` claim."""
        return self._valid.subject

    @property
    def claims(self) -> Mapping[str, Any]:
        """Every claim of the validated token, read-only (JSON arrays appear as tuples)."""
        return self._valid.claims

    @property
    def issuer(self) -> str:
        """The configured issuer that vouched for the caller (its token's ``iss``)."""
        return self._valid.issuer

    @property
    def client_id(self) -> str | None:
        """The client the token was issued to: its ``client_id`` (RFC 9068) or ``azp`` claim."""
        return self._valid.client_id

    @property
    def scopes(self) -> frozenset[str]:
        """The scopes granted by the token (``scope`` string and/or ``scp`` list)."""
        return self._valid.scopes

    @property
    def usable_until(self) -> float:
        """Unix time until which the caller's token is accepted: its ``exp`` plus the leeway.
        No grant is handed out for it after that, not even one obtained earlier."""
        return self._valid.usable_until

    def has_scope(self, scope: str) -> bool:
        """Whether the token grants ``scope``, itself or through a broader scope that implies
        it (the middleware's ``scope_hierarchy``)."""
        return scope in self._valid.granted

    @property
    def subject_token(self) -> str:
        """The caller's bearer token, for exchanges. Never log it."""
        return self._token.decode("ascii")

    async def exchange(self, resource: str, *, scope: str | None = None) -> Grant:
        """A grant for ``resource`` acting as the caller (RFC 8693), from the cache when it can.

        Raises an :class:`ExchangeError` subclass, also recorded for :meth:`get_errors`.
        """
        try:
            grant = await self._exchanger.exchange(self, resource, normalize_scope(scope))
        except ExchangeError as exc:
            if self._errors is None:
                self._errors = {}
            self._errors[resource] = exc
            raise
        if self._grants is None:
            self._grants = {}
        self._grants[resource] = grant
        if self._errors:
            self._errors.pop(resource, None)
        return grant

    async def prefetch(self, resources: Iterable[str], *, scope: str | None = None) -> None:
        """Exchange for every resource concurrently; failures are recorded, not raised."""

        async def one(resource: str) -> None:
            with contextlib.suppress(ExchangeError):  # recorded for access() and get_errors()
                await self.exchange(resource, scope=scope)

        async with anyio.create_task_group() as tasks:
            for resource in dict.fromkeys(resources):
                tasks.start_soon(one, resource)

    def access(self, resource: str) -> Grant:
        """The grant obtained for ``resource`` earlier in this request (by ``@grant``,
        :meth:`prefetch` or :meth:`exchange`); raises its :class:`ExchangeError` if it failed,
        and :class:`ExchangeDenied` once the caller's token has expired."""
        if self._errors and resource in self._errors:
            raise self._errors[resource]
        if self._grants and resource in self._grants:
            check_subject(self, resource)
            return self._grants[resource]
        raise LookupError(
            f"no grant for {resource} was requested in this request: "
            "use @grant(...) or await exchange(...) first"
        )

    def has_errors(self) -> bool:
        """Whether an exchange in this request failed (and was not retried successfully)."""
        return bool(self._errors)

    def get_errors(self) -> Mapping[str, ExchangeError]:
        """The failed exchanges of this request, by resource."""
        return MappingProxyType(self._errors or {})

    def auth(self, resource: str, *, scope: str | None = None) -> httpx.Auth:
        """An ``httpx.Auth`` sending a grant for ``resource``; on a 401 from the upstream API it
        drops that grant (here and in the shared cache) and exchanges once more."""
        normalized = normalize_scope(scope)
        return UpstreamAuth(
            resource,
            partial(self.exchange, resource, scope=normalized),
            partial(self._exchanger.forget, self, resource, normalized),
        )

    def __repr__(self) -> str:
        return f"AccessContext(subject={self.subject!r}, scopes={sorted(self.scopes)!r})"
