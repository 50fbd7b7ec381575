//! `stableid masks`: the face and hair masks an identity is learned with, written as PNGs to check
//! them before training (the loss only looks at the face, and at the hair with a small weight).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Tensor;
use stableid::io::{write_atomically, write_png};
use stableid::priors::masks::SIZE;
use stableid::weights::Hub;

use super::{DeviceArg, FaceParserArgs, FramingArgs};

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    stableid masks me.jpg --out masks\n  \
    stableid masks me.jpg --out masks --face-parser bisenet --face-parser-weights 79999_iter.pth\n  \
    stableid masks me.jpg --face-parser-weights ./face-parsing --json\n\n\
    Writes PHOTO_STEM-overlay.png (the photo with the face tinted green and the hair blue),\n\
    PHOTO_STEM-face.png and PHOTO_STEM-hair.png (the masks, white = inside).")]
pub struct MasksArgs {
    /// The photo, framed as for learning: the face detected and aligned (unless --no-align), 512x512.
    pub photo: PathBuf,
    /// Folder for the PNGs (created if missing; earlier masks of the same photo are replaced).
    #[arg(long, default_value = "masks")]
    pub out: PathBuf,
    #[command(flatten)]
    pub framing: FramingArgs,
    #[command(flatten)]
    pub parser: FaceParserArgs,
    /// Where the face parser runs.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: MasksArgs, hub: &Hub) -> Result<()> {
    // Cheap checks first: an unreadable photo or folder fails before the parser loads.
    let framed = args.framing.frame(std::slice::from_ref(&args.photo), args.json)?.remove(0);
    let photo = &framed.photo;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create output folder {}", args.out.display()))?;
    let device = args.device.open()?;
    let parser = args.parser.load(hub, &device)?;
    let rgb = photo.rgb().as_raw();
    let masks = parser.masks(rgb)?;

    let stem = args.photo.file_stem().map_or_else(|| "photo".into(), |s| s.to_string_lossy().into_owned());
    let paths = [
        args.out.join(format!("{stem}-overlay.png")),
        args.out.join(format!("{stem}-face.png")),
        args.out.join(format!("{stem}-hair.png")),
    ];
    let face = mask_values(&masks.face)?;
    let hair = mask_values(&masks.hair)?;
    let weights = args.parser.weights().unwrap_or_default().to_string();
    let mut text = vec![
        ("face_parser", parser.kind().name().to_string()),
        ("face_parser_weights", weights.clone()),
        ("photo_sha256", photo.sha256().to_string()),
    ];
    text.extend(framed.provenance());
    write_png(&paths[0], &masks.overlay(rgb)?, &text)?;
    write_gray_png(&paths[1], &face)?;
    write_gray_png(&paths[2], &hair)?;

    let (face_fraction, hair_fraction) = (masks.face_fraction()?, masks.hair_fraction()?);
    if args.json {
        let summary = serde_json::json!({
            "photo": args.photo,
            "overlay": paths[0],
            "face_mask": paths[1],
            "hair_mask": paths[2],
            "face_fraction": face_fraction,
            "hair_fraction": hair_fraction,
            "face_parser": parser.kind().name(),
            "face_parser_weights": weights,
        });
        println!("{summary}");
    } else {
        for path in &paths {
            println!("{}", path.display());
        }
        eprintln!("face: {:.1}% of the image, hair: {:.1}%", 100.0 * face_fraction, 100.0 * hair_fraction);
    }
    Ok(())
}

/// A `(512, 512)` mask as row-major values in {0, 1}.
fn mask_values(mask: &Tensor) -> Result<Vec<f32>> {
    Ok(mask.flatten_all()?.to_vec1::<f32>()?)
}

/// Writes a mask as an 8-bit grayscale PNG (255 inside, 0 outside), atomically.
fn write_gray_png(path: &Path, mask: &[f32]) -> Result<()> {
    let bytes: Vec<u8> = mask.iter().map(|&v| if v > 0.5 { 255 } else { 0 }).collect();
    write_atomically(path, |w| {
        let mut encoder = png::Encoder::new(w, SIZE as u32, SIZE as u32);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(std::io::Error::other)?;
        writer.write_image_data(&bytes).map_err(std::io::Error::other)?;
        writer.finish().map_err(std::io::Error::other)
    })?;
    Ok(())
}
