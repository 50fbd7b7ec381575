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

use crate::models::config::ConfigChecks;
use crate::nn::{attention, Conv2d, Conv2dConfig, LayerNorm, Linear};

/// The fields of a transformers `ViTConfig` (config.json) that the encoder uses; missing keys
/// take transformers' defaults (ViT-B/16 at 224 px), unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ViTConfig {
    /// `"vit"` in transformers configs; absent in hand-written ones.
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    /// Only `"gelu"` (exact erf form) is supported.
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub qkv_bias: bool,
}

impl Default for ViTConfig {
    fn default() -> Self {
        Self {
            model_type: None,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: "gelu".to_string(),
            layer_norm_eps: 1e-12,
            image_size: 224,
            patch_size: 16,
            num_channels: 3,
            qkv_bias: true,
        }
    }
}

const VIT: ConfigChecks =
    ConfigChecks { name: "vit config", supported: "only ViTs with exact GELU and RGB input (3 channels) are" };

impl ViTConfig {
    /// Checks that the config describes an encoder this module implements; the error names the
    /// offending field and its value.
    pub fn validate(&self) -> Result<()> {
        if let Some(kind) = self.model_type.as_deref().filter(|k| *k != "vit") {
            return Err(VIT.invalid("model_type", &kind, "is not a ViT (expected \"vit\")"));
        }
        VIT.expect_eq("hidden_act", &self.hidden_act.as_str(), &"gelu")?;
        VIT.expect_divides("num_attention_heads", self.num_attention_heads, "hidden_size", self.hidden_size)?;
        VIT.expect_divides("patch_size", self.patch_size, "image_size", self.image_size)?;
        VIT.expect_eq("num_channels", &self.num_channels, &3)
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
