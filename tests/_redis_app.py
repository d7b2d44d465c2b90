"""An application for ``uvicorn --workers N tests._redis_app:app`` (tests/test_redis_processes).

Configured by environment variables (set by the test): ``REDIS_TEST_ISSUER``,
``REDIS_TEST_RESOURCE``, ``REDIS_TEST_CLIENT_ID``, ``REDIS_TEST_CLIENT_SECRET``,
``REDIS_TEST_REDIS_URL`` and ``REDIS_TEST_KEY``. ``GET /exchange?resource=R`` exchanges the
caller's token and answers the grant's ``sub``/``aud``, a short digest of it and the worker's
process id; ``GET /health`` (public) answers the process id. Nothing answered holds a token.
"""

from __future__ import annotations

import os

import httpx
from joserfc.jwk import KeySet

from asgi_delegation import DelegationMiddleware
from asgi_delegation.redis import RedisGrantCache
from tests._redis_worker import make_app

_issuer = os.environ["REDIS_TEST_ISSUER"]
_keys = KeySet.import_key_set(httpx.get(_issuer + "/jwks").json())

app = DelegationMiddleware(
    make_app(_keys),
    issuer=_issuer,
    resource=os.environ["REDIS_TEST_RESOURCE"],
    client_id=os.environ["REDIS_TEST_CLIENT_ID"],
    client_secret=os.environ["REDIS_TEST_CLIENT_SECRET"],
    public_paths=["/health"],
    shared_cache=RedisGrantCache(
        os.environ["REDIS_TEST_REDIS_URL"], encryption_keys=[os.environ["REDIS_TEST_KEY"]]
    ),
)
