"""The user-facing client: `batch-gateway submit`, `batches ...` and `files ...`, built on the `openai` SDK."""
