"""Builds tests/fixtures/tiny-sd: a tiny random-weight Stable Diffusion 2.1-style model folder in
the real diffusers layout (the same files `stableid --model` reads for the real model).

Shapes follow SD 2.1-base's structure (CrossAttn down blocks then a plain one, linear
projections, heads given by `attention_head_dim`, 1024 -> 32 cross-attention width) at toy size.
"""
import gzip
import json
import shutil

import open_clip
import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from common import FIXTURES, SD21_BASE_SCHEDULER, TINY_SD, bytes_to_unicode, seed

TINY_MERGES = 400  # the first CLIP merges: common sub-words, so prompts tokenize sensibly


def write_tiny_tokenizer(folder):
    """A CLIP BPE vocabulary cut to the first TINY_MERGES merges, with SD2's '!' padding."""
    folder.mkdir(parents=True, exist_ok=True)
    bpe = gzip.open(open_clip.__path__[0] + "/bpe_simple_vocab_16e6.txt.gz").read().decode("utf-8")
    merges = [tuple(line.split()) for line in bpe.split("\n")[1 : 1 + TINY_MERGES]]
    chars = bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    # The SD 2.x tokenizer configs (as in tests/fixtures/tokenizer/): '!' pads. Like the hub folder,
    # no tokenizer.json: transformers builds the tokenizer from vocab.json + merges.txt.
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(FIXTURES / "tokenizer" / name, folder / name)
    tok = CLIPTokenizer.from_pretrained(str(folder))
    assert tok("a photo").input_ids[1] != tok.unk_token_id, "the tiny tokenizer must know common words"
    return len(vocab)


def main():
    if TINY_SD.exists():
        shutil.rmtree(TINY_SD)
    TINY_SD.mkdir(parents=True)
    vocab_len = write_tiny_tokenizer(TINY_SD / "tokenizer")

    seed(0)
    text_config = CLIPTextConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=32,
        bos_token_id=vocab_len - 2, eos_token_id=vocab_len - 1, pad_token_id=0,
    )
    text_encoder = CLIPTextModel(text_config)
    text_encoder.save_pretrained(str(TINY_SD / "text_encoder"))

    seed(1)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32), layers_per_block=2, attention_head_dim=[2, 4],
        cross_attention_dim=32, use_linear_projection=True, norm_num_groups=8,
    )
    # diffusers' initialisation, with the norms' affine parameters moved off (1, 0) so that a
    # swapped weight and bias would show.
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "norm" in name and name.endswith(".weight"):
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.02)
    unet.save_pretrained(str(TINY_SD / "unet"))

    seed(2)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
        sample_size=64,
    )
    vae.save_pretrained(str(TINY_SD / "vae"))

    scheduler = PNDMScheduler.from_config(SD21_BASE_SCHEDULER)
    scheduler.save_pretrained(str(TINY_SD / "scheduler"))

    (TINY_SD / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.8.0",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }, indent=2))
    print(f"wrote {TINY_SD}")


if __name__ == "__main__":
    main()
