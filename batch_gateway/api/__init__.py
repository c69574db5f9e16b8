"""The HTTP API (Litestar): `create_app(services)` serves OpenAI's Files and Batches endpoints."""
