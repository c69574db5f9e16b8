"""API keys: created and revoked from the CLI, stored hashed, each bound to one tenant.

Keys are long random tokens, so a fast hash (SHA-256) is enough: there is nothing to brute-force. Lookup is by the
hash, and the final comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from batch_gateway import ids
from batch_gateway.store.metadata import ApiKeyRecord, MetadataStore

DEFAULT_TENANT = "default"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def create_key(metadata: MetadataStore, tenant: str) -> tuple[str, ApiKeyRecord]:
    key = ids.new_api_key()
    record = ApiKeyRecord(
        id="key_" + secrets.token_hex(8), tenant=tenant, key_hash=hash_key(key), prefix=key[:10], created_at=ids.now()
    )
    await metadata.insert_key(record)
    return key, record


async def tenant_for_key(metadata: MetadataStore, key: str) -> str | None:
    """The tenant of a valid, unrevoked key, or None."""
    digest = hash_key(key)
    tenant = await metadata.tenant_for_key_hash(digest)
    # The store matched on the hash already; compare again in constant time so no code path leaks timing.
    if tenant is None or not hmac.compare_digest(digest, hash_key(key)):
        return None
    return tenant
