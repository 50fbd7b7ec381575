//! The face-recognition feature of the identity photo: the CLS token of a ViT's `last_hidden_state`
//! (StableIdentity's identity prior, `datasets_face/face_id.py` and `train.py` in
//! <https://github.com/qinghew/StableIdentity>).
//!
//! Preprocessing, as the reference: crop the face box (left 64, top 70, right 440, bottom 446) of
//! the 512x512 photo, then the ViT image processor of google/vit-base-patch16-224-in21k: resize to
//! 224x224 bilinear with antialiasing, scale by 1/255, normalise with mean 0.5 and std 0.5.
//! transformers 5 (`ViTImageProcessor` / `AutoImageProcessor` by default) resizes with torchvision
//! on uint8 tensors, whose fixed-point weights differ from PIL's in the last bit of about 0.3% of
//! the samples; that is the default here ([`Weights::Torchvision`]). The published implementation
//! ran transformers 4, whose processor resized with PIL: [`Weights::Pil`] reproduces that.
//! The learner flips the ViT input with the image, hence the `flipped` variants.

use candle_core::{DType, Device, IndexOp, Tensor};
use image::imageops;
use image::RgbImage;

use crate::io::read_json;
use crate::models::vit::{ViTConfig, ViTModel};
use crate::priors::photo::{resize, rgb_to_tensor, Filter, Photo, Weights};
use crate::weights::{transformers_weights, Hub, ModelFiles, TRANSFORMERS_WEIGHTS};
use crate::{Error, Result};

/// The face region StableIdentity crops from the 512 photo: left, top, right, bottom.
pub const VIT_CROP_BOX: [u32; 4] = [64, 70, 440, 446];

/// Side of the ViT input.
pub const VIT_INPUT_SIZE: u32 = 224;

/// The 224x224 RGB image the ViT processor makes of the photo's face crop, before normalisation.
pub fn vit_input_image(photo: &Photo, weights: Weights) -> RgbImage {
    let [left, top, right, bottom] = VIT_CROP_BOX;
    let crop = imageops::crop_imm(photo.rgb(), left, top, right - left, bottom - top).to_image();
    resize(&crop, VIT_INPUT_SIZE, VIT_INPUT_SIZE, Filter::Bilinear, weights)
}

/// The ViT input `(1, 3, 224, 224)` f32 on the CPU, as transformers 5's default ViT image processor
/// makes it; `flipped` mirrors it left-right.
pub fn preprocess(photo: &Photo, flipped: bool) -> Result<Tensor> {
    preprocess_with(photo, flipped, Weights::Torchvision)
}

/// [`preprocess`] with the resize of either processor backend.
pub fn preprocess_with(photo: &Photo, flipped: bool, weights: Weights) -> Result<Tensor> {
    let mut image = vit_input_image(photo, weights);
    if flipped {
        imageops::flip_horizontal_in_place(&mut image);
    }
    // (x / 255 - 0.5) / 0.5, in the fused form transformers uses, (x - 127.5) / 127.5.
    Ok(rgb_to_tensor(&image, |v| (f32::from(v) - 127.5) / 127.5)?)
}

/// A face-recognition ViT, ready to turn photos into identity features.
#[derive(Debug, Clone)]
pub struct FaceEncoder {
    model: ViTModel,
    device: Device,
}

impl FaceEncoder {
    pub fn new(model: ViTModel, device: &Device) -> Self {
        Self { model, device: device.clone() }
    }

    pub fn model(&self) -> &ViTModel {
        &self.model
    }

    /// Width of the feature (768 for ViT-B).
    pub fn hidden_size(&self) -> usize {
        self.model.config().hidden_size
    }

    /// The CLS token of `last_hidden_state` for the photo (mirrored if `flipped`): `(hidden,)` f32
    /// on the encoder's device.
    pub fn feature(&self, photo: &Photo, flipped: bool) -> Result<Tensor> {
        let pixels = preprocess(photo, flipped)?.to_device(&self.device)?;
        let hidden = self.model.forward(&pixels)?;
        Ok(hidden.i((0, 0))?.to_dtype(DType::F32)?)
    }
}

/// The face-recognition ViT StableIdentity uses.
pub const DEFAULT_FACE_ENCODER: &str = "jayanta/vit-base-patch16-224-in21k-face-recognition";

/// What [`load_face_encoder`] reads of a transformers folder.
pub fn face_encoder_files() -> ModelFiles {
    ModelFiles::new("face-recognition model", DEFAULT_FACE_ENCODER)
        .file("config.json")
        .weights(TRANSFORMERS_WEIGHTS.map(String::from))
}

/// Loads the face-recognition ViT from a transformers folder (config.json and model.safetensors
/// or pytorch_model.bin, names with or without the `vit.` prefix of
/// `ViTForImageClassification`) given as a local path or a hub id (found in the hub cache or
/// fetched into it).
pub fn load_face_encoder(dir_or_hub_id: &str, hub: &Hub, device: &Device) -> Result<FaceEncoder> {
    let dir = hub.resolve(dir_or_hub_id, &face_encoder_files())?;
    let config_path = dir.join("config.json");
    let config: ViTConfig = read_json(&config_path)?;
    let unsupported = |msg: String| Error::UnsupportedModel(format!("{}: {msg}", config_path.display()));
    config.validate().map_err(|e| unsupported(e.to_string()))?;
    if config.image_size != VIT_INPUT_SIZE as usize {
        return Err(unsupported(format!(
            "image_size {} (the face feature is defined on {VIT_INPUT_SIZE}x{VIT_INPUT_SIZE} inputs)",
            config.image_size
        )));
    }
    let (weights, names) = transformers_weights(&dir, DType::F32, device, "ViT")?;
    let (file, vb) = (weights.path, weights.vb);
    let vb = if names.iter().any(|n| n == "embeddings.cls_token") {
        vb
    } else if names.iter().any(|n| n == "vit.embeddings.cls_token") {
        vb.pp("vit")
    } else {
        return Err(Error::Weights {
            file,
            msg: "no ViT encoder weights in it (neither `embeddings.cls_token` nor `vit.embeddings.cls_token`); \
                  is this a transformers ViT checkpoint?"
                .into(),
        });
    };
    let model = ViTModel::new(vb, &config).map_err(|e| Error::Weights {
        file: file.clone(),
        msg: format!("{e} (do the weights match {}?)", config_path.display()),
    })?;
    Ok(FaceEncoder::new(model, device))
}
