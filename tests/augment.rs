//! The per-step augmentation: parity of the bicubic resize with torch, of the colour jitter with
//! torchvision/Pillow and of the whole chain with the published pipeline
//! (tools/reference/augment.py); geometry of every transform on a photo whose pixels encode their
//! own coordinates; statistics of the random draws; speed.

mod common;

use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::Value;
use stableid::identity::augment::{
    adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, apply, augment, crop_size, no_augmentation,
    resize_bicubic, AugmentConfig, AugmentParams, AugmentedSample, Jitter, Paste, TrainingPhoto,
};

use common::{fixture, load_tensors};

const SIZE: usize = 512;
const LATENT: usize = SIZE / 8;

fn values<T: candle_core::WithDType>(t: &Tensor) -> Vec<T> {
    t.flatten_all().unwrap().to_vec1::<T>().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn read_json(rel: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(rel)).unwrap()).unwrap()
}

#[test]
fn bicubic_matches_torch_interpolate() {
    let t = load_tensors("augment/bicubic.safetensors");
    for name in ["up_ac", "up", "down_ac", "down", "odd_ac", "odd"] {
        let input = &t[&format!("{name}.input")];
        let expected = &t[&format!("{name}.output")];
        let (c, h, w) = input.dims3().unwrap();
        let (_, oh, ow) = expected.dims3().unwrap();
        let out = resize_bicubic(&values(input), c, h, w, oh, ow, name.ends_with("_ac"));
        let diff = max_diff(&out, &values(expected));
        eprintln!("bicubic {name} {h}x{w} -> {oh}x{ow}: max abs diff {diff:e}");
        assert!(diff <= 1e-5, "bicubic {name}: max abs diff {diff:e}");
    }
}

#[test]
fn jitter_matches_torchvision_on_pil_images() {
    let t = load_tensors("augment/jitter.safetensors");
    let input: Vec<u8> = values(&t["input"]);
    for case in read_json("augment/jitter.json").as_array().unwrap() {
        let (key, factor) = (case["key"].as_str().unwrap(), case["factor"].as_f64().unwrap());
        let mut rgb = input.clone();
        match case["op"].as_str().unwrap() {
            "brightness" => adjust_brightness(&mut rgb, factor),
            "contrast" => adjust_contrast(&mut rgb, factor),
            "saturation" => adjust_saturation(&mut rgb, factor),
            "hue" => adjust_hue(&mut rgb, factor),
            op => panic!("unknown op {op}"),
        }
        let expected: Vec<u8> = values(&t[key]);
        let wrong = rgb.iter().zip(&expected).filter(|(a, b)| a != b).count();
        let changed = input.iter().zip(&expected).filter(|(a, b)| a != b).count();
        eprintln!("{key} (factor {factor}): {wrong} of {} values differ ({changed} changed by the op)", rgb.len());
        assert_eq!(wrong, 0, "{key}: {wrong} values differ from torchvision");
        assert!(changed > 0, "{key}: the reference left the image unchanged, the case tests nothing");
    }
}

fn chain_photo(t: &std::collections::HashMap<String, Tensor>, size: usize) -> TrainingPhoto {
    TrainingPhoto::new(size, size, values(&t["photo"]), values(&t["face_mask"]), values(&t["hair_mask"])).unwrap()
}

#[test]
fn chain_matches_the_published_pipeline() {
    let t = load_tensors("augment/chain.safetensors");
    let p = read_json("augment/chain.json");
    let size = p["size"].as_u64().unwrap() as usize;
    let photo = chain_photo(&t, size);
    let get = |k: &str| p[k].as_u64().unwrap() as usize;
    let jitter = p["order"]
        .as_array()
        .unwrap()
        .iter()
        .map(|op| {
            let name = op.as_str().unwrap();
            let op = match name {
                "brightness" => Jitter::Brightness,
                "contrast" => Jitter::Contrast,
                "saturation" => Jitter::Saturation,
                _ => Jitter::Hue,
            };
            (op, p[name].as_f64().unwrap())
        })
        .collect();
    let params = AugmentParams {
        jitter,
        flip: p["flip"].as_bool().unwrap(),
        crop: Some((get("crop_top"), get("crop_left"))),
        paste: Some(Paste {
            top: get("paste_top"),
            left: get("paste_left"),
            height: get("paste_height"),
            width: get("paste_width"),
        }),
    };
    let s = apply(&photo, &params, &Device::Cpu).unwrap();
    assert!(s.flipped);
    assert_eq!(s.image.dims(), &[1, 3, size, size]);
    assert_eq!(s.face_mask.dims(), &[1, 1, size / 8, size / 8]);
    let diff = max_diff(&values(&s.image), &values(&t["image"]));
    eprintln!("chain image: max abs diff {diff:e}");
    assert!(diff <= 1e-5, "chain image: max abs diff {diff:e}");
    for m in ["face_mask", "hair_mask"] {
        let ours = values::<f32>(if m == "face_mask" { &s.face_mask } else { &s.hair_mask });
        let expected = values::<f32>(&t[&format!("{m}_latent")]);
        assert_eq!(ours, expected, "chain {m}");
        assert!(expected.contains(&1.0), "chain {m}: empty reference mask");
    }

    let plain = no_augmentation(&photo, &Device::Cpu).unwrap();
    assert!(!plain.flipped);
    assert_eq!(max_diff(&values(&plain.image), &values(&t["plain.image"])), 0.0, "unaugmented image");
    assert_eq!(values::<f32>(&plain.face_mask), values::<f32>(&t["plain.face_mask"]), "unaugmented face mask");
    assert_eq!(values::<f32>(&plain.hair_mask), values::<f32>(&t["plain.hair_mask"]), "unaugmented hair mask");
}

// ---------------------------------------------------------------------------------------------
// Geometry on a photo whose pixels encode their coordinates: R = x, G = y (scaled to 0..255),
// B = 255 (so that no photo pixel equals the black background). The face mask is a checkerboard
// of 64-pixel squares, the hair mask vertical stripes 48 pixels wide.

fn face_at(x: f32, y: f32) -> bool {
    ((x / 64.0).floor() as i64 + (y / 64.0).floor() as i64) % 2 == 0
}

fn hair_at(x: f32) -> bool {
    (x / 48.0).floor() as i64 % 2 == 0
}

/// Distance from `v` to the nearest multiple of `period`.
fn edge_distance(v: f32, period: f32) -> f32 {
    let r = v.rem_euclid(period);
    r.min(period - r)
}

fn coordinate_photo() -> TrainingPhoto {
    let level = |v: usize| (v as f32 * 255.0 / (SIZE - 1) as f32).round() as u8;
    let mut rgb = Vec::with_capacity(3 * SIZE * SIZE);
    let (mut face, mut hair) = (Vec::new(), Vec::new());
    for y in 0..SIZE {
        for x in 0..SIZE {
            rgb.extend_from_slice(&[level(x), level(y), 255]);
            face.push(face_at(x as f32 + 0.5, y as f32 + 0.5) as u8 as f32);
            hair.push(hair_at(x as f32 + 0.5) as u8 as f32);
        }
    }
    TrainingPhoto::new(SIZE, SIZE, rgb, face, hair).unwrap()
}

/// Geometry-only draws: colour jitter off (it would change the encoded coordinates).
fn geometry_config() -> AugmentConfig {
    AugmentConfig { brightness: None, contrast: None, saturation: None, hue: None, ..AugmentConfig::default() }
}

/// The source pixel that output pixel (`x`, `y`) should show under `params` (inside the paste).
fn expected_source(params: &AugmentParams, x: f32, y: f32) -> (f32, f32) {
    let last = (SIZE - 1) as f32;
    let (mut x, mut y) = (x, y);
    if let Some(p) = params.paste {
        // align_corners: the ends of the pasted rows/columns are the ends of the full image.
        x = (x - p.left as f32) * last / (p.width - 1) as f32;
        y = (y - p.top as f32) * last / (p.height - 1) as f32;
    }
    if let Some((top, left)) = params.crop {
        let (ch, cw) = crop_size(SIZE, SIZE);
        x = left as f32 + x * (cw - 1) as f32 / last;
        y = top as f32 + y * (ch - 1) as f32 / last;
    }
    if params.flip {
        x = last - x;
    }
    (x, y)
}

/// Checks one sample of the coordinate photo: the image shows the source pixels the draws say,
/// the background is exactly -1 / 0, and the latent masks agree with the coordinates the image
/// shows. Returns the number of latent pixels whose masks were compared.
fn check_geometry(params: &AugmentParams, s: &AugmentedSample) -> usize {
    let image: Vec<f32> = values(&s.image);
    let (face, hair): (Vec<f32>, Vec<f32>) = (values(&s.face_mask), values(&s.hair_mask));
    let plane = SIZE * SIZE;
    let decode = |v: f32| ((v + 1.0) / 2.0 * 255.0).round() * (SIZE - 1) as f32 / 255.0;
    let rect = params.paste.unwrap_or(Paste { top: 0, left: 0, height: SIZE, width: SIZE });
    // Distance inside the pasted rectangle (negative outside).
    let inside = |x: f32, y: f32| {
        let dx = (x - rect.left as f32).min((rect.left + rect.width - 1) as f32 - x);
        let dy = (y - rect.top as f32).min((rect.top + rect.height - 1) as f32 - y);
        dx.min(dy)
    };

    for y in 0..SIZE {
        for x in 0..SIZE {
            let px = [image[y * SIZE + x], image[plane + y * SIZE + x], image[2 * plane + y * SIZE + x]];
            let depth = inside(x as f32, y as f32);
            if depth < 0.0 {
                assert_eq!(px, [-1.0; 3], "background at ({x}, {y}) is not black");
            } else if depth >= 2.0 {
                let (ex, ey) = expected_source(params, x as f32, y as f32);
                let (sx, sy) = (decode(px[0]), decode(px[1]));
                assert!(
                    (sx - ex).abs() <= 2.0 && (sy - ey).abs() <= 2.0 && (px[2] - 1.0).abs() < 0.02,
                    "pixel ({x}, {y}) shows source ({sx}, {sy}), expected ({ex}, {ey}) under {params:?}"
                );
            }
        }
    }

    // A latent pixel samples the full-size masks at (scale * j, scale * i) (align_corners).
    let scale = (SIZE - 1) as f32 / (LATENT - 1) as f32;
    let mut compared = 0;
    for i in 0..LATENT {
        for j in 0..LATENT {
            let (x, y) = (scale * j as f32, scale * i as f32);
            let (f, h) = (face[i * LATENT + j], hair[i * LATENT + j]);
            assert!(f == 0.0 || f == 1.0, "face mask value {f}");
            assert!(h == 0.0 || h == 1.0, "hair mask value {h}");
            let depth = inside(x, y);
            if depth < -3.0 {
                assert_eq!((f, h), (0.0, 0.0), "masks not 0 outside the paste at latent ({j}, {i})");
            } else if depth > 3.0 {
                let (xi, yi) = (x.round() as usize, y.round() as usize);
                let sx = decode(image[yi * SIZE + xi]);
                let sy = decode(image[plane + yi * SIZE + xi]);
                if edge_distance(sx, 64.0) > 8.0 && edge_distance(sy, 64.0) > 8.0 {
                    assert_eq!(f == 1.0, face_at(sx, sy), "face mask at latent ({j}, {i}), source ({sx}, {sy})");
                    compared += 1;
                }
                if edge_distance(sx, 48.0) > 8.0 {
                    assert_eq!(h == 1.0, hair_at(sx), "hair mask at latent ({j}, {i}), source x {sx}");
                }
            }
        }
    }
    compared
}

#[test]
fn each_transform_keeps_masks_aligned() {
    let photo = coordinate_photo();
    let dev = Device::Cpu;
    let none = AugmentParams::none();
    let cases = [
        ("identity", none.clone()),
        ("flip", AugmentParams { flip: true, ..none.clone() }),
        ("crop", AugmentParams { crop: Some((17, 120)), ..none.clone() }),
        ("paste", AugmentParams { paste: Some(Paste { top: 40, left: 200, height: 300, width: 280 }), ..none.clone() }),
        (
            "full-size paste",
            AugmentParams { paste: Some(Paste { top: 0, left: 0, height: SIZE, width: SIZE }), ..none.clone() },
        ),
        (
            "all",
            AugmentParams {
                jitter: Vec::new(),
                flip: true,
                crop: Some((128, 0)),
                paste: Some(Paste { top: 255, left: 3, height: 256, width: 281 }),
            },
        ),
    ];
    for (name, params) in cases {
        let s = apply(&photo, &params, &dev).unwrap();
        assert_eq!(s.flipped, params.flip, "{name}: flip flag");
        let compared = check_geometry(&params, &s);
        eprintln!("{name}: {compared} latent face-mask pixels compared");
        assert!(compared > 300, "{name}: only {compared} latent pixels compared");
    }

    // A flip mirrors the image exactly and is what the flag says.
    let plain: Vec<f32> = values(&no_augmentation(&photo, &dev).unwrap().image);
    let flipped: Vec<f32> = values(&apply(&photo, &AugmentParams { flip: true, ..none }, &dev).unwrap().image);
    for (row, mirrored) in plain.chunks_exact(SIZE).zip(flipped.chunks_exact(SIZE)) {
        assert!(row.iter().eq(mirrored.iter().rev()), "flip is not an exact mirror");
    }
}

#[test]
fn random_chains_keep_masks_aligned() {
    let photo = coordinate_photo();
    let config = geometry_config();
    let mut flips = 0;
    for seed in 0..24 {
        let params = AugmentParams::sample(&config, SIZE, SIZE, &mut StdRng::seed_from_u64(seed));
        let s = augment(&photo, &config, &mut StdRng::seed_from_u64(seed), &Device::Cpu).unwrap();
        assert_eq!(s.flipped, params.flip, "seed {seed}: augment draws differently from sample + apply");
        flips += params.flip as usize;
        let compared = check_geometry(&params, &s);
        assert!(compared > 100, "seed {seed}: only {compared} latent pixels compared ({params:?})");
    }
    assert!((4..=20).contains(&flips), "{flips} flips in 24 seeds");
}

#[test]
fn draws_follow_the_reference_ranges() {
    let config = AugmentConfig::default();
    let (ch, cw) = crop_size(SIZE, SIZE);
    assert_eq!((ch, cw), (384, 384));
    let n = 200;
    let (mut flips, mut heights, mut crop_tops) = (0, 0.0, 0.0);
    let mut first = [0usize; 4];
    for seed in 0..n {
        let p = AugmentParams::sample(&config, SIZE, SIZE, &mut StdRng::seed_from_u64(1000 + seed));
        let ops: Vec<Jitter> = p.jitter.iter().map(|(op, _)| *op).collect();
        for op in [Jitter::Brightness, Jitter::Contrast, Jitter::Saturation, Jitter::Hue] {
            assert_eq!(ops.iter().filter(|&&o| o == op).count(), 1, "{op:?} not applied exactly once: {ops:?}");
        }
        first[ops[0] as usize] += 1;
        for &(op, factor) in &p.jitter {
            let (lo, hi) = if op == Jitter::Hue { (-0.01, 0.01) } else { (0.8, 1.2) };
            assert!((lo..=hi).contains(&factor), "{op:?} factor {factor}");
        }
        flips += p.flip as usize;
        let (top, left) = p.crop.unwrap();
        assert!(top <= SIZE - ch && left <= SIZE - cw, "crop at ({top}, {left})");
        crop_tops += top as f64;
        let q = p.paste.unwrap();
        assert!((256..=512).contains(&q.height), "pasted height {}", q.height);
        let (lo, hi) = ((q.height as f64 * 0.9).floor() as usize, ((q.height as f64 * 1.1) as usize).min(SIZE));
        assert!((lo..=hi).contains(&q.width), "pasted width {} for height {}", q.width, q.height);
        assert!(q.top + q.height <= SIZE && q.left + q.width <= SIZE, "paste {q:?} leaves the image");
        assert!(q.height == SIZE || q.top < SIZE - q.height, "paste top {} (numpy randint excludes the end)", q.top);
        heights += q.height as f64;
    }
    let n = n as f64;
    eprintln!(
        "flip rate {}, mean crop top {}, mean pasted height {}, first op counts {first:?}",
        flips as f64 / n,
        crop_tops / n,
        heights / n
    );
    assert!((0.4..=0.6).contains(&(flips as f64 / n)), "flip rate {}", flips as f64 / n);
    assert!((54.0..=74.0).contains(&(crop_tops / n)), "mean crop top {}", crop_tops / n);
    assert!((364.0..=404.0).contains(&(heights / n)), "mean pasted height {}", heights / n);
    assert!(first.iter().all(|&c| c >= 25), "first operation counts {first:?} are not uniform");
}

#[test]
fn jitter_changes_brightness_within_range() {
    // A grey 64x64 photo: the drawn brightness factor scales its mean.
    let size = 64;
    let grey = 160u8;
    let photo =
        TrainingPhoto::new(size, size, vec![grey; 3 * size * size], vec![1.0; size * size], vec![0.0; size * size])
            .unwrap();
    let config = AugmentConfig::default();
    let (mut low, mut high) = (f64::MAX, f64::MIN);
    for seed in 0..200 {
        let mut p = AugmentParams::sample(&config, size, size, &mut StdRng::seed_from_u64(seed));
        p.jitter.retain(|(op, _)| *op == Jitter::Brightness);
        let factor = p.jitter[0].1;
        let p = AugmentParams { jitter: p.jitter, ..AugmentParams::none() };
        let image: Vec<f32> = values(&apply(&photo, &p, &Device::Cpu).unwrap().image);
        let mean = image.iter().map(|&v| (v as f64 + 1.0) / 2.0 * 255.0).sum::<f64>() / image.len() as f64;
        let ratio = mean / grey as f64;
        assert!((ratio - factor).abs() <= 1.0 / grey as f64, "ratio {ratio} for factor {factor}");
        assert!((0.8 - 1.0 / grey as f64..=1.2).contains(&ratio), "brightness ratio {ratio}");
        low = low.min(ratio);
        high = high.max(ratio);
    }
    eprintln!("brightness ratios over 200 seeds: [{low}, {high}]");
    assert!(low < 0.85 && high > 1.15, "brightness ratios [{low}, {high}] do not span the range");
}

#[test]
fn disabled_config_is_no_augmentation() {
    let photo = coordinate_photo();
    let plain = no_augmentation(&photo, &Device::Cpu).unwrap();
    let s = augment(&photo, &AugmentConfig::disabled(), &mut StdRng::seed_from_u64(3), &Device::Cpu).unwrap();
    assert!(!s.flipped);
    assert_eq!(values::<f32>(&s.image), values::<f32>(&plain.image));
    assert_eq!(values::<f32>(&s.face_mask), values::<f32>(&plain.face_mask));
    assert_eq!(values::<f32>(&s.hair_mask), values::<f32>(&plain.hair_mask));
    // Unaugmented, the image is the photo scaled to [-1, 1].
    let image: Vec<f32> = values(&plain.image);
    assert_eq!(image[0], -1.0);
    assert_eq!(image[2 * SIZE * SIZE], 1.0);
    assert_eq!(image[SIZE - 1], 1.0);
}

#[test]
fn rejects_inconsistent_inputs() {
    assert!(TrainingPhoto::new(64, 64, vec![0; 3 * 64 * 64], vec![0.0; 64 * 64], vec![0.0; 10]).is_err());
    assert!(TrainingPhoto::new(60, 64, vec![0; 3 * 60 * 64], vec![0.0; 60 * 64], vec![0.0; 60 * 64]).is_err());
    let photo = TrainingPhoto::new(64, 64, vec![0; 3 * 64 * 64], vec![0.0; 64 * 64], vec![0.0; 64 * 64]).unwrap();
    let outside = AugmentParams { crop: Some((17, 0)), ..AugmentParams::none() };
    assert!(apply(&photo, &outside, &Device::Cpu).is_err());
    let too_big =
        AugmentParams { paste: Some(Paste { top: 1, left: 0, height: 64, width: 64 }), ..AugmentParams::none() };
    assert!(apply(&photo, &too_big, &Device::Cpu).is_err());
}

#[test]
fn full_augmentation_is_fast() {
    let photo = coordinate_photo();
    let config = AugmentConfig::default();
    let mut rng = StdRng::seed_from_u64(5);
    let mut times: Vec<f64> = (0..7)
        .map(|_| {
            let start = Instant::now();
            augment(&photo, &config, &mut rng, &Device::Cpu).unwrap();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    eprintln!("augment 512x512: median {:.1} ms (min {:.1} ms)", times[3], times[0]);
    // Generous: the machine running the tests is shared.
    assert!(times[0] < 250.0, "augmentation takes {:.1} ms", times[0]);
}
