"""ControlNet reference: two tiny SD2-style ControlNets made with diffusers' `ControlNetModel.from_unet`
from tests/fixtures/tiny-sd/unet, every parameter perturbed (so no zero convolution stays zero),
their residuals, and whole StableDiffusionControlNetPipeline runs on tests/fixtures/tiny-sd from
stored initial latents (guided, scale below 1 with a start/end window, guess mode, two ControlNets,
the control image's own size, red and blue swapped), with an identity in the prompt.

Writes tests/fixtures/tiny-controlnet/ (config.json + fp16 PyTorch `diffusion_pytorch_model.bin`, as
thibaud/controlnet-sd21-openpose-diffusers ships on its main branch), tests/fixtures/tiny-controlnet-2/
(config.json + `diffusion_pytorch_model.fp16.safetensors`), two control images under
tests/fixtures/controlnet/, and tests/fixtures/parity/controlnet.safetensors (+ .json)."""
import json
import shutil

import numpy as np
import torch
from PIL import Image, ImageDraw
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file

from common import FIXTURES, PARITY, TINY_SD, save_tensors, seed

SAMPLERS = {"dpm++": DPMSolverMultistepScheduler, "ddim": DDIMScheduler}
# The conditioning embedding halves the image three times, as the VAE does; few channels keep it small.
EMBEDDING_CHANNELS = (4, 8, 8, 16)


def make_controlnet(unet, seed_value):
    """from_unet, then every parameter moved off its value: the zero convolutions become random."""
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBEDDING_CHANNELS)
    seed(seed_value)
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.copy_(torch.randn_like(p) * 0.2)
            else:
                p.add_(torch.randn_like(p) * 0.02)
            # The weights are stored in fp16: compute with exactly the stored values.
            p.copy_(p.half().float())
    return controlnet.eval()


def save_pickle_fp16(controlnet, folder):
    """config.json + an fp16 `diffusion_pytorch_model.bin` (torch.save of the state dict)."""
    if folder.exists():
        shutil.rmtree(folder)
    controlnet.save_pretrained(str(folder), safe_serialization=True)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({k: v.half() for k, v in controlnet.state_dict().items()}, folder / "diffusion_pytorch_model.bin")


def save_safetensors_fp16(controlnet, folder):
    """config.json + `diffusion_pytorch_model.fp16.safetensors` (diffusers' fp16 variant)."""
    if folder.exists():
        shutil.rmtree(folder)
    controlnet.save_pretrained(str(folder), safe_serialization=True)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    state = {k: v.half().contiguous() for k, v in controlnet.state_dict().items()}
    save_file(state, str(folder / "diffusion_pytorch_model.fp16.safetensors"))


def pose_like_image(width, height, seed_value):
    """Coloured limbs and joints on black, like an OpenPose map, with soft edges from a resize."""
    rng = np.random.default_rng(seed_value)
    big = Image.new("RGB", (width * 4, height * 4))
    draw = ImageDraw.Draw(big)
    for _ in range(8):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, min(width, height) * 4, 4))
        draw.line((x0, y0, x1, y1), fill=colour, width=10)
        draw.ellipse((x1 - 12, y1 - 12, x1 + 12, y1 + 12), fill=colour)
    return big.resize((width, height), Image.BILINEAR)


def residual_cases(controlnet):
    seed(21)
    sample, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, controlnet.config.cross_attention_dim)
    t = torch.tensor([700.0, 40.0])
    cond = torch.rand(2, 3, 64, 64)
    out = {"residuals.sample": sample, "residuals.timesteps": t, "residuals.context": context, "residuals.cond": cond}
    bgr = ControlNetModel.from_config({**controlnet.config, "controlnet_conditioning_channel_order": "bgr"})
    bgr.load_state_dict(controlnet.state_dict())
    for name, model, scale, guess in [("plain", controlnet, 1.0, False), ("guess", controlnet, 0.7, True),
                                      ("bgr", bgr.eval(), 0.5, False)]:
        with torch.no_grad():
            down, mid = model(sample, t, encoder_hidden_states=context, controlnet_cond=cond,
                              conditioning_scale=scale, guess_mode=guess, return_dict=False)
        out.update({f"residuals.{name}.down.{i}": r for i, r in enumerate(down)})
        out[f"residuals.{name}.mid"] = mid
    return out


# (name, prompt, sampler, steps, guidance, [(controlnet index, image, scale, start, end, swap red/blue)],
#  guess mode, size or None for the control image's)
CASES = [
    ("guided", "a photo of v1* v2* dancing", "ddim", 6, 7.5, [(0, 0, 1.0, 0.0, 1.0, False)], False, (64, 64)),
    ("scale_window", "a photo of v1* v2* dancing", "dpm++", 6, 7.5, [(0, 0, 0.6, 0.2, 0.8, False)], False, (64, 64)),
    ("guess_mode", "v1* v2* on a beach", "ddim", 6, 7.5, [(0, 0, 0.8, 0.0, 1.0, False)], True, (64, 64)),
    ("two_controlnets", "v1* v2* on a beach", "ddim", 6, 7.5,
     [(0, 0, 0.8, 0.0, 1.0, False), (1, 1, 0.5, 0.0, 0.7, False)], False, (64, 64)),
    ("control_size", "a photo of v1* v2*", "ddim", 5, 7.5, [(1, 1, 1.0, 0.0, 1.0, False)], False, None),
    ("swapped_unguided", "a photo of v1* v2*", "ddim", 5, 1.0, [(0, 0, 1.0, 0.0, 1.0, True)], False, (64, 64)),
]


def main():
    unet = UNet2DConditionModel.from_pretrained(str(TINY_SD / "unet"))
    controlnets = [make_controlnet(unet, 31), make_controlnet(unet, 32)]
    save_pickle_fp16(controlnets[0], FIXTURES / "tiny-controlnet")
    save_safetensors_fp16(controlnets[1], FIXTURES / "tiny-controlnet-2")
    images_dir = FIXTURES / "controlnet"
    images_dir.mkdir(parents=True, exist_ok=True)
    image_files = [images_dir / "pose_80x72.png", images_dir / "pose_75x70.png"]
    for path, (w, h), s in zip(image_files, [(80, 72), (75, 70)], [1, 2]):
        pose_like_image(w, h, s).save(path)
    images = [Image.open(p) for p in image_files]

    tensors = residual_cases(controlnets[0])

    base = StableDiffusionPipeline.from_pretrained(str(TINY_SD), safety_checker=None, feature_extractor=None)
    seed(7)
    identity = torch.randn(2, base.text_encoder.config.hidden_size)
    base.tokenizer.add_tokens(["v1*", "v2*"])
    base.text_encoder.resize_token_embeddings(len(base.tokenizer))
    ids = base.tokenizer.convert_tokens_to_ids(["v1*", "v2*"])
    with torch.no_grad():
        base.text_encoder.get_input_embeddings().weight[ids] = identity
    tensors["identity"] = identity

    cases = []
    for index, (name, prompt, sampler, steps, guidance, controls, guess, size) in enumerate(CASES):
        (w, h) = size if size else tuple(s - s % 8 for s in images[controls[0][1]].size)
        seed(100 + index)
        latents = torch.randn(1, 4, h // 8, w // 8)
        nets = [controlnets[c[0]] for c in controls]
        pipe = StableDiffusionControlNetPipeline(
            vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
            controlnet=nets[0] if len(nets) == 1 else nets,
            scheduler=SAMPLERS[sampler].from_config(base.scheduler.config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        control_images = []
        for _, image_index, _, _, _, swap in controls:
            image = images[image_index]
            # What StableIdentity's notebook does to the pose map: `np.array(pose)[:, :, ::-1]`.
            control_images.append(Image.fromarray(np.array(image)[:, :, ::-1].copy()) if swap else image)
        one = len(controls) == 1
        with torch.no_grad():
            image = pipe(
                prompt, image=control_images[0] if one else control_images, num_inference_steps=steps,
                guidance_scale=guidance, latents=latents.clone(), output_type="np",
                height=size[1] if size else None, width=size[0] if size else None,
                controlnet_conditioning_scale=controls[0][2] if one else [c[2] for c in controls],
                control_guidance_start=controls[0][3] if one else [c[3] for c in controls],
                control_guidance_end=controls[0][4] if one else [c[4] for c in controls],
                guess_mode=guess,
            ).images
        tensors[f"{name}.latents"] = latents
        tensors[f"{name}.image"] = torch.from_numpy(image).permute(0, 3, 1, 2)
        cases.append({
            "name": name, "prompt": prompt, "sampler": sampler, "steps": steps, "guidance": guidance,
            "guess_mode": guess, "size": list(size) if size else None,
            "controls": [{"controlnet": ["tiny-controlnet", "tiny-controlnet-2"][c[0]],
                          "image": f"controlnet/{image_files[c[1]].name}", "scale": c[2], "start": c[3],
                          "end": c[4], "swap_red_blue": c[5]} for c in controls],
        })
    save_tensors(PARITY / "controlnet.safetensors", tensors)
    (PARITY / "controlnet.json").write_text(json.dumps(cases, indent=2))


if __name__ == "__main__":
    main()
