#!/usr/bin/env bash
# Builds the C++/CUDA extension (csrc/) against another torch release's headers and libraries, the
# way a GPU machine's `pip install --no-build-isolation -e .` would, without that torch installed
# and without a GPU: downloads the torch wheel (no dependencies), compiles every source (the CUDA
# routing kernels too when nvcc is here) and links them, then lists the symbols the extension needs
# that none of that torch's libraries (nor CUDA's runtime, libstdc++, libc, OpenMP, Python)
# defines. Exit 0 when the build links and nothing is missing.
#
#   benchmarks/ext_build_check.sh [TORCH_VERSION] [SM]     # default: 2.11.0 (the GPU image's) 90
#
# Work files go to a new temporary folder, removed at the end.
set -euo pipefail
version=${1:-2.11.0}
sm=${2:-90}
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "ext_build_check: torch $version wheel, no dependencies"
$py -m pip download -q --no-deps "torch==$version" -d "$work/dl"
(cd "$work" && unzip -q dl/torch-*.whl 'torch/include/*' 'torch/lib/*')
inc=$work/torch/include
lib=$work/torch/lib
pyinc=$($py -c "import sysconfig; print(sysconfig.get_paths()['include'])")
flags=(-O3 -std=c++17 -I"$inc" -I"$inc/torch/csrc/api/include" -I"$pyinc"
  -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C)
links=(-L"$lib" -lc10 -ltorch -ltorch_cpu -ltorch_python)
if command -v nvcc >/dev/null && [ -e "$lib/libtorch_cuda.so" ]; then
  cuda=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}
  [ -e "$cuda/lib64/libcudart.so" ] || cuda=/usr/local/cuda
  flags+=(-DFEDLEASE_WITH_CUDA -I"$cuda/include")
  links+=(-lc10_cuda -ltorch_cuda -L"$cuda/lib64" -lcudart)
  echo "ext_build_check: csrc/routing_cuda.cu with $(nvcc --version | tail -n 1), sm_$sm"
  nvcc "${flags[@]}" --expt-relaxed-constexpr -D__CUDA_NO_HALF_OPERATORS__ \
    -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
    -D__CUDA_NO_HALF2_OPERATORS__ --compiler-options -fPIC \
    -gencode "arch=compute_$sm,code=sm_$sm" -c csrc/routing_cuda.cu -o "$work/routing_cuda.o"
fi
echo "ext_build_check: csrc/*.cpp"
printf '%s\n' csrc/*.cpp | xargs -P "$(nproc)" -I{} sh -c \
  'c++ "$@" -fPIC -fopenmp -w -c {} -o "$0/$(basename {} .cpp).o"' "$work" "${flags[@]}"
c++ -shared -o "$work/_C.so" "$work"/*.o "${links[@]}" -fopenmp
defined() {
  for so in "$lib"/*.so "${cuda:-/nonexistent}"/lib64/libcudart.so; do
    [ -e "$so" ] && nm -D --defined-only "$so" | awk '{print $3}'
  done
  for so in libstdc++.so.6 libc.so.6 libm.so.6 libgomp.so.1 libgcc_s.so.1; do
    path=$(ldconfig -p | awk -v n="$so" '$1 == n {print $NF; exit}')
    [ -n "$path" ] && nm -D --defined-only "$path" | awk '{print $3}'
  done
}
nm -D --undefined-only "$work/_C.so" | awk '$1 == "U" {print $2}' | sed 's/@.*//' | sort -u \
  >"$work/needed"
defined | sed 's/@.*//' | sort -u >"$work/defined"
missing=$(comm -23 "$work/needed" "$work/defined" | grep -v -E '^(_?Py|__tls_get_addr$)' || true)
if [ -n "$missing" ]; then
  echo "ext_build_check: symbols torch $version does not define:"
  echo "$missing"
  exit 1
fi
echo "ext_build_check: fedlease._C builds and links against torch $version"
