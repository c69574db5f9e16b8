"""An OpenAI-compatible stand-in for a vLLM server (`batch-gateway sim`), for demos, tests and benchmarks."""

from batch_gateway.sim.engine import SimConfig
from batch_gateway.sim.server import SimServer, create_sim_app

__all__ = ["SimConfig", "SimServer", "create_sim_app"]
