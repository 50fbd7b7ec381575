//! `stableid render`: views of a 3DGS PLY on an orbit, or from a 3DGS `cameras.json`, as PNGs.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use stableid::io::video::{write_video, VideoFormat};
use stableid::io::write_png;
use stableid::splats::{orbit_cameras, read_cameras_json, read_ply, render, Camera, Gaussians, Orbit, RenderOptions};

use super::{check_writable, progress_bar};

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    stableid render head.ply --out turntable\n  \
    stableid render head.ply --views 36 --elevation 10 --fov 30 --size 768 --background 1,1,1\n  \
    stableid render head.ply --views 72 --turntable 24   # also head.turntable.mp4\n  \
    stableid render scene.ply --camera cameras.json --out views\n\n\
    Writes DIR/STEM.view000.png, ... (STEM: the PLY's name; STEM-1, STEM-2, ... when those exist:\n\
    files are never replaced), each carrying its camera (3DGS cameras.json format) as PNG text.\n\
    The orbit circles the median of the Gaussians' centres around --up, starting on the first axis\n\
    perpendicular to it; without --radius it is far enough for the scene to fill the view.\n\
    Rendering runs on the CPU (all cores).")]
pub struct RenderArgs {
    /// A PLY in the layout of 3DGS (x y z, f_dc_*, f_rest_*, opacity, scale_*, rot_*).
    pub splats: PathBuf,
    /// Folder for the PNGs (created if missing).
    #[arg(long, default_value = "renders")]
    pub out: PathBuf,
    /// Views on the orbit, evenly spaced in azimuth.
    #[arg(long, default_value_t = 8)]
    pub views: usize,
    /// Distance of the cameras from the scene's centre [default: the scene fills the view].
    #[arg(long)]
    pub radius: Option<f64>,
    /// Degrees above the orbit plane.
    #[arg(long, default_value_t = 15.0, allow_negative_numbers = true)]
    pub elevation: f64,
    /// Vertical field of view in degrees.
    #[arg(long, default_value_t = 40.0)]
    pub fov: f64,
    /// Image size: N (square) or WIDTHxHEIGHT.
    #[arg(long, default_value = "512")]
    pub size: String,
    /// Background colour R,G,B in [0, 1].
    #[arg(long, default_value = "0,0,0")]
    pub background: String,
    /// The orbit's axis X,Y,Z (up in the images); 3DGS captures from COLMAP often need 0,-1,0.
    #[arg(long, default_value = "0,0,1", allow_hyphen_values = true)]
    pub up: String,
    /// Render the cameras of a 3DGS cameras.json instead of an orbit.
    #[arg(long, conflicts_with_all = ["views", "radius", "elevation", "fov", "size", "up"])]
    pub camera: Option<PathBuf>,
    /// Print the written files as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Also write the views as a turntable video, TAG.turntable.mp4 (H.264), at this many frames
    /// per second (the size must be even).
    #[arg(long, value_name = "FPS")]
    pub turntable: Option<u32>,
}

pub(super) fn triple(flag: &str, text: &str) -> Result<[f64; 3]> {
    let values: Vec<f64> = text
        .split(',')
        .map(|v| v.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("--{flag} {text}: expected three numbers X,Y,Z"))?;
    match values.as_slice() {
        [a, b, c] if values.iter().all(|v| v.is_finite()) => Ok([*a, *b, *c]),
        _ => bail!("--{flag} {text}: expected three finite numbers X,Y,Z"),
    }
}

fn size(text: &str) -> Result<(usize, usize)> {
    let parse = |v: &str| v.trim().parse::<usize>().ok();
    let (width, height) = match text.split_once('x') {
        Some((w, h)) => (parse(w), parse(h)),
        None => (parse(text), parse(text)),
    };
    match (width, height) {
        (Some(w), Some(h)) if w > 0 && h > 0 && w <= 8192 && h <= 8192 => Ok((w, h)),
        _ => bail!("--size {text}: expected N or WIDTHxHEIGHT, each between 1 and 8192"),
    }
}

pub fn run(args: RenderArgs) -> Result<()> {
    let background = triple("background", &args.background)?;
    if background.iter().any(|v| !(0.0..=1.0).contains(v)) {
        bail!("--background {}: each channel must lie in [0, 1]", args.background);
    }
    let (width, height) = size(&args.size)?;
    let gaussians = read_ply(&args.splats, &Device::Cpu)?;
    let cameras: Vec<Camera> = match &args.camera {
        Some(path) => read_cameras_json(path)?,
        None => {
            let means: Vec<[f64; 3]> = gaussians
                .means
                .to_dtype(DType::F64)?
                .to_vec2::<f64>()?
                .into_iter()
                .map(|m| [m[0], m[1], m[2]])
                .collect();
            let orbit = Orbit {
                views: args.views,
                radius: args.radius,
                elevation: args.elevation,
                fov: args.fov,
                width,
                height,
                up: triple("up", &args.up)?,
            };
            orbit_cameras(&means, &orbit)?
        }
    };
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    check_writable(&args.out)?;
    let stem = args.splats.file_stem().map_or_else(|| "splats".into(), |s| s.to_string_lossy().into_owned());
    let free = |file: String| std::fs::symlink_metadata(args.out.join(file)).is_err();
    let tag = (0..)
        .map(|k| if k == 0 { stem.clone() } else { format!("{stem}-{k}") })
        .find(|tag| (0..cameras.len()).all(|view| free(view_name(tag, view))) && free(turntable_name(tag)))
        .expect("a free name");
    if let Some(fps) = args.turntable {
        let odd = cameras.iter().any(|c| c.width % 2 == 1 || c.height % 2 == 1);
        if fps == 0 || odd {
            bail!("--turntable {fps}: needs a frame rate of at least 1 and views of even width and height (H.264)");
        }
    }
    let options = RenderOptions { background, ..RenderOptions::default() };
    let source = args.splats.display().to_string();
    let files = ViewFiles { dir: &args.out, tag: &tag, source: &source, turntable: args.turntable };
    let written = write_views(&gaussians, &cameras, &options, &files, !args.json)?;
    if args.json {
        println!("{}", serde_json::json!({ "splats": args.splats, "views": written }));
    } else {
        eprintln!("wrote {} views to {}", written.len(), args.out.display());
    }
    Ok(())
}

fn view_name(tag: &str, view: usize) -> String {
    format!("{tag}.view{view:03}.png")
}

fn turntable_name(tag: &str) -> String {
    format!("{tag}.turntable.mp4")
}

/// Where [`write_views`] writes: DIR/TAG.viewNNN.png (each carrying its camera and `source` as
/// PNG text) and, with `turntable` frames per second, DIR/TAG.turntable.mp4.
pub(super) struct ViewFiles<'a> {
    pub dir: &'a Path,
    pub tag: &'a str,
    pub source: &'a str,
    pub turntable: Option<u32>,
}

/// Renders `gaussians` from each camera into `files`; returns the files written.
pub(super) fn write_views(
    gaussians: &Gaussians,
    cameras: &[Camera],
    options: &RenderOptions,
    files: &ViewFiles,
    show_progress: bool,
) -> Result<Vec<PathBuf>> {
    let ViewFiles { dir: out, tag, source, turntable } = *files;
    let bar = progress_bar(cameras.len() as u64, "rendering");
    if !show_progress {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut written = Vec::new();
    let mut frames = Vec::new();
    for (view, camera) in cameras.iter().enumerate() {
        let image = render(gaussians, camera, options)?.rgb_image()?;
        let path = out.join(view_name(tag, view));
        let camera_json = serde_json::to_string(&camera.to_json(view, &view_name(tag, view)))?;
        write_png(&path, &image, &[("source", source.to_string()), ("camera", camera_json)])?;
        written.push(path);
        if turntable.is_some() {
            frames.push(image);
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if let Some(fps) = turntable {
        let path = out.join(turntable_name(tag));
        write_video(&path, &frames, fps, VideoFormat::Mp4, &[])?;
        written.push(path);
    }
    Ok(written)
}
