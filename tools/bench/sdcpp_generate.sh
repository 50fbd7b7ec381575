#!/usr/bin/env bash
# stable-diffusion.cpp on the same diffusers folder as `stableid generate` and
# tools/bench/diffusers_generate.py (docs/benchmarks.md, "Memory on the CPU"): builds its CPU
# `sd-cli` from the stable-diffusion-cpp-python sdist on PyPI with CMake (from CMake's PyPI wheel),
# then times each weight type with /usr/bin/time (wall seconds, peak resident KB).
#
#     tools/bench/sdcpp_generate.sh DIR [WORK]
#
# DIR: an SD 2.1-base-shaped diffusers folder (tools/bench/random_sd21.py writes one). sd-cli
# reads diffusers folders but finds the model's version from text-encoder tensor names with the
# `text_model.` prefix, which transformers 5 no longer writes: WORK/model gets links to DIR's parts
# and a copy of the text encoder with the prefix. WORK defaults to /tmp/sdcpp-bench.
# Environment: PYTHON (a Python with pip and safetensors, default tools/reference/.venv/bin/python),
# THREADS (default: every core), VERSION (the sdist's, default 0.4.7), TYPES (default f32 f16 q8_0),
# RES (image side, default 256).
set -euo pipefail

model=$(cd "$1" && pwd)
work=${2:-/tmp/sdcpp-bench}
repo=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-$repo/tools/reference/.venv/bin/python}
THREADS=${THREADS:-$(nproc)}
VERSION=${VERSION:-0.4.7}
TYPES=${TYPES:-f32 f16 q8_0}
mkdir -p "$work"

src=$work/stable_diffusion_cpp_python-$VERSION/vendor/stable-diffusion.cpp
if [[ ! -x $src/build/bin/sd-cli ]]; then
  # The sdist's address from PyPI's JSON API (pip would build the package, and CMake, to get it).
  curl -sSL -o "$work/sdist.tar.gz" "$("$PYTHON" - "$VERSION" <<'PY'
import json, sys, urllib.request
index = json.load(urllib.request.urlopen("https://pypi.org/pypi/stable-diffusion-cpp-python/json"))
print(next(u["url"] for u in index["releases"][sys.argv[1]] if u["packagetype"] == "sdist"))
PY
)"
  tar xzf "$work/sdist.tar.gz" -C "$work"
  "$PYTHON" -m pip install --quiet cmake
  cmake=$(dirname "$PYTHON")/cmake
  "$cmake" -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DSD_BUILD_EXAMPLES=ON >/dev/null
  "$cmake" --build "$src/build" --config Release -j "$THREADS" --target sd-cli >/dev/null
fi

prepared=$work/model
if [[ ! -f $prepared/text_encoder/model.safetensors ]]; then
  mkdir -p "$prepared/text_encoder"
  for part in unet vae scheduler tokenizer model_index.json; do ln -sfn "$model/$part" "$prepared/$part"; done
  cp "$model/text_encoder/config.json" "$prepared/text_encoder/"
  "$PYTHON" - "$model/text_encoder/model.safetensors" "$prepared/text_encoder/model.safetensors" <<'PY'
import sys
from safetensors.torch import load_file, save_file
tensors = load_file(sys.argv[1])
save_file({k if k.startswith("text_model.") else "text_model." + k: v for k, v in tensors.items()}, sys.argv[2])
PY
fi

for type in $TYPES; do
  /usr/bin/time -f "$type: %e s, peak %M KB" "$src/build/bin/sd-cli" -m "$prepared" --type "$type" \
    -p "a photo of an astronaut" -W "${RES:-256}" -H "${RES:-256}" --steps 5 --sampling-method euler \
    --cfg-scale 8.5 -s 1 -t "$THREADS" -o "$work/$type.png" 2>&1 | grep -E "sampling completed|peak"
done
