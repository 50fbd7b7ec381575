//! `stableid bench`: times the learning step, a guided denoising step, the VAE and the text
//! encoder on the real SD 2.1-base architecture with random weights (nothing to download), and
//! the face detection and alignment of a photo.

use anyhow::Result;
use clap::ValueEnum;
use stableid::bench::{BenchOptions, Measure};
use stableid::models::stable_diffusion::SdConfigs;

use super::{DeviceArg, DtypeArg};

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    stableid bench --res 256                 # CPU, everything, about 3 minutes on 2 cores\n  \
    stableid bench --only learn --repeats 5 --json\n  \
    stableid bench --res 256 --only learn --profile   # which ops take the time\n  \
    stableid bench --device cuda --dtype f16 --only learn,denoise\n  \
    stableid bench --only align --photo phone.jpg   # face detection + alignment\n  \
    stableid bench --only video --res 256           # a text-to-video denoising step\n  \
    stableid bench --only splat --splats 100000 --splat-views 4   # Gaussian splatting, 512x512\n  \
    stableid bench --only load,denoise --res 256 --dtype q8 --model sd21/   # loading from files, q8\n  \
    RAYON_NUM_THREADS=4 stableid bench --res 256   # CPU threads\n\n\
    tools/bench/compare.sh runs the same measurements in PyTorch and prints the ratios (docs/benchmarks.md).")]
pub struct BenchArgs {
    /// Image side in pixels (latents are res/8); 256 keeps CPU runs short.
    #[arg(long, default_value_t = 512)]
    res: usize,
    /// Untimed runs of each measurement first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Timed runs of each measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Which measurements, comma-separated [default: learn,denoise,controlnet,vae,text, align
    /// with --photo, load with --model].
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Option<Vec<MeasureArg>>,
    /// Gaussians of the splat measurement.
    #[arg(long, default_value_t = 100_000)]
    splats: usize,
    /// Views per splat measurement run.
    #[arg(long, default_value_t = 4)]
    splat_views: usize,
    /// The photo the align measurement reads, detects and aligns.
    #[arg(long)]
    photo: Option<std::path::PathBuf>,
    /// A diffusers folder (SD 2.1-base-shaped) the load measurement reads from its files;
    /// tools/bench/random_sd21.py writes one with random weights.
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    /// Where the models run.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Precision of the frozen models (the identity MLP and the loss stay f32).
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    dtype: DtypeArg,
    /// Seed of the random weights and inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// After the timed runs, run each measurement once more timing every op (forward and
    /// backward) and print where the time goes.
    #[arg(long)]
    profile: bool,
    /// Print the results as JSON (the keys tools/bench/pytorch_bench.py writes) instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(ValueEnum, Clone, Copy, PartialEq, Eq)]
enum MeasureArg {
    /// One learning step: MLP, AdaIN, text encoder, UNet, masked loss, backward, AdamW.
    Learn,
    /// One classifier-free-guidance denoising step (UNet on a batch of 2).
    Denoise,
    /// The same step steered by a ControlNet (ControlNet and UNet on a batch of 2).
    Controlnet,
    /// VAE encode and decode.
    Vae,
    /// Text encoding of one prompt.
    Text,
    /// Reading --photo, detecting its faces and aligning the largest (as learn does).
    Align,
    /// One guided denoising step of ModelScope's text-to-video UNet on 16 frames (1.4B parameters:
    /// only when asked for).
    Video,
    /// Forward, and forward + backward, of --splats Gaussians at --res from --splat-views cameras.
    Splat,
    /// Loading Stable Diffusion from the files of --model in --dtype (time, and loading's peak memory).
    Load,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let device = args.device.open()?;
    let options = BenchOptions {
        resolution: args.res,
        warmup: args.warmup,
        repeats: args.repeats,
        measures: match &args.only {
            Some(only) => only
                .iter()
                .map(|m| match m {
                    MeasureArg::Learn => Measure::Learn,
                    MeasureArg::Denoise => Measure::Denoise,
                    MeasureArg::Controlnet => Measure::Controlnet,
                    MeasureArg::Vae => Measure::Vae,
                    MeasureArg::Text => Measure::Text,
                    MeasureArg::Align => Measure::Align,
                    MeasureArg::Video => Measure::Video,
                    MeasureArg::Splat => Measure::Splat,
                    MeasureArg::Load => Measure::Load,
                })
                .collect(),
            None => Measure::MODELS
                .into_iter()
                .chain(args.photo.is_some().then_some(Measure::Align))
                .chain(args.model.is_some().then_some(Measure::Load))
                .collect(),
        },
        device: device.clone(),
        precision: args.dtype.precision(&device)?,
        seed: args.seed,
        profile: args.profile,
        photo: args.photo,
        model: args.model,
        video_unet: Default::default(),
        splats: args.splats,
        splat_views: args.splat_views,
    };
    let configs = SdConfigs::sd21_base();
    options.validate(&configs)?;
    if !args.json && options.measures.iter().any(|m| m.uses_models()) {
        eprintln!("building the SD 2.1-base models with random weights and measuring (this takes a while on a CPU)...");
    }
    let report = stableid::bench::run(&configs, &options)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}
