"""UNet parity fixtures (diffusers UNet2DConditionModel).

Writes
- tests/fixtures/parity/unet.safetensors: outputs of tests/fixtures/tiny-sd/unet (SD 2.x style:
  linear projections, per-block head counts) for a batch with two timesteps, single timesteps
  broadcast over a batch, and a latent size not divisible by the downsampling factor;
- tests/fixtures/parity/unet_residuals.safetensors: the same UNet with additional residuals (a
  ControlNet's) added to its skip connections and mid block;
- tests/fixtures/unet-sd15/: a tiny SD 1.5-style UNet (1x1 convolution projections, one head
  count for all blocks, 3 blocks), plus tests/fixtures/parity/unet_sd15.safetensors. It also
  exercises config options the tiny SD 2.x UNet leaves at their defaults: `upcast_attention`,
  `transformer_layers_per_block` as a list, `flip_sin_to_cos` false and `freq_shift` 1.
"""
import math
import shutil

import torch
from diffusers import UNet2DConditionModel

from common import FIXTURES, PARITY, TINY_SD, save_tensors, seed

SD15 = FIXTURES / "unet-sd15"


def make_sd15_unet() -> UNet2DConditionModel:
    seed(10)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 24, 32), layers_per_block=1, attention_head_dim=8,
        cross_attention_dim=48, use_linear_projection=False, norm_num_groups=8,
        transformer_layers_per_block=[1, 2, 1], upcast_attention=True,
        flip_sin_to_cos=False, freq_shift=1,
    )
    # Every weight random (diffusers zero-initialises nothing here, but norms start at 1/0):
    # matrices scaled by their fan-in so activations stay of order one through the net.
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    if SD15.exists():
        shutil.rmtree(SD15)
    unet.save_pretrained(str(SD15))
    return unet


def run(unet, sample, timesteps, context):
    with torch.no_grad():
        return unet(sample, timesteps, encoder_hidden_states=context).sample


def tiny_sd_cases() -> dict:
    unet = UNet2DConditionModel.from_pretrained(str(TINY_SD / "unet")).eval()
    cross = unet.config.cross_attention_dim
    seed(11)
    out = {}
    # Two samples, each at its own timestep.
    s, c = torch.randn(2, 4, 8, 8), torch.randn(2, 77, cross)
    t = torch.tensor([999.0, 10.0])
    out.update({"batch.sample": s, "batch.timesteps": t, "batch.context": c, "batch.out": run(unet, s, t, c)})
    # One timestep, given as a (1,) tensor, for the whole batch.
    s, c = torch.randn(2, 4, 8, 8), torch.randn(2, 77, cross)
    out.update({"single.sample": s, "single.context": c})
    for t in (0, 500, 981):
        out[f"single.t{t}.out"] = run(unet, s, torch.tensor([float(t)]), c)
    # 9x7 latents: not divisible by the downsampling factor 2.
    s, c = torch.randn(1, 4, 9, 7), torch.randn(1, 77, cross)
    t = torch.tensor([250.0])
    out.update({"odd.sample": s, "odd.timesteps": t, "odd.context": c, "odd.out": run(unet, s, t, c)})
    return out


def residual_case() -> dict:
    """ControlNet's entry point on the tiny SD UNet: a random residual for every skip connection
    (conv_in's output, then each down block's states) and for the mid block's output."""
    unet = UNet2DConditionModel.from_pretrained(str(TINY_SD / "unet")).eval()
    cross = unet.config.cross_attention_dim
    seed(13)
    s, c = torch.randn(2, 4, 8, 8), torch.randn(2, 77, cross)
    t = torch.tensor([700.0, 40.0])
    shapes = []
    hooks = [unet.conv_in.register_forward_hook(lambda m, i, o: shapes.append(o.shape))]
    for block in unet.down_blocks:
        hooks.append(block.register_forward_hook(lambda m, i, o: shapes.extend(r.shape for r in o[1])))
    hooks.append(unet.mid_block.register_forward_hook(lambda m, i, o: shapes.append(o.shape)))
    run(unet, s, t, c)
    for hook in hooks:
        hook.remove()
    down = [0.5 * torch.randn(shape) for shape in shapes[:-1]]
    mid = 0.5 * torch.randn(shapes[-1])
    with torch.no_grad():
        result = unet(s, t, encoder_hidden_states=c, down_block_additional_residuals=tuple(down),
                      mid_block_additional_residual=mid).sample
    out = {"residuals.sample": s, "residuals.timesteps": t, "residuals.context": c,
           "residuals.mid": mid, "residuals.out": result}
    out.update({f"residuals.down.{i}": r for i, r in enumerate(down)})
    return out


def sd15_cases(unet) -> dict:
    seed(12)
    out = {}
    s, c = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 48)
    t = torch.tensor([999.0, 10.0])
    out.update({"batch.sample": s, "batch.timesteps": t, "batch.context": c, "batch.out": run(unet, s, t, c)})
    # 10x6 latents with a downsampling factor of 4: 10 -> 5 -> 3, so one upsampler doubles and
    # the other resizes 3 -> 5.
    s, c = torch.randn(2, 4, 10, 6), torch.randn(2, 77, 48)
    t = torch.tensor([500.0, 30.0])
    out.update({"odd.sample": s, "odd.timesteps": t, "odd.context": c, "odd.out": run(unet, s, t, c)})
    return out


def main():
    save_tensors(PARITY / "unet.safetensors", tiny_sd_cases())
    save_tensors(PARITY / "unet_residuals.safetensors", residual_case())
    sd15 = make_sd15_unet().eval()
    save_tensors(PARITY / "unet_sd15.safetensors", sd15_cases(sd15))


if __name__ == "__main__":
    main()
