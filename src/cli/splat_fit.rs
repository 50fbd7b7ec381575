//! `stableid splat-fit`: Gaussians fitted to images seen from known cameras (3DGS's L1 loop), as a
//! PLY.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use stableid::io::read_png_text;
use stableid::priors::photo::{load_image_with_digest, rgb_to_tensor};
use stableid::splats::{
    cameras_extent, fit, psnr, random_start, read_camera_entries, read_ply, render, write_ply, Camera, CameraJson,
    FitOptions, RenderOptions,
};

use super::progress_bar;
use super::render::triple;

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    stableid render truth.ply --views 24 --out views && stableid splat-fit views/*.png --out fitted.ply\n  \
    stableid splat-fit images/*.png --cameras cameras.json --iterations 7000 --out scene.ply\n  \
    stableid splat-fit views/*.png --init fitted.ply --iterations 3000 --out refined.ply\n\n\
    Each image's camera comes from --cameras (a 3DGS cameras.json; entries matched by img_name, the\n\
    file name without its extension) or, without it, from the camera the image carries as PNG text\n\
    (`stableid render` writes it). Without --init the fit starts from --points random Gaussians in the\n\
    ball every camera sees around the point they look at. The schedule is 3DGS's scaled to\n\
    --iterations (densify from 1/60 to 1/2 of the run, opacity reset every tenth), its learning rates\n\
    scaled by the cameras' extent, L1 loss only. The PLY carries the settings as header comments;\n\
    an existing PLY is never overwritten. Runs on the CPU (all cores).")]
pub struct SplatFitArgs {
    /// The target images (PNG or JPEG), each seen from a known camera.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// The fitted Gaussians, a 3DGS PLY.
    #[arg(long, default_value = "fitted.ply")]
    pub out: PathBuf,
    /// A 3DGS cameras.json holding the images' cameras.
    #[arg(long)]
    pub cameras: Option<PathBuf>,
    /// Start from this PLY instead of random Gaussians.
    #[arg(long, conflicts_with = "points")]
    pub init: Option<PathBuf>,
    /// Random Gaussians to start from (3DGS starts its synthetic scenes from 100,000).
    #[arg(long, default_value_t = 100_000)]
    pub points: usize,
    /// Iterations, one image each, in turn (3DGS: 30,000).
    #[arg(long, default_value_t = 30_000)]
    pub iterations: usize,
    /// Background colour R,G,B in [0, 1] behind the Gaussians (the images' own background).
    #[arg(long, default_value = "0,0,0")]
    pub background: String,
    /// Keep the number of Gaussians fixed (no densification, pruning or opacity reset).
    #[arg(long)]
    pub no_densify: bool,
    /// Seed of the random start and of the splits' samples.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// The camera of `image`: its entry in `cameras` (matched by name), or the one it carries.
fn camera_of(image: &std::path::Path, cameras: Option<&[(String, Camera)]>) -> Result<Camera> {
    let stem = image.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    if let Some(cameras) = cameras {
        let name = image.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        return match cameras.iter().find(|(img_name, _)| *img_name == stem || *img_name == name) {
            Some((_, camera)) => Ok(camera.clone()),
            None => bail!("{}: no camera named {stem} in --cameras", image.display()),
        };
    }
    let text = read_png_text(image).unwrap_or_default();
    let Some((_, json)) = text.iter().find(|(key, _)| key == "camera") else {
        bail!("{}: the image carries no camera: pass --cameras cameras.json", image.display());
    };
    let entry: CameraJson = serde_json::from_str(json)
        .with_context(|| format!("{}: its camera text is not a 3DGS camera", image.display()))?;
    Ok(Camera::from_json(&entry)?)
}

/// The image as a `[3, height, width]` tensor in [0, 1], checked against its camera's size.
fn target_of(image: &std::path::Path, camera: &Camera) -> Result<Tensor> {
    let (rgb, _) = load_image_with_digest(image, "image")?;
    if (rgb.width() as usize, rgb.height() as usize) != (camera.width, camera.height) {
        bail!(
            "{} is {}x{} but its camera sees {}x{}",
            image.display(),
            rgb.width(),
            rgb.height(),
            camera.width,
            camera.height
        );
    }
    Ok(rgb_to_tensor(&rgb, |level| f32::from(level) / 255.0)?.squeeze(0)?)
}

pub fn run(args: SplatFitArgs) -> Result<()> {
    let background = triple("background", &args.background)?;
    if background.iter().any(|v| !(0.0..=1.0).contains(v)) {
        bail!("--background {}: each channel must lie in [0, 1]", args.background);
    }
    if args.iterations == 0 || args.points == 0 {
        bail!("--iterations and --points must be at least 1");
    }
    if args.out.exists() {
        bail!("{} already exists: choose another --out (outputs are never overwritten)", args.out.display());
    }
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        super::check_writable(dir)?;
    }
    let named_cameras = match &args.cameras {
        Some(path) => Some(
            read_camera_entries(path)?
                .into_iter()
                .map(|entry| Ok((entry.img_name.clone(), Camera::from_json(&entry)?)))
                .collect::<Result<Vec<_>>>()?,
        ),
        None => None,
    };
    let mut views = Vec::with_capacity(args.images.len());
    for image in &args.images {
        let camera = camera_of(image, named_cameras.as_deref())?;
        let target = target_of(image, &camera)?;
        views.push((camera, target));
    }
    let cameras: Vec<Camera> = views.iter().map(|(camera, _)| camera.clone()).collect();
    let start = match &args.init {
        Some(path) => read_ply(path, &Device::Cpu)?,
        None => random_start(&cameras, args.points, args.seed, &Device::Cpu)?,
    };
    let extent = cameras_extent(&cameras).max(1e-6);
    let mut options = FitOptions::new(args.iterations, extent);
    options.render = RenderOptions { background, ..RenderOptions::default() };
    options.seed = args.seed;
    if args.no_densify {
        options.densify = None;
    }

    let bar = progress_bar(args.iterations as u64, "fitting");
    if args.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let started = std::time::Instant::now();
    let (fitted, report) = fit(&start, &views, &options, |_, loss| {
        bar.set_message(format!("fitting (L1 {loss:.4})"));
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    let mean_psnr = views
        .iter()
        .map(|(camera, target)| psnr(&render(&fitted, camera, &options.render)?.color()?, target))
        .sum::<stableid::Result<f64>>()?
        / views.len() as f64;
    let metadata = [
        ("software", format!("stableid {} splat-fit", env!("CARGO_PKG_VERSION"))),
        ("images", args.images.len().to_string()),
        ("iterations", args.iterations.to_string()),
        ("start", args.init.as_ref().map_or(format!("{} random points", args.points), |p| p.display().to_string())),
        ("densify", (!args.no_densify).to_string()),
        ("background", args.background.clone()),
        ("seed", args.seed.to_string()),
        ("psnr", format!("{mean_psnr:.2}")),
    ];
    write_ply(&args.out, &fitted, &metadata)?;
    let final_loss = report.losses.last().copied().unwrap_or(f64::NAN);
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "splats": args.out,
                "gaussians": report.count,
                "iterations": args.iterations,
                "final_l1": final_loss,
                "psnr": mean_psnr,
                "seconds": started.elapsed().as_secs_f64(),
            })
        );
    } else {
        eprintln!(
            "wrote {} ({} Gaussians; mean PSNR over the {} images {mean_psnr:.2} dB)",
            args.out.display(),
            report.count,
            views.len()
        );
    }
    Ok(())
}
