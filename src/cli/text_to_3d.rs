//! `stableid 3d`: a 3D head of an identity (or of any prompt) as 3D Gaussians, trained with
//! Interval Score Matching as LucidDreamer does for StableIdentity.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use stableid::identity::Identity;
use stableid::models::stable_diffusion::{SdConfigs, StableDiffusion};
use stableid::pipelines::text_to_3d::{
    head_cloud, turntable, view_image, Start, Text3dCheckpoint, Text3dOutcome, Text3dRun, Text3dSettings,
    DEFAULT_NEGATIVE_PROMPT, DEFAULT_POINTS, DEFAULT_PREVIEW_EVERY, DEFAULT_TURNTABLE_FPS, DEFAULT_TURNTABLE_VIEWS,
};
use stableid::splats::{read_ply, write_ply, RenderOptions};
use stableid::weights::{Hub, ModelDir};

use super::render::{write_views, ViewFiles};
use super::{check_writable, progress_bar, stop_on_ctrl_c, warn_other_encoders, ModelArgs};

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    stableid 3d \"v1* v2* wearing a hat\" --identity me.safetensors --out me3d\n  \
    stableid 3d \"v1* v2* wearing a hat\" --identity me.safetensors --out me3d --resume   # after Ctrl-C\n  \
    stableid 3d \"a zombie joker head\" --out joker --device cuda --dtype f16 --iterations 3000\n  \
    stableid 3d \"v1* v2*, smiling\" --identity me.safetensors --init head.ply --out me3d-2\n\n\
    Writes DIR/splats.ply (3DGS layout, settings as header comments), DIR/splats.turntable.mp4 and\n\
    DIR/splats.viewNNN.png (--turntable-views around the head at LucidDreamer's video camera:\n\
    radius 3.5, eye level, field of view 0.55 rad), previews DIR/preview.iterNNNNN.png and\n\
    DIR/checkpoint.safetensors. Defaults are StableIdentity's LucidDreamer config\n\
    (configs/stableid.yaml): 5000 iterations of 4 views at 512 x 512, ISM with Perp-Neg (front,\n\
    side and back view prompts), guidance 7.5, head cameras widening every 500 iterations.\n\
    The start is a head-shaped ellipsoid of --points Gaussians (LucidDreamer starts from a\n\
    Point-E cloud of 81,920, which this tool does not run) or --init PLY. The Gaussians are\n\
    rendered on the CPU; the diffusion models run on --device.")]
pub struct Text3dArgs {
    /// The prompt; `v1* v2*` stand for the first --identity, `v3* v4*` for the second, ...
    pub prompt: String,
    /// Identity file (from `stableid learn`); repeat for several people.
    #[arg(long)]
    pub identity: Vec<PathBuf>,
    /// Output folder.
    #[arg(long, default_value = "3d")]
    pub out: PathBuf,
    /// The unconditional branch of classifier-free guidance.
    #[arg(long, default_value = DEFAULT_NEGATIVE_PROMPT)]
    pub negative_prompt: String,
    /// Training iterations (4 views each).
    #[arg(long, default_value_t = 5000)]
    pub iterations: usize,
    /// Render size in pixels (square, a multiple of 8).
    #[arg(long, default_value_t = 512)]
    pub size: usize,
    /// Classifier-free guidance scale of the ISM prediction.
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// Seed of every random draw (cameras, noise, timesteps, the start).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Start from this 3DGS PLY instead of the head-shaped ellipsoid.
    #[arg(long, conflicts_with = "points")]
    pub init: Option<PathBuf>,
    /// Gaussians in the head-shaped start.
    #[arg(long, default_value_t = DEFAULT_POINTS)]
    pub points: usize,
    /// Write a preview (front view) every N iterations (0: none).
    #[arg(long, default_value_t = DEFAULT_PREVIEW_EVERY)]
    pub preview_every: usize,
    /// Save a checkpoint every N iterations (0: only on Ctrl-C).
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: usize,
    /// Continue the interrupted run in --out (same settings).
    #[arg(long)]
    pub resume: bool,
    /// Views around the head written at the end (PNGs and the turntable video).
    #[arg(long, default_value_t = DEFAULT_TURNTABLE_VIEWS)]
    pub turntable_views: usize,
    /// Frame rate of the turntable video.
    #[arg(long, default_value_t = DEFAULT_TURNTABLE_FPS)]
    pub fps: u32,
    /// Print progress and the result as JSON lines on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn run(args: Text3dArgs, hub: &Hub) -> Result<()> {
    let mut settings = Text3dSettings::new(&args.prompt).with_iterations(args.iterations);
    settings.negative_prompt = args.negative_prompt.clone();
    settings.size = args.size;
    settings.seed = args.seed;
    settings.ism.guidance_scale = args.guidance;
    settings.validate()?;
    if args.turntable_views == 0 || args.fps == 0 {
        bail!("--turntable-views and --fps must be at least 1");
    }
    let identities = args.identity.iter().map(|p| Identity::load(p)).collect::<Result<Vec<_>, _>>()?;
    let splats = args.out.join("splats.ply");
    let checkpoint = args.out.join("checkpoint.safetensors");
    if splats.exists() {
        bail!("{} already exists: choose another --out (outputs are never overwritten)", splats.display());
    }
    let resume = if args.resume {
        Some(
            Text3dCheckpoint::load(&checkpoint)
                .with_context(|| format!("--resume: no checkpoint to continue in {}", args.out.display()))?,
        )
    } else {
        if checkpoint.exists() {
            bail!(
                "{} holds an interrupted run: pass --resume to continue it, or choose another --out",
                args.out.display()
            );
        }
        None
    };
    let start = match (resume, &args.init) {
        (Some(saved), _) => Start::Resume(Box::new(saved)),
        (None, Some(path)) => Start::Cloud(read_ply(path, &Device::Cpu)?),
        (None, None) => Start::Cloud(head_cloud(args.points, args.seed, &Device::Cpu)?),
    };
    let device = args.model.device()?;
    let model = ModelDir::resolve(&args.model.model, hub, args.model.dtype())?;
    let configs = SdConfigs::read(&model)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    check_writable(&args.out)?;

    let sd = StableDiffusion::load_with_configs(&model, configs, &device, args.model.precision(&device)?)?;
    warn_other_encoders(&sd, &identities, model.name())?;
    if !identities.is_empty() && sd.prompt_ids(&args.prompt)?.identities_used == 0 {
        eprintln!("warning: --identity is given but the prompt has no v1* v2*: the identity is not used");
    }
    let run = Text3dRun {
        sd: &sd,
        identities: &identities,
        settings,
        checkpoint: checkpoint.clone(),
        checkpoint_every: args.checkpoint_every,
    };

    let stop = stop_on_ctrl_c()?;

    let bar = progress_bar(args.iterations as u64, "3d");
    if args.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let preview_camera = turntable(1, args.size)?.remove(0);
    let started = std::time::Instant::now();
    let outcome = run.run(start, &stop, &mut |report, gaussians| {
        bar.set_position(report.iteration as u64);
        bar.set_message(format!("3d, {} Gaussians, t {}", report.gaussians, report.t));
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "iteration": report.iteration,
                    "ism_grad_norm": report.ism_grad_norm,
                    "tv_loss": report.tv_loss,
                    "scale_loss": report.scale_loss,
                    "t": report.t,
                    "s": report.s,
                    "as_latent": report.as_latent,
                    "gaussians": report.gaussians,
                })
            );
        }
        if args.preview_every > 0 && report.iteration % args.preview_every == 0 {
            let image = view_image(gaussians, &preview_camera)?;
            let path = args.out.join(format!("preview.iter{:05}.png", report.iteration));
            stableid::io::write_png(&path, &image, &[("iteration", report.iteration.to_string())])?;
        }
        Ok(())
    });
    bar.finish_and_clear();
    let gaussians = match outcome? {
        Text3dOutcome::Interrupted { iteration, checkpoint } => {
            eprintln!(
                "stopped after iteration {iteration}; checkpoint {} saved: rerun with --resume to continue",
                checkpoint.display()
            );
            std::process::exit(130);
        }
        Text3dOutcome::Finished(gaussians) => gaussians,
    };
    let start =
        args.init.as_ref().map_or(format!("head ellipsoid of {} Gaussians", args.points), |p| p.display().to_string());
    let metadata = run.settings.ply_metadata(sd.model_name(), &identities, &start);
    write_ply(&splats, &gaussians, &metadata)?;
    let cameras = turntable(args.turntable_views, args.size)?;
    let source = splats.display().to_string();
    let files = ViewFiles { dir: &args.out, tag: "splats", source: &source, turntable: Some(args.fps) };
    let options = RenderOptions { background: [1.0; 3], ..RenderOptions::default() };
    let written = write_views(&gaussians, &cameras, &options, &files, !args.json)?;
    std::fs::remove_file(&checkpoint).ok();
    finish(&args, &splats, &written, gaussians.len()?, started.elapsed().as_secs_f64());
    Ok(())
}

fn finish(args: &Text3dArgs, splats: &Path, written: &[PathBuf], count: usize, seconds: f64) {
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "splats": splats, "gaussians": count, "views": written, "seconds": seconds })
        );
    } else {
        eprintln!(
            "wrote {} ({count} Gaussians) and {} views in {}",
            splats.display(),
            written.len(),
            args.out.display()
        );
    }
}
