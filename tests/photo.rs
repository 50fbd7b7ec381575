//! Photo loading against PIL (fixture from tools/reference/face_feature.py): real photos in several
//! formats and sizes resized to 512x512 byte for byte as `Image.open(p).convert("RGB").resize((512, 512))`,
//! and the errors for photos that cannot be used, huge ones (issue 18) refused before decoding.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, IndexOp};
use common::bad_inputs::{jpeg_claiming, png_claiming, write_flat_png};
use common::{fixture, load_tensors};
use image::{ImageBuffer, Luma, RgbImage};
use sha2::{Digest, Sha256};
use stableid::priors::photo::{load_photo, resize, Filter, Weights, PHOTO_SIZE};
use stableid::Error;

const PARITY: &str = "parity/face_feature.safetensors";

fn metadata() -> HashMap<String, String> {
    serde_json::from_str(&std::fs::read_to_string(fixture("parity/face_feature.json")).unwrap()).unwrap()
}

/// The fixture photos, by file name.
fn photo_names(meta: &HashMap<String, String>) -> Vec<String> {
    let mut names: Vec<String> =
        meta.keys().filter_map(|k| k.strip_suffix(".file_sha256")).map(str::to_string).collect();
    names.sort();
    names
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Lossless photos decode to PIL's pixels exactly, so their 512 images must be identical; JPEG
/// decoders differ (the image crate's zune-jpeg vs PIL's libjpeg-turbo: IDCT rounding and chroma
/// upsampling), by a fraction of a level on average.
#[test]
fn real_photos_resize_to_pils_512() {
    let meta = metadata();
    let grids = load_tensors(PARITY);
    let stride: usize = meta["grid_stride"].parse().unwrap();
    let names = photo_names(&meta);
    assert_eq!(names.len(), 10, "fixture photos: {names:?}");
    let mut failures = Vec::new();
    for name in &names {
        let photo = load_photo(&fixture(&format!("photos/{name}"))).unwrap();
        assert_eq!(photo.rgb().dimensions(), (PHOTO_SIZE, PHOTO_SIZE), "{name}");
        assert_eq!(photo.sha256(), meta[&format!("{name}.file_sha256")], "{name}: file digest");
        let grid = grids[&format!("{name}.pil512_grid")].flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let side = PHOTO_SIZE as usize / stride;
        let diffs: Vec<u8> = grid
            .iter()
            .enumerate()
            .map(|(i, &expected)| {
                let (y, x, c) = (i / (side * 3), (i / 3) % side, i % 3);
                let at = |v: usize| (v * stride + stride / 2) as u32;
                photo.rgb().get_pixel(at(x), at(y))[c].abs_diff(expected)
            })
            .collect();
        let max = diffs.iter().copied().max().unwrap();
        let mean = diffs.iter().map(|&d| f64::from(d)).sum::<f64>() / diffs.len() as f64;
        let exact = sha256_hex(photo.rgb().as_raw()) == meta[&format!("{name}.pil512_sha256")];
        let (mode, size) = (&meta[&format!("{name}.mode")], &meta[&format!("{name}.size")]);
        eprintln!("{name} ({mode} {size}): identical to PIL: {exact}; grid max diff {max}, mean {mean:.3}");
        let ok = if name.ends_with(".png") { exact } else { max <= 4 && mean <= 0.4 };
        if !ok {
            failures.push(format!("{name}: identical {exact}, max diff {max}, mean {mean:.3}"));
        }
    }
    assert!(failures.is_empty(), "512 images too far from PIL's: {failures:?}");
}

#[test]
fn to_tensor_is_the_image_in_minus_one_to_one() {
    let photo = load_photo(&fixture("photos/astronaut_300x400.jpg")).unwrap();
    let t = photo.to_tensor().unwrap();
    assert_eq!(t.dims(), &[1, 3, 512, 512]);
    assert_eq!(t.dtype(), DType::F32);
    for (x, y) in [(0u32, 0u32), (511, 0), (100, 300), (511, 511), (257, 64)] {
        let px = photo.rgb().get_pixel(x, y);
        for c in 0..3 {
            let v = t.i((0, c, y as usize, x as usize)).unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(v, (f32::from(px[c]) / 255.0 - 0.5) / 0.5, "pixel ({x}, {y}) channel {c}");
        }
    }
    let all = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(all.iter().all(|v| (-1.0..=1.0).contains(v)));
    assert!(all.iter().any(|&v| v < -0.9) && all.iter().any(|&v| v > 0.9), "a real photo spans the range");
}

#[test]
fn resize_to_the_same_size_is_the_identity_and_shapes_follow_the_request() {
    let image =
        RgbImage::from_fn(300, 260, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x * y) % 251) as u8]));
    for filter in [Filter::Bilinear, Filter::Bicubic] {
        for weights in [Weights::Pil, Weights::Torchvision] {
            assert_eq!(resize(&image, 300, 260, filter, weights), image);
            assert_eq!(resize(&image, 123, 456, filter, weights).dimensions(), (123, 456));
        }
    }
    // A flat image stays flat whatever the scale (the weights of every output pixel sum to one).
    let flat = RgbImage::from_pixel(333, 277, image::Rgb([7, 128, 250]));
    let resized = resize(&flat, 512, 200, Filter::Bicubic, Weights::Pil);
    assert!(resized.pixels().all(|p| p.0 == [7, 128, 250]));
}

#[test]
fn sixteen_bit_grey_keeps_the_high_byte() {
    let dir = tempfile::tempdir().unwrap();
    let grey = image::open(fixture("photos/coffee_gray_384x256.png")).unwrap().to_luma8();
    // Low byte 255 - v: rounding v16 / 257 would give v + 1 for most pixels, and PIL's clipping 255.
    let wide: ImageBuffer<Luma<u16>, Vec<u16>> = ImageBuffer::from_fn(grey.width(), grey.height(), |x, y| {
        let v = u16::from(grey.get_pixel(x, y)[0]);
        Luma([v * 256 + (255 - v)])
    });
    let path = dir.path().join("grey16.png");
    wide.save(&path).unwrap();
    let from16 = load_photo(&path).unwrap();
    let from8 = load_photo(&fixture("photos/coffee_gray_384x256.png")).unwrap();
    assert_eq!(from16.rgb(), from8.rgb());
}

/// The message of the `Error::Input` that loading `path` gives; it must name the file.
fn input_error(path: &Path) -> String {
    match load_photo(path) {
        Err(Error::Input(msg)) => {
            let file = path.file_name().unwrap().to_str().unwrap();
            assert!(msg.contains(file), "error does not name the file: {msg}");
            msg
        }
        Err(other) => panic!("{}: expected an input error, got {other}", path.display()),
        Ok(_) => panic!("{}: loaded a bad photo", path.display()),
    }
}

#[test]
fn unusable_photos_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };

    let msg = input_error(&write("empty.jpg", b""));
    assert!(msg.contains("empty"), "{msg}");

    let jpeg = std::fs::read(fixture("photos/astronaut_300x400.jpg")).unwrap();
    let msg = input_error(&write("cut.jpg", &jpeg[..jpeg.len() * 6 / 10]));
    assert!(msg.contains("truncated"), "{msg}");

    let msg = input_error(&write("header.jpg", &jpeg[..100]));
    assert!(msg.contains("truncated"), "{msg}");
    // An EXIF header may embed a complete JPEG thumbnail, whose end marker must not hide a
    // truncated main image.
    let mut thumbnail = Vec::new();
    RgbImage::from_pixel(16, 16, image::Rgb([200, 10, 10]))
        .write_to(&mut std::io::Cursor::new(&mut thumbnail), image::ImageFormat::Jpeg)
        .unwrap();
    let app1: Vec<u8> = [b"Exif\0\0".as_slice(), &thumbnail].concat();
    let with_thumbnail: Vec<u8> =
        [&jpeg[..2], &[0xFF, 0xE1], &u16::try_from(app1.len() + 2).unwrap().to_be_bytes(), &app1, &jpeg[2..]].concat();
    let whole = load_photo(&write("thumbnail.jpg", &with_thumbnail)).unwrap();
    assert_eq!(whole.rgb(), load_photo(&fixture("photos/astronaut_300x400.jpg")).unwrap().rgb());
    let msg = input_error(&write("cut-thumbnail.jpg", &with_thumbnail[..with_thumbnail.len() * 6 / 10]));
    assert!(msg.contains("truncated"), "{msg}");

    let png = std::fs::read(fixture("photos/chelsea_300x256.png")).unwrap();
    let msg = input_error(&write("cut.png", &png[..png.len() / 2]));
    assert!(msg.contains("cannot decode"), "{msg}");

    let msg = input_error(&write("notes.jpg", b"these are not the pixels you are looking for\n"));
    assert!(msg.contains("not an image"), "{msg}");

    let small = dir.path().join("small.png");
    RgbImage::from_pixel(100, 100, image::Rgb([90, 60, 30])).save(&small).unwrap();
    let msg = input_error(&small);
    assert!(msg.contains("100x100") && msg.contains("256"), "{msg}");

    let thin = dir.path().join("thin.png");
    RgbImage::from_pixel(600, 255, image::Rgb([90, 60, 30])).save(&thin).unwrap();
    let msg = input_error(&thin);
    assert!(msg.contains("600x255"), "{msg}");

    let msg = input_error(&dir.path().join("missing.jpg"));
    assert!(msg.contains("cannot read"), "{msg}");
}

/// The files of issue 18 whose headers claim huge images (a decompression bomb, a damaged
/// header): each is refused from its header, at once, before anything is decoded.
#[test]
fn huge_images_are_refused_from_their_header() {
    let dir = tempfile::tempdir().unwrap();
    let png = std::fs::read(fixture("photos/chelsea_300x256.png")).unwrap();
    let jpeg = std::fs::read(fixture("photos/astronaut_300x400.jpg")).unwrap();
    let mut cases = vec![
        ("ihdr_100000x100000.png", png_claiming(&png, 100_000, 100_000), "10000 megapixels"),
        ("ihdr_65536x65536.png", png_claiming(&png, 65_536, 65_536), "4295 megapixels"),
        ("ihdr_1x4294967295.png", png_claiming(&png, 1, u32::MAX), "1x4294967295"),
        ("rand1_crcfix.png", png_claiming(&png, 600, 1_073_742_424), "600x1073742424"),
        ("sof_65535x65535.jpg", jpeg_claiming(&jpeg, 65_535, 65_535, false), "4295 megapixels"),
        ("sofprog_65535.jpg", jpeg_claiming(&jpeg, 65_535, 65_535, true), "4295 megapixels"),
        ("just_over.png", png_claiming(&png, 10_001, 10_000), "101 megapixels"),
    ]
    .into_iter()
    .map(|(name, bytes, says)| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        (path, says)
    })
    .collect::<Vec<_>>();
    // A valid PNG of one colour, 40000 x 40000 (a few MB).
    let flat = dir.path().join("flat_40000x40000.png");
    write_flat_png(&flat, 40_000, 40_000);
    cases.push((flat, "40000x40000 pixels (1600 megapixels)"));
    for (path, says) in cases {
        let start = Instant::now();
        let msg = input_error(&path);
        let elapsed = start.elapsed();
        assert!(msg.contains(says) && msg.contains("limit of 100 megapixels"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        assert!(elapsed < Duration::from_secs(1), "{}: refused after {elapsed:?}", path.display());
    }
}

/// A file that does not start like an image is refused after its first bytes (`/dev/zero` never
/// ends), one too large for a photo from its length.
#[test]
fn endless_and_oversized_files_are_not_read() {
    let start = Instant::now();
    let msg = input_error(Path::new("/dev/zero"));
    assert!(msg.contains("not an image"), "{msg}");
    assert!(start.elapsed() < Duration::from_secs(1));

    // A sparse file: a PNG signature, then 600 MiB of nothing.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.png");
    let file = std::fs::File::create(&path).unwrap();
    std::io::Write::write_all(&mut &file, &std::fs::read(fixture("photos/chelsea_300x256.png")).unwrap()[..64])
        .unwrap();
    file.set_len(600 << 20).unwrap();
    let start = Instant::now();
    let msg = input_error(&path);
    assert!(msg.contains("larger than 512 MiB"), "{msg}");
    assert!(start.elapsed() < Duration::from_secs(1));
}

/// Photos are reduced row by row from the decoded image, converted to 8-bit RGB one row at a
/// time: the result is that of converting the whole image, then resizing it.
#[test]
fn photos_are_reduced_row_by_row_as_whole_images_would_be() {
    let dir = tempfile::tempdir().unwrap();
    let level = |x: u32, y: u32, c: u32| ((x * (7 + c) + y * (3 + 2 * c) + (x * y) % 13) % 256) as u8;
    // Smaller and larger than 512 on either side.
    for (w, h) in [(1500, 1100), (300, 700)] {
        let images = [
            image::DynamicImage::ImageRgba8(image::RgbaImage::from_fn(w, h, |x, y| {
                image::Rgba([level(x, y, 0), level(x, y, 1), level(x, y, 2), level(x, y, 3)])
            })),
            image::DynamicImage::ImageLumaA8(ImageBuffer::from_fn(w, h, |x, y| {
                image::LumaA([level(x, y, 0), level(x, y, 1)])
            })),
            image::DynamicImage::ImageRgb16(ImageBuffer::from_fn(w, h, |x, y| {
                image::Rgb([0, 1, 2].map(|c| u16::from(level(x, y, c)) * 257 + c as u16))
            })),
        ];
        for image in images {
            let path = dir.path().join("photo.png");
            image.save(&path).unwrap();
            let whole = match &image {
                image::DynamicImage::ImageRgb16(wide) => {
                    RgbImage::from_raw(w, h, wide.as_raw().iter().map(|v| (v >> 8) as u8).collect()).unwrap()
                }
                other => other.to_rgb8(),
            };
            let expected = resize(&whole, PHOTO_SIZE, PHOTO_SIZE, Filter::Bicubic, Weights::Pil);
            let photo = load_photo(&path).unwrap();
            assert!(photo.rgb() == &expected, "{w}x{h} {:?}", image.color());
        }
    }
}
