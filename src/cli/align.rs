//! `stableid align`: finds the faces of photos and writes each face used as the 512x512
//! FFHQ-aligned crop an identity is learned from, with a preview of what was found.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;
use image::RgbImage;
use stableid::io::write_png;
use stableid::models::mtcnn::Face;
use stableid::priors::align::{align, check_face_size, choose_face, preview, AlignedFace, FaceDetector, ALIGNED_SIZE};
use stableid::priors::photo::load_upright;

use super::check_writable;

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    stableid align me.jpg --out aligned\n  \
    stableid align group.jpg --face 2 --out aligned\n  \
    stableid align a.jpg b.jpg --all-faces --json\n\n\
    Writes DIR/STEM.aligned.png (the 512x512 FFHQ crop; STEM.faceN.aligned.png with --all-faces) and\n\
    DIR/STEM.preview.png: the photo (at most 1600 px) with every face's box (yellow), its landmarks\n\
    (red) and the crop of each face aligned (green), on a grey margin where a crop reaches past the\n\
    photo (that part is filled by reflection). Faces are numbered from 1, largest first; faces too\n\
    small for a usable crop (under 64 px) are refused. Existing files are never replaced: STEM-1,\n\
    STEM-2, ... are used instead.")]
pub struct AlignArgs {
    /// The photos (JPEG, PNG, ...; a JPEG's EXIF orientation is applied).
    #[arg(required = true)]
    pub photos: Vec<PathBuf>,
    /// Folder for the PNGs (created if missing).
    #[arg(long, default_value = "aligned")]
    pub out: PathBuf,
    /// Align face N of each photo (1 = the largest) [default: the largest].
    #[arg(long, conflicts_with = "all_faces")]
    pub face: Option<usize>,
    /// Align every face found.
    #[arg(long)]
    pub all_faces: bool,
    /// Print the faces (boxes, scores, landmarks, crop quads) and the files as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// One photo's faces and the crops made from it, before anything is written.
struct Aligned {
    photo: PathBuf,
    image: RgbImage,
    faces: Vec<Face>,
    /// (face number from 1, its crop)
    crops: Vec<(usize, AlignedFace)>,
}

pub fn run(args: AlignArgs) -> Result<()> {
    let detector = FaceDetector::shipped(&Device::Cpu)?;
    // Every photo is read and aligned before anything is written or said: a bad photo writes
    // nothing.
    let mut done = Vec::new();
    let mut notes = Vec::new();
    for path in &args.photos {
        let image = load_upright(path)?;
        let faces = detector.detect(&image)?;
        let numbers: Vec<usize> = if args.all_faces {
            choose_face(&faces, None, path)?;
            let (usable, small): (Vec<usize>, Vec<usize>) =
                (1..=faces.len()).partition(|&n| check_face_size(&faces[n - 1], n, path).is_ok());
            if usable.is_empty() {
                check_face_size(&faces[0], 1, path)?;
            }
            if !small.is_empty() {
                notes.push(format!("{}: faces {small:?} are too small to align, skipped", path.display()));
            }
            usable
        } else {
            let n = args.face.unwrap_or(1);
            check_face_size(choose_face(&faces, args.face, path)?, n, path)?;
            vec![n]
        };
        if faces.len() > 1 && !args.all_faces && args.face.is_none() {
            notes.push(format!(
                "{}: {} faces found, aligning the largest (--face N picks another, --all-faces takes all)",
                path.display(),
                faces.len()
            ));
        }
        let crops = numbers
            .into_iter()
            .map(|n| Ok((n, align(&image, &faces[n - 1], ALIGNED_SIZE)?)))
            .collect::<stableid::Result<Vec<_>>>()?;
        for (n, _) in crops.iter().filter(|(_, crop)| crop.padded) {
            notes.push(format!(
                "{}: face {n} is cut by the photo's border; its crop's missing part is filled by reflection (see the preview)",
                path.display()
            ));
        }
        done.push(Aligned { photo: path.clone(), image, faces, crops });
    }
    if !args.json {
        notes.iter().for_each(|note| eprintln!("{note}"));
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create output folder {}", args.out.display()))?;
    check_writable(&args.out)?;

    let mut summary = Vec::new();
    for photo in &done {
        summary.push(write(photo, &args.out, args.all_faces)?);
    }
    if args.json {
        println!("{}", serde_json::json!({ "photos": summary }));
    } else {
        let aligned = summary.iter().flat_map(|p| p["aligned"].as_array().into_iter().flatten().map(|c| &c["path"]));
        for path in aligned.chain(summary.iter().map(|p| &p["preview"])) {
            println!("{}", path.as_str().unwrap_or_default());
        }
    }
    Ok(())
}

fn face_json(number: usize, face: &Face) -> serde_json::Value {
    serde_json::json!({ "face": number, "box": face.bbox, "score": face.score, "landmarks": face.landmarks })
}

/// Writes one photo's crops and preview under free names; returns the photo's JSON summary.
fn write(photo: &Aligned, out: &Path, all_faces: bool) -> Result<serde_json::Value> {
    let stem = photo.photo.file_stem().map_or_else(|| "photo".into(), |s| s.to_string_lossy().into_owned());
    let crop_name = |tag: &str, n: usize| {
        if all_faces {
            format!("{tag}.face{n}.aligned.png")
        } else {
            format!("{tag}.aligned.png")
        }
    };
    // The first of STEM, STEM-1, STEM-2, ... whose files all are free.
    let tag = (0..)
        .map(|k| if k == 0 { stem.clone() } else { format!("{stem}-{k}") })
        .find(|tag| {
            let names = photo.crops.iter().map(|(n, _)| crop_name(tag, *n)).chain([format!("{tag}.preview.png")]);
            names.into_iter().all(|name| std::fs::symlink_metadata(out.join(name)).is_err())
        })
        .expect("a free name");
    let faces: Vec<_> = photo.faces.iter().enumerate().map(|(i, f)| face_json(i + 1, f)).collect();
    let source = photo.photo.display().to_string();
    let mut crops = Vec::new();
    for (n, crop) in &photo.crops {
        let path = out.join(crop_name(&tag, *n));
        let face = &photo.faces[n - 1];
        let text = [
            ("photo", source.clone()),
            ("face", face_json(*n, face).to_string()),
            ("quad", serde_json::to_string(&crop.quad)?),
            ("alignment", "FFHQ (NVlabs ffhq-dataset recipe) on MTCNN landmarks".to_string()),
        ];
        write_png(&path, &(&crop.image).into(), &text)?;
        crops.push(serde_json::json!({ "face": n, "path": path, "quad": crop.quad, "padded": crop.padded }));
    }
    let preview_path = out.join(format!("{tag}.preview.png"));
    let text = [("photo", source), ("faces", serde_json::Value::from(faces.clone()).to_string())];
    let quads: Vec<_> = photo.crops.iter().map(|(_, crop)| crop.quad).collect();
    write_png(&preview_path, &(&preview(&photo.image, &photo.faces, &quads)).into(), &text)?;
    let summary = serde_json::json!({
        "photo": photo.photo,
        "width": photo.image.width(),
        "height": photo.image.height(),
        "faces": faces,
        "aligned": crops,
        "preview": preview_path,
    });
    Ok(summary)
}
