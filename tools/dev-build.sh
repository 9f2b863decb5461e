#!/usr/bin/env bash
# Developer build: compile the extension in place so that `PYTHONPATH=python pytest` runs the
# source tree without installing. Users and CI install the wheel instead (see .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
cmake -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$(command -v "$PY")" \
  -Dpybind11_DIR="$("$PY" -c 'import pybind11; print(pybind11.get_cmake_dir())')" >/dev/null
cmake --build build/dev
cp build/dev/_core*.so python/metalora/
echo "built $(ls python/metalora/_core*.so)"
