//! CLIP text encoder, as transformers' `CLIPTextModel`
//! (<https://github.com/huggingface/transformers/blob/main/src/transformers/models/clip/modeling_clip.py>).
//!
//! Stable Diffusion 2.x conditions the UNet on `last_hidden_state` (after the final layer norm).
//! StableIdentity writes the learned identity vectors `v1*`, `v2*` into the token embeddings of
//! placeholder ids and back-propagates through the whole encoder, so every block here comes from
//! [`crate::nn`] (no fused op that would cut the graph) and the placeholders are handled by
//! [`ClipTextModel::embed_tokens`] without touching the frozen table.

use candle_core::{bail, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::models::config::ConfigChecks;
use crate::nn::{attention, gelu_erf, LayerNorm, Linear};

/// The fields of a transformers `CLIPTextConfig` (text_encoder/config.json) that the model uses;
/// missing keys take transformers' defaults, unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    /// `"gelu"` (exact erf form, SD 2.x) or `"quick_gelu"` (OpenAI CLIP, SD 1.x).
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".to_string(),
            layer_norm_eps: 1e-5,
        }
    }
}

const CLIP_TEXT: ConfigChecks =
    ConfigChecks { name: "clip text config", supported: "only the \"gelu\" and \"quick_gelu\" activations are" };

impl ClipTextConfig {
    /// Checks that the config describes a text encoder this module implements; the error names
    /// the offending field and its value.
    pub fn validate(&self) -> Result<()> {
        self.layer_spec().map(|_| ())
    }

    /// The sizes of the encoder layers, once the whole config is checked.
    fn layer_spec(&self) -> Result<ClipLayerSpec> {
        ClipLayerSpec::new(
            &CLIP_TEXT,
            &self.hidden_act,
            self.hidden_size,
            self.intermediate_size,
            self.num_attention_heads,
            self.layer_norm_eps,
        )
    }
}

/// The sizes of one CLIP encoder layer, shared by the text and the vision towers
/// ([`super::clip`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClipLayerSpec {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub eps: f64,
    act: Activation,
}

impl ClipLayerSpec {
    /// Checks the activation name and the head split; errors name the field of `checks`' config.
    pub(crate) fn new(
        checks: &ConfigChecks,
        hidden_act: &str,
        hidden: usize,
        intermediate: usize,
        heads: usize,
        eps: f64,
    ) -> Result<Self> {
        let act = match hidden_act {
            "gelu" => Activation::Gelu,
            "quick_gelu" => Activation::QuickGelu,
            _ => return Err(checks.unsupported("hidden_act", &hidden_act)),
        };
        checks.expect_divides("num_attention_heads", heads, "hidden_size", hidden)?;
        Ok(Self { hidden, intermediate, heads, eps, act })
    }
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    /// `x * Phi(x)` with the exact normal CDF.
    Gelu,
    /// `x * sigmoid(1.702 x)`.
    QuickGelu,
}

impl Activation {
    fn forward(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gelu => gelu_erf(x),
            // sigmoid from plain ops, so the backward pass is candle's own.
            Self::QuickGelu => {
                let sigmoid = ((x * -1.702)?.exp()? + 1.0)?.recip()?;
                x * sigmoid
            }
        }
    }
}

#[derive(Debug, Clone)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

impl ClipAttention {
    fn new(vb: VarBuilder, spec: &ClipLayerSpec) -> Result<Self> {
        let h = spec.hidden;
        Ok(Self {
            q_proj: Linear::new(vb.pp("q_proj"), h, h, true)?,
            k_proj: Linear::new(vb.pp("k_proj"), h, h, true)?,
            v_proj: Linear::new(vb.pp("v_proj"), h, h, true)?,
            out_proj: Linear::new(vb.pp("out_proj"), h, h, true)?,
            heads: spec.heads,
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let split_heads = |t: Tensor| t.reshape((b, s, self.heads, h / self.heads))?.transpose(1, 2);
        let q = split_heads(self.q_proj.forward(x)?)?;
        let k = split_heads(self.k_proj.forward(x)?)?;
        let v = split_heads(self.v_proj.forward(x)?)?;
        let y = attention(&q, &k, &v, mask)?;
        self.out_proj.forward(&y.transpose(1, 2)?.reshape((b, s, h))?)
    }
}

#[derive(Debug, Clone)]
struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl ClipMlp {
    fn new(vb: VarBuilder, spec: &ClipLayerSpec) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(vb.pp("fc1"), spec.hidden, spec.intermediate, true)?,
            fc2: Linear::new(vb.pp("fc2"), spec.intermediate, spec.hidden, true)?,
            act: spec.act,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.act.forward(&self.fc1.forward(x)?)?)
    }
}

/// Pre-norm transformer layer: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Debug, Clone)]
pub(crate) struct ClipEncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    mlp: ClipMlp,
    layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    /// The layers `encoder.layers.{0..count}` under `vb`.
    pub(crate) fn stack(vb: VarBuilder, spec: &ClipLayerSpec, count: usize) -> Result<Vec<Self>> {
        (0..count).map(|i| Self::new(vb.pp(format!("encoder.layers.{i}")), spec)).collect()
    }

    fn new(vb: VarBuilder, spec: &ClipLayerSpec) -> Result<Self> {
        let (h, eps) = (spec.hidden, spec.eps);
        Ok(Self {
            self_attn: ClipAttention::new(vb.pp("self_attn"), spec)?,
            layer_norm1: LayerNorm::new(vb.pp("layer_norm1"), h, eps)?,
            mlp: ClipMlp::new(vb.pp("mlp"), spec)?,
            layer_norm2: LayerNorm::new(vb.pp("layer_norm2"), h, eps)?,
        })
    }

    /// `mask` (seq, seq) is added to the attention scores: the text tower's causal mask; the
    /// vision tower attends everywhere (`None`).
    pub(crate) fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let x = (x + self.self_attn.forward(&self.layer_norm1.forward(x)?, mask)?)?;
        &x + self.mlp.forward(&self.layer_norm2.forward(&x)?)?
    }
}

/// The CLIP text transformer; its output is `last_hidden_state` (batch, seq, hidden).
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    config: ClipTextConfig,
}

impl ClipTextModel {
    /// Loads the weights from `vb` at the root of text_encoder/model.safetensors. Both layouts are
    /// accepted: `text_model.embeddings...` (transformers 4 and the published SD checkpoints) and
    /// `embeddings...` (transformers 5 saves `CLIPTextModel` without the `text_model` level).
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let spec = cfg.layer_spec()?;
        let vb =
            if vb.contains_tensor("text_model.embeddings.token_embedding.weight") { vb.pp("text_model") } else { vb };
        let h = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let token_embedding = emb.get((cfg.vocab_size, h), "token_embedding.weight")?;
        let position_embedding = emb.get((cfg.max_position_embeddings, h), "position_embedding.weight")?;
        let layers = ClipEncoderLayer::stack(vb.clone(), &spec, cfg.num_hidden_layers)?;
        let final_layer_norm = LayerNorm::new(vb.pp("final_layer_norm"), h, cfg.layer_norm_eps)?;
        Ok(Self { token_embedding, position_embedding, layers, final_layer_norm, config: cfg.clone() })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// The (vocab, hidden) token-embedding table.
    pub fn token_embedding(&self) -> &Tensor {
        &self.token_embedding
    }

    /// Token embeddings of `ids` (batch, seq) u32, shape (batch, seq, hidden).
    ///
    /// Ids past the vocabulary are placeholders: `vocab_size + i` takes row `i` of `extra`
    /// (n_extra, hidden), e.g. the identity vectors `v1*`, `v2*`. The result is differentiable
    /// with respect to `extra` (cast to the table's dtype), and the frozen table is only indexed,
    /// never copied. An id beyond the rows of `extra` is an error.
    pub fn embed_tokens(&self, ids: &Tensor, extra: Option<&Tensor>) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        if ids.dtype() != DType::U32 {
            bail!("token ids must be u32, got {:?}", ids.dtype())
        }
        let vocab = self.config.vocab_size as u32;
        let n_extra = match extra {
            Some(e) => {
                let (n, h) = e.dims2()?;
                if h != self.config.hidden_size {
                    bail!("extra embeddings have width {h}, the text encoder {}", self.config.hidden_size)
                }
                n as u32
            }
            None => 0,
        };
        let flat: Vec<u32> = ids.flatten_all()?.to_vec1()?;
        if let Some(&bad) = flat.iter().find(|&&id| id >= vocab + n_extra) {
            bail!("token id {bad} is outside the vocabulary ({vocab}) and the {n_extra} extra embeddings")
        }
        let device = self.token_embedding.device();
        let table_ids: Vec<u32> = flat.iter().map(|&id| if id < vocab { id } else { 0 }).collect();
        let rows = self.token_embedding.index_select(&Tensor::new(table_ids, device)?, 0)?;
        let rows = match extra {
            Some(extra) if flat.iter().any(|&id| id >= vocab) => {
                let extra = extra.to_dtype(rows.dtype())?;
                let extra_ids: Vec<u32> = flat.iter().map(|&id| id.saturating_sub(vocab)).collect();
                let extra_rows = extra.index_select(&Tensor::new(extra_ids, device)?, 0)?;
                let is_extra: Vec<u8> = flat.iter().map(|&id| u8::from(id >= vocab)).collect();
                let is_extra = Tensor::from_vec(is_extra, (flat.len(), 1), device)?.broadcast_as(rows.shape())?;
                is_extra.where_cond(&extra_rows, &rows)?
            }
            _ => rows,
        };
        rows.reshape((b, s, self.config.hidden_size))
    }

    /// `last_hidden_state` from token embeddings (batch, seq, hidden): adds the position
    /// embeddings, runs the causally masked encoder layers and the final layer norm.
    pub fn forward_embeddings(&self, inputs_embeds: &Tensor) -> Result<Tensor> {
        let (_, s, _) = inputs_embeds.dims3()?;
        if s > self.config.max_position_embeddings {
            bail!("sequence of {s} tokens exceeds max_position_embeddings {}", self.config.max_position_embeddings)
        }
        let positions = self.position_embedding.narrow(0, 0, s)?.to_dtype(inputs_embeds.dtype())?;
        let mut x = inputs_embeds.broadcast_add(&positions)?;
        let mask = causal_mask(s, x.dtype(), x.device())?;
        for layer in &self.layers {
            x = layer.forward(&x, Some(&mask))?;
        }
        self.final_layer_norm.forward(&x)
    }

    /// `last_hidden_state` of token `ids` (batch, seq) u32; see [`Self::embed_tokens`] for `extra`.
    pub fn forward(&self, ids: &Tensor, extra: Option<&Tensor>) -> Result<Tensor> {
        self.forward_embeddings(&self.embed_tokens(ids, extra)?)
    }
}

/// (seq, seq) additive mask: 0 where a token may attend (itself and earlier), -inf after.
fn causal_mask(seq: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> =
        (0..seq).flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(values, (seq, seq), device)?.to_dtype(dtype)
}
