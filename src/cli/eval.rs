//! `stableid eval`: the paper's metrics (CLIP-I, CLIP-T, Face Sim, Face Div, Trusted Div, FID) of
//! one or several identities, on images it generates from the published test prompts (reused
//! when already in the output folder, so a stopped run resumes) or on images made before; a
//! Markdown and JSON report and a contact sheet per identity.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use stableid::eval::fid::frechet_distance;
use stableid::eval::images::{
    file_name, identity_digest, parse_prompts, plan_images, read_generated, read_reference, reusable, PUBLISHED_PROMPTS,
};
use stableid::eval::metrics::MetricRow;
use stableid::eval::report::{contact_sheet, IdentityReport, Report};
use stableid::eval::scorer::{
    EvalImage, MetricModels, MetricWeights, Timings, ALEXNET_FILE, ALEXNET_SOURCE, DEFAULT_CLIP, FACENET_FILE,
    FACENET_SOURCE, INCEPTION_FILE, INCEPTION_SOURCE,
};
use stableid::identity::Identity;
use stableid::io::{write_bytes, write_png, RgbImage};
use stableid::models::stable_diffusion::{SdConfigs, StableDiffusion};
use stableid::pipelines::text_to_image::to_rgb_images;
use stableid::pipelines::{generate, GenerateRequest};
use stableid::priors::photo::{load_image_with_digest, load_upright};
use stableid::schedulers::Sampler;
use stableid::weights::{torch_cached_checkpoint, Hub, ModelDir};

use super::{check_writable, progress_bar, ModelArgs};

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    stableid eval --identity me.safetensors --photo me.jpg --out eval-me\n  \
    stableid eval --identity me.safetensors --photo me.jpg --out eval-me --num-images 1 --prompts my_prompts.txt\n  \
    stableid eval --identity a.safetensors --photo a.jpg --identity b.safetensors --photo b.jpg --out table\n  \
    stableid eval --identity me-200.safetensors --identity me-450.safetensors --photo me.jpg --out steps\n  \
    stableid eval --images outputs --photo me.jpg --out eval-outputs --fid-reference celebs/\n\n\
Writes OUT/report.md, OUT/report.json and OUT/contact_sheet-NAME.png (numbered when they exist), the\n\
generated images in OUT/NAME/ (NAME: the identity file's name). Images already there with the same\n\
settings are reused, so an interrupted run resumes. The metric models' weights are never downloaded:\n\
CLIP from the hub cache or a folder; FaceNet (20180402-114759-vggface2.pt), AlexNet (alexnet-owt-7be5be79.pth)\n\
and Inception (pt_inception-2015-12-05-6726825d.pth) from PyTorch's cache ($TORCH_HOME/hub/checkpoints or\n\
$TORCH_HOME/checkpoints), where facenet-pytorch, torchvision and pytorch-fid keep them, or the files given.\n\
Definitions of the metrics: docs/eval.md.")]
pub struct EvalArgs {
    /// Identity file to evaluate (from `stableid learn`); repeat for several (one table row each).
    #[arg(long)]
    pub identity: Vec<PathBuf>,
    /// The photo the identity was learned from (Face Sim and CLIP-I compare with it): once for
    /// all identities, or once per --identity (or --images), in the same order.
    #[arg(long, required = true)]
    pub photo: Vec<PathBuf>,
    /// Score the images of this folder instead of generating (each PNG's `prompt` metadata, as
    /// `stableid generate` writes it, says its prompt); repeat for several.
    #[arg(long, conflicts_with = "identity")]
    pub images: Vec<PathBuf>,
    /// Folder for the images and the report (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Prompts file (one per line with `v1* v2*`, # comments) [default: the 40 published test prompts].
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Images per prompt.
    #[arg(long, default_value_t = 4)]
    pub num_images: usize,
    /// Seed of each prompt's first image; image k of every prompt uses seed + k.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Denoising steps.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 8.5)]
    pub guidance: f64,
    /// What the images should not show.
    #[arg(long, short = 'n', default_value = "")]
    pub negative_prompt: String,
    #[arg(long, default_value = "dpm++", value_parser = parse_sampler, help = format!("Sampler: one of {}", Sampler::NAMES.join(", ")))]
    pub sampler: Sampler,
    /// CLIP for CLIP-I and CLIP-T: a transformers CLIPModel folder or a hub id (in the hub cache, or downloaded).
    #[arg(long, default_value = DEFAULT_CLIP)]
    pub clip: String,
    /// FaceNet weights (facenet-pytorch's 20180402-114759-vggface2.pt, or .safetensors) [default: in PyTorch's cache].
    #[arg(long)]
    pub facenet_weights: Option<PathBuf>,
    /// AlexNet weights for LPIPS (torchvision's alexnet-owt-7be5be79.pth, or .safetensors) [default: in PyTorch's cache].
    #[arg(long)]
    pub alexnet_weights: Option<PathBuf>,
    /// Inception-v3 weights for FID (pytorch-fid's pt_inception-2015-12-05-6726825d.pth, or .safetensors)
    /// [default: in PyTorch's cache].
    #[arg(long, requires = "fid_reference")]
    pub inception_weights: Option<PathBuf>,
    /// Folder of reference images: adds FID (the generated images against these).
    #[arg(long)]
    pub fid_reference: Option<PathBuf>,
    /// Print the report's JSON on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub model: ModelArgs,
}

fn parse_sampler(s: &str) -> Result<Sampler, String> {
    s.parse::<Sampler>().map_err(|e| e.to_string())
}

/// One row of the table: where its images come from, and its photo.
struct Subject {
    label: String,
    photo: PathBuf,
    source: Source,
}

enum Source {
    Generate(Identity),
    Folder(PathBuf),
}

/// The path of `file` given by `flag`, or `file` in PyTorch's cache.
fn weights_path(given: &Option<PathBuf>, file: &str, what: &str, source: &str, flag: &str) -> Result<PathBuf> {
    match given {
        Some(path) => Ok(path.clone()),
        None => torch_cached_checkpoint(file, what, source).with_context(|| format!("pass {flag} FILE, or")),
    }
}

/// Distinct labels: each name, with `-2`, `-3`, ... after a name already taken.
fn unique_labels(names: Vec<String>) -> Vec<String> {
    let mut labels: Vec<String> = Vec::with_capacity(names.len());
    for name in names {
        let mut label = name.clone();
        let mut n = 2;
        while labels.contains(&label) {
            label = format!("{name}-{n}");
            n += 1;
        }
        labels.push(label);
    }
    labels
}

fn stem(path: &Path) -> String {
    path.file_stem().map_or_else(|| "identity".to_string(), |s| s.to_string_lossy().into_owned())
}

/// The suffix that makes this run's report files new: "" or "-2", "-3", ...
fn free_suffix(out: &Path, labels: &[String]) -> String {
    let taken = |suffix: &str| {
        out.join(format!("report{suffix}.md")).exists()
            || out.join(format!("report{suffix}.json")).exists()
            || labels.iter().any(|l| out.join(format!("contact_sheet-{l}{suffix}.png")).exists())
    };
    (1..).map(|n| if n == 1 { String::new() } else { format!("-{n}") }).find(|s| !taken(s)).expect("a free name")
}

pub fn run(args: EvalArgs, hub: &Hub) -> Result<()> {
    let start = Instant::now();
    let mut timings = Timings::default();
    // 1. Cheap checks, before any model loads.
    if args.num_images == 0 {
        bail!("--num-images must be at least 1");
    }
    let subjects_count = if args.images.is_empty() { args.identity.len() } else { args.images.len() };
    if subjects_count == 0 {
        bail!("nothing to evaluate: pass --identity FILE (images are generated) or --images DIR");
    }
    let photos = match args.photo.len() {
        1 => vec![args.photo[0].clone(); subjects_count],
        n if n == subjects_count => args.photo.clone(),
        n => bail!(
            "{n} --photo for {subjects_count} identities: give one photo for all, or one per --identity / --images"
        ),
    };
    let sources: Vec<(String, Source)> = if args.images.is_empty() {
        args.identity.iter().map(|p| Ok((stem(p), Source::Generate(Identity::load(p)?)))).collect::<Result<_>>()?
    } else {
        args.images.iter().map(|d| (stem(d), Source::Folder(d.clone()))).collect()
    };
    let labels = unique_labels(sources.iter().map(|(name, _)| name.clone()).collect());
    let subjects: Vec<Subject> = sources
        .into_iter()
        .zip(labels.iter().cloned())
        .zip(photos)
        .map(|(((_, source), label), photo)| Subject { label, photo, source })
        .collect();
    let (prompts, prompts_source) = match &args.prompts {
        Some(path) => {
            let text = stableid::io::read_text_bounded(path, stableid::io::SMALL_FILE_LIMIT)
                .with_context(|| format!("cannot read prompts file {}", path.display()))?;
            (parse_prompts(&text, &path.display().to_string())?, path.display().to_string())
        }
        None => (parse_prompts(PUBLISHED_PROMPTS, "assets/eval_prompts.txt")?, "the 40 published test prompts".into()),
    };
    let weights = MetricWeights {
        clip: args.clip.clone(),
        facenet: weights_path(
            &args.facenet_weights,
            FACENET_FILE,
            "FaceNet weights",
            FACENET_SOURCE,
            "--facenet-weights",
        )?,
        alexnet: weights_path(
            &args.alexnet_weights,
            ALEXNET_FILE,
            "AlexNet weights (LPIPS)",
            ALEXNET_SOURCE,
            "--alexnet-weights",
        )?,
        inception: match &args.fid_reference {
            Some(_) => Some(weights_path(
                &args.inception_weights,
                INCEPTION_FILE,
                "Inception-v3 weights (FID)",
                INCEPTION_SOURCE,
                "--inception-weights",
            )?),
            None => None,
        },
    };
    let device = args.model.device()?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create output folder {}", args.out.display()))?;
    check_writable(&args.out)?;

    // 2. The metric models, the photos' faces and the FID reference: a photo without a face stops
    // the run before any image is generated.
    let models = timings.time("load metric models", || MetricModels::load(&weights, hub, &device))?;
    let photo_features = timings.time("photos", || {
        subjects
            .iter()
            .map(|s| {
                let photo = load_upright(&s.photo)?;
                models.photo_features(&photo, &s.photo)
            })
            .collect::<stableid::Result<Vec<_>>>()
    })?;
    let reference = match &args.fid_reference {
        Some(dir) => Some(timings.time("FID reference (Inception)", || -> Result<Tensor> {
            let images = read_reference(dir)?;
            let bar = progress_bar(1, &format!("Inception on {} reference images", images.len()));
            let features = models.fid_features(images.iter())?;
            bar.finish_and_clear();
            Ok(features)
        })?),
        None => None,
    };

    // 3. The images: generated (or reused), or read.
    let generator = Generator::new(&args, &subjects, &prompts, hub)?;
    let mut identities = Vec::with_capacity(subjects.len());
    let mut all_features = Vec::new();
    for (subject, photo) in subjects.iter().zip(&photo_features) {
        let mut own = Timings::default();
        let (subject_prompts, images, images_dir) = match &subject.source {
            Source::Generate(identity) => {
                let dir = args.out.join(&subject.label);
                let images = generator.images(identity, &dir, &subject.label, &mut own)?;
                (prompts.clone(), images, dir)
            }
            Source::Folder(dir) => {
                let (prompts, images) = own.time("read images", || read_generated(dir))?;
                (prompts, images, dir.clone())
            }
        };
        let bar = progress_bar(images.len() as u64, &format!("{}: faces", subject.label));
        let scored =
            models.score(photo, &subject_prompts, &images, &mut own, &mut |done, _| bar.set_position(done as u64))?;
        bar.finish_and_clear();
        let mut mean = scored.mean.clone();
        if let Some(reference) = &reference {
            let features = own.time("Inception", || models.fid_features(images.iter().map(|i| &i.image)))?;
            mean.fid = Some(frechet_distance(&features, reference)?);
            all_features.push(features);
        }
        let sheet = own.time("contact sheet", || contact_sheet(&subject_prompts, &images, &scored.images));
        let mut report = IdentityReport::new(
            subject.label.clone(),
            match &subject.source {
                Source::Generate(identity) => Some(identity.source.display().to_string()),
                Source::Folder(_) => None,
            },
            subject.photo.display().to_string(),
            images_dir.display().to_string(),
            &subject_prompts,
            &scored,
            own.clone(),
        );
        report.mean = mean;
        timings.merge(&own);
        identities.push((report, sheet, scored));
    }

    // 4. The table of all identities and the report files.
    let mut all = MetricRow::of(
        identities.iter().flat_map(|(_, _, s)| s.images.iter()),
        identities.iter().flat_map(|(_, _, s)| s.pairs.iter()),
    );
    if let Some(reference) = &reference {
        all.fid = Some(frechet_distance(&Tensor::cat(&all_features, 0)?, reference)?);
    }
    let suffix = free_suffix(&args.out, &labels);
    let mut sheets = Vec::new();
    let report_start = Instant::now();
    for (report, sheet, _) in &identities {
        let path = args.out.join(format!("contact_sheet-{}{suffix}.png", report.label));
        write_png(&path, &RgbImage::from(sheet), &[("Software", format!("stableid {}", env!("CARGO_PKG_VERSION")))])?;
        sheets.push(path);
    }
    timings.add("write report", report_start.elapsed().as_secs_f64());
    timings.add("total", start.elapsed().as_secs_f64());
    let report = Report {
        settings: generator.settings(&args, &prompts_source, &weights),
        identities: identities.into_iter().map(|(r, _, _)| r).collect(),
        all,
        timings_s: timings,
    };
    let json = serde_json::to_string_pretty(&report)?;
    let (json_path, md_path) =
        (args.out.join(format!("report{suffix}.json")), args.out.join(format!("report{suffix}.md")));
    write_bytes(&json_path, json.as_bytes())?;
    write_bytes(&md_path, report.markdown().as_bytes())?;
    if args.json {
        println!("{json}");
    } else {
        for path in [&md_path, &json_path].into_iter().chain(&sheets) {
            println!("{}", path.display());
        }
    }
    Ok(())
}

/// Generates an identity's images, or reuses those already made with the same settings.
struct Generator {
    /// Loaded on the first image to make (`None` when evaluating folders).
    model: Option<ModelDir>,
    configs: Option<SdConfigs>,
    sd: std::cell::OnceCell<StableDiffusion>,
    model_args: ModelArgs,
    request: Option<GenerateRequest>,
    prompts: Vec<String>,
    num_images: usize,
    seed: u64,
}

impl Generator {
    fn new(args: &EvalArgs, subjects: &[Subject], prompts: &[String], hub: &Hub) -> Result<Self> {
        let generating = subjects.iter().any(|s| matches!(s.source, Source::Generate(_)));
        let (model, configs, request) = if generating {
            let model = ModelDir::resolve(&args.model.model, hub, args.model.dtype())?;
            let configs = SdConfigs::read(&model)?;
            let (width, height) = configs.default_size();
            let mut request = GenerateRequest::new(&prompts[0], width, height);
            request.steps = args.steps;
            request.guidance = args.guidance;
            request.negative_prompt = args.negative_prompt.clone();
            request.sampler = args.sampler;
            request.validate(&configs)?;
            (Some(model), Some(configs), Some(request))
        } else {
            (None, None, None)
        };
        Ok(Self {
            model,
            configs,
            sd: std::cell::OnceCell::new(),
            model_args: args.model.clone(),
            request,
            prompts: prompts.to_vec(),
            num_images: args.num_images,
            seed: args.seed,
        })
    }

    /// Stable Diffusion, loaded on the first call.
    fn sd(&self) -> Result<&StableDiffusion> {
        if let Some(sd) = self.sd.get() {
            return Ok(sd);
        }
        let (model, configs) = (self.model.as_ref().expect("generating"), self.configs.clone().expect("generating"));
        let device = self.model_args.device()?;
        let sd = StableDiffusion::load_with_configs(model, configs, &device, self.model_args.precision(&device)?)?;
        Ok(self.sd.get_or_init(|| sd))
    }

    /// The images of `identity` in `dir`: those there with the same settings, the others made.
    fn images(&self, identity: &Identity, dir: &Path, label: &str, timings: &mut Timings) -> Result<Vec<EvalImage>> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create image folder {}", dir.display()))?;
        let template = self.request.as_ref().expect("generating");
        let digest = identity_digest(identity)?;
        let plan = plan_images(self.prompts.len(), self.num_images, self.seed);
        let mut requests = Vec::with_capacity(plan.len());
        let mut missing = 0;
        for planned in &plan {
            let mut request = template.clone();
            request.prompt = self.prompts[planned.prompt].clone();
            request.seed = planned.seed;
            let mut settings =
                request.settings(self.model.as_ref().expect("generating").name(), std::slice::from_ref(identity));
            settings.push(("identity_sha256", digest.clone()));
            let path = dir.join(&planned.file);
            let reuse = reusable(&path, &settings)?;
            missing += usize::from(!reuse);
            requests.push((planned, request, settings, path, reuse));
        }
        if missing > 0 {
            let model = self.model.as_ref().expect("generating");
            super::warn_other_encoders(self.sd()?, std::slice::from_ref(identity), model.name())?;
        }
        let steps = template.steps as u64;
        let bar = progress_bar(missing as u64 * steps, &format!("{label}: {missing} images to generate"));
        let mut images = Vec::with_capacity(plan.len());
        let mut done = 0u64;
        for (planned, request, settings, path, reuse) in requests {
            let image = if reuse {
                timings.time("read images", || load_image_with_digest(&path, "image"))?.0
            } else {
                let start = Instant::now();
                let sd = self.sd()?;
                let generated = generate(sd, &request, std::slice::from_ref(identity), &mut |step, _| {
                    bar.set_position(done + step as u64)
                })?;
                done += steps;
                let rgb = to_rgb_images(&generated.image)?.remove(0);
                write_png(&path, &rgb, &settings)?;
                timings.add("generation", start.elapsed().as_secs_f64());
                image::RgbImage::from_raw(rgb.width, rgb.height, rgb.pixels).expect("RGB pixels")
            };
            images.push(EvalImage { file: file_name(&path), prompt: planned.prompt, image });
        }
        bar.finish_and_clear();
        Ok(images)
    }

    /// How the images were made and scored, for the report.
    fn settings(&self, args: &EvalArgs, prompts_source: &str, weights: &MetricWeights) -> Vec<(String, String)> {
        let mut settings = vec![];
        if let Some(request) = &self.request {
            let model = self.model.as_ref().expect("generating").name().to_string();
            settings.extend([
                ("model".to_string(), model),
                ("prompts".into(), format!("{} ({} prompts)", prompts_source, self.prompts.len())),
                ("images per prompt".into(), self.num_images.to_string()),
                ("seeds".into(), format!("{} + image index, the same for every prompt", self.seed)),
                (
                    "sampler".into(),
                    format!("{} ({} steps, guidance {})", request.sampler, request.steps, request.guidance),
                ),
                ("negative prompt".into(), format!("{:?}", request.negative_prompt)),
                ("size".into(), format!("{}x{}", request.width, request.height)),
            ]);
        }
        settings.push(("CLIP".into(), weights.clip.clone()));
        settings.push(("FaceNet".into(), weights.facenet.display().to_string()));
        settings.push(("LPIPS AlexNet".into(), weights.alexnet.display().to_string()));
        if let (Some(inception), Some(reference)) = (&weights.inception, &args.fid_reference) {
            settings.push(("FID Inception-v3".into(), inception.display().to_string()));
            settings.push(("FID reference".into(), reference.display().to_string()));
        }
        settings
    }
}
