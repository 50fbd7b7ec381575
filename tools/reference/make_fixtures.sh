#!/usr/bin/env bash
# Regenerates every committed test fixture from the PyTorch reference (torch + diffusers +
# transformers from PyPI). One command: `tools/reference/make_fixtures.sh`.
# Uses $VENV (default tools/reference/.venv), created and filled on first use.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${VENV:-$here/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r "$here/requirements.txt"
fi
# facenet-pytorch pins torch<2.3, torchvision<0.18, numpy<2 and Pillow<10.3; with its dependencies pip would
# downgrade the stack above. Its MTCNN code runs on today's torch, so it is installed without them.
if ! "$venv/bin/python" -c "import facenet_pytorch" 2>/dev/null; then
  "$venv/bin/pip" install -q --no-deps facenet-pytorch==2.6.0
fi
# controlnet_aux (the OpenPose reference) pulls in every annotator's dependencies; its open_pose module
# needs only OpenCV and einops (imported by the package's __init__).
if ! "$venv/bin/python" -c "import controlnet_aux, cv2" 2>/dev/null; then
  "$venv/bin/pip" install -q --no-deps controlnet_aux==0.0.10
  "$venv/bin/pip" install -q opencv-python-headless==5.0.0.93 einops==0.8.2
fi
# lpips (LPIPS reference and its shipped heads) pins nothing it needs beyond the stack above.
if ! "$venv/bin/python" -c "import lpips" 2>/dev/null; then
  "$venv/bin/pip" install -q --no-deps lpips==0.1.4
fi
cd "$here"
# The tiny model folder first: the component and pipeline fixtures are computed on its weights.
for script in tiny_models tokenizer_cases clip_text_vae unet schedulers pipeline controlnet unet3d celeb_basis face_feature face_parsing checkpoints augment learner_step ism convert_mtcnn mtcnn align openpose eval_models eval_metrics splat; do
  echo "== $script"
  "$venv/bin/python" "$script.py"
done
