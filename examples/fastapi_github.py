"""A FastAPI endpoint that calls GitHub as the signed-in user, with a delegated token.

The caller sends a bearer token for *this* API. ``DelegationMiddleware`` validates it, and
``Depends(delegated(...))`` exchanges it (RFC 8693) for a token for the GitHub API that still
names the user: the endpoint never sees the user's GitHub credentials, and GitHub never sees the
token meant for this API.

Run the self-contained demo (a local authorization server, a fake GitHub API and this app, all
on 127.0.0.1; needs ``pip install asgi-delegation[serve] fastapi``)::

    python examples/fastapi_github.py

In your own code, build the app with ``create_app(...)`` (your authorization server's issuer,
this API's resource identifier, its client credentials) and serve it with any ASGI server.
"""

import secrets
from typing import Annotated, Any

import anyio
import httpx
from fastapi import Depends, FastAPI, Header, HTTPException

from asgi_delegation import DelegationMiddleware, Grant
from asgi_delegation.fastapi import delegated
from asgi_delegation.testing import LocalAuthorizationServer, loopback_socket, serve

CLIENT_ID = "github-helper"  # this API's client at the authorization server


def create_app(
    *, issuer: str, resource: str, client_secret: str, github: str = "https://api.github.com"
) -> DelegationMiddleware:
    # GitHub's base URL doubles as its resource identifier: the token is exchanged for exactly
    # the API it is sent to. The demo passes the loopback origin of its fake GitHub instead.
    # (No `from __future__ import annotations` in this file: FastAPI evaluates the endpoint's
    # annotations, and `github` in `Depends(delegated(github))` is a local of this function.)
    api = FastAPI(title="GitHub helper")

    @api.get("/github/login")
    async def github_login(grant: Annotated[Grant, Depends(delegated(github))]) -> dict[str, str]:
        """The caller's GitHub login, asked of GitHub with the delegated token."""
        async with httpx.AsyncClient(base_url=github) as http:
            answer = await http.get(
                "/user", headers={"Authorization": f"Bearer {grant.access_token}"}
            )
        if answer.status_code != 200:
            raise HTTPException(502, detail=f"GitHub answered {answer.status_code}")
        return {"login": answer.json()["login"]}

    # Every request needs a valid bearer token for `resource`; others get 401 from here.
    return DelegationMiddleware(
        api, issuer=issuer, resource=resource, client_id=CLIENT_ID, client_secret=client_secret
    )


# -- demo harness: everything below stands in for the real world --------------------------------


def fake_github(auth: LocalAuthorizationServer, origin: str) -> FastAPI:
    """``GET /user`` answers the login of whoever the token names, if the token is for us."""
    fake = FastAPI()

    @fake.get("/user")
    async def user(authorization: Annotated[str, Header()] = "") -> dict[str, Any]:
        claims = auth.verify(authorization.removeprefix("Bearer "))
        if claims is None or claims.get("aud") != origin:
            raise HTTPException(401, detail="not a token for this API")
        return {"login": claims["sub"]}

    return fake


async def demo() -> None:
    auth = LocalAuthorizationServer()
    secret = secrets.token_urlsafe(16)
    auth.register_client(CLIENT_ID, secret=secret)
    async with auth.serve() as issuer:
        with loopback_socket() as (github_sock, github), loopback_socket() as (app_sock, origin):
            app = create_app(issuer=issuer, resource=origin, client_secret=secret, github=github)
            async with (
                serve(fake_github(auth, github), github_sock),
                serve(app, app_sock),
                httpx.AsyncClient(base_url=origin) as client,
            ):
                anonymous = await client.get("/github/login")
                print(f"without a token:  {anonymous.status_code}")

                token = auth.mint("alice", audience=origin)  # alice's token for this API
                answer = await client.get(
                    "/github/login", headers={"Authorization": f"Bearer {token}"}
                )
                print(f"as alice:         {answer.status_code} {answer.json()}")
                answer.raise_for_status()


if __name__ == "__main__":
    anyio.run(demo)
