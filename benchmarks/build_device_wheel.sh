#!/usr/bin/env bash
# Build the extension here (CPU machine, nvcc) as a wheel for the GPU machine's Python
# (3.12, jaxlib 0.11.2 as gpu.md lists), into .gpu/ where `run` carries it; then
#   bash benchmarks/gpu_check.sh wheel test ...
# installs it in seconds. Needs a Python 3.12 (PY312, default pyenv's) and the CUTLASS wheel
# in .gpu/ (gpu.md's recipe). ~6 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY312=${PY312:-/root/.pyenv/versions/3.12.1/bin/python}
venv=/tmp/jdg_py312
if ! $venv/bin/python -c "import jax" 2>/dev/null; then
  $PY312 -m venv $venv
  $venv/bin/pip install -q jax==0.11.2 jaxlib==0.11.2 nanobind scikit-build-core numpy
fi
rm -rf /tmp/jdg_cutlass && mkdir -p /tmp/jdg_cutlass
python3 -m zipfile -e .gpu/nvidia_cutlass-*.whl /tmp/jdg_cutlass
rm -f .gpu/jax_deepgemm-*.whl
PATH=/usr/local/cuda/bin:$PATH CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  $venv/bin/pip wheel --no-build-isolation --no-deps -w .gpu . \
  -Ccmake.define.CUTLASS_INCLUDE_DIR=/tmp/jdg_cutlass/cutlass_library/source/include \
  -Cbuild-dir=/tmp/jdg_build312  # kept: a rebuild compiles only what changed
ls -la .gpu/jax_deepgemm-*.whl
