//! What a benchmark run measured, and its two forms: JSON (the keys tools/bench/pytorch_bench.py
//! writes) and a table for people, with the op-by-op profiles of `--profile`.

use candle_core::Device;
use serde_json::{json, Value};

use super::{GUIDANCE_SCALE, LEARN_TIMESTEP};
use crate::nn::profile::Profile;
use crate::nn::Precision;

/// The times and memory of one measured operation.
#[derive(Debug, Clone)]
pub struct Timing {
    /// `learn`, `denoise`, `vae_encode`, `vae_decode` or `text`.
    pub name: &'static str,
    /// Seconds of every timed run (warm-up runs excluded).
    pub times_s: Vec<f64>,
    /// Memory in use just before the first run, in bytes (see [`BenchReport::memory`]).
    pub memory_before: Option<u64>,
    /// The most memory in use during the runs, warm-up included, in bytes.
    pub memory_peak: Option<u64>,
    /// One more run's op-by-op times, with `--profile`.
    pub profile: Option<Profile>,
}

impl Timing {
    pub fn median_s(&self) -> f64 {
        let mut sorted = self.times_s.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        }
    }

    pub fn min_s(&self) -> f64 {
        self.times_s.iter().copied().fold(f64::INFINITY, f64::min)
    }

    pub fn max_s(&self) -> f64 {
        self.times_s.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    }
}

/// Parameter counts of the models built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParameterCounts {
    pub unet: u64,
    pub text_encoder: u64,
    pub vae: u64,
    pub mlp: u64,
}

/// The Stable Diffusion models a benchmark built (for the measurements that use them).
#[derive(Debug, Clone)]
pub struct BuiltModels {
    pub parameters: ParameterCounts,
    /// Seconds to build the three models with random weights.
    pub build_s: f64,
    /// Memory in use once the models are built.
    pub memory_after_build: Option<u64>,
}

/// Everything a benchmark run measured, and under which conditions.
#[derive(Debug, Clone)]
pub struct BenchReport {
    /// `cpu` or `cuda:N`.
    pub device: String,
    pub precision: Precision,
    /// Whether f32 products ran on TF32 tensor cores ([`crate::nn::set_tf32`]; CUDA only).
    pub tf32: bool,
    /// CPU threads candle uses (`RAYON_NUM_THREADS`, else all cores).
    pub threads: usize,
    pub resolution: usize,
    /// Side of the latents (`resolution / 8` for Stable Diffusion).
    pub latent_side: usize,
    pub warmup: usize,
    pub repeats: usize,
    /// `None` when only measurements without them ran (`align`).
    pub models: Option<BuiltModels>,
    /// What the memory numbers are.
    pub memory: &'static str,
    pub timings: Vec<Timing>,
}

impl BenchReport {
    /// The report as JSON; tools/bench/pytorch_bench.py writes the same keys.
    pub fn to_json(&self) -> Value {
        let mut results = serde_json::Map::new();
        for t in &self.timings {
            results.insert(
                t.name.to_string(),
                json!({
                    "median_s": t.median_s(),
                    "min_s": t.min_s(),
                    "max_s": t.max_s(),
                    "times_s": t.times_s,
                    "memory_before_bytes": t.memory_before,
                    "peak_memory_bytes": t.memory_peak,
                }),
            );
            if let Some(profile) = &t.profile {
                let ops: Vec<Value> = profile
                    .ops
                    .iter()
                    .map(|op| json!({"name": op.name, "calls": op.calls, "seconds": op.seconds}))
                    .collect();
                let phases: Vec<Value> = profile
                    .phases
                    .iter()
                    .map(|p| json!({"name": p.name, "calls": p.calls, "seconds": p.seconds}))
                    .collect();
                results[t.name]["profile"] = json!({
                    "total_s": profile.total_seconds,
                    "rest_s": profile.rest_seconds(),
                    "ops": ops,
                    "phases": phases,
                });
            }
        }
        let mut report = json!({
            "implementation": "stableid",
            "version": env!("CARGO_PKG_VERSION"),
            "device": self.device,
            "dtype": self.precision.name(),
            "tf32_matmul": self.tf32,
            "threads": self.threads,
            "resolution": self.resolution,
            "warmup": self.warmup,
            "repeats": self.repeats,
            "learn_timestep": LEARN_TIMESTEP,
            "guidance_scale": GUIDANCE_SCALE,
            "memory": self.memory,
            "results": results,
        });
        if let Some(models) = &self.models {
            let p = &models.parameters;
            report["parameters"] = json!({"unet": p.unet, "text_encoder": p.text_encoder, "vae": p.vae, "mlp": p.mlp});
            report["build_s"] = json!(models.build_s);
            report["memory_after_build_bytes"] = json!(models.memory_after_build);
        }
        report
    }

    /// The report as a table for people.
    pub fn table(&self) -> String {
        let millions = |n: u64| n as f64 / 1e6;
        let mut out = format!(
            "device {}, dtype {}{}, {} threads, warm-up {}, repeats {}\nmemory: {}\n",
            self.device,
            self.precision.name(),
            if self.tf32 { " (TF32 products)" } else { "" },
            self.threads,
            self.warmup,
            self.repeats,
            self.memory,
        );
        if let Some(models) = &self.models {
            let p = &models.parameters;
            out += &format!(
                "Stable Diffusion 2.1-base architecture, random weights, {}x{} (latents {}x{})\n\
                 parameters: UNet {:.1}M, text encoder {:.1}M, VAE {:.1}M, identity MLP {:.1}M; built in {:.1} s{}\n",
                self.resolution,
                self.resolution,
                self.latent_side,
                self.latent_side,
                millions(p.unet),
                millions(p.text_encoder),
                millions(p.vae),
                millions(p.mlp),
                models.build_s,
                models.memory_after_build.map(|b| format!(", {} in use after", gib(b))).unwrap_or_default(),
            );
        }
        out += "\n";
        out += &format!(
            "{:<12} {:>10} {:>10} {:>10} {:>12} {:>12}\n",
            "measurement", "median", "min", "max", "mem before", "mem peak"
        );
        for t in &self.timings {
            let mem = |m: Option<u64>| m.map(gib).unwrap_or_else(|| "-".into());
            out += &format!(
                "{:<12} {:>10} {:>10} {:>10} {:>12} {:>12}\n",
                t.name,
                seconds(t.median_s()),
                seconds(t.min_s()),
                seconds(t.max_s()),
                mem(t.memory_before),
                mem(t.memory_peak),
            );
        }
        for t in &self.timings {
            if let Some(profile) = &t.profile {
                out += &profile_table(t.name, profile);
            }
        }
        out
    }
}

/// One profiled run, op by op, with each op's share of the run's time.
fn profile_table(name: &str, profile: &Profile) -> String {
    let total = profile.total_seconds;
    let mut out = format!(
        "\n{name}, one run with op timing (waits for the device around every op): {}\n{:<22} {:>6} {:>10} {:>7}\n",
        seconds(total),
        "op",
        "calls",
        "time",
        "share"
    );
    let share = |s: f64| format!("{:.1}%", 100.0 * s / total);
    for op in &profile.ops {
        out += &format!("{:<22} {:>6} {:>10} {:>7}\n", op.name, op.calls, seconds(op.seconds), share(op.seconds));
    }
    let rest = profile.rest_seconds();
    out += &format!("{:<22} {:>6} {:>10} {:>7}\n", "rest (other candle ops)", "", seconds(rest), share(rest));
    for phase in &profile.phases {
        out += &format!(
            "phase: {:<15} {:>6} {:>10} {:>7}\n",
            phase.name,
            phase.calls,
            seconds(phase.seconds),
            share(phase.seconds)
        );
    }
    out
}

/// The device as the report names it.
pub(super) fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

fn seconds(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else {
        format!("{:.1} ms", s * 1e3)
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}
