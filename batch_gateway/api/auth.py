"""Bearer-key authentication and the tenant every object is scoped to.

The mode is configuration (`--auth`), never inferred from what the database holds, so revoking every key can only
lock the gateway, never open it:
- `keys` (the default): a request needs a valid, unrevoked key, and its tenant scopes everything. While no key exists
  every request gets 401, with a message that says how to create one.
- `open`: any bearer token (or none) is the tenant `default`. `serve` allows it only on a loopback address.

Key lookups (and the key count behind the no-key message) are cached for a couple of seconds so that a busy API does
not ask the database on every request; a key created or revoked from the CLI takes effect within that time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeAlias

import structlog
from litestar import Request
from litestar.di import NamedDependency
from litestar.params import FromPath

from batch_gateway.api.context import TENANT_STATE
from batch_gateway.api.state import authenticator_of
from batch_gateway.errors import Unauthorized
from batch_gateway.keys import DEFAULT_TENANT, hash_key, tenant_for_key
from batch_gateway.settings import AuthMode
from batch_gateway.store.metadata import MetadataStore

# Handler parameter types: the authenticated tenant, and an object id from the path.
Tenant: TypeAlias = NamedDependency[str]
PathId: TypeAlias = FromPath[str]

CACHE_SECONDS = 2.0
_MAX_CACHED_KEYS = 10_000

_NO_KEY_MESSAGE = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth "
    "(i.e. Authorization: Bearer YOUR_KEY)."
)
NO_KEYS_EXIST_MESSAGE = (
    "This gateway has no API key yet. Create one with `batch-gateway keys create --tenant NAME` and send it in an "
    "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)


def mask_key(key: str) -> str:
    """OpenAI-style masking: enough of the key to recognise it, never enough to use it."""
    if len(key) <= 8:
        return "*" * len(key)
    return key[:3] + "*" * (len(key) - 7) + key[-4:]


class Authenticator:
    def __init__(
        self,
        metadata: MetadataStore,
        mode: AuthMode,
        cache_seconds: float = CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metadata = metadata
        self.mode = AuthMode(mode)
        self._cache_seconds = cache_seconds
        self.clock = clock  # what the cache ages by (tests move it on instead of waiting)
        self._key_count: tuple[float, int] | None = None  # (checked at, count)
        self._tenants: dict[str, tuple[float, str | None]] = {}  # key hash -> (checked at, tenant)

    async def tenant_for(self, authorization: str | None) -> str:
        """The tenant of the request, or `Unauthorized`."""
        if self.mode is AuthMode.OPEN:
            return DEFAULT_TENANT
        key = _bearer_token(authorization)
        tenant = await self._tenant_for_key(key) if key else None
        if tenant is not None:
            return tenant
        # Refused either way; the count only chooses the most helpful message.
        if await self._active_key_count() == 0:
            raise Unauthorized(NO_KEYS_EXIST_MESSAGE, code="invalid_api_key")
        if not key:
            raise Unauthorized(_NO_KEY_MESSAGE, code="invalid_api_key")
        raise Unauthorized(f"Incorrect API key provided: {mask_key(key)}.", code="invalid_api_key")

    async def _active_key_count(self) -> int:
        now = self.clock()
        if self._key_count is None or now - self._key_count[0] > self._cache_seconds:
            self._key_count = (now, await self._metadata.active_key_count())
        return self._key_count[1]

    async def _tenant_for_key(self, key: str) -> str | None:
        digest = hash_key(key)
        now = self.clock()
        cached = self._tenants.get(digest)
        if cached is not None and now - cached[0] <= self._cache_seconds:
            return cached[1]
        tenant = await tenant_for_key(self._metadata, key)
        if len(self._tenants) >= _MAX_CACHED_KEYS:
            self._tenants.clear()
        self._tenants[digest] = (now, tenant)
        return tenant


def _bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


async def provide_tenant(request: Request) -> str:
    """Litestar dependency: authenticate the request and bind its tenant to the logs."""
    tenant = await authenticator_of(request).tenant_for(request.headers.get("authorization"))
    request.scope["state"][TENANT_STATE] = tenant
    structlog.contextvars.bind_contextvars(tenant=tenant)
    return tenant
