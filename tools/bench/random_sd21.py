"""Writes a diffusers folder shaped as Stable Diffusion 2.1-base (the configs of
src/models/stable_diffusion.rs) with random weights and the CLIP tokenizer of the test fixtures,
for timing whole commands (`stableid 3d`, `generate`) at the real architecture without a download.

    tools/reference/.venv/bin/python tools/bench/random_sd21.py OUT_DIR
"""

import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pytorch_bench import rust_constants  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def main():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(sys.argv[1])
    if out.exists():
        sys.exit(f"{out} exists: choose a new folder")
    torch.manual_seed(0)
    consts = rust_constants()
    CLIPTextModel(CLIPTextConfig(**consts["text_encoder"])).save_pretrained(out / "text_encoder")
    UNet2DConditionModel(**consts["unet"]).save_pretrained(out / "unet")
    AutoencoderKL(**consts["vae"]).save_pretrained(out / "vae")
    (out / "scheduler").mkdir()
    scheduler = {"_class_name": "PNDMScheduler", **consts["scheduler"]}
    (out / "scheduler/scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    tokenizer = out / "tokenizer"
    tokenizer.mkdir()
    for name in ["vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"]:
        shutil.copy(ROOT / "tests/fixtures/tokenizer" / name, tokenizer / name)
    (out / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    print(out)


if __name__ == "__main__":
    main()
