//! `stableid learn`: one face photo in, an identity file out; on the way, sample images made with
//! the identity as learned so far (`--preview-every N`), and the loss curve at the end.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use stableid::identity::loss::LossKind;
use stableid::identity::run::{LearnOutcome, LearnRun, LearnSettings, PreparedPhoto};
use stableid::identity::step::Basis;
use stableid::identity::Identity;
use stableid::io::chart::LossCurve;
use stableid::io::{write_png, RgbImage};
use stableid::models::stable_diffusion::StableDiffusion;
use stableid::pipelines::text_to_image::to_rgb_images;
use stableid::pipelines::{generate, GenerateRequest};
use stableid::priors::align::provenance_of;
use stableid::priors::celeb_basis::{CelebBasis, CelebNames};
use stableid::priors::face_feature::{load_face_encoder, DEFAULT_FACE_ENCODER};
use stableid::weights::{Hub, ModelDir};

use super::{check_writable, progress_bar, stop_on_ctrl_c, FaceParserArgs, FramingArgs, ModelArgs};

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    stableid learn me.jpg --out me.safetensors\n  \
    stableid learn a.jpg b.jpg c.jpg --out me.safetensors   # several photos of one person\n  \
    stableid learn group.jpg --face 2 --out me.safetensors  # the second largest face (see `stableid align`)\n  \
    stableid generate \"v1* v2* as an astronaut, facing to camera, best quality, ultra high res\" --identity me.safetensors\n  \
    stableid learn me.jpg --out me.safetensors --resume          # continue after Ctrl-C or a crash\n  \
    stableid learn me.jpg --out me.safetensors --loss noise --json  # the paper's ablation, JSON log lines\n  \
    stableid learn me.jpg --out me.safetensors --preview-every 50   # me.preview-050.png, ... while it learns\n\n\
Next to the identity (me.safetensors) go the aligned crop (me.aligned.png), the loss curve of the run\n\
(me.loss.png: each step's loss and their running mean; the losses are in its metadata) and, with\n\
--preview-every N, a sample image every N steps (me.preview-STEP.png): \"a photo of v1* v2*, facing to\n\
camera, best quality, ultra high res\", seed 42, 25 DPM-Solver++ steps, guidance 8.5, at the model's size.")]
pub struct LearnArgs {
    /// A photo of the person, or several (each step learns from one of them): the face is detected
    /// and aligned (FFHQ-style) unless --no-align.
    #[arg(required = true)]
    pub photos: Vec<PathBuf>,
    /// The identity file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Overwrite an existing output and start over from scratch (ignoring any checkpoint).
    /// The checkpoint is kept after a run: `--resume --steps N` extends a finished one.
    #[arg(long)]
    pub force: bool,
    /// Continue from the checkpoint of an interrupted run with the same settings.
    #[arg(long, conflicts_with = "force")]
    pub resume: bool,
    /// Checkpoint file [default: OUT with `.ckpt.safetensors`].
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Save a checkpoint every N steps (0: only on Ctrl-C).
    #[arg(long, default_value_t = 50)]
    pub save_every: usize,
    /// Optimisation steps.
    #[arg(long, default_value_t = 450)]
    pub steps: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 5e-5)]
    pub lr: f64,
    /// Seed of the initialisation and of every step's random draws.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Loss: two-phase (the paper's), or noise / rec throughout (ablations).
    #[arg(long, default_value = "two-phase", value_parser = parse_loss)]
    pub loss: LossKind,
    /// Timesteps above this use the noise loss, at or below the reconstruction loss.
    #[arg(long, default_value_t = 600)]
    pub phase_threshold: usize,
    /// Weight of the hair mask in the loss (beta).
    #[arg(long, default_value_t = 0.1)]
    pub hair_weight: f64,
    /// Clip gradients to this global norm.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Face-recognition ViT: a transformers folder or hub id.
    #[arg(long, default_value = DEFAULT_FACE_ENCODER)]
    pub face_encoder: String,
    #[command(flatten)]
    pub framing: FramingArgs,
    #[command(flatten)]
    pub parser: FaceParserArgs,
    /// Celebrity names for the basis, one two-word name per line [default: the shipped list].
    #[arg(long)]
    pub celeb_names: Option<PathBuf>,
    /// Every N steps, generate a sample image with the identity as learned so far, next to the
    /// output (fixed prompt and seed: see below); each takes 25 denoising steps.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub preview_every: Option<u64>,
    /// Print one JSON line per step (and per preview) and a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub model: ModelArgs,
}

fn parse_loss(s: &str) -> Result<LossKind, String> {
    s.parse()
}

pub fn run(args: LearnArgs, hub: &Hub) -> Result<()> {
    let checkpoint = args.checkpoint.clone().unwrap_or_else(|| default_checkpoint(&args.out));
    // The crops learned from, next to the identity: `me.aligned.png`, or `me.aligned.N.png` for
    // photo N of several.
    let aligned_pngs: Vec<PathBuf> = match args.photos.len() {
        1 => vec![sibling(&args.out, "aligned.png")],
        n => (1..=n).map(|i| sibling(&args.out, &format!("aligned.{i}.png"))).collect(),
    };
    let loss_png = sibling(&args.out, "loss.png");
    let preview_every = args.preview_every.map(|n| n as usize);
    let previews: Vec<PathBuf> = preview_every
        .map(|every| {
            (every..=args.steps).step_by(every).map(|step| preview_path(&args.out, step, args.steps)).collect()
        })
        .unwrap_or_default();
    // Refuse early, before anything slow: never overwrite, never silently discard a checkpoint.
    for output in [&args.out, &loss_png].into_iter().chain(&aligned_pngs).chain(&previews) {
        if output.exists() && !args.force && !args.resume {
            bail!("{} already exists: pass --force to overwrite it, or choose another --out", output.display());
        }
    }
    if checkpoint.exists() && !args.resume && !args.force {
        bail!(
            "a checkpoint of an earlier run exists ({}): pass --resume to continue it, or --force to start anew",
            checkpoint.display()
        );
    }
    if args.resume && !checkpoint.exists() {
        bail!("--resume: no checkpoint at {}", checkpoint.display());
    }
    let out_dir = args.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !out_dir.is_dir() {
        bail!("the output folder {} does not exist", out_dir.display());
    }
    check_writable(out_dir)?;

    let mut settings = LearnSettings {
        steps: args.steps,
        seed: args.seed,
        max_grad_norm: args.max_grad_norm,
        save_every: (args.save_every > 0).then_some(args.save_every),
        ..LearnSettings::default()
    };
    settings.adamw.lr = args.lr;
    settings.loss.kind = args.loss;
    settings.loss.phase_threshold = args.phase_threshold;
    settings.loss.hair_weight = args.hair_weight;
    settings.validate()?;

    let framed = args.framing.frame(&args.photos, args.json)?;
    let names = CelebNames::load(args.celeb_names.as_deref())?;
    let device = args.model.device()?;
    let model = ModelDir::resolve(&args.model.model, hub, args.model.dtype())?;
    let encoder = load_face_encoder(&args.face_encoder, hub, &device)?;
    let parser = args.parser.load(hub, &device)?;
    let sd = StableDiffusion::load(&model, &device, args.model.precision(&device)?)?;
    let prepared = framed
        .iter()
        .zip(&args.photos)
        .map(|(framed, path)| {
            PreparedPhoto::new(&framed.photo, &encoder, &parser, &device).with_context(|| format!("{}", path.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let basis = CelebBasis::load_or_compute(
        &basis_cache_dir(out_dir),
        sd.text_encoder_file(),
        &names,
        sd.tokenizer(),
        sd.text_encoder().token_embedding(),
    )?;
    if !args.json {
        for (photo, path) in prepared.iter().zip(&args.photos) {
            eprintln!(
                "{}: face {:.0}% / hair {:.0}% of the image",
                path.display(),
                100.0 * photo.face_fraction,
                100.0 * photo.hair_fraction
            );
        }
        eprintln!("{} celebrity names in the basis", names.len());
    }

    let mut provenance: HashMap<String, String> = [
        ("face_encoder".to_string(), args.face_encoder.clone()),
        ("face_parser".to_string(), parser.kind().name().to_string()),
        ("celeb_names".to_string(), names.len().to_string()),
    ]
    .into();
    provenance.extend(provenance_of(&framed).into_iter().map(|(key, value)| (key.to_string(), value)));
    for ((framed, path), png) in framed.iter().zip(&args.photos).zip(&aligned_pngs) {
        if let Some(alignment) = &framed.alignment {
            write_png(png, &RgbImage::from(&alignment.crop.image), &[("photo", path.display().to_string())])?;
        }
    }
    let run = LearnRun {
        sd: &sd,
        photos: &prepared,
        basis: Basis { mean: basis.mean.to_device(&device)?, std: basis.std.to_device(&device)? },
        settings,
        checkpoint: checkpoint.clone(),
        resume: args.resume,
        provenance,
    };

    let stop = stop_on_ctrl_c()?;

    let bar = progress_bar(args.steps as u64, "learning");
    let json = args.json;
    let mut losses = Vec::new();
    let preview = Preview { sd: &sd, out: &args.out, total: args.steps, bar: &bar, json };
    let outcome = run.run_with_previews(
        &stop,
        preview_every,
        &mut |done, _total, report| {
            bar.set_position(done as u64);
            bar.set_message(format!("learning, loss {:.4}", report.loss));
            losses.push((done, report.loss));
            if json {
                println!("{}", serde_json::json!({ "step": done, "loss": report.loss, "grad_norm": report.grad_norm }));
            }
        },
        &mut |done, identity| preview.write(done, identity),
    );
    bar.finish_and_clear();
    match outcome? {
        LearnOutcome::Interrupted { step, checkpoint } => {
            eprintln!(
                "stopped after step {step}; checkpoint {} saved: rerun with --resume to continue",
                checkpoint.display()
            );
            std::process::exit(130);
        }
        LearnOutcome::Finished(identity) => {
            identity.save(&args.out)?;
            write_loss_curve(&loss_png, &args, losses)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "identity": args.out,
                        "loss_curve": loss_png,
                        "steps": args.steps,
                        "metadata": identity.metadata,
                    })
                );
            } else {
                println!("{}", args.out.display());
            }
        }
    }
    Ok(())
}

/// The sample images `--preview-every` makes, each with the identity as learned so far.
struct Preview<'a> {
    sd: &'a StableDiffusion,
    out: &'a Path,
    total: usize,
    bar: &'a indicatif::ProgressBar,
    json: bool,
}

impl Preview<'_> {
    /// Generates and writes the preview of step `done`; a failure is said and learning goes on.
    fn write(&self, done: usize, identity: Identity) {
        let path = preview_path(self.out, done, self.total);
        self.bar.set_message(format!("preview at step {done}"));
        let (width, height) = self.sd.configs().default_size();
        // The same sample as the web app's previews (stated in `learn --help`).
        let request = GenerateRequest::preview(width, height);
        let written = generate(self.sd, &request, &[identity], &mut |_, _| {}).and_then(|generated| {
            let mut text = generated.settings;
            text.push(("learning_step", done.to_string()));
            text.push(("identity", self.out.display().to_string()));
            write_png(&path, &to_rgb_images(&generated.image)?.remove(0), &text)
        });
        match written {
            Ok(()) if self.json => println!("{}", serde_json::json!({ "step": done, "preview": path })),
            Ok(()) => self.bar.println(format!("preview at step {done}: {}", path.display())),
            Err(e) => self.bar.println(format!("warning: no preview at step {done}: {e}")),
        }
    }
}

/// `me.safetensors` -> `me.preview-STEP.png`, the step padded to the digits of `total`.
fn preview_path(out: &Path, step: usize, total: usize) -> PathBuf {
    let digits = total.to_string().len();
    sibling(out, &format!("preview-{step:0digits$}.png"))
}

/// Writes the chart of this run's losses (with the losses in its metadata).
fn write_loss_curve(path: &Path, args: &LearnArgs, losses: Vec<(usize, f64)>) -> Result<()> {
    let (Some(&(first, _)), Some(&(last, _))) = (losses.first(), losses.last()) else { return Ok(()) };
    let name = args.out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let curve = LossCurve::new(losses, format!("{name}: loss at steps {first} to {last} (seed {})", args.seed));
    let text = [
        ("identity", args.out.display().to_string()),
        ("running_mean_window", curve.window().to_string()),
        ("losses", serde_json::to_string(&curve.points)?),
    ];
    write_png(path, &curve.draw()?, &text)?;
    Ok(())
}

/// `me.safetensors` -> `me.ckpt.safetensors`.
fn default_checkpoint(out: &Path) -> PathBuf {
    sibling(out, "ckpt.safetensors")
}

/// `me.safetensors` -> `me.EXTENSION`.
fn sibling(out: &Path, extension: &str) -> PathBuf {
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "identity".into());
    out.with_file_name(format!("{stem}.{extension}"))
}

/// The celebrity basis is cached next to the outputs.
fn basis_cache_dir(out_dir: &Path) -> PathBuf {
    out_dir.join(".stableid-cache")
}
