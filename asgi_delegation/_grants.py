"""Where grants are kept between requests: the in-process cache, and a shared one behind it.

The exchange path reaches grants only through :class:`Grants`. A lookup is in-process only (a
dictionary read, never a network round trip); a miss asks the shared cache, when there is one,
which asks the authorization server at most once across every process that shares it; what it
returns fills the in-process cache. Lifetimes cross processes as Unix times and are kept here
as monotonic ones.

A subject's grants can be invalidated: they are dropped here at once and, through the shared
cache, in every other process. A lookup or exchange that was under way when any invalidation
happened fills no cache, since it may have read what the invalidation meant to remove; the
``epoch`` that every invalidation moves lets the exchange path start new flights after it.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from . import _clock
from ._grant import Grant

_EXPIRY_SKEW = 5.0  # a grant this close to expiring is no longer handed out
_REFRESH_RETRY_BASE = 1.0  # the first wait before retrying a failed refresh ahead of expiry


class Caller(Protocol):
    """The caller a grant is obtained for (an :class:`AccessContext`)."""

    token_digest: bytes

    @property
    def subject(self) -> str: ...
    @property
    def client_id(self) -> str | None: ...
    @property
    def claims(self) -> Mapping[str, Any]: ...
    @property
    def usable_until(self) -> float: ...
    @property
    def subject_token(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Issued:
    """A grant, the Unix time its issued lifetime ends, and that lifetime in seconds."""

    grant: Grant
    ends_at: float
    lifetime: float


@dataclass(frozen=True, slots=True)
class Item:
    """One grant's cache key as a shared cache sees it. ``key`` encodes everything that decides
    the grant (issuer, client, subject token digest, resource, scope): a shared cache must only
    ever show it through a keyed hash."""

    issuer: str
    subject: str
    key: bytes
    subject_ends_at: float  # the subject token's exp, without leeway


Fetch = Callable[[], Awaitable[Issued]]
#: What the caller found before its flight: "none" (it did not look), "missed" (the shared
#: cache has nothing), "skip" (it failed, or is not to be used now: exchange directly).
Look = Literal["none", "missed", "skip"]


class Listener(Protocol):
    """What a shared cache tells an in-process cache about other processes' doings."""

    issuer: str

    def invalidated(self, matches: Callable[[str], bool]) -> None:
        """Drop the grants of every subject for which ``matches(subject)``."""

    def flush(self) -> None:
        """Drop everything: invalidations may have been missed."""


@runtime_checkable
class SharedCache(Protocol):
    def attach(self, listener: Listener) -> None: ...

    def available(self) -> bool:
        """Whether to use it for the next lookup (False while its circuit breaker is open)."""

    async def look(
        self, item: Item, accept: Callable[[Issued], bool]
    ) -> tuple[Issued | None, bool]:
        """The stored grant ``accept`` takes, or None; and whether the cache answered."""

    async def obtain(
        self, item: Item, fetch: Fetch, accept: Callable[[Issued], bool], *, looked: bool
    ) -> Issued:
        """A grant ``accept`` takes, from the shared cache or from ``fetch()``, which runs at
        most once across processes at a time; what ``fetch()`` returns is stored. Asked only
        after :meth:`available` said yes; ``looked``: :meth:`look` has just found nothing."""

    async def discard(self, item: Item, grant: Grant) -> None:
        """Remove ``grant`` if it is still the one stored for ``item``."""

    async def invalidate(self, issuers: Sequence[str], subject: str) -> None: ...

    def stats(self) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...


class Entry:
    __slots__ = ("backoff", "grant", "refresh_at", "refreshing", "stale_at", "subject")

    def __init__(self, grant: Grant, refresh_at: float, stale_at: float, subject: str) -> None:
        self.grant = grant
        self.refresh_at = refresh_at
        self.stale_at = stale_at
        self.subject = subject
        self.refreshing = False
        self.backoff = _REFRESH_RETRY_BASE  # the wait before a retry, should a refresh fail


class Grants:
    """The grants of one issuer's exchanger, by (subject token digest, resource, scope)."""

    def __init__(
        self,
        *,
        issuer: str,
        identity: Sequence[str | None],
        size: int,
        refresh_margin: float,
        shared: SharedCache | None,
    ) -> None:
        self.issuer = issuer
        self._identity = list(identity)  # what else decides a grant: the client, the target
        self._entries: OrderedDict[Hashable, Entry] = OrderedDict()
        self._size = size
        self._refresh_margin = refresh_margin
        self._shared = shared
        # Subjects whose invalidation did not reach the shared cache: their grants there may
        # be the ones it meant to retire. Bounded: each is an administrator's call.
        self._unshared: set[str] = set()
        self.epoch = 0
        if shared is not None:
            shared.attach(self)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, now: float) -> Entry | None:
        """The entry for ``key`` if it may still be handed out at monotonic time ``now``."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now < entry.stale_at:
            self._entries.move_to_end(key)
            return entry
        del self._entries[key]
        return None

    def peek(self, key: Hashable) -> Entry | None:
        return self._entries.get(key)

    def sharing(self, caller: Caller) -> bool:
        """Whether a miss here for ``caller`` can look in the shared cache now."""
        return (
            self._shared is not None
            and (not self._unshared or caller.subject not in self._unshared)
            and self._shared.available()
        )

    def share(self, subject: str, shared: bool) -> None:
        """Use the shared cache for ``subject`` again, or (``shared`` False) not until then."""
        if shared:
            self._unshared.discard(subject)
        elif len(self._unshared) < 100_000:
            self._unshared.add(subject)

    async def from_shared(self, key: tuple[bytes, str, str | None], caller: Caller) -> Grant | Look:
        """The shared cache's grant for ``key``, cached here; else what the look found: one
        look, no exchange, done by the caller itself rather than by a shared flight, so that a
        hit costs one round trip."""
        assert self._shared is not None
        epoch = self.epoch
        usable_until = caller.usable_until
        now = _clock.now()
        issued, answered = await self._shared.look(
            self._item(key, caller), lambda issued: self._stale_at(issued, usable_until) > now
        )
        if issued is None:
            return "missed" if answered else "skip"
        if epoch == self.epoch:
            self._put(key, caller.subject, usable_until, issued)
        return issued.grant

    async def obtain(
        self,
        key: tuple[bytes, str, str | None],
        caller: Caller,
        fetch: Fetch,
        *,
        refresh: bool,
        look: Look = "none",
    ) -> Grant:
        """A grant from the shared cache or ``fetch()``, cached here. For a ``refresh``, only a
        shared grant not itself due for refresh is taken. ``look``: what :meth:`from_shared`
        has just found (after "skip", straight to ``fetch()``)."""
        epoch = self.epoch
        usable_until = caller.usable_until
        shared = self._shared
        # Build no Item when the shared cache is not used.
        if look == "skip" or not self.sharing(caller):
            issued = await fetch()
        else:
            assert shared is not None
            now = _clock.now()
            due = self._refresh_at if refresh else self._stale_at

            def accept(issued: Issued) -> bool:
                return due(issued, usable_until) > now

            item = self._item(key, caller)
            issued = await shared.obtain(item, fetch, accept, looked=look == "missed")
        if epoch == self.epoch:
            self._put(key, caller.subject, usable_until, issued)
        return issued.grant

    async def discard(
        self, key: tuple[bytes, str, str | None], caller: Caller, grant: Grant
    ) -> None:
        """Drop ``grant`` (an upstream API refused it) here and in the shared cache; a newer
        grant stays."""
        entry = self._entries.get(key)
        if entry is not None and entry.grant is grant:
            del self._entries[key]
        if self._shared is not None and self.sharing(caller):
            await self._shared.discard(self._item(key, caller), grant)

    def invalidated(self, matches: Callable[[str], bool]) -> None:
        self.epoch += 1
        verdicts: dict[str, bool] = {}  # one verdict per subject: matching may cost a hash
        for key, entry in list(self._entries.items()):
            subject = entry.subject
            verdict = verdicts.get(subject)
            if verdict is None:
                verdict = verdicts[subject] = matches(subject)
            if verdict:
                del self._entries[key]

    def flush(self) -> None:
        self.epoch += 1
        self._entries.clear()

    def _put(self, key: Hashable, subject: str, usable_until: float, issued: Issued) -> None:
        wall, mono = _clock.now(), _clock.monotonic()
        stale_at = self._stale_at(issued, usable_until)
        if stale_at <= wall:
            return
        refresh_at = self._refresh_at(issued, usable_until)
        self._entries[key] = Entry(
            issued.grant, mono + refresh_at - wall, mono + stale_at - wall, subject
        )
        self._entries.move_to_end(key)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)

    @staticmethod
    def _stale_at(issued: Issued, usable_until: float) -> float:
        """Until when the grant is handed out: shortly before it expires, and never once the
        subject token has expired."""
        return min(issued.ends_at - _EXPIRY_SKEW, usable_until)

    def _refresh_at(self, issued: Issued, usable_until: float) -> float:
        if issued.ends_at - _EXPIRY_SKEW >= usable_until:
            return math.inf  # the subject token ends first: a refreshed grant would end with it
        return issued.ends_at - min(self._refresh_margin, issued.lifetime / 2)

    def _item(self, key: tuple[bytes, str, str | None], caller: Caller) -> Item:
        digest, resource, scope = key
        exp = caller.claims.get("exp")
        ends = caller.usable_until
        if isinstance(exp, int | float) and not isinstance(exp, bool):
            ends = min(ends, float(exp))
        encoded = json.dumps([self.issuer, *self._identity, digest.hex(), resource, scope])
        return Item(self.issuer, caller.subject, encoded.encode(), ends)
