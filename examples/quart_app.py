"""A Quart view that calls an upstream calendar API as the caller, with a delegated token.

Quart has no ``request.state``: the caller's access context comes from
``current_access_context()``. ``@grant(calendar)`` exchanges the caller's token (RFC 8693) for
a token for the calendar API before the view runs; a failed exchange is raised by
``access(...)`` and answered here by an error handler (403, or 503 to retry later).

Run the self-contained demo (a local authorization server, a fake calendar API and this app,
all on 127.0.0.1; needs ``pip install asgi-delegation[serve] quart``)::

    python examples/quart_app.py
"""

import secrets
from typing import Any

import anyio
import httpx
from quart import Quart, request

from asgi_delegation import (
    DelegationMiddleware,
    ExchangeError,
    ExchangeUnavailable,
    current_access_context,
    grant,
)
from asgi_delegation.testing import LocalAuthorizationServer, loopback_socket, serve

CLIENT_ID = "agenda-app"  # this app's client at the authorization server


def create_app(
    *, issuer: str, resource: str, client_secret: str, calendar: str
) -> DelegationMiddleware:
    # The calendar API's base URL doubles as its resource identifier: the token is exchanged
    # for exactly the API it is sent to. The demo passes the loopback origin of its fake API.
    app = Quart(__name__)

    @app.get("/agenda")
    @grant(calendar)  # exchanged before the view runs
    async def agenda() -> dict[str, Any]:
        # The grant obtained by @grant; if that exchange failed, its ExchangeError is raised.
        token = current_access_context().access(calendar).access_token
        async with httpx.AsyncClient(base_url=calendar) as http:
            answer = await http.get("/events", headers={"Authorization": f"Bearer {token}"})
        answer.raise_for_status()
        calendar_page = answer.json()
        return {"owner": calendar_page["owner"], "events": calendar_page["events"]}

    @app.errorhandler(ExchangeError)
    async def exchange_failed(exc: ExchangeError) -> tuple[dict[str, Any], int]:
        # E.g. access_denied: the user has not consented to this app using their calendar.
        status = 503 if isinstance(exc, ExchangeUnavailable) else 403
        return {"error": exc.error, "resource": exc.resource}, status

    # Every request needs a valid bearer token for `resource`; others get 401 from here.
    return DelegationMiddleware(
        app,
        issuer=issuer,
        resource=resource,
        client_id=CLIENT_ID,
        client_secret=client_secret,
    )


# -- demo harness: everything below stands in for the real world --------------------------------


def fake_calendar(auth: LocalAuthorizationServer, origin: str) -> Quart:
    """``GET /events`` answers the events of whoever the token names, if the token is for us."""
    fake = Quart("fake_calendar")

    @fake.get("/events")
    async def events() -> tuple[dict[str, Any], int]:
        claims = auth.verify(request.headers.get("Authorization", "").removeprefix("Bearer "))
        if claims is None or claims.get("aud") != origin:
            return {"error": "invalid_token"}, 401
        return {"owner": claims["sub"], "events": ["10:00 standup"]}, 200

    return fake


async def demo() -> None:
    auth = LocalAuthorizationServer()
    secret = secrets.token_urlsafe(16)
    auth.register_client(CLIENT_ID, secret=secret)
    async with auth.serve() as issuer:
        with loopback_socket() as (cal_sock, calendar), loopback_socket() as (app_sock, origin):
            auth.unconsented.add(("bob", calendar))  # bob never let the app see his calendar
            app = create_app(
                issuer=issuer, resource=origin, client_secret=secret, calendar=calendar
            )
            async with (
                serve(fake_calendar(auth, calendar), cal_sock),
                serve(app, app_sock),
                httpx.AsyncClient(base_url=origin) as client,
            ):
                for user, expected in (("alice", 200), ("bob", 403)):
                    token = auth.mint(user, audience=origin)  # the user's token for this app
                    answer = await client.get(
                        "/agenda", headers={"Authorization": f"Bearer {token}"}
                    )
                    print(f"{user}: {answer.status_code} {answer.json()}")
                    if answer.status_code != expected:
                        raise SystemExit(f"expected {expected}")


if __name__ == "__main__":
    anyio.run(demo)
