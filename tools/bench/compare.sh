#!/usr/bin/env bash
# Runs `stableid bench` and its PyTorch reference (tools/bench/pytorch_bench.py) on this machine, one
# after the other with the same arguments and thread count, and prints both results and the ratios
# stableid / PyTorch (below 1: stableid is faster or smaller). See docs/benchmarks.md.
#
#     tools/bench/compare.sh --res 256 --repeats 3 --warmup 1
#     tools/bench/compare.sh --only learn --device cuda --res 512
#     tools/bench/compare.sh --only align --photo phone.jpg
#
# Arguments (passed to both): --res, --warmup, --repeats, --only, --device, --dtype, --seed, --photo.
# Environment:
#   PYTHON    the Python with torch, diffusers, transformers, facenet-pytorch (default /work/venv/bin/python;
#             set it up with `python3 -m venv VENV && VENV/bin/pip install -r tools/reference/requirements.txt`)
#   STABLEID  the stableid binary (default: `cargo build --release`, then target/release/stableid;
#             for CUDA, the binary tools/cuda/build.sh makes)
#   THREADS   CPU threads of both (default: every core; RAYON_NUM_THREADS for candle, torch.set_num_threads)
#   OUT       where the two JSON reports are kept (default: a new temporary folder)
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-/work/venv/bin/python}
THREADS=${THREADS:-$(nproc)}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
if [[ -z ${STABLEID:-} ]]; then
  (cd "$repo" && cargo build --release --quiet --bin stableid)
  STABLEID=$repo/target/release/stableid
fi

# Other work on the machine skews the times: the load averages before and after go into the report.
load() { cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown; }
load_before=$(load)
echo "stableid bench $* ($THREADS threads)..." >&2
RAYON_NUM_THREADS=$THREADS "$STABLEID" bench "$@" --json >"$OUT/stableid.json"
echo "pytorch_bench.py $* ($THREADS threads)..." >&2
"$PYTHON" "$repo/tools/bench/pytorch_bench.py" "$@" --threads "$THREADS" --json >"$OUT/pytorch.json"

load_after=$(load)

"$PYTHON" - "$OUT/stableid.json" "$OUT/pytorch.json" "$load_before" "$load_after" <<'EOF'
import json
import sys

ours, ref = (json.load(open(path)) for path in sys.argv[1:3])
print(f"load averages (1, 5, 15 min): {sys.argv[3]} before, {sys.argv[4]} after")
print(f"{ours['device']}, {ours['dtype']}, {ours['resolution']}x{ours['resolution']}, threads {ours['threads']} "
      f"(PyTorch {ref['threads']}), warm-up {ours['warmup']}, median of {ours['repeats']}")
print(f"PyTorch: {ref['version']}; learning step at t = {ours['learn_timestep']}")
if ours.get("parameters") != ref.get("parameters"):
    print(f"WARNING: the models differ: stableid {ours.get('parameters')} vs PyTorch {ref.get('parameters')}")
print(f"memory: {ours['memory']}")
if "build_s" in ours:
    print(f"models built: stableid {ours['build_s']:.1f} s, {ours['memory_after_build_bytes'] / 2**30:.2f} GiB; "
          f"PyTorch {ref['build_s']:.1f} s, {ref['memory_after_build_bytes'] / 2**30:.2f} GiB")
print()
print(f"{'measurement':<12} {'stableid':>10} {'PyTorch':>10} {'ratio':>6}   {'peak stableid':>13} {'PyTorch':>10} {'ratio':>6}")


def seconds(s):
    return f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.1f} ms"


def gib(b):
    return "-" if b is None else f"{b / 2**30:.2f} GiB"


def ratio(a, b):
    return "-" if a is None or b is None else f"{a / b:.2f}"


for name in ("learn", "denoise", "controlnet", "vae_encode", "vae_decode", "text", "video", "photo_load",
             "face_detect", "face_align"):
    mine, theirs = ours["results"].get(name), ref["results"].get(name)
    if mine is None or theirs is None:
        continue
    print(f"{name:<12} {seconds(mine['median_s']):>10} {seconds(theirs['median_s']):>10} "
          f"{ratio(mine['median_s'], theirs['median_s']):>6}   {gib(mine['peak_memory_bytes']):>13} "
          f"{gib(theirs['peak_memory_bytes']):>10} {ratio(mine['peak_memory_bytes'], theirs['peak_memory_bytes']):>6}")
EOF
echo "reports: $OUT/stableid.json $OUT/pytorch.json" >&2
