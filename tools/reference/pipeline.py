"""Whole-pipeline reference: diffusers' StableDiffusionPipeline on tests/fixtures/tiny-sd, from
stored initial latents, with an identity written into the `v1*` `v2*` token rows the way
textual-inversion loading does. Writes tests/fixtures/parity/pipeline.safetensors (+ .json)."""
import json
import subprocess

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
)

from common import PARITY, REPO, TINY_SD, save_tensors, seed

SAMPLERS = {"dpm++": DPMSolverMultistepScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}

# (name, prompt, negative prompt, uses identity, sampler, steps, guidance)
CASES = [
    ("identity_guided", "a photo of v1* v2* smiling", "", True, "dpm++", 10, 8.5),
    ("identity_unguided", "a photo of v1* v2* smiling", "", True, "dpm++", 10, 1.0),
    ("plain_negative", "an oil painting of a lighthouse", "blurry", False, "dpm++", 10, 7.5),
    ("identity_ddim", "v1* v2* as an astronaut", "", True, "ddim", 8, 8.5),
    ("identity_euler", "v1* v2* as an astronaut", "", True, "euler", 8, 8.5),
]


def main():
    pipe = StableDiffusionPipeline.from_pretrained(str(TINY_SD), safety_checker=None, feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    seed(7)
    identity = torch.randn(2, pipe.text_encoder.config.hidden_size)
    latents = torch.randn(1, 4, 8, 8)

    # Textual-inversion style: two new tokens whose embedding rows hold the identity.
    pipe.tokenizer.add_tokens(["v1*", "v2*"])
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
    ids = pipe.tokenizer.convert_tokens_to_ids(["v1*", "v2*"])
    with torch.no_grad():
        pipe.text_encoder.get_input_embeddings().weight[ids] = identity

    tensors = {"identity": identity, "latents": latents}
    cases = []
    base_config = pipe.scheduler.config
    for name, prompt, negative, uses_identity, sampler, steps, guidance in CASES:
        pipe.scheduler = SAMPLERS[sampler].from_config(base_config)
        with torch.no_grad():
            image = pipe(
                prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                latents=latents.clone(), height=64, width=64, output_type="np",
            ).images
        tensors[name] = torch.from_numpy(image).permute(0, 3, 1, 2)
        cases.append({"name": name, "prompt": prompt, "negative_prompt": negative, "identity": uses_identity,
                      "sampler": sampler, "steps": steps, "guidance": guidance})
    save_tensors(PARITY / "pipeline.safetensors", tensors)
    (PARITY / "pipeline.json").write_text(json.dumps(cases, indent=2))
    check_exported_identity(latents, base_config)


def check_exported_identity(latents, scheduler_config):
    """`stableid export --format diffusers` of the identity above, loaded by diffusers'
    load_textual_inversion into a fresh pipeline: the image it makes is recorded for the Rust test."""
    exported = PARITY / "identity-diffusers.safetensors"
    subprocess.run(
        ["cargo", "run", "--release", "--quiet", "--", "export", str(PARITY / "pipeline.safetensors"),
         "--format", "diffusers", "--out", str(exported), "--force"],
        cwd=REPO, check=True,
    )
    pipe = StableDiffusionPipeline.from_pretrained(str(TINY_SD), safety_checker=None, feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(scheduler_config)
    pipe.load_textual_inversion(str(exported), token="<me>")
    with torch.no_grad():
        image = pipe("a photo of <me> smiling", num_inference_steps=10, guidance_scale=8.5,
                     latents=latents.clone(), height=64, width=64, output_type="np").images
    save_tensors(PARITY / "identity_export.safetensors", {"image": torch.from_numpy(image).permute(0, 3, 1, 2)})


if __name__ == "__main__":
    main()
