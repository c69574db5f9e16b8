"""What the app keeps for its handlers: the process's services, the authenticator and the upstream catalog.

`create_app` builds them once (`app_state`); handlers reach them through the request. They are not Litestar
dependencies: Litestar resolves several dependencies of one handler in concurrent tasks, so the log bindings the
`tenant` dependency makes would no longer reach the handler.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from litestar import Litestar, Request
from litestar.datastructures import State

from batch_gateway.services import Services
from batch_gateway.upstreams.catalog import UpstreamCatalog

if TYPE_CHECKING:
    from batch_gateway.api.auth import Authenticator

_SERVICES = "services"
_AUTHENTICATOR = "authenticator"
_UPSTREAMS = "upstreams"


def app_state(services: Services, authenticator: Authenticator, upstreams: UpstreamCatalog) -> State:
    return State({_SERVICES: services, _AUTHENTICATOR: authenticator, _UPSTREAMS: upstreams})


def services_of(request: Request) -> Services:
    return request.app.state[_SERVICES]


def authenticator_of(request: Request) -> Authenticator:
    return authenticator_in(request.app)


def authenticator_in(app: Litestar) -> Authenticator:
    return app.state[_AUTHENTICATOR]


def upstreams_of(request: Request) -> UpstreamCatalog:
    return request.app.state[_UPSTREAMS]
