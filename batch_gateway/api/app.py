"""The HTTP API: OpenAI's /v1/files, /v1/uploads and /v1/batches, plus /health and /ready."""

from __future__ import annotations

from litestar import Litestar
from litestar.di import Provide

from batch_gateway.api import batches, files, health, metrics, partial, uploads
from batch_gateway.api.auth import Authenticator, provide_tenant
from batch_gateway.api.context import request_context_middleware, stamp_response
from batch_gateway.api.errors import handle_exception
from batch_gateway.api.state import app_state
from batch_gateway.api.tracing import tracing_middleware
from batch_gateway.services import Services
from batch_gateway.settings import AuthMode
from batch_gateway.upstreams.catalog import UpstreamCatalog
from batch_gateway.upstreams.routes import parse_upstreams

# JSON bodies are tiny; the upload route lifts this limit and enforces its own while streaming.
MAX_JSON_BODY_BYTES = 1024 * 1024


def create_app(services: Services) -> Litestar:
    settings = services.settings
    authenticator = Authenticator(services.metadata, AuthMode(settings.auth))
    # What the model servers serve, so that POST /v1/batches refuses an endpoint none of them answers.
    upstreams = UpstreamCatalog(parse_upstreams(settings.upstream), api_key=settings.upstream_api_key or None)
    return Litestar(
        route_handlers=[
            files.upload_file,
            files.list_files,
            files.retrieve_file,
            files.delete_file,
            files.file_content,
            uploads.create_upload,
            uploads.add_upload_part,
            uploads.complete_upload,
            uploads.cancel_upload,
            batches.create_batch,
            batches.list_batches,
            batches.retrieve_batch,
            batches.cancel_batch,
            partial.partial_results,
            partial.run_stats,
            health.health,
            health.ready,
            metrics.metrics,
        ],
        dependencies={"tenant": Provide(provide_tenant)},
        exception_handlers={Exception: handle_exception},
        middleware=[tracing_middleware, request_context_middleware],
        before_send=[stamp_response],
        state=app_state(services, authenticator, upstreams),
        request_max_body_size=MAX_JSON_BODY_BYTES,
        openapi_config=None,  # the contract is OpenAI's; its spec is the reference, not ours
        logging_config=None,  # structlog is configured by the process (batch_gateway.logs)
        debug=False,
    )
