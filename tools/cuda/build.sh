#!/usr/bin/env bash
# Builds `stableid` with CUDA on a machine that has neither a GPU nor a CUDA toolkit, for a
# machine that has both (see docs/cuda.md). One command, from anywhere:
#
#     tools/cuda/build.sh                      # -> target-cuda/release/stableid
#     FEATURES=cudnn tools/cuda/build.sh       # also link cuDNN (conv forward)
#
# Settings (environment):
#   CUDA_COMPUTE_CAP  GPU generation to compile the kernels for; default 90 (H100/H200).
#   FEATURES          cargo features; default `cuda`.
#   CUDA_VENV         where the CUDA 13.0 wheels are installed; default target-cuda/venv.
#   CARGO_TARGET_DIR  default target-cuda, so the CPU build in target/ is left alone.
#   CARGO_BUILD_JOBS  cargo's parallelism (nvcc inherits it through CUDAFORGE_THREADS).
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"

export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target-cuda}
features=${FEATURES:-cuda}
venv=${CUDA_VENV:-$CARGO_TARGET_DIR/venv}

# CUDA 13.0 exactly, not the newest 13.x: PTX from a newer nvcc carries a newer PTX ISA version,
# which an older driver refuses to load, and the H200 machines run driver 580 (CUDA 13.0). cudarc
# also picks its API bindings from `nvcc --version`, so 13.0 keeps every driver symbol it links
# to one that driver 580 exports. nvcc needs crt (host headers), nvvm (cicc, libdevice) and cccl
# (libcu++ headers) beside it; the runtime, cuBLAS, cuRAND and NVRTC wheels give the libraries
# that cudarc (dynamic-linking) and candle-kernels (cudart) link against.
wheels=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
)
libs=(cudart cublas cublasLt curand nvrtc)
if [[ ,$features, == *,cudnn,* ]]; then
  # The H200 machines have cuDNN 9.14 in /usr/lib/x86_64-linux-gnu. Linking against that same
  # version makes the linker prove every cuDNN function candle calls exists there (cudarc's
  # bindings are 9.21's; the functions candle uses are older than 9.14).
  wheels+=(nvidia-cudnn-cu13==9.14.0.64)
  libs+=(cudnn)
fi

[[ -x $venv/bin/python ]] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${wheels[@]}"

# The CUDA 13 wheels all unpack into site-packages/nvidia/cu13/{bin,include,lib}: a toolkit layout
# that nvcc's own nvcc.profile expects.
cuda=$("$venv/bin/python" - <<'EOF'
import nvidia, os
print(os.path.join(list(nvidia.__path__)[0], "cu13"))
EOF
)
lib=$cuda/lib
[[ -x $cuda/bin/nvcc ]] || { echo "no nvcc under $cuda" >&2; exit 1; }

# Wheels ship only the versioned libraries (libcublas.so.13); `-lcublas` wants libcublas.so.
# cuDNN has its own wheel folder (nvidia/cudnn/lib): link it into the same place.
for name in "${libs[@]}"; do
  if [[ $name == cudnn ]]; then
    so=$(ls "$(dirname "$cuda")"/cudnn/lib/libcudnn.so.9)
  else
    so=$(ls "$lib/lib$name.so".[0-9]* | head -n1)
  fi
  ln -sf "$so" "$lib/lib$name.so"
done

# libcuda.so.1 belongs to the GPU driver, which no package here ships. Link against a stub
# with the driver's soname and every driver API function name (bodies never run): the binary
# then records `NEEDED libcuda.so.1`, and the real driver library supplies the symbols at run
# time. Names come from cuda.h (both plain and `_v2`-style macro targets) plus the profiler API
# (cudaProfiler.h is not in the wheels).
stubs=$lib/stubs
mkdir -p "$stubs"
if [[ ! -e $stubs/libcuda.so ]]; then
  {
    grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$cuda/include/cuda.h"
    printf '%s\n' cuProfilerInitialize cuProfilerStart cuProfilerStop
  } | sort -u | sed 's/.*/void &(void) {}/' >"$stubs/libcuda-stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so" "$stubs/libcuda-stub.c"
fi

# cudarc's build script runs `nvcc --version` from PATH and searches CUDA_HOME/{lib,lib/stubs};
# candle-kernels' build (cudaforge) finds nvcc on PATH and takes CUDA_COMPUTE_CAP since no GPU
# can be queried here.
export PATH=$cuda/bin:$PATH
export CUDA_HOME=$cuda
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-${CARGO_BUILD_JOBS:-$(nproc)}}

cargo build --release --features "$features" --bin stableid

bin=$CARGO_TARGET_DIR/release/stableid
echo "built $bin ($(du -h "$bin" | cut -f1)), for compute capability $CUDA_COMPUTE_CAP; it needs:"
readelf -d "$bin" | grep NEEDED
