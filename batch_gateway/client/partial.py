"""Partial results while a batch runs: batch-gateway's `GET /v1/batches/{id}/partial_results` extension.

The endpoint answers with every result line finished so far (JSONL), for in-progress batches only. Each poll may
repeat lines already seen, so lines are remembered by a digest of their bytes and appended to the local file once.
Servers without the extension (OpenAI itself) answer 404; the caller then stops asking.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import openai
from openai._legacy_response import HttpxBinaryResponseContent


def partial_results_path(batch_id: str) -> str:
    return f"/batches/{batch_id}/partial_results"


class PartialResults:
    """Appends newly finished result lines of one batch to `path`, each line once, across polls and across
    resumed `watch` runs (lines already in the file are not written again)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.supported = True
        self.written = 0
        self._seen: set[bytes] = set()
        if path.exists():
            self.new_lines(path.read_bytes())

    def new_lines(self, data: bytes) -> list[bytes]:
        """The lines of `data` not seen before (blank lines dropped), remembering them as seen."""
        fresh = []
        for line in data.splitlines():
            line = line.strip()
            if not line:
                continue
            digest = hashlib.blake2b(line, digest_size=16).digest()
            if digest not in self._seen:
                self._seen.add(digest)
                fresh.append(line)
        return fresh

    def fetch(self, client: openai.OpenAI, batch_id: str) -> bytes:
        """The server's current partial results. Raises `openai.NotFoundError` when there are none to offer."""
        # `client.get` goes through the SDK's auth, retries and error mapping; the binary cast keeps the body raw.
        response = client.get(
            partial_results_path(batch_id),
            cast_to=HttpxBinaryResponseContent,
            options={"headers": {"Accept": "application/jsonl"}},
        )
        return response.content

    def poll(self, client: openai.OpenAI, batch_id: str) -> int:
        """Fetch and append what is new; returns how many lines were appended."""
        fresh = self.new_lines(self.fetch(client, batch_id))
        if fresh:
            with self.path.open("ab") as out:
                out.write(b"\n".join(fresh) + b"\n")
            self.written += len(fresh)
        return len(fresh)
