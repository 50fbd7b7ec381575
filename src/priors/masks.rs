//! Face and hair masks of the photo, from a face parser (StableIdentity's masked diffusion loss
//! weighs the face fully and the hair by beta).
//!
//! Two parsers give the 19 CelebAMask-HQ classes: SegFormer (`jonathandinu/face-parsing`, hub
//! hosted, safetensors) and the paper's BiSeNet (face-parsing.PyTorch, `79999_iter.pth`). They
//! order their classes differently, so the masks are defined by class **name**, never by index:
//! - face = every class except background, earring (`ear_r`), neck, necklace (`neck_l`), cloth,
//!   hair and hat (so skin, brows, eyes, eyeglasses, ears, nose, mouth, lips);
//! - hair = hair.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::io::read_json;
use crate::models::face_parsing::bisenet::{self, BiSeNet};
use crate::models::face_parsing::segformer::{
    SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor,
};
use crate::weights::{transformers_weights, weights_file, Hub, ModelFiles, Weights, TRANSFORMERS_WEIGHTS};
use crate::{Error, Result};

/// Side of the (square) photo the parsers see and the masks cover.
pub const SIZE: usize = 512;

/// The SegFormer face parser used when no weights are given.
pub const DEFAULT_SEGFORMER: &str = "jonathandinu/face-parsing";

/// A mask with fewer face pixels than this fraction of the image means there is no usable face.
const MIN_FACE_FRACTION: f64 = 0.01;

/// The 19 CelebAMask-HQ classes under face-parsing.PyTorch's short names, with other spellings
/// checkpoints use for them.
const CLASS_ALIASES: [(&str, &[&str]); 19] = [
    ("background", &["bg"]),
    ("skin", &["face_skin"]),
    ("l_brow", &["left_brow", "left_eyebrow", "l_eyebrow"]),
    ("r_brow", &["right_brow", "right_eyebrow", "r_eyebrow"]),
    ("l_eye", &["left_eye"]),
    ("r_eye", &["right_eye"]),
    ("eye_g", &["eyeglasses", "eye_glasses", "glasses"]),
    ("l_ear", &["left_ear"]),
    ("r_ear", &["right_ear"]),
    ("ear_r", &["earring", "earrings", "ear_ring"]),
    ("nose", &[]),
    ("mouth", &["inner_mouth"]),
    ("u_lip", &["upper_lip"]),
    ("l_lip", &["lower_lip"]),
    ("neck", &[]),
    ("neck_l", &["necklace"]),
    ("cloth", &["clothes", "clothing"]),
    ("hair", &[]),
    ("hat", &[]),
];

/// Classes outside the face mask (everything else is face).
const NOT_FACE: [&str; 7] = ["background", "ear_r", "neck", "neck_l", "cloth", "hair", "hat"];

/// The short CelebAMask-HQ name of a class name as a checkpoint spells it.
fn canonical_class(name: &str) -> Option<&'static str> {
    let name = name.trim().to_lowercase().replace([' ', '-'], "_");
    CLASS_ALIASES.iter().find(|(short, aliases)| *short == name || aliases.contains(&name.as_str())).map(|(s, _)| *s)
}

/// Face and hair masks, `(H, W)` f32 with values in {0, 1}.
#[derive(Debug, Clone)]
pub struct Masks {
    pub face: Tensor,
    pub hair: Tensor,
}

impl Masks {
    /// Fraction of the image covered by the face mask.
    pub fn face_fraction(&self) -> Result<f64> {
        Ok(self.face.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?)
    }

    /// Fraction of the image covered by the hair mask.
    pub fn hair_fraction(&self) -> Result<f64> {
        Ok(self.hair.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?)
    }
}

/// Which classes of a parser make up the face and the hair masks.
#[derive(Debug, Clone)]
pub struct FaceClasses {
    names: Vec<String>,
    /// Per class id: 1 for a face class, else 0.
    face: Vec<f32>,
    /// Per class id: 1 for hair, else 0.
    hair: Vec<f32>,
}

impl FaceClasses {
    /// Maps a parser's class names (in id order) to the masks; the names must be the 19
    /// CelebAMask-HQ classes, each once, in any order and either spelling.
    pub fn new<S: AsRef<str>>(names: &[S]) -> Result<Self> {
        let names: Vec<String> = names.iter().map(|n| n.as_ref().to_string()).collect();
        let canonical: Vec<Option<&str>> = names.iter().map(|n| canonical_class(n)).collect();
        let missing: Vec<&str> =
            CLASS_ALIASES.iter().map(|(s, _)| *s).filter(|s| !canonical.contains(&Some(*s))).collect();
        let unknown: Vec<&str> =
            names.iter().zip(&canonical).filter(|(_, c)| c.is_none()).map(|(n, _)| n.as_str()).collect();
        if !missing.is_empty() || !unknown.is_empty() || names.len() != CLASS_ALIASES.len() {
            return Err(Error::UnsupportedModel(format!(
                "the face parser's classes are not the 19 CelebAMask-HQ classes \
                 (missing: [{}]; not recognised: [{}]); found {} classes: [{}]",
                missing.join(", "),
                unknown.join(", "),
                names.len(),
                names.join(", ")
            )));
        }
        // Every name is recognised here, so `flatten` keeps one entry per class id.
        let flags = |keep: fn(&str) -> bool| -> Vec<f32> {
            canonical.iter().flatten().map(|c| if keep(c) { 1.0 } else { 0.0 }).collect()
        };
        let face = flags(|c| !NOT_FACE.contains(&c));
        let hair = flags(|c| c == "hair");
        Ok(Self { names, face, hair })
    }

    /// The class names in id order, as the parser spells them.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The masks of an `(H, W)` map of class ids. Fails when almost no pixel is face (under 1% of
    /// the image): the photo is then not a usable head shot.
    pub fn masks(&self, class_map: &Tensor) -> Result<Masks> {
        let (h, w) = class_map.dims2()?;
        let ids = class_map.flatten_all()?.to_dtype(DType::U32)?;
        let max = ids.max(0)?.to_scalar::<u32>()? as usize;
        if max >= self.names.len() {
            return Err(Error::Input(format!("class map holds class {max}, the parser has {}", self.names.len())));
        }
        let lookup = |table: &[f32]| -> Result<Tensor> {
            let table = Tensor::new(table, class_map.device())?;
            Ok(table.index_select(&ids, 0)?.reshape((h, w))?)
        };
        let masks = Masks { face: lookup(&self.face)?, hair: lookup(&self.hair)? };
        let fraction = masks.face_fraction()?;
        if fraction < MIN_FACE_FRACTION {
            return Err(Error::Input(format!(
                "no face found: only {:.2}% of the image is face (skin, eyes, nose, mouth, ...); \
                 is this an aligned head shot? The photo should show one face, centred and filling most of the frame",
                100.0 * fraction
            )));
        }
        Ok(masks)
    }
}

/// The two face parsers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaceParserKind {
    /// transformers SegFormer (`jonathandinu/face-parsing` by default).
    Segformer,
    /// face-parsing.PyTorch BiSeNet (`79999_iter.pth`), as in the paper.
    Bisenet,
}

impl FaceParserKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Segformer => "segformer",
            Self::Bisenet => "bisenet",
        }
    }
}

/// A face parser with its preprocessing, class names and mask definition.
#[derive(Debug, Clone)]
pub struct FaceParser {
    network: Network,
    normalization: Normalization,
    classes: FaceClasses,
    device: Device,
}

#[derive(Debug, Clone)]
enum Network {
    Segformer(Box<SegformerForSemanticSegmentation>),
    Bisenet(Box<BiSeNet>),
}

/// Input normalisation: pixel values are `(byte * scale - mean) / std` per channel.
#[derive(Debug, Clone, Copy)]
struct Normalization {
    scale: f64,
    mean: [f64; 3],
    std: [f64; 3],
}

impl FaceParser {
    /// Loads a parser. `weights`: for SegFormer a transformers model folder (config.json,
    /// model.safetensors) or a hub id found in the hub cache or fetched into it, by default
    /// [`DEFAULT_SEGFORMER`]; for BiSeNet a checkpoint file (zip-format `.pth` or `.safetensors`)
    /// or a folder holding `model.safetensors`, `model.pth` or `79999_iter.pth`.
    pub fn load(kind: FaceParserKind, weights: Option<&str>, hub: &Hub, device: &Device) -> Result<Self> {
        match (kind, weights) {
            (FaceParserKind::Segformer, spec) => {
                Self::segformer(&hub.resolve(spec.unwrap_or(DEFAULT_SEGFORMER), &Self::segformer_files())?, device)
            }
            (FaceParserKind::Bisenet, Some(spec)) => Self::bisenet(Path::new(spec), device),
            (FaceParserKind::Bisenet, None) => Err(Error::Input(
                "the BiSeNet face parser needs its weights: pass the path of face-parsing.PyTorch's 79999_iter.pth \
                 (or use the SegFormer parser, whose weights come from the Hugging Face hub)"
                    .into(),
            )),
        }
    }

    /// What [`FaceParser::segformer`] reads of a transformers folder.
    pub fn segformer_files() -> ModelFiles {
        ModelFiles::new("face parser", DEFAULT_SEGFORMER)
            .file("config.json")
            .optional("preprocessor_config.json")
            .weights(TRANSFORMERS_WEIGHTS.map(String::from))
    }

    /// Loads a SegFormer parser from a transformers folder (config.json, model.safetensors,
    /// optionally preprocessor_config.json).
    pub fn segformer(dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config: SegformerConfig = read_json(&config_path)?;
        let config_error = |e: candle_core::Error| Error::Config { file: config_path.clone(), msg: e.to_string() };
        config.validate().map_err(config_error)?;
        let classes = FaceClasses::new(&config.class_names().map_err(config_error)?)?;
        let (scale, mean, std) = SegformerImageProcessor::from_dir(dir)?
            .normalization(SIZE, SIZE)
            .map_err(|e| Error::Config { file: dir.join("preprocessor_config.json"), msg: e.to_string() })?;
        let (weights, _) = transformers_weights(dir, DType::F32, device, "SegFormer")?;
        let model = weights.build(|vb| SegformerForSemanticSegmentation::new(vb, &config))?;
        Ok(Self {
            network: Network::Segformer(Box::new(model)),
            normalization: Normalization { scale, mean, std },
            classes,
            device: device.clone(),
        })
    }

    /// Loads the BiSeNet parser from a face-parsing.PyTorch checkpoint (see [`FaceParser::load`]).
    pub fn bisenet(spec: &Path, device: &Device) -> Result<Self> {
        let weights = open_bisenet_checkpoint(spec, device)?;
        let model = weights.build(BiSeNet::new)?;
        let classes = FaceClasses::new(&bisenet::CLASSES)?;
        if model.num_classes() != bisenet::CLASSES.len() {
            return Err(Error::UnsupportedModel(format!(
                "{}: the BiSeNet head predicts {} classes, the CelebAMask-HQ face parser 19",
                spec.display(),
                model.num_classes()
            )));
        }
        Ok(Self {
            network: Network::Bisenet(Box::new(model)),
            normalization: Normalization { scale: 1.0 / 255.0, mean: bisenet::IMAGE_MEAN, std: bisenet::IMAGE_STD },
            classes,
            device: device.clone(),
        })
    }

    pub fn kind(&self) -> FaceParserKind {
        match self.network {
            Network::Segformer(_) => FaceParserKind::Segformer,
            Network::Bisenet(_) => FaceParserKind::Bisenet,
        }
    }

    /// The class names in id order and the mask definition over them.
    pub fn classes(&self) -> &FaceClasses {
        &self.classes
    }

    /// Class scores `(classes, 512, 512)` of a 512x512 RGB photo (row-major bytes), each parser
    /// with its reference preprocessing and upsampling (SegFormer: bilinear from 1/4 resolution,
    /// `align_corners=False`, as its image processor's post-processing; BiSeNet: its own
    /// `align_corners=True` upsampling).
    pub fn logits(&self, rgb512: &[u8]) -> Result<Tensor> {
        let pixels = self.pixel_values(rgb512)?;
        let logits = match &self.network {
            Network::Segformer(model) => model.forward(&pixels)?.upsample_bilinear2d(SIZE, SIZE, false)?,
            Network::Bisenet(model) => model.forward(&pixels)?,
        };
        Ok(logits.squeeze(0)?)
    }

    /// The network input `(1, 3, 512, 512)` for a 512x512 RGB photo: SegFormer as its image
    /// processor config says, BiSeNet as the reference code (`ToTensor`, ImageNet mean / std).
    pub fn pixel_values(&self, rgb512: &[u8]) -> Result<Tensor> {
        if rgb512.len() != SIZE * SIZE * 3 {
            return Err(Error::Input(format!(
                "the face parser takes a {SIZE}x{SIZE} RGB photo ({} bytes), got {} bytes",
                SIZE * SIZE * 3,
                rgb512.len()
            )));
        }
        let Normalization { scale, mean, std } = self.normalization;
        let to_tensor = |v: [f64; 3]| Tensor::new(&v.map(|x| x as f32), &self.device)?.reshape((1, 3, 1, 1));
        let gain = to_tensor([0, 1, 2].map(|c| scale / std[c]))?;
        let offset = to_tensor([0, 1, 2].map(|c| -mean[c] / std[c]))?;
        let x = Tensor::from_slice(rgb512, (SIZE, SIZE, 3), &self.device)?.to_dtype(DType::F32)?;
        Ok(x.permute((2, 0, 1))?.unsqueeze(0)?.broadcast_mul(&gain)?.broadcast_add(&offset)?)
    }

    /// The `(512, 512)` map of class ids (u32): argmax of [`FaceParser::logits`].
    pub fn class_map(&self, rgb512: &[u8]) -> Result<Tensor> {
        Ok(self.logits(rgb512)?.argmax(0)?)
    }

    /// Face and hair masks `(512, 512)` of a 512x512 RGB photo; fails when no face is found.
    pub fn masks(&self, rgb512: &[u8]) -> Result<Masks> {
        self.classes.masks(&self.class_map(rgb512)?)
    }
}

/// Opens a BiSeNet checkpoint: safetensors, or a PyTorch file in either format (the original
/// `79999_iter.pth` is in the legacy one).
fn open_bisenet_checkpoint(spec: &Path, device: &Device) -> Result<Weights> {
    let path = if spec.is_dir() {
        ["model.safetensors", "model.pth", "79999_iter.pth"]
            .iter()
            .map(|f| spec.join(f))
            .find(|p| p.is_file())
            .ok_or_else(|| Error::MissingFile {
                what: "BiSeNet checkpoint".into(),
                path: spec.to_path_buf(),
                hint: "the folder holds none of model.safetensors, model.pth, 79999_iter.pth".into(),
            })?
    } else if spec.is_file() {
        spec.to_path_buf()
    } else {
        return Err(Error::MissingFile {
            what: "BiSeNet checkpoint".into(),
            path: spec.to_path_buf(),
            hint: "pass face-parsing.PyTorch's 79999_iter.pth (or the same weights as .safetensors)".into(),
        });
    };
    weights_file(&path, DType::F32, device)
}
