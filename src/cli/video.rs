//! `stableid video`: prompt in, video out (MP4, GIF or a folder of PNG frames), with the prompt,
//! seed and settings in a sidecar JSON file of the same name.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use stableid::identity::Identity;
use stableid::io::video::{write_video, VideoFormat};
use stableid::io::write_bytes;
use stableid::models::text_to_video::{TextToVideoModel, VideoConfigs, DEFAULT_VIDEO_MODEL};
use stableid::pipelines::text_to_image::to_rgb_images;
use stableid::pipelines::text_to_video::{check_fps, DEFAULT_FPS};
use stableid::pipelines::{check_identity_widths, generate_video, read_latents, VideoRequest};
use stableid::schedulers::Sampler;
use stableid::weights::{Hub, ModelDir};

use super::{check_writable, progress_bar, warn_other_encoders, DeviceArg, DtypeArg, ModelArgs};

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    stableid video \"v1* v2* is cooking, face to the camera\" --identity me.safetensors\n  \
    stableid video \"v1* v2* laughing, face to the camera\" --identity me.safetensors --format gif --seed 3\n  \
    stableid video \"a dog running on a beach\" --frames 24 --fps 12 --steps 25 --json\n  \
    stableid video \"v1* v2* surfing\" --identity me.safetensors --model cerspense/zeroscope_v2_576w --width 576 --height 320 --frames 24\n\n\
The model is a diffusers text-to-video folder (TextToVideoSDPipeline layout: ModelScope T2V, Zeroscope) or\n\
a hub id (in the hub cache, or downloaded); identities learned on SD 2.1 work in it unchanged. Each video gets a\n\
sidecar NAME.json with its prompt, seed and settings.")]
pub struct VideoArgs {
    /// The prompt; `v1* v2*` stand for the first --identity, `v3* v4*` for the second, ...
    pub prompt: String,
    /// What the video should not show.
    #[arg(long, short = 'n', default_value = "")]
    pub negative_prompt: String,
    /// Identity file (from `stableid learn`); repeat for several people.
    #[arg(long)]
    pub identity: Vec<PathBuf>,
    /// Number of frames.
    #[arg(long, default_value_t = 16)]
    pub frames: usize,
    /// Frames per second of the written video.
    #[arg(long, default_value_t = DEFAULT_FPS)]
    pub fps: u32,
    /// Frame width in pixels, a multiple of 8 [default: the model's size, 256 for ModelScope].
    #[arg(long)]
    pub width: Option<usize>,
    /// Frame height in pixels, a multiple of 8 [default: the model's size].
    #[arg(long)]
    pub height: Option<usize>,
    /// Denoising steps.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Classifier-free guidance scale (1 turns guidance off).
    #[arg(long, default_value_t = 9.0)]
    pub guidance: f64,
    /// Sampler [default: the model's own scheduler, DDIM for ModelScope].
    #[arg(long, value_parser = parse_sampler, help = format!("Sampler: one of {} [default: the model's scheduler, DDIM for ModelScope]", Sampler::NAMES.join(", ")))]
    pub sampler: Option<Sampler>,
    /// Seed of the first video; video i uses seed + i. Random when not given.
    #[arg(long)]
    pub seed: Option<u64>,
    /// How many videos to make.
    #[arg(long, default_value_t = 1)]
    pub num_videos: usize,
    /// Start from these latents (a safetensors file with one tensor of shape 1 x 4 x FRAMES x H/8 x W/8).
    #[arg(long)]
    pub initial_latents: Option<PathBuf>,
    /// Output format: mp4 (H.264), gif, or png (a folder of frames).
    #[arg(long, default_value = "mp4", value_parser = parse_format)]
    pub format: VideoFormat,
    /// Folder for the videos (created if missing; existing files are never overwritten).
    #[arg(long, default_value = "outputs")]
    pub out: PathBuf,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
    /// Diffusers text-to-video folder, or a Hugging Face hub id (found in the hub cache, or downloaded into it).
    #[arg(long, default_value = DEFAULT_VIDEO_MODEL)]
    pub model: String,
    /// Where the models run.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// Precision of the frozen models.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
}

fn parse_sampler(s: &str) -> Result<Sampler, String> {
    s.parse::<Sampler>().map_err(|e| e.to_string())
}

fn parse_format(s: &str) -> Result<VideoFormat, String> {
    s.parse::<VideoFormat>()
}

pub fn run(args: VideoArgs, hub: &Hub) -> Result<()> {
    if args.num_videos == 0 {
        bail!("--num-videos must be at least 1");
    }
    check_fps(args.fps)?;
    // Cheap checks first: bad identities, settings the model cannot take and an unwritable
    // folder fail before any weights load.
    let identities = args.identity.iter().map(|p| Identity::load(p)).collect::<Result<Vec<_>, _>>()?;
    let model_args = ModelArgs { model: args.model.clone(), device: args.device, dtype: args.dtype };
    let device = model_args.device()?;
    let model_dir = ModelDir::resolve(&args.model, hub, model_args.dtype())?;
    let configs = VideoConfigs::read(&model_dir)?;
    check_identity_widths(&identities, configs.text_encoder.hidden_size, &args.model)?;
    let (default_width, default_height) = configs.default_size();
    let seed = args.seed.unwrap_or_else(|| rand::random::<u32>() as u64);
    let mut request = VideoRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        frames: args.frames,
        width: args.width.unwrap_or(default_width),
        height: args.height.unwrap_or(default_height),
        steps: args.steps,
        guidance: args.guidance,
        seed,
        sampler: args.sampler,
        initial_latents: args.initial_latents.as_deref().map(read_latents).transpose()?,
    };
    request.validate(&configs)?;
    if request.initial_latents.is_some() && args.num_videos > 1 {
        bail!("--initial-latents gives the noise of one video: use --num-videos 1");
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create output folder {}", args.out.display()))?;
    check_writable(&args.out)?;

    let model = TextToVideoModel::load(&model_dir, configs, &device, args.dtype.precision(&device)?)?;
    warn_other_encoders(&model, &identities, model_dir.name())?;
    if model.prompt_encoder().prompt_ids(&args.prompt)?.truncated {
        eprintln!(
            "warning: the prompt is longer than {} tokens; the rest is ignored",
            model.prompt_encoder().tokenizer().max_length()
        );
    }

    let mut written = Vec::new();
    for i in 0..args.num_videos {
        request.seed = seed + i as u64;
        let bar = progress_bar(args.steps as u64, &format!("video {}/{}", i + 1, args.num_videos));
        let video = generate_video(&model, &request, &identities, &mut |done, _| bar.set_position(done as u64))?;
        bar.finish_and_clear();
        let frames = to_rgb_images(&video.frames)?;
        let path = next_free_path(&args.out, request.seed, args.format)?;
        let mut settings = video.settings.clone();
        settings.push(("fps", args.fps.to_string()));
        write_video(&path, &frames, args.fps, args.format, &settings)?;
        let sidecar = path.with_extension("json");
        let metadata: serde_json::Map<String, serde_json::Value> =
            settings.iter().fold(serde_json::Map::new(), |mut map, (key, value)| {
                match map.get_mut(*key) {
                    // Several identities: a list.
                    Some(serde_json::Value::Array(list)) => list.push(value.clone().into()),
                    Some(existing) => *existing = serde_json::json!([existing.clone(), value]),
                    None => {
                        map.insert(key.to_string(), value.clone().into());
                    }
                }
                map
            });
        write_bytes(&sidecar, serde_json::to_string_pretty(&metadata)?.as_bytes())?;
        if !args.json {
            println!("{}", path.display());
        }
        written.push(serde_json::json!({ "path": path, "settings": sidecar, "seed": request.seed }));
    }
    if args.json {
        let summary = serde_json::json!({
            "videos": written,
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "frames": request.frames,
            "fps": args.fps,
            "steps": request.steps,
            "guidance": request.guidance,
            "sampler": request.sampler(model.configs()).to_string(),
            "width": request.width,
            "height": request.height,
            "format": format!("{:?}", args.format).to_lowercase(),
            "model": model.model_name(),
            "identities": args.identity,
        });
        println!("{summary}");
    }
    Ok(())
}

/// `DIR/NNNNN-SEED.mp4` (or `.gif`, or a folder for PNG frames) with the next number not yet used
/// in DIR: never overwrites.
fn next_free_path(dir: &Path, seed: u64, format: VideoFormat) -> Result<PathBuf> {
    let next = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.split('-').next()?.parse::<u64>().ok()))
        .max()
        .map_or(0, |n| n + 1);
    let name = format!("{next:05}-{seed}");
    Ok(match format.extension() {
        Some(ext) => dir.join(format!("{name}.{ext}")),
        None => dir.join(name),
    })
}
