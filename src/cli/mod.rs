//! Subcommands of `stableid` and what they share (device, dtype, progress bars).

mod align;
mod bench;
mod eval;
mod generate;
mod identity_file;
mod learn;
mod masks;
mod pose;
mod render;
#[cfg(feature = "server")]
mod serve;
mod splat_fit;
mod text_to_3d;
mod video;

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use clap::{Parser, Subcommand, ValueEnum};
use stableid::nn::Precision;
use stableid::priors::align::{frame_photo, FaceDetector, FramedPhoto, Framing};
use stableid::priors::masks::{FaceParser, FaceParserKind, DEFAULT_SEGFORMER};
use stableid::weights::{DownloadEvent, Hub};

#[derive(Parser)]
#[command(
    name = "stableid",
    version,
    about = "StableIdentity: learn a face identity from one photo, then put that person anywhere with Stable Diffusion 2.1",
    after_help = "Examples:\n  stableid align me.jpg --out aligned\n  stableid learn aligned/me.aligned.png --out me.safetensors\n  stableid generate \"a photo of an astronaut riding a horse\" --seed 7\n  stableid generate \"v1* v2* as an astronaut, facing to camera, best quality, ultra high res\" --identity me.safetensors --num-images 4\n  stableid serve   # the web app, at http://127.0.0.1:7860/"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Never use the network: models come from local folders and the Hugging Face hub cache only
    /// (as HF_HUB_OFFLINE=1). Without it, a model missing from the cache is downloaded into it.
    #[arg(long, global = true)]
    offline: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Find the faces of photos and write each as the 512x512 FFHQ-aligned crop learn expects.
    Align(align::AlignArgs),
    /// Time the learning step, denoising, VAE and text encoder on SD 2.1-base with random weights.
    Bench(bench::BenchArgs),
    /// Measure identities as the paper does: CLIP-I, CLIP-T, Face Sim, Face Div, Trusted Div, FID.
    Eval(eval::EvalArgs),
    /// Generate images from a prompt (with `v1* v2*` standing for an identity).
    Generate(generate::GenerateArgs),
    /// Learn an identity (v1* v2*) from one face photo.
    Learn(learn::LearnArgs),
    /// Generate a video from a prompt with a text-to-video model (ModelScope T2V by default), identities included.
    Video(video::VideoArgs),
    /// Render a 3D Gaussian splatting PLY from an orbit of cameras (or a cameras.json) as PNGs.
    Render(render::RenderArgs),
    /// Train a 3D head of a prompt (with `v1* v2*` standing for an identity) as 3D Gaussians (LucidDreamer's ISM).
    #[command(name = "3d")]
    ThreeD(text_to_3d::Text3dArgs),
    /// Fit 3D Gaussians to images seen from known cameras (3DGS's L1 loop), as a PLY.
    SplatFit(splat_fit::SplatFitArgs),
    /// Show the face and hair masks the learner will focus on, as PNG overlays.
    Masks(masks::MasksArgs),
    /// Draw the OpenPose body pose of photos, for a pose ControlNet (weights: non-commercial use only).
    Pose(pose::PoseArgs),
    /// Write an identity as a textual-inversion embedding for diffusers, AUTOMATIC1111 or ComfyUI.
    Export(identity_file::ExportArgs),
    /// Print what an identity file holds (shape, norms, how it was learned).
    Inspect(identity_file::InspectArgs),
    /// Run the web app: upload photos, learn identities, generate images in the browser.
    #[cfg(feature = "server")]
    Serve(serve::ServeArgs),
}

pub fn run(cli: Cli) -> Result<()> {
    let hub = hub(cli.offline);
    match cli.command {
        Command::Align(args) => align::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Eval(args) => eval::run(args, &hub),
        Command::Generate(args) => generate::run(args, &hub),
        Command::Learn(args) => learn::run(args, &hub),
        Command::Masks(args) => masks::run(args, &hub),
        Command::Pose(args) => pose::run(args, &hub),
        Command::Video(args) => video::run(args, &hub),
        Command::Render(args) => render::run(args),
        Command::SplatFit(args) => splat_fit::run(args),
        Command::ThreeD(args) => text_to_3d::run(args, &hub),
        Command::Export(args) => identity_file::export(args),
        Command::Inspect(args) => identity_file::inspect(args),
        #[cfg(feature = "server")]
        Command::Serve(args) => serve::run(args, &hub),
    }
}

/// Where every command finds its models: the hub cache and endpoint of the environment
/// (HF_HUB_CACHE, HF_HOME, HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE), offline also when `offline`;
/// downloads are announced with their size and shown as a progress bar on stderr.
fn hub(offline: bool) -> Hub {
    let hub = Hub::from_env().offline(offline);
    let cache = hub.cache_dir().to_path_buf();
    let bar: std::sync::Mutex<Option<indicatif::ProgressBar>> = std::sync::Mutex::new(None);
    hub.with_progress(std::sync::Arc::new(move |event: &DownloadEvent| {
        let mut bar = bar.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match *event {
            DownloadEvent::Start { repo, files, bytes, notice } => {
                eprintln!(
                    "downloading {files} file{} of {repo} ({}) into {}",
                    if files == 1 { "" } else { "s" },
                    indicatif::HumanBytes(bytes),
                    cache.display()
                );
                if let Some(notice) = notice {
                    eprintln!("note: {repo}: {notice}");
                }
                let new_bar = indicatif::ProgressBar::new(bytes);
                new_bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} elapsed {elapsed} eta {eta}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
                *bar = Some(new_bar);
            }
            DownloadEvent::Progress { file, done, .. } => {
                if let Some(bar) = bar.as_ref() {
                    bar.set_message(file.to_string());
                    bar.set_position(done);
                }
            }
            DownloadEvent::Retry { file, attempt, .. } => {
                let line = format!("connection lost; resuming {file} (retry {attempt})");
                match bar.as_ref() {
                    Some(bar) => bar.println(line),
                    None => eprintln!("{line}"),
                }
            }
            DownloadEvent::Finish { .. } => {
                if let Some(bar) = bar.take() {
                    bar.finish_and_clear();
                }
            }
        }
    }))
}

/// Flags every model-loading command shares.
#[derive(clap::Args, Clone)]
pub struct ModelArgs {
    /// Diffusers model folder, or a Hugging Face hub id (found in the hub cache, or downloaded into it).
    #[arg(long, default_value = stableid::weights::DEFAULT_MODEL)]
    pub model: String,
    /// Where the models run.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// Precision of the frozen models.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
}

#[derive(ValueEnum, Clone, Copy, PartialEq, Eq)]
pub enum DeviceArg {
    Cpu,
    /// An NVIDIA GPU (a CUDA build); f32 products run on TF32 tensor cores unless STABLEID_TF32=0.
    Cuda,
}

#[derive(ValueEnum, Clone, Copy, PartialEq, Eq)]
pub enum DtypeArg {
    F32,
    /// Half the weights' memory. On the CPU the linear and convolution weights are kept in f16 and
    /// widened as they are multiplied (activations f32); on CUDA everything runs in f16.
    F16,
    /// CUDA only.
    Bf16,
    /// 8-bit linear and convolution weights with a scale per block of 32 (ggml's q8_0), about a
    /// quarter of f32's memory; CPU only.
    Q8,
}

impl ModelArgs {
    /// The device, checked to run the models in `--dtype`.
    pub fn device(&self) -> Result<Device> {
        let device = self.device.open()?;
        self.dtype.precision(&device)?;
        Ok(device)
    }

    /// The dtype whose weights files are fetched and preferred (the fp16 variant for f16 and q8).
    pub fn dtype(&self) -> DType {
        self.dtype.dtype()
    }

    /// How the Stable Diffusion models load on `device`.
    pub fn precision(&self, device: &Device) -> Result<Precision> {
        self.dtype.precision(device)
    }
}

impl DtypeArg {
    /// The dtype whose weights files are fetched and preferred (the fp16 variant for f16 and q8),
    /// and in which models without packed weights run.
    pub fn dtype(self) -> DType {
        match self {
            DtypeArg::F32 => DType::F32,
            DtypeArg::F16 | DtypeArg::Q8 => DType::F16,
            DtypeArg::Bf16 => DType::BF16,
        }
    }

    /// What the models load as on `device`: f16 and q8 on the CPU keep packed weight matrices
    /// and compute in f32.
    pub fn precision(self, device: &Device) -> Result<Precision> {
        let precision = match self {
            DtypeArg::F32 => DType::F32.into(),
            DtypeArg::F16 => Precision::f16_on(device),
            DtypeArg::Bf16 => DType::BF16.into(),
            DtypeArg::Q8 => Precision::q8_on(device)?,
        };
        stableid::nn::check_dtype(precision.dtype, device)?;
        Ok(precision)
    }
}

impl DeviceArg {
    /// Opens the device, saying so when this build lacks CUDA.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceArg::Cpu => Ok(Device::Cpu),
            #[cfg(feature = "cuda")]
            DeviceArg::Cuda => {
                // TF32 tensor cores for f32 products: the speed of half precision's kernels at a
                // 10-bit mantissa inside each product (sums stay f32).
                stableid::nn::set_tf32(std::env::var("STABLEID_TF32").map_or(true, |v| v != "0"));
                Device::new_cuda(0).map_err(|e| anyhow::anyhow!("cannot open CUDA device 0: {e}"))
            }
            #[cfg(not(feature = "cuda"))]
            DeviceArg::Cuda => {
                bail!(
                    "this build has no CUDA support: rebuild with `cargo build --release --features cuda` (see README)"
                )
            }
        }
    }
}

// Choice of the face parser, shared by every command that needs the masks. (A plain comment: clap
// would take a doc comment here for the `about` of every command that flattens these flags.)
#[derive(clap::Args, Clone)]
pub struct FaceParserArgs {
    /// Face parser: segformer (jonathandinu/face-parsing from the hub) or bisenet (the paper's
    /// face-parsing.PyTorch model, 79999_iter.pth).
    #[arg(long, value_enum, default_value_t = FaceParserArg::Segformer)]
    pub face_parser: FaceParserArg,
    /// The parser's weights: for segformer a transformers folder or hub id [default: jonathandinu/face-parsing];
    /// for bisenet the checkpoint file (face-parsing.PyTorch's 79999_iter.pth, or .safetensors).
    #[arg(long)]
    pub face_parser_weights: Option<String>,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
pub enum FaceParserArg {
    Segformer,
    Bisenet,
}

impl FaceParserArgs {
    pub fn kind(&self) -> FaceParserKind {
        match self.face_parser {
            FaceParserArg::Segformer => FaceParserKind::Segformer,
            FaceParserArg::Bisenet => FaceParserKind::Bisenet,
        }
    }

    /// The weights location as given, or the default one.
    pub fn weights(&self) -> Option<&str> {
        match (self.kind(), self.face_parser_weights.as_deref()) {
            (FaceParserKind::Segformer, None) => Some(DEFAULT_SEGFORMER),
            (_, given) => given,
        }
    }

    pub fn load(&self, hub: &Hub, device: &Device) -> Result<FaceParser> {
        Ok(FaceParser::load(self.kind(), self.weights(), hub, device)?)
    }
}

// How `learn` and `masks` frame the photo (a plain comment, as for FaceParserArgs).
#[derive(clap::Args, Clone)]
pub struct FramingArgs {
    /// Use the photo as it is: it is an FFHQ-aligned head crop already (no face detection).
    #[arg(long)]
    pub no_align: bool,
    /// Which face to align when the photo holds several: numbered from 1, largest first (as
    /// `stableid align` lists them) [default: the largest].
    #[arg(long, conflicts_with = "no_align")]
    pub face: Option<usize>,
}

impl FramingArgs {
    pub fn framing(&self) -> Framing {
        if self.no_align {
            Framing::AsIs
        } else {
            Framing::Align { face: self.face }
        }
    }

    /// Reads and frames `photos` (one face detector for all of them); once all are framed, says
    /// which face was used where there were several, and which crops reach past their photo
    /// (unless `quiet`).
    pub fn frame(&self, photos: &[std::path::PathBuf], quiet: bool) -> Result<Vec<FramedPhoto>> {
        let detector = FaceDetector::shipped(&Device::Cpu)?;
        let framed = photos
            .iter()
            .map(|photo| {
                frame_photo(photo, self.framing(), &detector).map_err(|e| match e {
                    stableid::Error::Face(problem) => stableid::Error::Face(format!(
                        "{problem} (or --no-align if it is an aligned head crop already)"
                    )),
                    other => other,
                })
            })
            .collect::<stableid::Result<Vec<_>>>()?;
        for (photo, framed) in photos.iter().zip(&framed) {
            let Some(alignment) = framed.alignment.as_ref().filter(|_| !quiet) else { continue };
            if alignment.faces_found > 1 {
                eprintln!(
                    "{}: {} faces found, using face {} (--face N picks another; `stableid align` shows them)",
                    photo.display(),
                    alignment.faces_found,
                    alignment.face
                );
            }
            if alignment.crop.padded {
                eprintln!(
                    "{}: face {} is cut by the photo's border; its crop's missing part is filled by reflection",
                    photo.display(),
                    alignment.face
                );
            }
        }
        Ok(framed)
    }
}

/// Warns about each identity learned on a text encoder whose token embeddings differ from
/// `model`'s (`model_name`): it may not look like its person there.
pub fn warn_other_encoders(
    model: &impl AsRef<stableid::models::stable_diffusion::PromptEncoder>,
    identities: &[stableid::identity::Identity],
    model_name: &str,
) -> Result<()> {
    for warning in stableid::pipelines::other_encoder_warnings(model, identities, model_name)? {
        eprintln!("warning: {warning}");
    }
    Ok(())
}

/// The error as one line, the chain of causes joined by ": ", a bad setting of the library
/// worded with the flag that sets it.
pub fn error_line(error: &anyhow::Error) -> String {
    let causes: Vec<String> = error
        .chain()
        .map(|cause| match cause.downcast_ref::<stableid::Error>() {
            Some(stableid::Error::Setting { name, value, problem }) => match *name {
                "identities" => format!("{problem}: pass one --identity FILE per v1* v2* pair ({value} given)"),
                _ => format!("{} {value}: {problem}", flag(name)),
            },
            _ => cause.to_string(),
        })
        .collect();
    causes.join(": ")
}

/// The flag that sets a library request's field.
fn flag(field: &str) -> String {
    match field {
        // The prompt is the positional argument.
        "prompt" => "the prompt".into(),
        "resolution" => "--res".into(),
        "measures" => "--only".into(),
        _ => format!("--{}", field.replace('_', "-")),
    }
}

/// A flag Ctrl-C sets: long runs finish their current step, save a checkpoint and exit cleanly.
pub fn stop_on_ctrl_c() -> Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    use anyhow::Context;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, std::sync::atomic::Ordering::SeqCst))
        .context("cannot install the Ctrl-C handler")?;
    Ok(stop)
}

/// Proves `dir` writable before any slow work starts, so a long run cannot fail at its end.
pub fn check_writable(dir: &std::path::Path) -> Result<()> {
    use anyhow::Context;
    let probe = dir.join(format!(".stableid-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"").with_context(|| format!("output folder {} is not writable", dir.display()))?;
    std::fs::remove_file(&probe).ok();
    Ok(())
}

/// A progress bar on stderr with ETA (hidden when stderr is not a terminal).
pub fn progress_bar(len: u64, message: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} elapsed {elapsed} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}
