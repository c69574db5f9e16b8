"""The storage and executor objects a process needs, built from its settings.

The API, the runner and gc each open a `Services` for their lifetime. Backends are chosen by URL: SQLite or
PostgreSQL for metadata, a local directory or S3 for objects, Valkey or nothing for live signals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from batch_gateway.executor.base import Executor
from batch_gateway.settings import Settings
from batch_gateway.store.metadata import MetadataStore
from batch_gateway.store.objects import ObjectStore
from batch_gateway.store.signals import NullSignals, Signals


def open_metadata_store(settings: Settings) -> MetadataStore:
    if settings.database_url.startswith(("postgresql://", "postgres://")):
        from batch_gateway.store.postgres import PostgresStore

        return PostgresStore(settings.database_url)
    from batch_gateway.store.sqlite import SqliteStore

    settings.data_path.mkdir(parents=True, exist_ok=True)
    path = (
        settings.database_url.removeprefix("sqlite:///")
        if settings.database_url
        else str(settings.data_path / "metadata.sqlite3")
    )
    return SqliteStore(path)


def open_signals(settings: Settings) -> Signals:
    if settings.valkey_url:
        from batch_gateway.store.valkey import ValkeySignals

        return ValkeySignals(settings.valkey_url, prefix=settings.valkey_prefix)
    return NullSignals()


@dataclass
class Services:
    settings: Settings
    metadata: MetadataStore
    objects: ObjectStore
    signals: Signals
    executor: Executor | None = field(default=None)

    @classmethod
    async def open(cls, settings: Settings) -> Services:
        metadata = open_metadata_store(settings)
        await metadata.open()
        signals = open_signals(settings)
        await signals.open()
        return cls(
            settings=settings, metadata=metadata, objects=ObjectStore(settings.object_store_url), signals=signals
        )

    async def close(self) -> None:
        if self.executor is not None:
            await self.executor.stop()
        await self.signals.close()
        await self.metadata.close()
