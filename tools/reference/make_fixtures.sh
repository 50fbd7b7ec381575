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
cd "$here"
# The tiny model folder first: the component and pipeline fixtures are computed on its weights.
for script in tiny_models tokenizer_cases clip_text_vae unet schedulers pipeline celeb_basis face_feature face_parsing checkpoints augment learner_step; do
  echo "== $script"
  "$venv/bin/python" "$script.py"
done
