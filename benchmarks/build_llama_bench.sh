#!/usr/bin/env bash
# Build llama.cpp's llama-bench from the llama.cpp source vendored in the llama-cpp-python sdist (CPU only).
# SIMD options follow this CPU's /proc/cpuinfo flags; AMX stays off; -DGGML_NATIVE=OFF so the flags are explicit.
#   benchmarks/build_llama_bench.sh [WORK_DIR]      -> WORK_DIR/llama.cpp/build/bin/llama-bench
set -euo pipefail
VERSION=0.3.36
WORK=${1:-build/llama-bench}
mkdir -p "$WORK"
cd "$WORK"
if [ ! -d llama.cpp ]; then
    pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d .
    tar xzf "llama_cpp_python-$VERSION.tar.gz"
    mv "llama_cpp_python-$VERSION/vendor/llama.cpp" llama.cpp
fi
flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
has() { [[ " $flags " == *" $1 "* ]] && echo ON || echo OFF; }
cmake -S llama.cpp -B llama.cpp/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
    -DGGML_AVX="$(has avx)" -DGGML_AVX2="$(has avx2)" -DGGML_FMA="$(has fma)" -DGGML_F16C="$(has f16c)" \
    -DGGML_BMI2="$(has bmi2)" -DGGML_AVX_VNNI="$(has avx_vnni)" -DGGML_AVX512="$(has avx512f)" \
    -DGGML_AVX512_VBMI="$(has avx512vbmi)" -DGGML_AVX512_VNNI="$(has avx512_vnni)" \
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF
cmake --build llama.cpp/build -j2 --target llama-bench
echo "$PWD/llama.cpp/build/bin/llama-bench"
