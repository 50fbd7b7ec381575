"""Times diffusers' StableDiffusionPipeline the way `stableid generate` is timed in
docs/benchmarks.md: weights read from a diffusers folder, one image, Euler, guidance 8.5; prints
the load time, the time per guided step and the process's peak resident memory.

    tools/reference/.venv/bin/python tools/bench/diffusers_generate.py MODEL_DIR \
        [--res 256] [--steps 5] [--threads 2] [--dtype f32|f16]

Compare with `/usr/bin/time -f %M stableid generate ... --model MODEL_DIR --sampler euler`
(tools/bench/random_sd21.py writes a folder shaped as SD 2.1-base with random weights).
"""

import argparse
import json
import resource
import time

import torch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--res", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["f32", "f16"], default="f32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    dtype = torch.float16 if args.dtype == "f16" else torch.float32
    start = time.perf_counter()
    # Component by component: the folder needs no model_index.json, as for `stableid generate`.
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(args.model, subfolder="vae", torch_dtype=dtype),
        text_encoder=CLIPTextModel.from_pretrained(args.model, subfolder="text_encoder", torch_dtype=dtype),
        tokenizer=CLIPTokenizer.from_pretrained(args.model, subfolder="tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(args.model, subfolder="unet", torch_dtype=dtype),
        scheduler=EulerDiscreteScheduler.from_pretrained(args.model, subfolder="scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    loaded = time.perf_counter() - start

    step_times = []
    last = [time.perf_counter()]

    def on_step(pipeline, step, timestep, kwargs):
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now
        return kwargs

    generator = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    last[0] = start
    with torch.no_grad():
        pipe(
            "a photo of an astronaut",
            height=args.res,
            width=args.res,
            num_inference_steps=args.steps,
            guidance_scale=8.5,
            generator=generator,
            callback_on_step_end=on_step,
        )
    total = time.perf_counter() - start
    steps = sorted(step_times)
    print(
        json.dumps(
            {
                "load_seconds": round(loaded, 2),
                "generate_seconds": round(total, 2),
                "median_step_seconds": round(steps[len(steps) // 2], 3),
                "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                "torch": torch.__version__,
                "res": args.res,
                "steps": args.steps,
                "dtype": args.dtype,
                "threads": args.threads,
            }
        )
    )


if __name__ == "__main__":
    main()
