"""Reference trajectories of diffusers' schedulers, replayed by tests/schedulers.rs.

Every scheduler is built as `XScheduler.from_config(SD 2.1-base's PNDM scheduler config)`, with
optional overrides. A run replays recorded model outputs (random tensors, one per step) from
noise scaled by `init_noise_sigma` and records every intermediate sample, plus Euler's scaled
model inputs for 20 steps. Writes:
  tests/fixtures/parity/schedulers.safetensors  tensors (f32)
  tests/fixtures/parity/schedulers.json         config, runs (timesteps, init_noise_sigma), timestep tables
"""
import json

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from common import PARITY, SD21_BASE_SCHEDULER, save_tensors, seed

CLASSES = {"dpm++": DPMSolverMultistepScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}
SHAPE = (1, 4, 8, 8)
# (sampler, steps, config overrides); runs with the same step count replay the same tensors.
RUNS = [(sampler, steps, {}) for sampler in CLASSES for steps in (50, 20, 25, 7)] + [
    ("dpm++", 20, {"timestep_spacing": "trailing"}),
    ("euler", 20, {"timestep_spacing": "leading"}),
    ("ddim", 7, {"timestep_spacing": "linspace"}),
] + [(sampler, 7, {"prediction_type": "v_prediction"}) for sampler in CLASSES]
# Step counts whose timesteps alone are compared, for every sampler and spacing.
TABLE_STEPS = [1, 2, 3, 4, 5, 7, 10, 13, 16, 20, 25, 33, 50, 64, 100, 128, 250]


def build(sampler, overrides):
    return CLASSES[sampler].from_config({**SD21_BASE_SCHEDULER, **overrides})


def json_numbers(timesteps):
    """Integers stay integers; Euler's fractional float32 timesteps become exact floats."""
    return [int(t) if float(t).is_integer() else float(t) for t in timesteps]


def run_name(sampler, steps, overrides):
    return "_".join([sampler, str(steps)] + [str(v) for v in overrides.values()])


def main():
    seed(0)
    tensors, runs = {}, []
    for steps in sorted({steps for _, steps, _ in RUNS}):
        tensors[f"noise_{steps}"] = torch.randn(SHAPE)
        tensors[f"model_outputs_{steps}"] = torch.randn((steps, *SHAPE))

    for sampler, steps, overrides in RUNS:
        name = run_name(sampler, steps, overrides)
        scheduler = build(sampler, overrides)
        scheduler.set_timesteps(steps)
        sample = tensors[f"noise_{steps}"] * scheduler.init_noise_sigma
        samples, scaled = [sample], []
        for i, t in enumerate(scheduler.timesteps):
            scaled.append(scheduler.scale_model_input(sample, t))
            sample = scheduler.step(tensors[f"model_outputs_{steps}"][i], t, sample).prev_sample
            samples.append(sample)
        tensors[f"{name}.samples"] = torch.stack(samples)
        if sampler == "euler" and steps == 20:
            tensors[f"{name}.scaled"] = torch.stack(scaled)
        runs.append({
            "name": name,
            "sampler": sampler,
            "steps": steps,
            "overrides": overrides,
            "timesteps": json_numbers(scheduler.timesteps),
            "init_noise_sigma": float(scheduler.init_noise_sigma),
        })

    tables = {}
    for sampler in CLASSES:
        for spacing in ("linspace", "leading", "trailing"):
            scheduler = build(sampler, {"timestep_spacing": spacing})
            table = {}
            for steps in TABLE_STEPS:
                scheduler.set_timesteps(steps)
                timesteps = json_numbers(scheduler.timesteps)
                # numpy's float arange can yield one timestep too many (ending at -1); not reproduced.
                assert len(timesteps) == steps, (sampler, spacing, steps)
                table[str(steps)] = timesteps
            tables[f"{sampler}/{spacing}"] = table

    # The training schedule: alphas_cumprod of every beta schedule, add_noise and velocity per sample.
    ddpm = DDPMScheduler.from_config(SD21_BASE_SCHEDULER)
    tensors["ddpm.alphas_cumprod"] = ddpm.alphas_cumprod
    for schedule in ("linear", "squaredcos_cap_v2"):
        other = DDPMScheduler.from_config({**SD21_BASE_SCHEDULER, "beta_schedule": schedule})
        tensors[f"ddpm.alphas_cumprod.{schedule}"] = other.alphas_cumprod
    ddpm_timesteps = [0, 500, 999]
    z0, noise = torch.randn((3, 4, 8, 8)), torch.randn((3, 4, 8, 8))
    t = torch.tensor(ddpm_timesteps)
    tensors.update({
        "ddpm.z0": z0,
        "ddpm.noise": noise,
        "ddpm.noisy": ddpm.add_noise(z0, noise, t),
        "ddpm.velocity": ddpm.get_velocity(z0, noise, t),
    })

    save_tensors(PARITY / "schedulers.safetensors", tensors)
    meta = {"config": SD21_BASE_SCHEDULER, "runs": runs, "tables": tables, "ddpm_timesteps": ddpm_timesteps}
    path = PARITY / "schedulers.json"
    path.write_text(json.dumps(meta, separators=(",", ":")) + "\n")
    print(f"wrote {path.relative_to(PARITY.parents[2])} ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
