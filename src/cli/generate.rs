//! `stableid generate`: prompt in, PNGs out (with prompt, seed and settings in their metadata),
//! optionally steered by ControlNets (`--controlnet DIR --control-image IMAGE`, repeatable), or by
//! the pose of a person in a photo (`--pose-from PHOTO`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use stableid::identity::Identity;
use stableid::io::write_png;
use stableid::models::controlnet::{ChannelOrder, ControlNetDir, OPENPOSE_SD21};
use stableid::models::stable_diffusion::{SdConfigs, StableDiffusion};
use stableid::pipelines::control::{check_control_settings, Control, ControlImage, DEFAULT_CONTROL_SCALE};
use stableid::pipelines::text_to_image::to_rgb_images;
use stableid::pipelines::{generate, read_latents, GenerateRequest};
use stableid::priors::photo::load_upright_with_digest;
use stableid::priors::pose::{pose_map, PoseEstimator, PoseSettings, WEIGHTS_HINT};
use stableid::schedulers::Sampler;
use stableid::weights::{Hub, ModelDir};

use super::{check_writable, progress_bar, warn_other_encoders, ModelArgs};

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    stableid generate \"a photo of a cat wearing a hat\" --seed 1 --out outputs\n  \
    stableid generate \"v1* v2* as an astronaut, facing to camera, best quality, ultra high res\" --identity me.safetensors\n  \
    stableid generate \"v1* v2* and v3* v4* having coffee\" --identity anna.safetensors --identity ben.safetensors\n  \
    stableid generate \"latte art of v1* v2*\" --identity me.safetensors --sampler ddim --steps 30 --json\n  \
    stableid generate \"v1* v2* dancing, best quality\" --identity me.safetensors \\\n      \
    --controlnet thibaud/controlnet-sd21-openpose-diffusers --control-image pose.png\n  \
    stableid generate \"v1* v2* on a stage\" --identity me.safetensors --controlnet pose-cn --control-image pose.png \\\n      \
    --control-scale 0.8 --controlnet depth-cn --control-image depth.png --control-scale 0.5 --guess-mode\n  \
    stableid generate \"v1* v2* dancing, best quality\" --identity me.safetensors --pose-from dancer.jpg\n\n\
ControlNets: each --controlnet (a diffusers ControlNet folder or hub id, downloaded if need be) takes\n\
the --control-image in the same position; --control-scale, --control-start, --control-end and\n\
--control-channel-order are given once for all or once per ControlNet. Without --width/--height the\n\
image takes the first control image's size (rounded down to a multiple of 8). Pose maps drawn as\n\
controlnet_aux draws them are RGB, the order thibaud's SD 2.1 OpenPose ControlNet was trained on;\n\
--control-channel-order bgr swaps red and blue first, as StableIdentity's notebook does (docs/controlnet.md).")]
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
    /// ControlNet to steer the image with: a diffusers ControlNet folder or a hub id (in the hub cache, or downloaded)
    /// (e.g. thibaud/controlnet-sd21-openpose-diffusers); repeat for several.
    #[arg(long)]
    pub controlnet: Vec<String>,
    /// The control image (pose map, depth map, edges...) of each --controlnet, in the same order.
    #[arg(long)]
    pub control_image: Vec<PathBuf>,
    /// Take the pose of the person in this photo: its OpenPose map (as `stableid pose` draws it) is
    /// the control image of the first --controlnet [default ControlNet:
    /// thibaud/controlnet-sd21-openpose-diffusers]. Found before any denoising.
    #[arg(long)]
    pub pose_from: Option<PathBuf>,
    /// The OpenPose body weights for --pose-from (non-commercial research use only, CMU's licence)
    /// [default: body_pose_model.pth of lllyasviel/Annotators, from the hub].
    #[arg(long, requires = "pose_from")]
    pub pose_model: Option<PathBuf>,
    /// How strongly each ControlNet steers (usually 0 to 2) [default: 1.0]; once for all or once per ControlNet.
    #[arg(long)]
    pub control_scale: Vec<f64>,
    /// The fraction of the steps after which each ControlNet starts steering [default: 0.0].
    #[arg(long)]
    pub control_start: Vec<f64>,
    /// The fraction of the steps after which each ControlNet stops steering [default: 1.0].
    #[arg(long)]
    pub control_end: Vec<f64>,
    /// The channel order each ControlNet is given its image in [default: the ControlNet's config, rgb];
    /// bgr swaps red and blue.
    #[arg(long, value_parser = parse_channel_order)]
    pub control_channel_order: Vec<ChannelOrder>,
    /// ControlNet guess mode: the ControlNets steer only the prompt's half of guidance, from weak (shallow
    /// layers) to full (deep), to follow the control image with little or no prompt.
    #[arg(long)]
    pub guess_mode: bool,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub model: ModelArgs,
}

fn parse_sampler(s: &str) -> Result<Sampler, String> {
    s.parse::<Sampler>().map_err(|e| e.to_string())
}

fn parse_channel_order(s: &str) -> Result<ChannelOrder, String> {
    s.parse::<ChannelOrder>()
}

/// The value of `flag` for ControlNet `index` of `count`: given once for all, once per ControlNet,
/// or not at all (`default`).
fn per_control<T: Copy>(values: &[T], flag: &str, count: usize, index: usize, default: T) -> Result<T> {
    match values.len() {
        0 => Ok(default),
        1 => Ok(values[0]),
        n if n == count => Ok(values[index]),
        n => bail!("{n} {flag} values for {count} --controlnet: give one for all or one per --controlnet"),
    }
}

/// How one ControlNet steers, from its flags.
#[derive(Clone, Copy)]
struct ControlSettings {
    scale: f64,
    start: f64,
    end: f64,
    channel_order: Option<ChannelOrder>,
}

/// The ControlNet flags, checked and read before any weights load.
struct ControlPlan {
    dirs: Vec<ControlNetDir>,
    configs: Vec<stableid::models::controlnet::ControlNetConfig>,
    images: Vec<ControlImage>,
    settings: Vec<ControlSettings>,
}

impl ControlPlan {
    fn read(args: &GenerateArgs, configs: &SdConfigs, model: &str, hub: &Hub) -> Result<Self> {
        // --pose-from gives the first ControlNet's image (thibaud's pose ControlNet by default).
        let controlnets = match (&args.pose_from, args.controlnet.is_empty()) {
            (Some(_), true) => vec![OPENPOSE_SD21.to_string()],
            _ => args.controlnet.clone(),
        };
        let count = controlnets.len();
        let posed = usize::from(args.pose_from.is_some());
        if args.control_image.len() + posed != count {
            bail!(
                "{} --control-image{} for {count} --controlnet: give one control image per ControlNet, in the same order",
                args.control_image.len(),
                if posed == 1 { " and --pose-from" } else { "" },
            );
        }
        for (flag, values) in [
            ("--control-scale", args.control_scale.len()),
            ("--control-start", args.control_start.len()),
            ("--control-end", args.control_end.len()),
            ("--control-channel-order", args.control_channel_order.len()),
        ] {
            if count == 0 && values > 0 {
                bail!("{flag} needs a --controlnet (and its --control-image)");
            }
            per_control(&vec![(); values], flag, count, 0, ())?;
        }
        let orders: Vec<Option<ChannelOrder>> = args.control_channel_order.iter().copied().map(Some).collect();
        let settings = (0..count)
            .map(|i| {
                let settings = ControlSettings {
                    scale: per_control(&args.control_scale, "--control-scale", count, i, DEFAULT_CONTROL_SCALE)?,
                    start: per_control(&args.control_start, "--control-start", count, i, 0.0)?,
                    end: per_control(&args.control_end, "--control-end", count, i, 1.0)?,
                    channel_order: per_control(&orders, "--control-channel-order", count, i, None)?,
                };
                check_control_settings(settings.scale, settings.start, settings.end)?;
                Ok(settings)
            })
            .collect::<Result<Vec<_>>>()?;
        if args.guess_mode && count == 0 {
            bail!("--guess-mode needs a --controlnet (and its --control-image)");
        }
        for &scale in &args.control_scale {
            if !(0.0..=2.0).contains(&scale) {
                eprintln!("warning: --control-scale {scale} is outside [0, 2], where ControlNets are usually used");
            }
        }
        let dtype = args.model.dtype();
        let dirs =
            controlnets.iter().map(|spec| ControlNetDir::resolve(spec, hub, dtype)).collect::<Result<Vec<_>, _>>()?;
        let mut controlnet_configs = Vec::with_capacity(count);
        for dir in &dirs {
            let config = dir.config()?;
            dir.check_fits(&config, configs, model)?;
            controlnet_configs.push(config);
        }
        let mut images = args.control_image.iter().map(|p| ControlImage::read(p)).collect::<Result<Vec<_>, _>>()?;
        if let Some(photo) = &args.pose_from {
            images.insert(0, pose_control_image(photo, args.pose_model.as_deref(), hub)?);
        }
        Ok(Self { dirs, configs: controlnet_configs, images, settings })
    }

    /// Loads the ControlNets and prepares their images at the output size.
    fn controls(&self, sd: &StableDiffusion, width: usize, height: usize) -> Result<Vec<Control>> {
        let mut controls = Vec::with_capacity(self.dirs.len());
        for ((dir, config), (image, settings)) in
            self.dirs.iter().zip(&self.configs).zip(self.images.iter().zip(&self.settings))
        {
            let controlnet = Arc::new(dir.load(config, sd.precision(), sd.device())?);
            let mut control = Control::new(controlnet, dir.name(), image, width, height)?;
            control.scale = settings.scale;
            control.start = settings.start;
            control.end = settings.end;
            control.channel_order = settings.channel_order.unwrap_or(control.channel_order);
            controls.push(control);
        }
        Ok(controls)
    }
}

/// The pose map of the person in `photo` (OpenPose, controlnet_aux's default resolutions) as a
/// control image; an error when nobody is found.
fn pose_control_image(photo: &Path, weights: Option<&Path>, hub: &Hub) -> Result<ControlImage> {
    let weights = match weights {
        Some(path) => path.to_path_buf(),
        None => PoseEstimator::hub_weights(hub)
            .with_context(|| format!("OpenPose body weights: pass --pose-model FILE, or {WEIGHTS_HINT}"))?,
    };
    let estimator = PoseEstimator::load(&weights, &Device::Cpu)?;
    let (rgb, sha256) = load_upright_with_digest(photo)?;
    let map = pose_map(&rgb, &estimator, PoseSettings::default())
        .with_context(|| format!("--pose-from {}", photo.display()))?;
    Ok(ControlImage { rgb: map.image, source: format!("pose of {}", photo.display()), sha256 })
}

pub fn run(args: GenerateArgs, hub: &Hub) -> Result<()> {
    if args.num_images == 0 {
        bail!("--num-images must be at least 1");
    }
    // Cheap checks first: bad identities, settings the model cannot take and an unwritable
    // folder fail before any weights load.
    let identities = args.identity.iter().map(|p| Identity::load(p)).collect::<Result<Vec<_>, _>>()?;
    let device = args.model.device()?;
    let model = ModelDir::resolve(&args.model.model, hub, args.model.dtype())?;
    let configs = SdConfigs::read(&model)?;
    let control_plan = ControlPlan::read(&args, &configs, model.name(), hub)?;
    // As diffusers: without a size, the first control image's, rounded down to a multiple of 8.
    let (default_width, default_height) = match control_plan.images.first() {
        Some(image) => image.default_size(configs.latent_factor()),
        None => configs.default_size(),
    };
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
        controls: Vec::new(),
        guess_mode: args.guess_mode,
    };
    request.validate(&configs)?;
    if request.initial_latents.is_some() && args.num_images > 1 {
        bail!("--initial-latents gives the noise of one image: use --num-images 1");
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create output folder {}", args.out.display()))?;
    check_writable(&args.out)?;

    let sd = StableDiffusion::load_with_configs(&model, configs, &device, args.model.precision(&device)?)?;
    warn_other_encoders(&sd, &identities, model.name())?;
    request.controls = control_plan.controls(&sd, request.width, request.height)?;
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
            "controlnets": request.controls.iter().map(|c| serde_json::json!({
                "controlnet": c.controlnet_name,
                "image": c.image_source,
                "image_sha256": c.image_sha256,
                "scale": c.scale,
                "start": c.start,
                "end": c.end,
                "channel_order": c.channel_order.to_string(),
            })).collect::<Vec<_>>(),
            "guess_mode": request.guess_mode,
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
