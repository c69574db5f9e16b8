"""Executors start one runner per batch: `local` (subprocess) or `argo` (a Workflow)."""

from __future__ import annotations

from batch_gateway.executor.base import Executor, RunState
from batch_gateway.settings import Settings
from batch_gateway.store.metadata import MetadataStore

__all__ = ["Executor", "RunState", "build_executor"]


def build_executor(settings: Settings, metadata: MetadataStore) -> Executor:
    if settings.executor == "local":
        from batch_gateway.executor.local import LocalExecutor

        return LocalExecutor(settings, metadata)
    if settings.executor == "argo":
        from batch_gateway.executor.argo import ArgoExecutor

        return ArgoExecutor(settings, metadata=metadata)
    raise ValueError(f"unknown executor {settings.executor!r}: use local or argo")
