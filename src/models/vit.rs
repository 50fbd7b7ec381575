//! Vision Transformer encoder, as transformers' `ViTModel`
//! (<https://github.com/huggingface/transformers/blob/main/src/transformers/models/vit/modeling_vit.py>).
//!
//! StableIdentity's identity prior is the CLS token of `last_hidden_state` of a ViT-B/16 fine-tuned
//! for face recognition. Module names are those of the hub checkpoints (`embeddings.*`,
//! `encoder.layer.N.attention.attention.query`, ..., `layernorm`); a `ViTForImageClassification`
//! checkpoint nests them under `vit.`, which the caller strips with `vb.pp("vit")`. The pooler and
//! any classifier head are not used. The encoder is frozen and its input is a constant photo, but
//! it is built from [`crate::nn`] like every model.

use candle_core::{bail, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::nn::{attention, Conv2d, Conv2dConfig, LayerNorm, Linear};

/// The fields of a transformers `ViTConfig` (config.json) that the encoder uses; missing keys
/// take transformers' defaults (ViT-B/16 at 224 px).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ViTConfig {
    /// `"vit"` in transformers configs; absent in hand-written ones.
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "default_num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    /// Only `"gelu"` (exact erf form) is supported.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    #[serde(default = "default_num_channels")]
    pub num_channels: usize,
    #[serde(default = "default_qkv_bias")]
    pub qkv_bias: bool,
}

fn default_hidden_size() -> usize {
    768
}
fn default_num_hidden_layers() -> usize {
    12
}
fn default_num_attention_heads() -> usize {
    12
}
fn default_intermediate_size() -> usize {
    3072
}
fn default_hidden_act() -> String {
    "gelu".to_string()
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_image_size() -> usize {
    224
}
fn default_patch_size() -> usize {
    16
}
fn default_num_channels() -> usize {
    3
}
fn default_qkv_bias() -> bool {
    true
}

impl ViTConfig {
    /// Rejects configs this encoder cannot run, naming the field.
    pub fn validate(&self) -> Result<()> {
        if let Some(kind) = self.model_type.as_deref().filter(|k| *k != "vit") {
            bail!("model_type: {kind:?} is not a ViT (expected \"vit\")")
        }
        if self.hidden_act != "gelu" {
            bail!("hidden_act: unsupported activation {:?} (expected \"gelu\")", self.hidden_act)
        }
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            bail!("num_attention_heads: {} does not divide hidden_size {}", self.num_attention_heads, self.hidden_size)
        }
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            bail!("patch_size: {} does not divide image_size {}", self.patch_size, self.image_size)
        }
        if self.num_channels != 3 {
            bail!("num_channels: {} (only RGB input, 3, is supported)", self.num_channels)
        }
        Ok(())
    }

    /// Patches per image plus the CLS token.
    pub fn sequence_length(&self) -> usize {
        (self.image_size / self.patch_size).pow(2) + 1
    }
}

#[derive(Debug, Clone)]
struct ViTAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    /// `attention.output.dense`
    output: Linear,
    heads: usize,
}

impl ViTAttention {
    fn new(vb: VarBuilder, cfg: &ViTConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let inner = vb.pp("attention");
        Ok(Self {
            query: Linear::new(inner.pp("query"), h, h, cfg.qkv_bias)?,
            key: Linear::new(inner.pp("key"), h, h, cfg.qkv_bias)?,
            value: Linear::new(inner.pp("value"), h, h, cfg.qkv_bias)?,
            output: Linear::new(vb.pp("output").pp("dense"), h, h, true)?,
            heads: cfg.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let split_heads = |t: Tensor| t.reshape((b, s, self.heads, h / self.heads))?.transpose(1, 2);
        let q = split_heads(self.query.forward(x)?)?;
        let k = split_heads(self.key.forward(x)?)?;
        let v = split_heads(self.value.forward(x)?)?;
        let out = attention(&q, &k, &v, None)?.transpose(1, 2)?.reshape((b, s, h))?;
        self.output.forward(&out)
    }
}

/// One pre-norm transformer block: `x + attn(ln(x))`, then `x + mlp(ln(x))`.
#[derive(Debug, Clone)]
struct ViTLayer {
    layernorm_before: LayerNorm,
    attention: ViTAttention,
    layernorm_after: LayerNorm,
    /// `intermediate.dense`
    intermediate: Linear,
    /// `output.dense`
    output: Linear,
}

impl ViTLayer {
    fn new(vb: VarBuilder, cfg: &ViTConfig) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Ok(Self {
            layernorm_before: LayerNorm::new(vb.pp("layernorm_before"), h, eps)?,
            attention: ViTAttention::new(vb.pp("attention"), cfg)?,
            layernorm_after: LayerNorm::new(vb.pp("layernorm_after"), h, eps)?,
            intermediate: Linear::new(vb.pp("intermediate").pp("dense"), h, cfg.intermediate_size, true)?,
            output: Linear::new(vb.pp("output").pp("dense"), cfg.intermediate_size, h, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.attention.forward(&self.layernorm_before.forward(x)?)?)?;
        let mlp = self.intermediate.forward(&self.layernorm_after.forward(&x)?)?.gelu_erf()?;
        x + self.output.forward(&mlp)?
    }
}

/// The ViT encoder without pooler: pixels to `last_hidden_state`.
#[derive(Debug, Clone)]
pub struct ViTModel {
    cls_token: Tensor,
    position_embeddings: Tensor,
    /// `embeddings.patch_embeddings.projection`: a conv with kernel = stride = patch size.
    patch_projection: Conv2d,
    layers: Vec<ViTLayer>,
    layernorm: LayerNorm,
    config: ViTConfig,
}

impl ViTModel {
    /// Builds the encoder from weights named as in a `ViTModel` checkpoint (no `vit.` prefix).
    pub fn new(vb: VarBuilder, cfg: &ViTConfig) -> Result<Self> {
        cfg.validate()?;
        let h = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let patch_projection = Conv2d::new(
            emb.pp("patch_embeddings").pp("projection"),
            cfg.num_channels,
            h,
            cfg.patch_size,
            Conv2dConfig { padding: 0, stride: cfg.patch_size },
        )?;
        let encoder = vb.pp("encoder").pp("layer");
        let layers = (0..cfg.num_hidden_layers).map(|i| ViTLayer::new(encoder.pp(i), cfg)).collect::<Result<_>>()?;
        Ok(Self {
            cls_token: emb.get((1, 1, h), "cls_token")?,
            position_embeddings: emb.get((1, cfg.sequence_length(), h), "position_embeddings")?,
            patch_projection,
            layers,
            layernorm: LayerNorm::new(vb.pp("layernorm"), h, cfg.layer_norm_eps)?,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ViTConfig {
        &self.config
    }

    /// `pixel_values` `(batch, 3, image_size, image_size)` to `last_hidden_state`
    /// `(batch, 1 + patches, hidden)`; token 0 is the CLS token.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, c, height, width) = pixel_values.dims4()?;
        let size = self.config.image_size;
        if (c, height, width) != (self.config.num_channels, size, size) {
            bail!("ViT input must be (batch, 3, {size}, {size}), got {:?}", pixel_values.dims())
        }
        let dtype = self.cls_token.dtype();
        let patches =
            self.patch_projection.forward(&pixel_values.to_dtype(dtype)?)?.flatten_from(2)?.transpose(1, 2)?;
        let cls = self.cls_token.broadcast_as((b, 1, self.config.hidden_size))?;
        let mut x = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embeddings)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        self.layernorm.forward(&x)
    }
}
