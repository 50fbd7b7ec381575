"""The PyTorch side of `stableid bench`: the same measurements with diffusers' UNet2DConditionModel and
AutoencoderKL and transformers' CLIPTextModel, built at the same SD 2.1-base configs (read from the
constants of src/models/stable_diffusion.rs, so both sides build the same models) with random weights:

- learn: one StableIdentity learning step: equalized-linear MLP -> AdaIN landing -> v1*/v2* token
  rows -> CLIPTextModel -> VAE encode of the photo (no grad) -> noising at t = LEARN_TIMESTEP (500,
  the reconstruction phase: z0 is predicted from the UNet's noise) -> UNet -> masked two-phase loss
  -> backward -> clip_grad_norm_(1.0) -> AdamW. Frozen models have requires_grad False.
- denoise: one classifier-free-guidance step: the UNet on a batch of 2 and the guidance.
- controlnet: the same step steered by ControlNetModel.from_unet(unet) (random weights): the ControlNet
  on a batch of 2 with the control image, the UNet with its residuals, the guidance.
- vae_encode, vae_decode, text: as named, under torch.no_grad().
- video (only when asked for): one guided step of ModelScope's text-to-video UNet3DConditionModel
  (random weights) on 16 frames at --res, guidance 9.
- align (with --photo): photo_load (PIL, EXIF orientation), face_detect (facenet-pytorch's
  MTCNN.detect) and face_align (the FFHQ recipe's crop of the largest face, tools/reference/align.py).

Times are the median of --repeats runs after --warmup runs. Memory: on the CPU the resident set
size (VmRSS, peak VmHWM reset before each measurement through /proc/self/clear_refs, as the Rust
side does; resource.getrusage's process peak where that is unavailable); on CUDA the device memory
in use sampled every millisecond (torch.cuda.mem_get_info, as the Rust side) and
torch.cuda.max_memory_allocated.

--profile runs each measurement once more under torch.profiler and reports its ops by self time
(device time on CUDA, CPU time on the CPU), to compare with `stableid bench --profile`.

Run from the repo root:  /work/venv/bin/python tools/bench/pytorch_bench.py --res 256 [--json]
"""
import argparse
import json
import os
import re
import resource
import statistics
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
SD_CONFIGS_RS = REPO / "src" / "models" / "stable_diffusion.rs"
BENCH_RS = REPO / "src" / "bench" / "mod.rs"
FEATURE_DIM = 768  # ViT-B/16 CLS feature
PROMPT_TOKENS = 77
DENOISE_TIMESTEP = 981.0
HAIR_WEIGHT = 0.1
PHASE_THRESHOLD = 600
MODEL_MEASURES = ("learn", "denoise", "controlnet", "vae", "text")
MEASURES = (*MODEL_MEASURES, "align", "video")
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def rust_constants():
    """The configs of src/models/stable_diffusion.rs and the constants of src/bench/mod.rs."""
    configs = SD_CONFIGS_RS.read_text()
    bench = BENCH_RS.read_text()

    def config(name):
        body = re.search(rf'pub const {name}: &str = r#"(.*?)"#;', configs, re.S).group(1)
        return {k: v for k, v in json.loads(body).items() if not k.startswith("_")}

    def number(name):
        return float(re.search(rf"pub const {name}: \w+ = ([0-9.]+);", bench).group(1))

    return {
        "unet": config("SD21_BASE_UNET"),
        "text_encoder": config("SD21_BASE_TEXT_ENCODER"),
        "vae": config("SD21_BASE_VAE"),
        "scheduler": config("SD21_BASE_SCHEDULER"),
        "learn_timestep": int(number("LEARN_TIMESTEP")),
        "guidance_scale": number("GUIDANCE_SCALE"),
        "video_frames": int(number("VIDEO_FRAMES")),
        "video_guidance_scale": number("VIDEO_GUIDANCE_SCALE"),
    }


class IdentityMlp(torch.nn.Module):
    """768 -> EqualLinear -> LeakyReLU(0.2) -> LayerNorm -> EqualLinear -> LayerNorm, lr_mul 0.1."""

    def __init__(self, token_dim):
        super().__init__()
        hidden = 2 * token_dim
        self.fc1_w = torch.nn.Parameter(torch.randn(hidden, FEATURE_DIM) * 0.02)
        self.fc1_b = torch.nn.Parameter(torch.zeros(hidden))
        self.norm1 = torch.nn.LayerNorm(hidden, eps=1e-5)
        self.fc2_w = torch.nn.Parameter(torch.randn(hidden, hidden) * 0.02)
        self.fc2_b = torch.nn.Parameter(torch.zeros(hidden))
        self.norm2 = torch.nn.LayerNorm(hidden, eps=1e-5)
        self.token_dim = token_dim

    def forward(self, f):
        x = F.linear(f, self.fc1_w * 0.1, self.fc1_b * 0.1)
        x = self.norm1(F.leaky_relu(x, 0.2))
        x = self.norm2(F.linear(x, self.fc2_w * 0.1, self.fc2_b * 0.1))
        return x.reshape(f.shape[0], 2, self.token_dim)


class TokenEmbeddingWithIdentity(torch.nn.Module):
    """The frozen token table; ids from `vocab` on take the rows of `identity` (differentiable)."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.vocab = table.shape[0]
        self.identity = None

    def forward(self, ids):
        rows = F.embedding(ids.clamp(max=self.vocab - 1), self.table)
        extra = ids >= self.vocab
        picked = self.identity.to(rows.dtype)[(ids - self.vocab).clamp(min=0)]
        return torch.where(extra.unsqueeze(-1), picked, rows)


class Memory:
    """Memory in use and its peak since the last reset (see the module doc)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.peak_used = 0
        if self.cuda:
            self.description = ("device memory in use (total - free, as nvidia-smi counts it: CUDA context and "
                                "caching allocator included; peak sampled every millisecond)")
            self.stop = threading.Event()
            self.sampler = threading.Thread(target=self._sample, daemon=True)
            self.sampler.start()
        else:
            self.description = "resident set size (VmRSS; peak VmHWM, reset before each measurement)"

    def _used(self):
        free, total = torch.cuda.mem_get_info()
        return total - free

    def _sample(self):
        while not self.stop.is_set():
            self.peak_used = max(self.peak_used, self._used())
            time.sleep(0.001)

    def current(self):
        return self._used() if self.cuda else proc_status_bytes("VmRSS:")

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.peak_used = self._used()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass  # the peak stays the process's

    def close(self):
        if self.cuda:
            self.stop.set()
            self.sampler.join()

    def peak(self):
        if self.cuda:
            return max(self.peak_used, self._used())
        peak = proc_status_bytes("VmHWM:")
        return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def proc_status_bytes(field):
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line[len(field):].split()[0]) * 1024
    except OSError:
        pass
    return None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name, args, memory, op, device):
    before = memory.current()
    memory.reset_peak()
    for _ in range(args.warmup):
        op()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        op()
        sync(device)
        times.append(time.perf_counter() - start)
    result = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": times,
              "memory_before_bytes": before, "peak_memory_bytes": memory.peak()}
    if memory.cuda:
        result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    if args.profile:
        result["profile"] = profile(op, device)
    return name, result


def profile(op, device, top=25):
    """One run of `op` under torch.profiler: total seconds and the `top` ops by self time."""
    from torch.profiler import ProfilerActivity
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        op()
        sync(device)
        total = time.perf_counter() - start
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    ops = [{"name": e.key, "calls": e.count, "seconds": getattr(e, key) / 1e6} for e in events[:top]]
    return {"total_s": total, "time": key, "ops": ops}


def caption_ids(vocab, device):
    """"a photo of v1* v2*" as src/bench/measure.rs writes it: BOS, 3 words, 2 placeholder rows, EOS, pad 0."""
    bos, eos = vocab - 2, vocab - 1
    ids = [bos] + [w % bos for w in (320, 1125, 539)] + [vocab, vocab + 1, eos]
    ids += [0] * (PROMPT_TOKENS - len(ids))
    return torch.tensor([ids], device=device)


def measure_models(args, only, device, dtype, memory, results):
    """The measurements of the SD models (learn, denoise, controlnet, vae, text) into `results`;
    returns what the report says of the models."""
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    consts = rust_constants()
    start = time.perf_counter()
    text_encoder = CLIPTextModel(CLIPTextConfig(**consts["text_encoder"]))
    unet = UNet2DConditionModel(**consts["unet"])
    vae = AutoencoderKL(**consts["vae"])
    models = {"unet": unet, "text_encoder": text_encoder, "vae": vae}
    for model in models.values():
        model.requires_grad_(False).eval().to(device)
        if dtype != torch.float32:
            model.to(dtype)
    sync(device)
    build_s = time.perf_counter() - start
    memory_after_build = memory.current()
    ddpm = DDPMScheduler.from_config(consts["scheduler"])
    alphas_cumprod = ddpm.alphas_cumprod.to(device)
    scaling = vae.config.scaling_factor

    embeddings = text_encoder.get_input_embeddings()
    owner = next(m for m in text_encoder.modules() if getattr(m, "token_embedding", None) is embeddings)
    token_embedding = TokenEmbeddingWithIdentity(embeddings.weight)
    owner.token_embedding = token_embedding

    width = text_encoder.config.hidden_size
    vocab = text_encoder.config.vocab_size
    latent_side = args.res // 8
    latent_shape = (1, unet.config.in_channels, latent_side, latent_side)
    image = torch.rand(1, 3, args.res, args.res, device=device) * 2 - 1
    ids = caption_ids(vocab, device)
    basis_mean = torch.randn(2, width, device=device) * 0.01
    basis_std = torch.randn(2, width, device=device).abs() * 0.01 + 0.005
    mlp = IdentityMlp(width).to(device)

    if "learn" in only:
        t = consts["learn_timestep"]
        optimizer = torch.optim.AdamW(mlp.parameters(), lr=5e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
        feature = torch.randn(1, FEATURE_DIM, device=device)
        face = (torch.rand(1, 1, latent_side, latent_side, device=device) >= 0.4).float()
        hair = (torch.rand(1, 1, latent_side, latent_side, device=device) >= 0.8).float()
        noise = torch.randn(latent_shape, device=device)
        posterior_noise = torch.randn(latent_shape, device=device)
        timesteps = torch.tensor([t], device=device)
        abar = alphas_cumprod[t]

        def learn_step():
            optimizer.zero_grad(set_to_none=True)
            token_embedding.identity = basis_mean + mlp(feature)[0] * basis_std
            context = text_encoder(ids)[0]
            with torch.no_grad():
                posterior = vae.encode(image.to(dtype)).latent_dist
                latents = (posterior.mean + posterior.std * posterior_noise.to(dtype)).float() * scaling
            noisy = ddpm.add_noise(latents, noise, timesteps)
            eps_hat = unet(noisy.to(dtype), timesteps, context).sample.float()
            if t > PHASE_THRESHOLD:
                pred, target = eps_hat, noise
            else:
                z0_hat = (noisy - (1 - abar).sqrt() * eps_hat) / abar.sqrt()
                pred, target = z0_hat / scaling, latents / scaling
            loss = F.mse_loss(face * pred, face * target) + HAIR_WEIGHT * F.mse_loss(hair * pred, hair * target)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(mlp.parameters(), 1.0)
            optimizer.step()
            return loss.item()

        name, result = measure("learn", args, memory, learn_step, device)
        results[name] = result

    with torch.no_grad():
        if "denoise" in only:
            latents = torch.randn(latent_shape, device=device)
            context = torch.randn(2, PROMPT_TOKENS, width, device=device).to(dtype)
            t = torch.full((2,), DENOISE_TIMESTEP, device=device)

            def denoise_step():
                pred = unet(torch.cat([latents, latents]).to(dtype), t, context).sample.float()
                uncond, text = pred.chunk(2)
                return uncond + consts["guidance_scale"] * (text - uncond)

            name, result = measure("denoise", args, memory, denoise_step, device)
            results[name] = result
        if "controlnet" in only:
            controlnet = ControlNetModel.from_unet(unet).requires_grad_(False).eval().to(device, dtype)
            latents = torch.randn(latent_shape, device=device)
            context = torch.randn(2, PROMPT_TOKENS, width, device=device).to(dtype)
            control_image = ((image + 1) / 2).to(dtype).repeat(2, 1, 1, 1)
            t = torch.full((2,), DENOISE_TIMESTEP, device=device)

            def controlnet_step():
                sample = torch.cat([latents, latents]).to(dtype)
                down, mid = controlnet(sample, t, encoder_hidden_states=context, controlnet_cond=control_image,
                                       conditioning_scale=1.0, return_dict=False)
                pred = unet(sample, t, context, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid).sample.float()
                uncond, text = pred.chunk(2)
                return uncond + consts["guidance_scale"] * (text - uncond)

            name, result = measure("controlnet", args, memory, controlnet_step, device)
            results[name] = result
            del controlnet
        if "vae" in only:
            image_in = image.to(dtype)
            name, result = measure("vae_encode", args, memory, lambda: vae.encode(image_in).latent_dist, device)
            results[name] = result
            z = torch.randn(latent_shape, device=device).to(dtype)
            name, result = measure("vae_decode", args, memory, lambda: vae.decode(z).sample, device)
            results[name] = result
        if "text" in only:
            token_embedding.identity = basis_mean
            name, result = measure("text", args, memory, lambda: text_encoder(ids)[0], device)
            results[name] = result

    return {
        "parameters": {**{k: sum(p.numel() for p in m.parameters()) for k, m in models.items()},
                       "mlp": sum(p.numel() for p in mlp.parameters())},
        "build_s": build_s,
        "memory_after_build_bytes": memory_after_build,
    }


def measure_video(args, device, dtype, memory, results):
    """One guided denoising step of ModelScope's text-to-video UNet (diffusers' default
    UNet3DConditionModel config, which is ModelScope's; random weights) on 16 frames, guidance 9."""
    from diffusers import UNet3DConditionModel

    consts = rust_constants()
    unet = UNet3DConditionModel().requires_grad_(False).eval().to(device, dtype)
    side = args.res // 8
    latents = torch.randn(1, unet.config.in_channels, consts["video_frames"], side, side, device=device)
    context = torch.randn(2, PROMPT_TOKENS, unet.config.cross_attention_dim, device=device).to(dtype)
    t = torch.full((2,), DENOISE_TIMESTEP, device=device)

    def video_step():
        pred = unet(torch.cat([latents, latents]).to(dtype), t, context).sample.float()
        uncond, text = pred.chunk(2)
        return uncond + consts["video_guidance_scale"] * (text - uncond)

    with torch.no_grad():
        name, results[name] = measure("video", args, memory, video_step, device)


def measure_align(args, memory, results):
    """Face detection and alignment of --photo as the Rust side times them: reading the photo (PIL,
    EXIF orientation), facenet-pytorch's MTCNN.detect, and the FFHQ recipe's crop of the largest
    face at 512 (tools/reference/align.py: numpy, scipy and PIL, warped at the recipe's 4096)."""
    import sys

    from facenet_pytorch import MTCNN
    from PIL import Image, ImageOps

    sys.path.insert(0, str(REPO / "tools" / "reference"))
    from align import ffhq_align

    def load():
        with Image.open(args.photo) as img:
            return ImageOps.exif_transpose(img).convert("RGB")

    mtcnn = MTCNN(device="cpu")
    name, results[name] = measure("photo_load", args, memory, load, torch.device("cpu"))
    photo = load()
    name, results[name] = measure("face_detect", args, memory, lambda: mtcnn.detect(photo, landmarks=True),
                                  torch.device("cpu"))
    boxes, _, landmarks = mtcnn.detect(photo, landmarks=True)
    if boxes is None:
        raise SystemExit(f"no face found in {args.photo}")
    largest = max(range(len(boxes)), key=lambda i: (boxes[i][2] - boxes[i][0]) * (boxes[i][3] - boxes[i][1]))
    name, results[name] = measure("face_align", args, memory, lambda: ffhq_align(photo, landmarks[largest], 512),
                                  torch.device("cpu"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--res", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", help="comma-separated: learn,denoise,controlnet,vae,text,align,video "
                        "(default: learn,denoise,controlnet,vae,text, and align with --photo)")
    parser.add_argument("--photo", help="the photo the align measurement reads, detects and aligns")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="f32", help="the frozen models' dtype")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch.set_num_threads (default: every core this process may use, as candle)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--profile", action="store_true", help="one more run of each under torch.profiler")
    parser.add_argument("--tf32", action="store_true",
                        help="TF32 tensor cores for f32 matrix products too (PyTorch's default: convolutions only)")
    args = parser.parse_args()
    only = args.only.split(",") if args.only else [*MODEL_MEASURES, *(["align"] if args.photo else [])]
    unknown = set(only) - set(MEASURES)
    if unknown:
        parser.error(f"--only: unknown {sorted(unknown)}; expected some of {','.join(MEASURES)}")
    if args.res % 64:
        parser.error(f"--res {args.res} must be a multiple of 64")
    if "align" in only and not args.photo:
        parser.error("the align measurement needs --photo")

    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    memory = Memory(device)
    results = {}
    models = None
    if set(only) & set(MODEL_MEASURES):
        models = measure_models(args, only, device, dtype, memory, results)
    if "video" in only:
        measure_video(args, device, dtype, memory, results)
    if "align" in only:
        measure_align(args, memory, results)

    import diffusers
    import transformers

    report = {
        "implementation": "pytorch",
        "version": f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}",
        "device": "cpu" if device.type == "cpu" else f"cuda:{torch.cuda.current_device()}",
        "dtype": args.dtype,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "threads": torch.get_num_threads(),
        "resolution": args.res,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "learn_timestep": rust_constants()["learn_timestep"],
        "guidance_scale": rust_constants()["guidance_scale"],
        **(models or {}),
        "memory": memory.description,
        "results": results,
    }
    memory.close()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        built = f"; built in {models['build_s']:.1f} s" if models else ""
        print(f"PyTorch ({report['version']}), {report['device']}, {args.dtype}, {report['threads']} threads, "
              f"{args.res}x{args.res}, warm-up {args.warmup}, repeats {args.repeats}{built}")
        print(f"{'measurement':<12} {'median':>10} {'min':>10} {'max':>10} {'mem before':>12} {'mem peak':>12}")
        gib = lambda b: f"{b / 2**30:.2f} GiB" if b is not None else "-"
        for name, r in results.items():
            print(f"{name:<12} {r['median_s']:>9.3f}s {r['min_s']:>9.3f}s {r['max_s']:>9.3f}s "
                  f"{gib(r['memory_before_bytes']):>12} {gib(r['peak_memory_bytes']):>12}")
        for name, r in results.items():
            if "profile" in r:
                p = r["profile"]
                print(f"\n{name}, one run under torch.profiler: {p['total_s'] * 1e3:.1f} ms; ops by {p['time']}")
                for op in p["ops"]:
                    print(f"{op['name'][:40]:<40} {op['calls']:>6} {op['seconds'] * 1e3:>10.2f} ms")


if __name__ == "__main__":
    main()
