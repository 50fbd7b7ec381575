//! The UNet's spatial transformer: `Transformer2DModel` (`diffusers/models/transformers/transformer_2d.py`,
//! continuous input), `BasicTransformerBlock` and `FeedForward` with GEGLU (`attention.py`,
//! `activations.py`), and `Attention` with the default processor (`attention_processor.py`).

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::{self, Conv2d, Conv2dConfig, GroupNorm, LayerNorm, Linear};

/// Multi-head attention without biases on q/k/v (diffusers' `attention_bias: false`) and with
/// a biased output projection `to_out.0`.
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    /// Compute the scores in f32 when the model runs in half precision (`upcast_attention`).
    upcast: bool,
}

impl Attention {
    /// `context_dim` is the width of the key/value input (the query width for self-attention).
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        upcast: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: Linear::new(vb.pp("to_q"), query_dim, inner, false)?,
            to_k: Linear::new(vb.pp("to_k"), context_dim, inner, false)?,
            to_v: Linear::new(vb.pp("to_v"), context_dim, inner, false)?,
            to_out: Linear::new(vb.pp("to_out.0"), inner, query_dim, true)?,
            heads,
            upcast,
        })
    }

    /// `x` (batch, n, query_dim) attends to `context` (batch, m, context_dim), or to itself.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(x);
        let q = self.split_heads(&self.to_q.forward(x)?)?;
        let k = self.split_heads(&self.to_k.forward(context)?)?;
        let v = self.split_heads(&self.to_v.forward(context)?)?;
        let (q, k) = match q.dtype() {
            DType::F16 | DType::BF16 if self.upcast => (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?),
            _ => (q, k),
        };
        let out = nn::attention(&q, &k, &v, None)?;
        let (b, heads, n, head_dim) = out.dims4()?;
        self.to_out.forward(&out.transpose(1, 2)?.reshape((b, n, heads * head_dim))?)
    }

    /// (batch, n, heads * head_dim) -> (batch, heads, n, head_dim)
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, inner) = x.dims3()?;
        x.reshape((b, n, self.heads, inner / self.heads))?.transpose(1, 2)
    }
}

/// `FeedForward` with GEGLU: `net.2(a * gelu(gate))` where `[a, gate] = net.0.proj(x)`, with the
/// exact (erf) GELU as PyTorch's default.
#[derive(Debug, Clone)]
pub struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    pub fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj: Linear::new(vb.pp("net.0.proj"), dim, 2 * inner, true)?,
            out: Linear::new(vb.pp("net.2"), inner, dim, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out.forward(&self.proj.forward_geglu(x)?)
    }
}

/// Self-attention, cross-attention and feed-forward, each pre-normed and residual.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        head_dim: usize,
        cross_attention_dim: usize,
        upcast_attention: bool,
    ) -> Result<Self> {
        let eps = 1e-5;
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), dim, eps)?,
            attn1: Attention::new(vb.pp("attn1"), dim, dim, heads, head_dim, upcast_attention)?,
            norm2: LayerNorm::new(vb.pp("norm2"), dim, eps)?,
            attn2: Attention::new(vb.pp("attn2"), dim, cross_attention_dim, heads, head_dim, upcast_attention)?,
            norm3: LayerNorm::new(vb.pp("norm3"), dim, eps)?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    /// `context` `None`: `attn2` is a second self-attention (diffusers' `double_self_attention`,
    /// as the video UNet's temporal transformers use it; build it with `cross_attention_dim = dim`).
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, context)? + x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + x
    }
}

/// `proj_in` / `proj_out`: a linear layer on (batch, h*w, c) tokens (`use_linear_projection`,
/// SD 2.x) or a 1x1 convolution on (batch, c, h, w) maps (SD 1.x).
#[derive(Debug, Clone)]
enum Projection {
    Linear(Linear),
    Conv(Conv2d),
}

impl Projection {
    fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, linear: bool) -> Result<Self> {
        Ok(if linear {
            Self::Linear(Linear::new(vb, in_dim, out_dim, true)?)
        } else {
            Self::Conv(Conv2d::new(vb, in_dim, out_dim, 1, Conv2dConfig::default())?)
        })
    }
}

/// GroupNorm, projection to tokens, transformer blocks, projection back, plus the input.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

/// Shape of the `Transformer2DModel`s of one UNet block.
#[derive(Debug, Clone, Copy)]
pub struct TransformerSpec {
    pub channels: usize,
    pub heads: usize,
    pub cross_attention_dim: usize,
    pub norm_groups: usize,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
}

impl Transformer2DModel {
    /// `layers`: the number of transformer blocks.
    pub fn new(vb: VarBuilder, spec: &TransformerSpec, layers: usize) -> Result<Self> {
        let c = spec.channels;
        let blocks = (0..layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb.pp(format!("transformer_blocks.{i}")),
                    c,
                    spec.heads,
                    c / spec.heads,
                    spec.cross_attention_dim,
                    spec.upcast_attention,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::new(vb.pp("norm"), spec.norm_groups, c, 1e-6)?,
            proj_in: Projection::new(vb.pp("proj_in"), c, c, spec.use_linear_projection)?,
            transformer_blocks: blocks,
            proj_out: Projection::new(vb.pp("proj_out"), c, c, spec.use_linear_projection)?,
        })
    }

    /// `x` (batch, c, h, w) with cross-attention to `context` (batch, seq, cross_attention_dim).
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        let to_tokens = |t: &Tensor| t.permute((0, 2, 3, 1))?.reshape((b, h * w, c));
        let mut tokens = match &self.proj_in {
            Projection::Linear(l) => l.forward(&to_tokens(&normed)?)?,
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, Some(context))?;
        }
        let to_map = |t: &Tensor| t.reshape((b, h, w, c))?.permute((0, 3, 1, 2));
        let out = match &self.proj_out {
            Projection::Linear(l) => to_map(&l.forward(&tokens)?)?,
            Projection::Conv(conv) => conv.forward(&to_map(&tokens)?.contiguous()?)?,
        };
        out + x
    }
}
