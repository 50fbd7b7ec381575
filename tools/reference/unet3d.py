"""Text-to-video reference: a tiny ModelScope-style UNet3DConditionModel (every parameter perturbed, so
the zero-initialised last temporal convolution `temp_convs.*.conv4.3` is not zero) and whole
TextToVideoSDPipeline runs with it and tests/fixtures/tiny-sd's text encoder and VAE.

Writes tests/fixtures/tiny-video/ (a diffusers text-to-video folder: the UNet3D stored in fp16, as
ali-vilab/text-to-video-ms-1.7b's `diffusion_pytorch_model.fp16.safetensors`, ModelScope's DDIM
scheduler config, tiny-sd's tokenizer, text encoder and VAE), and tests/fixtures/parity/unet3d.safetensors
(+ .json): UNet outputs for 1, 2 and 3 frames at several timesteps, and pipeline frames from stored
initial latents, with and without an identity, with DDIM and DPM-Solver++."""
import json
import shutil

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline, TextToVideoSDPipeline
from diffusers.models import UNet3DConditionModel
from safetensors.torch import save_file

from common import FIXTURES, PARITY, TINY_SD, save_tensors, seed

TINY_VIDEO = FIXTURES / "tiny-video"
SAMPLERS = {"dpm++": DPMSolverMultistepScheduler, "ddim": DDIMScheduler}

# scheduler/scheduler_config.json of ali-vilab/text-to-video-ms-1.7b.
MODELSCOPE_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.15.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def make_unet():
    """ModelScope's block layout at tiny widths; `attention_head_dim` is the head width here (8), as 64 is there."""
    seed(41)
    unet = UNet3DConditionModel(
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=8,
        sample_size=4,
    )
    with torch.no_grad():
        for name, p in unet.named_parameters():
            p.add_(torch.randn_like(p) * (0.2 if "temp_convs" in name and name.endswith(("conv4.3.weight", "conv4.3.bias")) else 0.02))
            # Stored in fp16: compute with exactly the stored values.
            p.copy_(p.half().float())
    return unet.eval()


def write_folder(unet):
    if TINY_VIDEO.exists():
        shutil.rmtree(TINY_VIDEO)
    for component in ("tokenizer", "text_encoder", "vae"):
        shutil.copytree(TINY_SD / component, TINY_VIDEO / component)
    unet.save_pretrained(str(TINY_VIDEO / "unet"), safe_serialization=True)
    (TINY_VIDEO / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    state = {k: v.half().contiguous() for k, v in unet.state_dict().items()}
    save_file(state, str(TINY_VIDEO / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    (TINY_VIDEO / "scheduler").mkdir()
    (TINY_VIDEO / "scheduler" / "scheduler_config.json").write_text(json.dumps(MODELSCOPE_SCHEDULER, indent=2))
    (TINY_VIDEO / "model_index.json").write_text(json.dumps({
        "_class_name": "TextToVideoSDPipeline",
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet3DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }, indent=2))


def unet_cases(unet):
    out = {}
    seed(42)
    for frames, timesteps in [(1, [999.0]), (2, [10.0, 500.0]), (3, [250.0])]:
        for t in timesteps:
            sample = torch.randn(2, 4, frames, 4, 6)
            context = torch.randn(2, 77, 32)
            with torch.no_grad():
                result = unet(sample, torch.tensor(t), encoder_hidden_states=context).sample
            key = f"unet.f{frames}.t{int(t)}"
            out.update({f"{key}.sample": sample, f"{key}.context": context, f"{key}.out": result,
                        f"{key}.timestep": torch.tensor([t])})
    return out


# (name, prompt, negative prompt, sampler, steps, guidance, frames, (width, height), identity?)
CASES = [
    ("ddim_identity", "v1* v2* is cooking, face to the camera", "", "ddim", 5, 9.0, 3, (32, 24), True),
    ("dpm_identity", "a video of v1* v2* laughing", "blurry", "dpm++", 5, 9.0, 2, (24, 24), True),
    ("ddim_plain", "a dog running on a beach", "", "ddim", 4, 9.0, 2, (24, 32), False),
    ("dpm_unguided_one_frame", "a photo of v1* v2*", "", "dpm++", 4, 1.0, 1, (24, 24), True),
]


def main():
    unet = make_unet()
    write_folder(unet)
    tensors = unet_cases(unet)

    base = StableDiffusionPipeline.from_pretrained(str(TINY_SD), safety_checker=None, feature_extractor=None)
    seed(7)
    identity = torch.randn(2, base.text_encoder.config.hidden_size)
    tensors["identity"] = identity
    cases = []
    for index, (name, prompt, negative, sampler, steps, guidance, frames, (w, h), with_identity) in enumerate(CASES):
        text_encoder, tokenizer = base.text_encoder, base.tokenizer
        if with_identity:
            # StableIdentity's way: two new tokens whose embeddings are the identity's vectors.
            tokenizer = type(base.tokenizer).from_pretrained(str(TINY_SD / "tokenizer"))
            tokenizer.add_tokens(["v1*", "v2*"])
            text_encoder = type(base.text_encoder).from_pretrained(str(TINY_SD / "text_encoder"))
            text_encoder.resize_token_embeddings(len(tokenizer))
            ids = tokenizer.convert_tokens_to_ids(["v1*", "v2*"])
            with torch.no_grad():
                text_encoder.get_input_embeddings().weight[ids] = identity
        pipe = TextToVideoSDPipeline(
            vae=base.vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            scheduler=SAMPLERS[sampler].from_config(MODELSCOPE_SCHEDULER),
        )
        pipe.set_progress_bar_config(disable=True)
        seed(200 + index)
        latents = torch.randn(1, 4, frames, h // 8, w // 8)
        with torch.no_grad():
            video = pipe(prompt, negative_prompt=negative or None, num_frames=frames, height=h, width=w,
                         num_inference_steps=steps, guidance_scale=guidance, latents=latents.clone(),
                         output_type="pt").frames
        tensors[f"{name}.latents"] = latents
        # (frames, 3, h, w) in [0, 1].
        tensors[f"{name}.frames"] = video[0]
        cases.append({"name": name, "prompt": prompt, "negative_prompt": negative, "sampler": sampler,
                      "steps": steps, "guidance": guidance, "frames": frames, "size": [w, h],
                      "identity": with_identity})
    save_tensors(PARITY / "unet3d.safetensors", tensors)
    (PARITY / "unet3d.json").write_text(json.dumps(cases, indent=2))


if __name__ == "__main__":
    main()
