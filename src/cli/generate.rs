//! `stableid generate`: prompt in, PNGs out (with prompt, seed and settings in their metadata).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use stableid::identity::Identity;
use stableid::io::write_png;
use stableid::models::stable_diffusion::{SdConfigs, StableDiffusion};
use stableid::pipelines::text_to_image::to_rgb_images;
use stableid::pipelines::{generate, read_latents, GenerateRequest};
use stableid::schedulers::Sampler;
use stableid::weights::ModelDir;

use super::{check_writable, progress_bar, ModelArgs};

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    stableid generate \"a photo of a cat wearing a hat\" --seed 1 --out outputs\n  \
    stableid generate \"v1* v2* as an astronaut, facing to camera, best quality, ultra high res\" --identity me.safetensors\n  \
    stableid generate \"v1* v2* and v3* v4* having coffee\" --identity anna.safetensors --identity ben.safetensors\n  \
    stableid generate \"latte art of v1* v2*\" --identity me.safetensors --sampler ddim --steps 30 --json")]
pub struct GenerateArgs {
    /// The prompt; `v1* v2*` stand for the first --identity, `v3* v4*` for the second, ...
    pub prompt: String,
    /// What the images should not show.
    #[arg(long, short = 'n', default_value = "")]
    pub negative_prompt: String,
    /// Identity file (from `stableid learn`, or a 2-vector textual-inversion embedding); repeat for several people.
    #[arg(long)]
    pub identity: Vec<PathBuf>,
    /// Denoising steps.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Classifier-free guidance scale (1 turns guidance off).
    #[arg(long, default_value_t = 8.5)]
    pub guidance: f64,
    /// Seed of the first image; image i uses seed + i. Random when not given.
    #[arg(long)]
    pub seed: Option<u64>,
    /// How many images to make.
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,
    /// Image width in pixels, a multiple of 8; width x height at most 2048 x 2048 [default: the
    /// model's size, 512 for SD 2.1-base].
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height in pixels, a multiple of 8 [default: the model's size].
    #[arg(long)]
    pub height: Option<usize>,
    /// Sampler.
    #[arg(long, default_value = "dpm++", value_parser = parse_sampler, help = format!("Sampler: one of {}", Sampler::NAMES.join(", ")))]
    pub sampler: Sampler,
    /// Folder for the PNGs (created if missing; existing files are never overwritten).
    #[arg(long, default_value = "outputs")]
    pub out: PathBuf,
    /// Start from these latents (a safetensors file with one tensor of shape 1 x 4 x H/8 x W/8) instead of seeded noise.
    #[arg(long)]
    pub initial_latents: Option<PathBuf>,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub model: ModelArgs,
}

fn parse_sampler(s: &str) -> Result<Sampler, String> {
    s.parse::<Sampler>().map_err(|e| e.to_string())
}

pub fn run(args: GenerateArgs) -> Result<()> {
    if args.num_images == 0 {
        bail!("--num-images must be at least 1");
    }
    // Cheap checks first: bad identities, settings the model cannot take and an unwritable
    // folder fail before any weights load.
    let identities = args.identity.iter().map(|p| Identity::load(p)).collect::<Result<Vec<_>, _>>()?;
    let device = args.model.device()?;
    let model = ModelDir::resolve(&args.model.model)?;
    let configs = SdConfigs::read(&model)?;
    let (default_width, default_height) = configs.default_size();
    let seed = args.seed.unwrap_or_else(|| rand::random::<u32>() as u64);
    let mut request = GenerateRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        steps: args.steps,
        guidance: args.guidance,
        seed,
        width: args.width.unwrap_or(default_width),
        height: args.height.unwrap_or(default_height),
        sampler: args.sampler,
        initial_latents: args.initial_latents.as_deref().map(read_latents).transpose()?,
    };
    request.validate(&configs)?;
    if request.initial_latents.is_some() && args.num_images > 1 {
        bail!("--initial-latents gives the noise of one image: use --num-images 1");
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create output folder {}", args.out.display()))?;
    check_writable(&args.out)?;

    let sd = StableDiffusion::load_with_configs(&model, configs, &device, args.model.dtype())?;
    if sd.prompt_ids(&args.prompt)?.truncated {
        eprintln!("warning: the prompt is longer than {} tokens; the rest is ignored", sd.tokenizer().max_length());
    }

    let mut written = Vec::new();
    for i in 0..args.num_images {
        request.seed = seed + i as u64;
        let bar = progress_bar(args.steps as u64, &format!("image {}/{}", i + 1, args.num_images));
        let generated = generate(&sd, &request, &identities, &mut |done, _| bar.set_position(done as u64))?;
        bar.finish_and_clear();
        let rgb = to_rgb_images(&generated.image)?.remove(0);
        let path = next_free_path(&args.out, request.seed)?;
        write_png(&path, &rgb, &generated.settings)?;
        if !args.json {
            println!("{}", path.display());
        }
        written.push(serde_json::json!({ "path": path, "seed": request.seed }));
    }
    if args.json {
        let summary = serde_json::json!({
            "images": written,
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "steps": request.steps,
            "guidance": request.guidance,
            "sampler": request.sampler.to_string(),
            "width": request.width,
            "height": request.height,
            "model": sd.model_name(),
            "identities": args.identity,
        });
        println!("{summary}");
    }
    Ok(())
}

/// `DIR/NNNNN-SEED.png` with the next number not yet used in DIR: never overwrites.
fn next_free_path(dir: &Path, seed: u64) -> Result<PathBuf> {
    let next = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.split('-').next()?.parse::<u64>().ok()))
        .max()
        .map_or(0, |n| n + 1);
    Ok(dir.join(format!("{next:05}-{seed}.png")))
}
