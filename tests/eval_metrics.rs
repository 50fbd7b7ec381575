//! The metrics of docs/eval.md on a fixed set of images (tests/fixtures/eval, made by
//! tools/reference/eval_metrics.py) against the same definitions computed in Python with the
//! reference packages (facenet-pytorch's MTCNN and InceptionResnetV1, transformers' CLIP, lpips,
//! pytorch-fid), on the models of tests/eval_models.rs: every image's CLIP-I, CLIP-T and Face
//! Sim, every pair's Face Div and Trusted Div, each prompt's row, the mean row and FID. The set
//! has images of different sizes, one with three faces and one without a face.

mod common;

use candle_core::{DType, Device};
use common::{fixture, load_config, var_builder};
use serde::Deserialize;
use stableid::eval::fid::frechet_distance;
use stableid::eval::images::{read_generated, read_reference};
use stableid::eval::metrics::MetricRow;
use stableid::eval::scorer::{MetricModels, Timings};
use stableid::models::clip::{ClipConfig, ClipModel};
use stableid::models::facenet::InceptionResnetV1;
use stableid::models::inception::FidInceptionV3;
use stableid::models::lpips::Lpips;
use stableid::priors::align::FaceDetector;
use stableid::priors::photo::load_upright;
use stableid::tokenizer::ClipTokenizer;

#[derive(Deserialize)]
struct Image {
    file: String,
    prompt: usize,
    clip_i: f32,
    clip_t: f32,
    face_sim: Option<f32>,
}

#[derive(Deserialize)]
struct Pair {
    a: usize,
    b: usize,
    face_div: f32,
    trusted_div: f32,
}

#[derive(Deserialize)]
struct Row {
    images: usize,
    faces: usize,
    clip_i: Option<f32>,
    clip_t: Option<f32>,
    face_sim: Option<f32>,
    face_div: Option<f32>,
    trusted_div: Option<f32>,
}

#[derive(Deserialize)]
struct Expected {
    photo: String,
    prompts: Vec<String>,
    images: Vec<Image>,
    pairs: Vec<Pair>,
    prompt_rows: Vec<Row>,
    mean: Row,
    fid: f64,
}

/// Percentages within 2e-3 (the embeddings agree within about 1e-5).
const TOL: f32 = 2e-3;

fn close(what: &str, ours: Option<f32>, theirs: Option<f32>) {
    match (ours, theirs) {
        (Some(a), Some(b)) => assert!((a - b).abs() <= TOL, "{what}: {a} vs {b}"),
        (a, b) => assert_eq!(a.is_some(), b.is_some(), "{what}: {a:?} vs {b:?}"),
    }
}

fn assert_row(what: &str, ours: &MetricRow, theirs: &Row) {
    assert_eq!((ours.images, ours.faces), (theirs.images, theirs.faces), "{what}: images and faces");
    close(&format!("{what} CLIP-I"), ours.clip_i, theirs.clip_i);
    close(&format!("{what} CLIP-T"), ours.clip_t, theirs.clip_t);
    close(&format!("{what} Face Sim"), ours.face_sim, theirs.face_sim);
    close(&format!("{what} Face Div"), ours.face_div, theirs.face_div);
    close(&format!("{what} Trusted Div"), ours.trusted_div, theirs.trusted_div);
}

/// The metric models on the weights the fixture was made with.
fn models() -> MetricModels {
    let config: ClipConfig = load_config("tiny-clip/config.json");
    let clip = ClipModel::new(var_builder(&fixture("tiny-clip/model.safetensors"), DType::F32), &config).unwrap();
    let formula = common::formula_weights::var_builder;
    MetricModels {
        clip,
        tokenizer: ClipTokenizer::from_dir(&fixture("tiny-clip")).unwrap(),
        facenet: InceptionResnetV1::new(formula()).unwrap(),
        lpips: Lpips::new(formula(), Lpips::shipped_heads(DType::F32, &Device::Cpu).unwrap()).unwrap(),
        inception: Some(FidInceptionV3::new(formula()).unwrap()),
        detector: FaceDetector::shipped(&Device::Cpu).unwrap(),
        device: Device::Cpu,
    }
}

#[test]
fn metrics_on_fixed_images_equal_the_python_computation() {
    let expected: Expected = load_config("eval/expected.json");
    let models = models();
    let photo_path = fixture(&format!("photos/{}", expected.photo));
    let photo = models.photo_features(&load_upright(&photo_path).unwrap(), &photo_path).unwrap();
    let (prompts, images) = read_generated(&fixture("eval/images")).unwrap();
    assert_eq!(prompts, expected.prompts, "prompts read from the PNG metadata");
    let mut timings = Timings::default();
    let scored = models.score(&photo, &prompts, &images, &mut timings, &mut |_, _| {}).unwrap();

    assert_eq!(scored.images.len(), expected.images.len());
    for (ours, theirs) in scored.images.iter().zip(&expected.images) {
        assert_eq!((&ours.file, ours.prompt), (&theirs.file, theirs.prompt));
        eprintln!(
            "{}: CLIP-I {} / {}, CLIP-T {} / {}, Face Sim {:?} / {:?}",
            ours.file, ours.clip_i, theirs.clip_i, ours.clip_t, theirs.clip_t, ours.face_sim, theirs.face_sim
        );
        close(&format!("{} CLIP-I", ours.file), Some(ours.clip_i), Some(theirs.clip_i));
        close(&format!("{} CLIP-T", ours.file), Some(ours.clip_t), Some(theirs.clip_t));
        close(&format!("{} Face Sim", ours.file), ours.face_sim, theirs.face_sim);
    }
    assert_eq!(scored.pairs.len(), expected.pairs.len(), "pairs of faces of one prompt");
    for (ours, theirs) in scored.pairs.iter().zip(&expected.pairs) {
        assert_eq!((ours.a, ours.b), (theirs.a, theirs.b));
        close("pair Face Div", Some(ours.face_div), Some(theirs.face_div));
        close("pair Trusted Div", Some(ours.trusted_div), Some(theirs.trusted_div));
    }
    for (p, (ours, theirs)) in scored.prompts.iter().zip(&expected.prompt_rows).enumerate() {
        assert_row(&format!("prompt {p}"), ours, theirs);
    }
    assert_row("mean", &scored.mean, &expected.mean);
    assert!(scored.mean.faces < scored.mean.images, "the set has an image without a face");

    let generated = models.fid_features(images.iter().map(|i| &i.image)).unwrap();
    let reference = read_reference(&fixture("eval/reference")).unwrap();
    let reference = models.fid_features(reference.iter()).unwrap();
    let fid = frechet_distance(&generated, &reference).unwrap();
    eprintln!("FID {fid} vs pytorch-fid {}", expected.fid);
    assert!((fid - expected.fid).abs() <= 1e-4 * expected.fid.abs(), "FID {fid} vs {}", expected.fid);
}
