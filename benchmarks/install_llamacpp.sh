#!/usr/bin/env bash
# Installs the llama.cpp peer for benchmarks/compare.py: llama-cpp-python, built from source into the active
# Python environment (a few minutes on 2 cores; needs a C/C++ compiler).
#
#   bash benchmarks/install_llamacpp.sh            # llama-cpp-python 0.3.36
#   LLAMA_CPP_PYTHON_VERSION=0.3.36 PYTHON=.venv/bin/python bash benchmarks/install_llamacpp.sh
#   bash benchmarks/install_llamacpp.sh --print-flags   # only show the CMake flags this CPU gets
#
# On x86 Linux the SIMD flags follow what /proc/cpuinfo lists, never a fixed set: CPUs differ (some have AVX-512,
# some only AVX2), and a build for instructions the CPU lacks dies with "Illegal instruction". GGML_NATIVE is off
# because -march=native trusts what a virtual machine advertises, and AMX is always off: a native build enables
# AMX where the CPU lists it but cannot run it, and then any prompt longer than one token crashes. Elsewhere
# (macOS, ARM) llama.cpp's own defaults apply.
set -euo pipefail

python=${PYTHON:-python}
version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}

cmake_args=""
if [[ $(uname -s) == Linux && $(uname -m) == x86_64 && -r /proc/cpuinfo ]]; then
  flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
  on() { [[ $flags == *" $1 "* ]] && echo ON || echo OFF; }
  cmake_args="-DGGML_NATIVE=OFF -DGGML_AVX=$(on avx) -DGGML_AVX2=$(on avx2) -DGGML_FMA=$(on fma)"
  cmake_args+=" -DGGML_F16C=$(on f16c) -DGGML_BMI2=$(on bmi2) -DGGML_AVX_VNNI=$(on avx_vnni)"
  cmake_args+=" -DGGML_AVX512=$(on avx512f) -DGGML_AVX512_VBMI=$(on avx512vbmi)"
  cmake_args+=" -DGGML_AVX512_VNNI=$(on avx512_vnni) -DGGML_AVX512_BF16=$(on avx512_bf16)"
  cmake_args+=" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
fi
if [[ ${1:-} == --print-flags ]]; then
  echo "${cmake_args:-(llama.cpp defaults)}"
  exit 0
fi
if ! command -v "${CXX:-c++}" >/dev/null 2>&1; then
  echo "error: no C++ compiler (${CXX:-c++}); install one first (Debian/Ubuntu: apt-get install -y build-essential)" >&2
  exit 1
fi

echo "building llama-cpp-python $version from source with CMAKE_ARGS: ${cmake_args:-(llama.cpp defaults)}" >&2
CMAKE_ARGS="$cmake_args" "$python" -m pip install --no-cache-dir --force-reinstall --no-deps \
  --no-binary llama-cpp-python "llama-cpp-python==$version"
"$python" -m pip install numpy jinja2 diskcache typing-extensions  # its dependencies, left as they are if present
# A crash here means the flags above do not fit this CPU.
"$python" -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__, "imports")'
