#!/usr/bin/env bash
# Installs llama-cpp-python, whose bundled libggml-base.so is the tests' oracle (llama.cpp's own C GGUF loader and
# reference quantizers). PyPI has no binary wheel, so it is built from source once (about 4 minutes on 2 cores)
# and the wheel is cached in $S2CONV_WHEEL_CACHE (default ~/.cache/s2conv-wheels).
set -euo pipefail
VERSION=0.3.36
CACHE="${S2CONV_WHEEL_CACHE:-$HOME/.cache/s2conv-wheels}"
if python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llama_cpp') is None)"; then exit 0; fi
mkdir -p "$CACHE"
if ! ls "$CACHE"/llama_cpp_python-$VERSION-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $VERSION (once; cached in $CACHE)"
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" python3 -m pip wheel -q --no-deps "llama-cpp-python==$VERSION" -w "$CACHE"
fi
python3 -m pip install -q --no-deps "$CACHE"/llama_cpp_python-$VERSION-*.whl
