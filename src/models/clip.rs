//! CLIP image and text towers with their projections, as transformers' `CLIPModel`
//! (<https://github.com/huggingface/transformers/blob/main/src/transformers/models/clip/modeling_clip.py>),
//! for the CLIP-I and CLIP-T metrics (`openai/clip-vit-base-patch32` by default, ViT-L/14 too).
//!
//! Weight names are the checkpoint's: `text_model.*` (the [`ClipTextModel`] of Stable Diffusion),
//! `vision_model.*` (`embeddings.{class_embedding, patch_embedding, position_embedding}`,
//! `pre_layrnorm` (sic), the encoder layers the text tower also uses, `post_layernorm`),
//! `visual_projection`, `text_projection`. The features are the projections, not normalised;
//! `logit_scale` is not used.

use candle_core::{bail, DType, IndexOp, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::models::clip_text::{ClipEncoderLayer, ClipLayerSpec, ClipTextConfig, ClipTextModel};
use crate::models::config::ConfigChecks;
use crate::nn::{conv2d, Conv2dConfig, LayerNorm, Linear};

/// The fields of a transformers `CLIPVisionConfig` that the vision tower uses; missing keys take
/// transformers' defaults (ViT-B/32), unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".to_string(),
            layer_norm_eps: 1e-5,
        }
    }
}

/// The text-tower fields `CLIPModel` reads beyond [`ClipTextConfig`]: which token ends a prompt.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ClipTextPooling {
    /// transformers' legacy value 2 (older configs, e.g. openai/clip-vit-base-patch32) means
    /// "pool at the largest id", which is the first end-of-text token of CLIP's tokenizer.
    pub eos_token_id: u32,
}

impl Default for ClipTextPooling {
    fn default() -> Self {
        Self { eos_token_id: 49407 }
    }
}

/// A transformers `CLIPConfig` (config.json of a `CLIPModel` checkpoint).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "ClipConfigJson")]
pub struct ClipConfig {
    pub text_config: ClipTextConfig,
    /// Read from `text_config` too.
    pub text_pooling: ClipTextPooling,
    pub vision_config: ClipVisionConfig,
    pub projection_dim: usize,
}

/// config.json as written: `text_config` is read twice, as [`ClipTextConfig`] and [`ClipTextPooling`].
#[derive(Deserialize)]
struct ClipConfigJson {
    text_config: serde_json::Value,
    vision_config: ClipVisionConfig,
    #[serde(default = "default_projection_dim")]
    projection_dim: usize,
}

fn default_projection_dim() -> usize {
    512
}

impl TryFrom<ClipConfigJson> for ClipConfig {
    type Error = serde_json::Error;

    fn try_from(json: ClipConfigJson) -> std::result::Result<Self, Self::Error> {
        Ok(Self {
            text_config: ClipTextConfig::deserialize(&json.text_config)?,
            text_pooling: ClipTextPooling::deserialize(&json.text_config)?,
            vision_config: json.vision_config,
            projection_dim: json.projection_dim,
        })
    }
}

const CLIP_VISION: ConfigChecks = ConfigChecks {
    name: "clip vision config",
    supported: "only RGB input and the \"gelu\" and \"quick_gelu\" activations are",
};

impl ClipVisionConfig {
    fn layer_spec(&self) -> Result<ClipLayerSpec> {
        CLIP_VISION.expect_eq("num_channels", &self.num_channels, &3)?;
        CLIP_VISION.expect_divides("patch_size", self.patch_size, "image_size", self.image_size)?;
        ClipLayerSpec::new(
            &CLIP_VISION,
            &self.hidden_act,
            self.hidden_size,
            self.intermediate_size,
            self.num_attention_heads,
            self.layer_norm_eps,
        )
    }

    /// Patches per image plus the class token.
    fn positions(&self) -> usize {
        (self.image_size / self.patch_size).pow(2) + 1
    }
}

/// The vision transformer: pixels to the pooled (class-token) output after `post_layernorm`.
#[derive(Debug, Clone)]
pub struct ClipVisionTransformer {
    class_embedding: Tensor,
    /// `embeddings.patch_embedding`: kernel = stride = patch size, no bias.
    patch_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<ClipEncoderLayer>,
    post_layernorm: LayerNorm,
    config: ClipVisionConfig,
}

impl ClipVisionTransformer {
    /// From `vb` at `vision_model`.
    pub fn new(vb: VarBuilder, cfg: &ClipVisionConfig) -> Result<Self> {
        let spec = cfg.layer_spec()?;
        let (h, p, eps) = (cfg.hidden_size, cfg.patch_size, cfg.layer_norm_eps);
        let emb = vb.pp("embeddings");
        Ok(Self {
            class_embedding: emb.get(h, "class_embedding")?,
            patch_embedding: emb.get((h, cfg.num_channels, p, p), "patch_embedding.weight")?,
            position_embedding: emb.get((cfg.positions(), h), "position_embedding.weight")?,
            pre_layrnorm: LayerNorm::new(vb.pp("pre_layrnorm"), h, eps)?,
            layers: ClipEncoderLayer::stack(vb.clone(), &spec, cfg.num_hidden_layers)?,
            post_layernorm: LayerNorm::new(vb.pp("post_layernorm"), h, eps)?,
            config: cfg.clone(),
        })
    }

    /// `pixel_values` (batch, 3, image_size, image_size) to the pooled output (batch, hidden).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, c, height, width) = pixel_values.dims4()?;
        let (size, h) = (self.config.image_size, self.config.hidden_size);
        if (c, height, width) != (3, size, size) {
            bail!("CLIP image input must be (batch, 3, {size}, {size}), got {:?}", pixel_values.dims())
        }
        let dtype = self.class_embedding.dtype();
        let patch = Conv2dConfig { padding: 0, stride: self.config.patch_size };
        let patches = conv2d(&pixel_values.to_dtype(dtype)?, &self.patch_embedding, None, patch)?;
        let patches = patches.flatten_from(2)?.transpose(1, 2)?;
        let class = self.class_embedding.reshape((1, 1, h))?.broadcast_as((b, 1, h))?;
        let x = Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        let mut x = self.pre_layrnorm.forward(&x)?;
        for layer in &self.layers {
            x = layer.forward(&x, None)?;
        }
        self.post_layernorm.forward(&x.i((.., 0))?.contiguous()?)
    }
}

/// `CLIPModel` without `logit_scale`: image and text features in the shared projection space.
#[derive(Debug, Clone)]
pub struct ClipModel {
    text_model: ClipTextModel,
    vision_model: ClipVisionTransformer,
    visual_projection: Linear,
    text_projection: Linear,
    config: ClipConfig,
}

impl ClipModel {
    /// From `vb` at the root of a `CLIPModel` checkpoint.
    pub fn new(vb: VarBuilder, cfg: &ClipConfig) -> Result<Self> {
        let text_model = ClipTextModel::new(vb.clone(), &cfg.text_config)?;
        let vision_model = ClipVisionTransformer::new(vb.pp("vision_model"), &cfg.vision_config)?;
        let (vision, text, proj) = (cfg.vision_config.hidden_size, cfg.text_config.hidden_size, cfg.projection_dim);
        Ok(Self {
            text_model,
            vision_model,
            visual_projection: Linear::new(vb.pp("visual_projection"), vision, proj, false)?,
            text_projection: Linear::new(vb.pp("text_projection"), text, proj, false)?,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// `get_image_features`: (batch, 3, size, size) normalised pixels to (batch, projection_dim).
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.visual_projection.forward(&self.vision_model.forward(pixel_values)?)
    }

    /// `get_text_features`: token `ids` (batch, seq) u32 to (batch, projection_dim), pooled at
    /// each row's first end-of-text token (see [`ClipTextPooling`]).
    pub fn text_features(&self, ids: &Tensor) -> Result<Tensor> {
        let hidden = self.text_model.forward(ids, None)?;
        let rows: Vec<Vec<u32>> = ids.to_vec2()?;
        let eos = self.config.text_pooling.eos_token_id;
        let positions = rows
            .iter()
            .map(|row| {
                let target = if eos == 2 { row.iter().copied().max().unwrap_or(0) } else { eos };
                row.iter().position(|&id| id == target).ok_or_else(|| {
                    candle_core::Error::Msg(format!("a prompt's token ids hold no end-of-text token {target}"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let pooled = positions.iter().enumerate().map(|(row, &at)| hidden.i((row, at))).collect::<Result<Vec<_>>>()?;
        self.text_projection.forward(&Tensor::stack(&pooled, 0)?.to_dtype(self.text_model.token_embedding().dtype())?)
    }
}

/// Cosine similarity of the rows of `a` and `b` (batch, dim), computed in f32: (batch).
pub fn cosine_similarity(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    let dot = (&a * &b)?.sum(1)?;
    let norms = (a.sqr()?.sum(1)?.sqrt()? * b.sqr()?.sum(1)?.sqrt()?)?;
    dot / norms
}
