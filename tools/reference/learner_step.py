"""One StableIdentity learning step in PyTorch on tests/fixtures/tiny-sd, written from
docs/method.md: equalized-linear MLP -> AdaIN landing -> v1*/v2* token rows -> CLIPTextModel ->
UNet -> masked two-phase loss -> backward -> clip_grad_norm_(1.0) -> AdamW.
Fixed inputs (no augmentation); one case above and one below the phase threshold.
Writes tests/fixtures/parity/learner_step.safetensors (+ .json)."""
import json

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from common import PARITY, TINY_SD, save_tensors, seed

FEATURE_DIM = 48  # the tiny stand-in for the ViT feature width (768)
PARAM_NAMES = ["fc1.weight", "fc1.bias", "norm1.weight", "norm1.bias", "fc2.weight", "fc2.bias",
               "norm2.weight", "norm2.bias"]
# (name, timestep, caption, max gradient norm): the second clips (its norm is about 0.04).
CASES = [("noise_phase", 800, "a close-up photo of v1* v2*", 1.0), ("rec_phase", 300, "a portrait of v1* v2*", 0.01)]


class IdentityMlp(torch.nn.Module):
    """768 -> EqualLinear -> LeakyReLU(0.2) -> LayerNorm -> EqualLinear -> LayerNorm, lr_mul 0.1."""

    def __init__(self, token_dim):
        super().__init__()
        hidden = 2 * token_dim
        self.fc1_w = torch.nn.Parameter(torch.randn(hidden, FEATURE_DIM) * 0.02)
        self.fc1_b = torch.nn.Parameter(torch.randn(hidden) * 0.02)
        self.norm1 = torch.nn.LayerNorm(hidden, eps=1e-5)
        self.fc2_w = torch.nn.Parameter(torch.randn(hidden, hidden) * 0.02)
        self.fc2_b = torch.nn.Parameter(torch.randn(hidden) * 0.02)
        self.norm2 = torch.nn.LayerNorm(hidden, eps=1e-5)
        with torch.no_grad():  # non-trivial affine parameters, so every parameter matters
            for norm in (self.norm1, self.norm2):
                norm.weight.add_(torch.randn(hidden) * 0.1)
                norm.bias.add_(torch.randn(hidden) * 0.1)
        self.token_dim = token_dim

    def params(self):
        return [self.fc1_w, self.fc1_b, self.norm1.weight, self.norm1.bias, self.fc2_w, self.fc2_b,
                self.norm2.weight, self.norm2.bias]

    def forward(self, f):
        x = F.linear(f, self.fc1_w * 0.1, self.fc1_b * 0.1)
        x = F.leaky_relu(x, 0.2)
        x = self.norm1(x)
        x = F.linear(x, self.fc2_w * 0.1, self.fc2_b * 0.1)
        x = self.norm2(x)
        return x.reshape(f.shape[0], 2, self.token_dim)


class EmbeddingWithIdentity(torch.nn.Module):
    """Token embedding whose rows after the vocabulary are the (differentiable) identity."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.identity = None

    def forward(self, ids):
        return F.embedding(ids, torch.cat([self.table, self.identity]))


def main():
    tokenizer = CLIPTokenizer.from_pretrained(str(TINY_SD / "tokenizer"))
    text_encoder = CLIPTextModel.from_pretrained(str(TINY_SD / "text_encoder")).eval()
    unet = UNet2DConditionModel.from_pretrained(str(TINY_SD / "unet")).eval()
    vae = AutoencoderKL.from_pretrained(str(TINY_SD / "vae")).eval()
    ddpm = DDPMScheduler.from_pretrained(str(TINY_SD / "scheduler"))
    for m in (text_encoder, unet, vae):
        m.requires_grad_(False)
    vocab = text_encoder.config.vocab_size
    width = text_encoder.config.hidden_size
    tokenizer.add_tokens(["v1*", "v2*"])
    placeholder_ids = tokenizer.convert_tokens_to_ids(["v1*", "v2*"])
    embeddings = text_encoder.get_input_embeddings()
    embeddings_owner = next(m for m in text_encoder.modules() if getattr(m, "token_embedding", None) is embeddings)
    identity_embedding = EmbeddingWithIdentity(embeddings.weight.detach())
    embeddings_owner.token_embedding = identity_embedding
    scaling = vae.config.scaling_factor
    alphas_cumprod = ddpm.alphas_cumprod

    tensors, cases = {}, []
    for case_index, (name, t, caption, max_norm) in enumerate(CASES):
        seed(100 + case_index)
        mlp = IdentityMlp(width)
        mean = torch.randn(2, width) * 0.01
        std = torch.rand(2, width) * 0.02 + 0.005
        feature = torch.randn(1, FEATURE_DIM)
        image = torch.rand(1, 3, 64, 64) * 2 - 1
        face = (torch.rand(1, 1, 8, 8) > 0.4).float()
        hair = (torch.rand(1, 1, 8, 8) > 0.7).float() * (1 - face)
        noise = torch.randn(1, 4, 8, 8)
        posterior_noise = torch.randn(1, 4, 8, 8)
        for pname, p in zip(PARAM_NAMES, mlp.params()):
            tensors[f"{name}.before.{pname}"] = p.detach().clone()
        tensors.update({f"{name}.basis_mean": mean, f"{name}.basis_std": std, f"{name}.feature": feature,
                        f"{name}.image": image, f"{name}.face_mask": face, f"{name}.hair_mask": hair,
                        f"{name}.noise": noise, f"{name}.posterior_noise": posterior_noise})

        identity = mean + mlp(feature)[0] * std
        # Placeholder ids from the tokenizer -> rows vocab, vocab + 1 of the extended table.
        ids = tokenizer(caption, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        for k, pid in enumerate(placeholder_ids):
            ids[ids == pid] = vocab + k
        identity_embedding.identity = identity
        context = text_encoder(ids)[0]

        posterior = vae.encode(image).latent_dist
        latents = (posterior.mean + posterior.std * posterior_noise) * scaling
        timesteps = torch.tensor([t])
        noisy = ddpm.add_noise(latents, noise, timesteps)
        eps_hat = unet(noisy, timesteps, context).sample
        if t > 600:
            pred, target = eps_hat, noise
        else:
            abar = alphas_cumprod[t]
            z0_hat = (noisy - (1 - abar).sqrt() * eps_hat) / abar.sqrt()
            pred, target = z0_hat / scaling, latents / scaling
        loss = F.mse_loss(face * pred, face * target) + 0.1 * F.mse_loss(hair * pred, hair * target)
        loss.backward()
        for pname, p in zip(PARAM_NAMES, mlp.params()):
            tensors[f"{name}.grad.{pname}"] = p.grad.detach().clone()
        grad_norm = torch.nn.utils.clip_grad_norm_(mlp.params(), max_norm)
        optimizer = torch.optim.AdamW(mlp.params(), lr=5e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
        optimizer.step()
        for pname, p in zip(PARAM_NAMES, mlp.params()):
            tensors[f"{name}.after.{pname}"] = p.detach().clone()
        tensors[f"{name}.identity"] = identity.detach()
        cases.append({"name": name, "timestep": t, "caption": caption, "loss": loss.item(),
                      "grad_norm": grad_norm.item(), "max_grad_norm": max_norm})
        print(name, "loss", loss.item(), "grad norm", grad_norm.item())
    save_tensors(PARITY / "learner_step.safetensors", tensors)
    (PARITY / "learner_step.json").write_text(json.dumps(cases, indent=2))


if __name__ == "__main__":
    main()
