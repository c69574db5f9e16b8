"""The real-engine tests drive the real `serve` process (the e2e fixtures) on the embedded backend only."""

import pytest

from tests.e2e.conftest import gateway_factory  # noqa: F401  (a fixture, used by name)


@pytest.fixture
def backend() -> dict[str, str]:
    return {}
