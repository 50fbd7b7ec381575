//! SegFormer semantic segmentation, as transformers' `SegformerForSemanticSegmentation`
//! (<https://github.com/huggingface/transformers/blob/main/src/transformers/models/segformer/modeling_segformer.py>),
//! the architecture of the face parser `jonathandinu/face-parsing` (MiT-b5, 19 CelebAMask-HQ classes).
//!
//! A hierarchical Mix Transformer encoder (overlapping patch embeddings, self-attention whose keys
//! and values are spatially reduced, Mix-FFN with a depthwise 3x3 convolution) feeds an all-MLP
//! decode head; the logits come out at 1/4 of the input resolution.
//!
//! Weight names are those of the hub checkpoints (`segformer.encoder.block.{stage}.{layer}...`,
//! `decode_head.linear_c.{stage}...`), which transformers' `save_pretrained` also writes.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{bail, Result, Tensor};
use candle_nn::{BatchNorm, ModuleT, VarBuilder};
use serde::Deserialize;

use crate::models::config::ConfigChecks;
use crate::nn::{attention, Conv2d, Conv2dConfig, LayerNorm, Linear};

/// transformers builds every SegFormer layer norm with `nn.LayerNorm`'s default eps
/// (the config's `layer_norm_eps` is not used by the model).
const LAYER_NORM_EPS: f64 = 1e-5;
const BATCH_NORM_EPS: f64 = 1e-5;
/// Classes a config may name by count alone (`num_labels` without `id2label`), a bound for the
/// list of names made from it.
const MAX_LABELS: usize = 10_000;

/// The fields of a transformers `SegformerConfig` (config.json) that the model uses; missing keys
/// take transformers' defaults (those of nvidia/mit-b0), unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SegformerConfig {
    pub num_channels: usize,
    pub num_encoder_blocks: usize,
    pub depths: Vec<usize>,
    pub sr_ratios: Vec<usize>,
    pub hidden_sizes: Vec<usize>,
    pub patch_sizes: Vec<usize>,
    pub strides: Vec<usize>,
    pub num_attention_heads: Vec<usize>,
    pub mlp_ratios: Vec<usize>,
    /// Only `"gelu"` (exact erf form) is supported.
    pub hidden_act: String,
    pub decoder_hidden_size: usize,
    /// Class names by id (`{"0": "background", ...}`).
    pub id2label: Option<BTreeMap<String, String>>,
    /// Used only when `id2label` is absent (transformers then names the classes `LABEL_i`).
    pub num_labels: Option<usize>,
}

impl Default for SegformerConfig {
    fn default() -> Self {
        Self {
            num_channels: 3,
            num_encoder_blocks: 4,
            depths: vec![2, 2, 2, 2],
            sr_ratios: vec![8, 4, 2, 1],
            hidden_sizes: vec![32, 64, 160, 256],
            patch_sizes: vec![7, 3, 3, 3],
            strides: vec![4, 2, 2, 2],
            num_attention_heads: vec![1, 2, 5, 8],
            mlp_ratios: vec![4, 4, 4, 4],
            hidden_act: "gelu".to_string(),
            decoder_hidden_size: 256,
            id2label: None,
            num_labels: None,
        }
    }
}

const SEGFORMER: ConfigChecks =
    ConfigChecks { name: "segformer config", supported: "only the exact (erf) \"gelu\" activation is" };

impl SegformerConfig {
    /// The class names in id order: from `id2label`, else `LABEL_0`, `LABEL_1`, ... as transformers
    /// names them (2 classes when `num_labels` is absent too).
    pub fn class_names(&self) -> Result<Vec<String>> {
        let Some(id2label) = &self.id2label else {
            let count = self.num_labels.unwrap_or(2);
            if count > MAX_LABELS {
                bail!("num_labels: {count} classes; at most {MAX_LABELS} are supported (face parsing has 19)")
            }
            return Ok((0..count).map(|i| format!("LABEL_{i}")).collect());
        };
        let mut by_id = BTreeMap::new();
        for (id, name) in id2label {
            match id.parse::<usize>() {
                Ok(i) => by_id.insert(i, name.clone()),
                Err(_) => bail!("segformer config: `id2label` key {id:?} is not a class id"),
            };
        }
        if by_id.keys().copied().ne(0..by_id.len()) {
            bail!("segformer config: `id2label` ids must be 0..{} without gaps, found {:?}", by_id.len(), by_id.keys())
        }
        Ok(by_id.into_values().collect())
    }

    /// Checks that the config describes a model this module implements; the error names the
    /// offending field and its value.
    pub fn validate(&self) -> Result<()> {
        let n = self.num_encoder_blocks;
        for (field, list) in [
            ("depths", &self.depths),
            ("sr_ratios", &self.sr_ratios),
            ("hidden_sizes", &self.hidden_sizes),
            ("patch_sizes", &self.patch_sizes),
            ("strides", &self.strides),
            ("num_attention_heads", &self.num_attention_heads),
            ("mlp_ratios", &self.mlp_ratios),
        ] {
            if list.len() != n {
                return Err(SEGFORMER.invalid(
                    field,
                    list,
                    format_args!("has {} entries for `num_encoder_blocks` = {n}", list.len()),
                ));
            }
        }
        SEGFORMER.expect_eq("hidden_act", &self.hidden_act.as_str(), &"gelu")?;
        for (i, (&hidden, &heads)) in self.hidden_sizes.iter().zip(&self.num_attention_heads).enumerate() {
            SEGFORMER.expect_divides(
                &format!("num_attention_heads[{i}]"),
                heads,
                &format!("hidden_sizes[{i}]"),
                hidden,
            )?;
        }
        Ok(())
    }
}

/// The fields of a `SegformerImageProcessor` config (preprocessor_config.json) that matter for a
/// 512x512 photo; missing keys (or a missing file) take the processor's defaults, unknown keys
/// are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SegformerImageProcessor {
    pub do_resize: bool,
    pub size: ProcessorSize,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
}

/// `size` of the image processor; SegFormer resizes to a fixed height and width.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct ProcessorSize {
    pub height: usize,
    pub width: usize,
}

impl Default for ProcessorSize {
    fn default() -> Self {
        Self { height: 512, width: 512 }
    }
}

impl Default for SegformerImageProcessor {
    fn default() -> Self {
        Self {
            do_resize: true,
            size: ProcessorSize::default(),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: [0.485, 0.456, 0.406],
            image_std: [0.229, 0.224, 0.225],
        }
    }
}

impl SegformerImageProcessor {
    /// Reads `preprocessor_config.json` of a model folder, or the defaults when the folder has none.
    pub fn from_dir(dir: &Path) -> crate::Result<Self> {
        let path = dir.join("preprocessor_config.json");
        if path.is_file() {
            crate::io::read_json(&path)
        } else {
            Ok(Self::default())
        }
    }

    /// Per-channel `(scale, mean, std)`: pixel values are `(byte * scale - mean) / std`. The photo is
    /// already `height` x `width`, so the processor's resize is the identity (torchvision returns
    /// an image of the requested size unchanged); any other size is rejected, naming the field.
    pub fn normalization(&self, height: usize, width: usize) -> Result<(f64, [f64; 3], [f64; 3])> {
        if self.do_resize && (self.size.height, self.size.width) != (height, width) {
            bail!(
                "segformer image processor config: `size` = {}x{} is not supported (only {height}x{width}, the photo \
                 size: the photo is not resized)",
                self.size.height,
                self.size.width
            )
        }
        let scale = if self.do_rescale { self.rescale_factor } else { 1.0 };
        let (mean, std) = if self.do_normalize { (self.image_mean, self.image_std) } else { ([0.0; 3], [1.0; 3]) };
        Ok((scale, mean, std))
    }
}

/// Strided convolution that cuts the image into overlapping patches, then a layer norm.
#[derive(Debug, Clone)]
struct OverlapPatchEmbeddings {
    proj: Conv2d,
    layer_norm: LayerNorm,
}

impl OverlapPatchEmbeddings {
    fn new(vb: VarBuilder, patch: usize, stride: usize, in_channels: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            proj: Conv2d::new(vb.pp("proj"), in_channels, hidden, patch, Conv2dConfig { padding: patch / 2, stride })?,
            layer_norm: LayerNorm::new(vb.pp("layer_norm"), hidden, LAYER_NORM_EPS)?,
        })
    }

    /// `(B, C, H, W)` -> tokens `(B, h*w, hidden)` and the token grid size `(h, w)`.
    fn forward(&self, x: &Tensor) -> Result<(Tensor, usize, usize)> {
        let x = self.proj.forward(x)?;
        let (_, _, h, w) = x.dims4()?;
        let tokens = x.flatten_from(2)?.transpose(1, 2)?;
        Ok((self.layer_norm.forward(&tokens)?, h, w))
    }
}

/// Tokens `(B, h*w, C)` -> feature map `(B, C, h, w)`.
fn tokens_to_map(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _, c) = x.dims3()?;
    x.transpose(1, 2)?.reshape((b, c, h, w))
}

/// Feature map `(B, C, h, w)` -> tokens `(B, h*w, C)`.
fn map_to_tokens(x: &Tensor) -> Result<Tensor> {
    x.flatten_from(2)?.transpose(1, 2)
}

/// Multi-head self-attention whose keys and values come from a grid shrunk `sr_ratio` times by a
/// strided convolution (PVT's spatial reduction), so that full-resolution stages stay affordable.
#[derive(Debug, Clone)]
struct EfficientSelfAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    /// The reduction convolution and its layer norm (`sr_ratio > 1` only).
    sr: Option<(Conv2d, LayerNorm)>,
    output: Linear,
    heads: usize,
}

impl EfficientSelfAttention {
    fn new(vb: VarBuilder, hidden: usize, heads: usize, sr_ratio: usize) -> Result<Self> {
        let vs = vb.pp("self");
        let sr = if sr_ratio > 1 {
            Some((
                Conv2d::new(vs.pp("sr"), hidden, hidden, sr_ratio, Conv2dConfig { padding: 0, stride: sr_ratio })?,
                LayerNorm::new(vs.pp("layer_norm"), hidden, LAYER_NORM_EPS)?,
            ))
        } else {
            None
        };
        Ok(Self {
            query: Linear::new(vs.pp("query"), hidden, hidden, true)?,
            key: Linear::new(vs.pp("key"), hidden, hidden, true)?,
            value: Linear::new(vs.pp("value"), hidden, hidden, true)?,
            sr,
            output: Linear::new(vb.pp("output").pp("dense"), hidden, hidden, true)?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let head_dim = c / self.heads;
        let split = |t: Tensor| -> Result<Tensor> {
            let len = t.dim(1)?;
            t.reshape((b, len, self.heads, head_dim))?.transpose(1, 2)
        };
        let kv_input = match &self.sr {
            Some((conv, norm)) => norm.forward(&map_to_tokens(&conv.forward(&tokens_to_map(x, h, w)?)?)?)?,
            None => x.clone(),
        };
        let q = split(self.query.forward(x)?)?;
        let k = split(self.key.forward(&kv_input)?)?;
        let v = split(self.value.forward(&kv_input)?)?;
        let out = attention(&q, &k, &v, None)?.transpose(1, 2)?.reshape((b, n, c))?;
        self.output.forward(&out)
    }
}

/// Depthwise 3x3 convolution (padding 1) as nine shifted multiply-adds: candle runs a grouped
/// convolution as one convolution per channel, which is slow for thousands of channels.
#[derive(Debug, Clone)]
struct DepthwiseConv3x3 {
    /// `(C, 1, 3, 3)`
    weight: Tensor,
    bias: Tensor,
}

impl DepthwiseConv3x3 {
    fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self { weight: vb.get((channels, 1, 3, 3), "weight")?, bias: vb.get(channels, "bias")? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        let padded = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
        let mut out = self.bias.reshape((1, c, 1, 1))?.broadcast_as(x.shape())?;
        for dy in 0..3 {
            for dx in 0..3 {
                let tap = self.weight.narrow(2, dy, 1)?.narrow(3, dx, 1)?.reshape((1, c, 1, 1))?;
                let shifted = padded.narrow(2, dy, h)?.narrow(3, dx, w)?;
                out = (out + shifted.broadcast_mul(&tap)?)?;
            }
        }
        Ok(out)
    }
}

/// Mix-FFN: linear, depthwise 3x3 convolution (which gives the positional information), GELU, linear.
#[derive(Debug, Clone)]
struct MixFfn {
    dense1: Linear,
    dwconv: DepthwiseConv3x3,
    dense2: Linear,
}

impl MixFfn {
    fn new(vb: VarBuilder, hidden: usize, inner: usize) -> Result<Self> {
        Ok(Self {
            dense1: Linear::new(vb.pp("dense1"), hidden, inner, true)?,
            dwconv: DepthwiseConv3x3::new(vb.pp("dwconv").pp("dwconv"), inner)?,
            dense2: Linear::new(vb.pp("dense2"), inner, hidden, true)?,
        })
    }

    fn forward(&self, x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let x = self.dense1.forward(x)?;
        let x = map_to_tokens(&self.dwconv.forward(&tokens_to_map(&x, h, w)?)?)?;
        self.dense2.forward(&x.gelu_erf()?)
    }
}

/// Pre-norm transformer layer: attention and Mix-FFN, each with a residual connection.
#[derive(Debug, Clone)]
struct SegformerLayer {
    layer_norm_1: LayerNorm,
    attention: EfficientSelfAttention,
    layer_norm_2: LayerNorm,
    mlp: MixFfn,
}

impl SegformerLayer {
    fn new(vb: VarBuilder, hidden: usize, heads: usize, sr_ratio: usize, mlp_ratio: usize) -> Result<Self> {
        Ok(Self {
            layer_norm_1: LayerNorm::new(vb.pp("layer_norm_1"), hidden, LAYER_NORM_EPS)?,
            attention: EfficientSelfAttention::new(vb.pp("attention"), hidden, heads, sr_ratio)?,
            layer_norm_2: LayerNorm::new(vb.pp("layer_norm_2"), hidden, LAYER_NORM_EPS)?,
            mlp: MixFfn::new(vb.pp("mlp"), hidden, hidden * mlp_ratio)?,
        })
    }

    fn forward(&self, x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let x = (self.attention.forward(&self.layer_norm_1.forward(x)?, h, w)? + x)?;
        self.mlp.forward(&self.layer_norm_2.forward(&x)?, h, w)? + x
    }
}

/// One encoder stage: patch embeddings, layers, layer norm; the output is a feature map.
#[derive(Debug, Clone)]
struct Stage {
    patch_embeddings: OverlapPatchEmbeddings,
    blocks: Vec<SegformerLayer>,
    layer_norm: LayerNorm,
}

impl Stage {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (mut x, h, w) = self.patch_embeddings.forward(x)?;
        for block in &self.blocks {
            x = block.forward(&x, h, w)?;
        }
        tokens_to_map(&self.layer_norm.forward(&x)?, h, w)
    }
}

/// All-MLP decode head: each stage projected to `decoder_hidden_size` and upsampled (bilinear) to
/// the first stage's grid, concatenated deepest first, fused by a 1x1 convolution with batch norm
/// (running statistics: eval mode) and ReLU, then classified per pixel.
#[derive(Debug, Clone)]
struct DecodeHead {
    linear_c: Vec<Linear>,
    linear_fuse: candle_nn::Conv2d,
    batch_norm: BatchNorm,
    classifier: Conv2d,
}

impl DecodeHead {
    fn new(vb: VarBuilder, cfg: &SegformerConfig, num_labels: usize) -> Result<Self> {
        let d = cfg.decoder_hidden_size;
        let linear_c = cfg
            .hidden_sizes
            .iter()
            .enumerate()
            .map(|(i, &hidden)| Linear::new(vb.pp("linear_c").pp(i).pp("proj"), hidden, d, true))
            .collect::<Result<Vec<_>>>()?;
        let fuse_in = d * cfg.num_encoder_blocks;
        Ok(Self {
            linear_c,
            linear_fuse: candle_nn::conv2d_no_bias(fuse_in, d, 1, Default::default(), vb.pp("linear_fuse"))?,
            batch_norm: candle_nn::batch_norm(d, BATCH_NORM_EPS, vb.pp("batch_norm"))?,
            classifier: Conv2d::new(vb.pp("classifier"), d, num_labels, 1, Conv2dConfig::default())?,
        })
    }

    fn forward(&self, features: &[Tensor]) -> Result<Tensor> {
        let (_, _, h, w) = features[0].dims4()?;
        let mut projected = Vec::with_capacity(features.len());
        for (feature, linear) in features.iter().zip(&self.linear_c).rev() {
            let (_, _, fh, fw) = feature.dims4()?;
            let map = tokens_to_map(&linear.forward(&map_to_tokens(feature)?)?, fh, fw)?;
            let map = if (fh, fw) == (h, w) { map } else { map.upsample_bilinear2d(h, w, false)? };
            projected.push(map);
        }
        let fused = candle_core::Module::forward(&self.linear_fuse, &Tensor::cat(&projected, 1)?)?;
        let fused = self.batch_norm.forward_t(&fused, false)?.relu()?;
        self.classifier.forward(&fused)
    }
}

/// SegFormer encoder and decode head: pixel values in, class logits at 1/4 resolution out.
#[derive(Debug, Clone)]
pub struct SegformerForSemanticSegmentation {
    stages: Vec<Stage>,
    decode_head: DecodeHead,
    num_labels: usize,
}

impl SegformerForSemanticSegmentation {
    /// Builds the model from a checkpoint with the hub layout (`segformer.*`, `decode_head.*`).
    pub fn new(vb: VarBuilder, cfg: &SegformerConfig) -> Result<Self> {
        cfg.validate()?;
        let num_labels = cfg.class_names()?.len();
        let encoder = vb.pp("segformer").pp("encoder");
        let mut stages = Vec::with_capacity(cfg.num_encoder_blocks);
        for i in 0..cfg.num_encoder_blocks {
            let hidden = cfg.hidden_sizes[i];
            let in_channels = if i == 0 { cfg.num_channels } else { cfg.hidden_sizes[i - 1] };
            let patch_embeddings = OverlapPatchEmbeddings::new(
                encoder.pp("patch_embeddings").pp(i),
                cfg.patch_sizes[i],
                cfg.strides[i],
                in_channels,
                hidden,
            )?;
            let blocks = (0..cfg.depths[i])
                .map(|j| {
                    let vb = encoder.pp("block").pp(i).pp(j);
                    SegformerLayer::new(vb, hidden, cfg.num_attention_heads[i], cfg.sr_ratios[i], cfg.mlp_ratios[i])
                })
                .collect::<Result<Vec<_>>>()?;
            let layer_norm = LayerNorm::new(encoder.pp("layer_norm").pp(i), hidden, LAYER_NORM_EPS)?;
            stages.push(Stage { patch_embeddings, blocks, layer_norm });
        }
        let decode_head = DecodeHead::new(vb.pp("decode_head"), cfg, num_labels)?;
        Ok(Self { stages, decode_head, num_labels })
    }

    /// Number of classes the head predicts.
    pub fn num_labels(&self) -> usize {
        self.num_labels
    }

    /// `(B, 3, H, W)` normalised pixel values -> logits `(B, num_labels, H/4, W/4)` (for a first
    /// stride of 4).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let mut features = Vec::with_capacity(self.stages.len());
        let mut x = pixel_values.clone();
        for stage in &self.stages {
            x = stage.forward(&x)?;
            features.push(x.clone());
        }
        self.decode_head.forward(&features)
    }
}
