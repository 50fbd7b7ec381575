//! Face parsers and masks against the references of tools/reference/face_parsing.py:
//! SegFormer against transformers (model, image processor, post-processing), BiSeNet against the
//! PyTorch module written from face-parsing.PyTorch, and the name-based mask definition.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{assert_close, fixture, load_config, load_tensors, var_builder};
use stableid::models::face_parsing::bisenet::{self, BiSeNet};
use stableid::models::face_parsing::segformer::{SegformerConfig, SegformerForSemanticSegmentation};
use stableid::priors::masks::{FaceClasses, FaceParser, FaceParserKind, SIZE};
use stableid::weights::{open_checkpoint, Hub};
use stableid::Error;

const PARITY: &str = "parity/face_parsing.safetensors";

fn segformer_config() -> SegformerConfig {
    load_config("tiny-segformer/config.json")
}

/// The 512x512 test photo: the stored 64x64 image with each pixel repeated over an 8x8 block.
fn photo(t: &std::collections::HashMap<String, Tensor>) -> Vec<u8> {
    let small = t["image_64"].to_vec3::<u8>().unwrap();
    let mut rgb = Vec::with_capacity(SIZE * SIZE * 3);
    for y in 0..SIZE {
        for x in 0..SIZE {
            rgb.extend_from_slice(&small[y / 8][x / 8]);
        }
    }
    rgb
}

/// Every `step`-th row and column of a `(C, H, W)` tensor.
fn subsample(x: &Tensor, step: usize) -> Tensor {
    let (_, h, w) = x.dims3().unwrap();
    let rows = Tensor::arange_step(0u32, h as u32, step as u32, x.device()).unwrap();
    let cols = Tensor::arange_step(0u32, w as u32, step as u32, x.device()).unwrap();
    x.index_select(&rows, 1).unwrap().index_select(&cols, 2).unwrap()
}

/// Compares the argmax of `logits` `(C, H, W)` with a reference class map wherever the two best
/// classes are further apart than the logit tolerance allows to swap (2e-4); such pixels must be
/// nearly all of them.
fn assert_same_classes(logits: &Tensor, expected: &Tensor, what: &str) {
    let scores = logits.to_vec3::<f32>().unwrap();
    let expected = expected.to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap();
    let (h, w) = (expected.len(), expected[0].len());
    let mut decided = 0;
    for y in 0..h {
        for x in 0..w {
            let mut column: Vec<(f32, usize)> = scores.iter().enumerate().map(|(c, s)| (s[y][x], c)).collect();
            column.sort_by(|a, b| b.0.total_cmp(&a.0));
            if column[0].0 - column[1].0 > 2e-4 {
                decided += 1;
                assert_eq!(column[0].1 as u32, expected[y][x], "{what}: class at ({y}, {x})");
            }
        }
    }
    assert!(decided * 100 >= h * w * 99, "{what}: only {decided} of {} pixels decided", h * w);
    eprintln!("{what}: {decided} of {} pixels compared, all equal", h * w);
}

#[test]
fn segformer_logits_match_transformers() {
    let t = load_tensors(PARITY);
    let vb = var_builder(&fixture("tiny-segformer/model.safetensors"), DType::F32);
    let model = SegformerForSemanticSegmentation::new(vb, &segformer_config()).unwrap();
    assert_eq!(model.num_labels(), 19);
    let logits = model.forward(&t["segformer.pixel_values"]).unwrap();
    assert_close(&logits, &t["segformer.logits"], 1e-4, "segformer logits (48x64 input)");
}

#[test]
fn segformer_config_defaults_and_rejections() {
    let cfg: SegformerConfig = serde_json::from_str(r#"{"unknown_key": 1}"#).unwrap();
    assert_eq!((cfg.hidden_sizes, cfg.decoder_hidden_size), (vec![32, 64, 160, 256], 256));
    for (json, expected) in [
        (r#"{"depths": [2, 2]}"#, "segformer config: `depths` = [2, 2] has 2 entries for `num_encoder_blocks` = 4"),
        (r#"{"hidden_act": "relu"}"#, "segformer config: `hidden_act` = \"relu\" is not supported"),
        (
            r#"{"num_attention_heads": [1, 3, 5, 8]}"#,
            "`num_attention_heads[1]` = 3 does not divide `hidden_sizes[1]` = 64",
        ),
    ] {
        let cfg: SegformerConfig = serde_json::from_str(json).unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(expected), "{json}: {err}");
    }
}

#[test]
fn segformer_parser_matches_image_processor_and_post_processing() {
    let t = load_tensors(PARITY);
    let parser = FaceParser::segformer(&fixture("tiny-segformer"), &Device::Cpu).unwrap();
    assert_eq!(parser.kind(), FaceParserKind::Segformer);
    let rgb = photo(&t);

    let pixels = parser.pixel_values(&rgb).unwrap().squeeze(0).unwrap();
    let expected_pixels = t["segformer.pixel_values_512_sub16"].squeeze(0).unwrap();
    assert_close(&subsample(&pixels, 16), &expected_pixels, 1e-5, "segformer pixel values");

    let logits = parser.logits(&rgb).unwrap();
    assert_eq!(logits.dims(), &[19, SIZE, SIZE]);
    let expected = t["segformer.upsampled_logits_sub32"].squeeze(0).unwrap();
    assert_close(&subsample(&logits, 32), &expected, 1e-4, "segformer logits upsampled to 512");
    assert_same_classes(&subsample(&logits, 4), &t["segformer.class_map_sub4"], "segformer class map");
}

#[test]
fn bisenet_logits_match_pytorch_module() {
    let t = load_tensors(PARITY);
    // The same weights saved in both formats; the real 79999_iter.pth is a legacy one.
    for file in ["tiny-bisenet/model.pth", "tiny-bisenet/legacy/79999_iter.pth"] {
        let (weights, _) = open_checkpoint(&fixture(file), DType::F32, &Device::Cpu).unwrap();
        let model = weights.build(BiSeNet::new).unwrap();
        assert_eq!(model.num_classes(), 19);
        let logits = model.forward(&t["bisenet.pixel_values"]).unwrap();
        assert_close(&logits, &t["bisenet.logits"], 1e-4, &format!("bisenet logits (32x40 input), {file}"));
    }
}

#[test]
fn bisenet_parser_matches_reference_class_map() {
    let t = load_tensors(PARITY);
    // Folders holding model.pth, and 79999_iter.pth (legacy format) as the original repository has it.
    for folder in ["tiny-bisenet", "tiny-bisenet/legacy"] {
        let parser = FaceParser::load(
            FaceParserKind::Bisenet,
            Some(fixture(folder).to_str().unwrap()),
            &Hub::from_env(),
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(parser.kind(), FaceParserKind::Bisenet);
        assert_eq!(parser.classes().names(), bisenet::CLASSES);
        let logits = parser.logits(&photo(&t)).unwrap();
        assert_same_classes(
            &subsample(&logits, 4),
            &t["bisenet.class_map_sub4"],
            &format!("bisenet class map, {folder}"),
        );
    }
}

#[test]
fn masks_follow_class_names_in_both_orders() {
    let t = load_tensors(PARITY);
    let class_map = &t["masks.class_map"];
    let segformer_names = segformer_config().class_names().unwrap();
    for (label, classes) in [
        ("bisenet", FaceClasses::new(&bisenet::CLASSES).unwrap()),
        ("segformer", FaceClasses::new(&segformer_names).unwrap()),
    ] {
        let masks = classes.masks(class_map).unwrap();
        for (part, mask) in [("face", &masks.face), ("hair", &masks.hair)] {
            let expected = &t[&format!("masks.{label}.{part}")];
            assert_eq!(mask.dims(), expected.dims());
            let diff = (mask - expected).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(diff, 0.0, "{label} {part} mask differs from the reference definition");
        }
    }
    // The parser reads its names from config.json's id2label.
    let parser = FaceParser::segformer(&fixture("tiny-segformer"), &Device::Cpu).unwrap();
    assert_eq!(parser.classes().names(), segformer_names.as_slice());
    assert_eq!(segformer_names[2], "nose");
}

#[test]
fn long_class_spellings_give_the_same_masks() {
    let long: Vec<&str> = bisenet::CLASSES
        .iter()
        .map(|n| match *n {
            "l_brow" => "left eyebrow",
            "r_brow" => "Right_Eyebrow",
            "l_eye" => "left_eye",
            "r_eye" => "right-eye",
            "eye_g" => "eyeglasses",
            "l_ear" => "left_ear",
            "r_ear" => "right_ear",
            "ear_r" => "earring",
            "u_lip" => "upper_lip",
            "l_lip" => "lower_lip",
            "neck_l" => "necklace",
            "cloth" => "clothes",
            other => other,
        })
        .collect();
    let t = load_tensors(PARITY);
    let masks = FaceClasses::new(&long).unwrap().masks(&t["masks.class_map"]).unwrap();
    assert_close(&masks.face, &t["masks.bisenet.face"], 0.0, "face mask, long names");
    assert_close(&masks.hair, &t["masks.bisenet.hair"], 0.0, "hair mask, long names");
}

#[test]
fn unexpected_class_names_are_listed() {
    let names: Vec<String> = (0..19).map(|i| format!("LABEL_{i}")).collect();
    let err = FaceClasses::new(&names).unwrap_err().to_string();
    assert!(err.contains("LABEL_0") && err.contains("LABEL_18"), "{err}");
    assert!(err.contains("missing: [background, skin"), "{err}");

    let mut duplicated: Vec<&str> = bisenet::CLASSES.to_vec();
    duplicated[18] = "hair";
    let err = FaceClasses::new(&duplicated).unwrap_err().to_string();
    assert!(err.contains("missing: [hat]"), "{err}");
}

#[test]
fn a_photo_without_face_is_an_error() {
    let classes = FaceClasses::new(&bisenet::CLASSES).unwrap();
    let hair = bisenet::CLASSES.iter().position(|c| *c == "hair").unwrap() as u32;
    let skin = 1u32;
    // Hair everywhere but 20 skin pixels of 2500 (0.8%): no face.
    let mut ids = vec![hair; 50 * 50];
    ids[..20].fill(skin);
    let err = classes.masks(&Tensor::from_vec(ids.clone(), (50, 50), &Device::Cpu).unwrap()).unwrap_err();
    assert!(matches!(err, Error::Input(_)), "{err:?}");
    assert!(err.to_string().contains("no face found") && err.to_string().contains("aligned head shot"), "{err}");
    // 30 skin pixels (1.2%) pass, with the hair mask on the rest.
    ids[..30].fill(skin);
    let masks = classes.masks(&Tensor::from_vec(ids, (50, 50), &Device::Cpu).unwrap()).unwrap();
    assert!((masks.face_fraction().unwrap() - 0.012).abs() < 1e-9);
    assert!((masks.hair_fraction().unwrap() - 0.988).abs() < 1e-9);
    assert_eq!(masks.face.i((0, 29)).unwrap().to_scalar::<f32>().unwrap(), 1.0);
}

#[test]
fn wrong_checkpoints_give_clear_errors() {
    // A SegFormer checkpoint given as BiSeNet weights: the missing tensor is named.
    let err = FaceParser::bisenet(&fixture("tiny-segformer/model.safetensors"), &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::Weights { .. }), "{err:?}");
    assert!(err.to_string().contains("cp.resnet.conv1.weight"), "{err}");
    // A BiSeNet folder given as SegFormer: no transformers config.
    let err = FaceParser::segformer(&fixture("tiny-bisenet"), &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::MissingFile { .. }), "{err:?}");
    assert!(err.to_string().contains("config.json"), "{err}");
    // BiSeNet weights are not on the hub: they must be given.
    let offline = Hub::from_env().offline(true);
    let err = FaceParser::load(FaceParserKind::Bisenet, None, &offline, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("79999_iter.pth"), "{err}");
    // A hub id that is not in the cache, offline: the message says how to get it.
    let err = FaceParser::load(FaceParserKind::Segformer, Some("nobody/no-such-face-parser"), &offline, &Device::Cpu)
        .unwrap_err();
    assert!(err.to_string().contains("huggingface-cli download nobody/no-such-face-parser"), "{err}");
}

#[test]
fn photo_of_the_wrong_size_is_rejected() {
    let parser = FaceParser::bisenet(&fixture("tiny-bisenet/model.pth"), &Device::Cpu).unwrap();
    let err = parser.masks(&vec![0u8; 256 * 256 * 3]).unwrap_err();
    assert!(matches!(err, Error::Input(_)) && err.to_string().contains("512x512"), "{err}");
}
