"""Shared helpers of the reference scripts: paths, seeding, saving tensors."""
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
PARITY = FIXTURES / "parity"
TINY_SD = FIXTURES / "tiny-sd"

# The scheduler config shipped in stabilityai/stable-diffusion-2-1-base (scheduler/scheduler_config.json).
SD21_BASE_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.8.0",
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


def seed(n: int) -> None:
    torch.manual_seed(n)


def save_tensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """Writes contiguous f32 (or integer) tensors to a safetensors file, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.is_floating_point():
            t = t.to(torch.float32)
        out[name] = t
    save_file(out, str(path), metadata=metadata)
    print(f"wrote {path.relative_to(REPO)} ({path.stat().st_size // 1024} KiB)")


def bytes_to_unicode():
    """CLIP's reversible byte -> printable character table, in CLIP's order ('!' first)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]
