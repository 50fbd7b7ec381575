"""Reference outputs of the CLIP text encoder (transformers) and the VAE (diffusers) on the tiny SD model.

Writes tests/fixtures/parity/clip_text.safetensors and tests/fixtures/parity/vae.safetensors.
The tiny models have identity norms (weight 1, bias 0) and, for CLIP, zero linear biases, so each
file also holds a variant with those small tensors randomised (`perturbed.<weight name>`): a swap
of weight and bias, or a forgotten bias, shows up there.
Run from the repository root: /work/venv/bin/python tools/reference/clip_text_vae.py
"""
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PARITY, TINY_SD, save_tensors, seed  # noqa: E402


def perturb_norms_and_biases(model: torch.nn.Module) -> dict:
    """Randomises every 1-D parameter (norm weights and biases, linear and conv biases) in place;
    returns them by weight-file name."""
    changed = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                module, _, kind = name.rpartition(".")
                base = 1.0 if kind == "weight" and "norm" in module.rsplit(".", 1)[-1] else 0.0
                p.copy_(base + 0.2 * torch.randn_like(p))
                changed[f"perturbed.{name}"] = p.clone()
    return changed


def clip_text() -> None:
    seed(0)
    model = CLIPTextModel.from_pretrained(TINY_SD / "text_encoder").eval()
    cfg = model.config
    vocab, hidden = cfg.vocab_size, cfg.hidden_size
    # Two prompts: BOS, words, two adjacent placeholders (vocab, vocab + 1), words, EOS, "!" padding.
    ids = torch.zeros(2, cfg.max_position_embeddings, dtype=torch.long)
    for row, (n_words, at) in enumerate([(6, 3), (9, 1)]):
        words = torch.randint(1, vocab - 100, (n_words,))
        body = torch.cat([words[:at], torch.tensor([vocab, vocab + 1]), words[at:]])
        seq = torch.cat([torch.tensor([cfg.bos_token_id]), body, torch.tensor([cfg.eos_token_id])])
        ids[row, : len(seq)] = seq
    extra = torch.randn(2, hidden)

    with torch.no_grad():
        # Placeholder rows written into a resized table, as a textual-inversion user would.
        model.resize_token_embeddings(vocab + 2, mean_resizing=False)
        model.embeddings.token_embedding.weight[vocab:] = extra
        tensors = {"ids": ids, "extra": extra, "output": model(input_ids=ids).last_hidden_state}
        tensors.update(perturb_norms_and_biases(model))
        tensors["perturbed_output"] = model(input_ids=ids).last_hidden_state
    save_tensors(PARITY / "clip_text.safetensors", tensors)


def vae() -> None:
    seed(1)
    model = AutoencoderKL.from_pretrained(TINY_SD / "vae").eval()
    f = 2 ** (len(model.config.block_out_channels) - 1)
    with torch.no_grad():
        image = torch.rand(1, 3, 64, 64) * 2 - 1
        posterior = model.encode(image).latent_dist
        noise = torch.randn_like(posterior.mean)
        latents = torch.randn(1, model.config.latent_channels, 64 // f, 64 // f)
        tensors = {
            "image": image,
            "mean": posterior.mean,
            "std": posterior.std,
            "noise": noise,
            "sample": posterior.mean + posterior.std * noise,
            "latents": latents,
            "decoded": model.decode(latents).sample,
        }
        # Non-square, batch of two.
        image_ns = torch.rand(2, 3, 64, 48) * 2 - 1
        posterior_ns = model.encode(image_ns).latent_dist
        latents_ns = torch.randn(2, model.config.latent_channels, 64 // f, 48 // f)
        tensors.update(
            {
                "image_ns": image_ns,
                "mean_ns": posterior_ns.mean,
                "std_ns": posterior_ns.std,
                "latents_ns": latents_ns,
                "decoded_ns": model.decode(latents_ns).sample,
            }
        )
        tensors.update(perturb_norms_and_biases(model))
        perturbed = model.encode(image).latent_dist
        tensors["perturbed_mean"] = perturbed.mean
        tensors["perturbed_std"] = perturbed.std
        tensors["perturbed_decoded"] = model.decode(latents).sample
    save_tensors(PARITY / "vae.safetensors", tensors)


if __name__ == "__main__":
    clip_text()
    vae()
