//! MTCNN face detector (Zhang et al., "Joint Face Detection and Alignment Using Multitask Cascaded
//! Convolutional Networks", IEEE SPL 2016) as facenet-pytorch 2.6.0 runs it: the networks of its
//! `models/mtcnn.py` (`PNet`, `RNet`, `ONet`).
//!
//! Module names are those of facenet-pytorch's state dicts (`conv1`, `prelu1`, `dense5_1`, ...),
//! under `pnet.`, `rnet.` and `onet.` in `assets/mtcnn.safetensors` (written by
//! `tools/reference/convert_mtcnn.py` from the weights the facenet-pytorch wheel ships;
//! `assets/MTCNN-LICENSE.txt`). [`Mtcnn::detect`] is `MTCNN.detect` with its defaults
//! (`models/utils/detect_face.py`'s `detect_face`), computed in f32 as there, with these
//! deviations:
//!
//! - P-Net runs on each pyramid level in bands of rows (the same outputs, bounded memory), and the
//!   levels are resized from the 8-bit photo band by band, never held whole;
//! - a box entirely outside the photo after a refinement is dropped (facenet-pytorch fails);
//! - a photo whose short side is under `min_face_size` gives no face (facenet-pytorch fails);
//! - equal scores are ordered by index (stable sorts) where NumPy's `argsort` leaves it open.
//!
//! The convolutions and dense layers are [`crate::nn`] layers; PReLU, the ceil-mode max pools and
//! the two-way softmax are computed here on the values, in one pass each (the detector is never
//! differentiated).

use std::ops::Range;

use candle_core::{DType, Device, Result, Storage, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;
use rayon::prelude::*;

use crate::nn::{Conv2d, Conv2dConfig, Linear};

/// The weights of the three networks, shipped in the repository and built into the binary.
const WEIGHTS: &[u8] = include_bytes!("../../assets/mtcnn.safetensors");

fn conv(vb: VarBuilder, c_in: usize, c_out: usize, kernel: usize) -> Result<Conv2d> {
    Conv2d::new(vb, c_in, c_out, kernel, Conv2dConfig::default())
}

/// Calls `f` with the values of the f32 tensor `x` in row-major order, read in place when `x` is
/// a contiguous CPU tensor.
fn with_values<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    if x.device().is_cpu() && x.is_contiguous() {
        let (storage, layout) = x.storage_and_layout();
        if let Storage::Cpu(cpu) = &*storage {
            return Ok(f(&cpu.as_slice::<f32>()?[layout.start_offset()..][..x.elem_count()]));
        }
    }
    Ok(f(&x.flatten_all()?.to_vec1::<f32>()?))
}

/// `torch.nn.PReLU(channels)`: `x` where `x > 0`, else `weight[c] * x`, on the channel axis 1 of
/// (batch, channels, ...) inputs.
#[derive(Debug, Clone)]
struct PRelu {
    weight: Vec<f32>,
}

impl PRelu {
    fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self { weight: vb.get(channels, "weight")?.to_vec1()? })
    }

    fn at(&self, plane: usize, v: f32) -> f32 {
        if v < 0.0 {
            v * self.weight[plane % self.weight.len()]
        } else {
            v
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let plane = x.elem_count() / (x.dim(0)? * self.weight.len()).max(1);
        let values = with_values(x, |values| {
            let mut out = vec![0f32; values.len()];
            out.par_chunks_mut(plane.max(1))
                .zip(values.par_chunks(plane.max(1)))
                .enumerate()
                .for_each(|(i, (out, values))| out.iter_mut().zip(values).for_each(|(o, &v)| *o = self.at(i, v)));
            out
        })?;
        Tensor::from_vec(values, x.shape(), x.device())
    }

    /// `MaxPool2d(kernel, stride, ceil_mode=True)` (no padding) of [`Self::forward`], in one pass
    /// over (batch, channels, h, w) inputs: `ceil((len - kernel) / stride) + 1` windows per axis,
    /// the last ones clipped to the input.
    fn forward_pooled(&self, x: &Tensor, kernel: usize, stride: usize) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let windows = |len: usize| (len - kernel).div_ceil(stride) + 1;
        let (oh, ow) = (windows(h), windows(w));
        let values = with_values(x, |values| {
            let mut out = vec![0f32; b * c * oh * ow];
            out.par_chunks_mut(oh * ow).zip(values.par_chunks(h * w)).enumerate().for_each(|(i, (out, plane))| {
                for (oy, out_row) in out.chunks_exact_mut(ow).enumerate() {
                    let rows = oy * stride..(oy * stride + kernel).min(h);
                    for (ox, o) in out_row.iter_mut().enumerate() {
                        let columns = ox * stride..(ox * stride + kernel).min(w);
                        let max = rows.clone().flat_map(|y| &plane[y * w..][columns.clone()]);
                        *o = max.fold(f32::NEG_INFINITY, |m, &v| m.max(self.at(i, v)));
                    }
                }
            });
            out
        })?;
        Tensor::from_vec(values, (b, c, oh, ow), x.device())
    }
}

/// `softmax(x, dim=1)` of (batch, 2, ...) logits, each pair computed as PyTorch does (the
/// larger subtracted, exponentials over their sum) in one pass over the values.
fn softmax_pairs(x: &Tensor) -> Result<Tensor> {
    let plane = (x.elem_count() / (2 * x.dim(0)?).max(1)).max(1);
    let out = with_values(x, |values| {
        let mut out = vec![0f32; values.len()];
        out.par_chunks_mut(2 * plane).zip(values.par_chunks(2 * plane)).for_each(|(out, logits)| {
            let (l0, l1) = logits.split_at(plane);
            let (p0, p1) = out.split_at_mut(plane);
            for (((p0, p1), &a), &b) in p0.iter_mut().zip(p1).zip(l0).zip(l1) {
                let m = a.max(b);
                let (ea, eb) = ((a - m).exp(), (b - m).exp());
                (*p0, *p1) = (ea / (ea + eb), eb / (ea + eb));
            }
        });
        out
    })?;
    Tensor::from_vec(out, x.shape(), x.device())
}

/// The flattening before the dense layers: facenet-pytorch permutes (batch, c, h, w) to
/// (batch, w, h, c) first, the order of the original Caffe / TensorFlow weights.
fn flatten_whc(x: &Tensor) -> Result<Tensor> {
    x.permute((0, 3, 2, 1))?.contiguous()?.flatten_from(1)
}

/// Proposal network: fully convolutional, one 12x12 window every 2 pixels.
#[derive(Debug, Clone)]
pub struct PNet {
    conv1: Conv2d,
    prelu1: PRelu,
    conv2: Conv2d,
    prelu2: PRelu,
    conv3: Conv2d,
    prelu3: PRelu,
    conv4_1: Conv2d,
    conv4_2: Conv2d,
}

impl PNet {
    pub fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv1: conv(vb.pp("conv1"), 3, 10, 3)?,
            prelu1: PRelu::new(vb.pp("prelu1"), 10)?,
            conv2: conv(vb.pp("conv2"), 10, 16, 3)?,
            prelu2: PRelu::new(vb.pp("prelu2"), 16)?,
            conv3: conv(vb.pp("conv3"), 16, 32, 3)?,
            prelu3: PRelu::new(vb.pp("prelu3"), 32)?,
            conv4_1: conv(vb.pp("conv4_1"), 32, 2, 1)?,
            conv4_2: conv(vb.pp("conv4_2"), 32, 4, 1)?,
        })
    }

    /// `x` (batch, 3, h, w), normalised pixels, with h, w >= 12. Returns the box regression
    /// (batch, 4, h', w') and the probabilities (batch, 2, h', w') of (no face, face), where
    /// `h' = ceil((h - 2) / 2) - 4`.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = self.prelu1.forward_pooled(&self.conv1.forward(x)?, 2, 2)?;
        let x = self.prelu2.forward(&self.conv2.forward(&x)?)?;
        let x = self.prelu3.forward(&self.conv3.forward(&x)?)?;
        let prob = softmax_pairs(&self.conv4_1.forward(&x)?)?;
        Ok((self.conv4_2.forward(&x)?, prob))
    }
}

/// Refinement network on 24x24 crops.
#[derive(Debug, Clone)]
pub struct RNet {
    conv1: Conv2d,
    prelu1: PRelu,
    conv2: Conv2d,
    prelu2: PRelu,
    conv3: Conv2d,
    prelu3: PRelu,
    dense4: Linear,
    prelu4: PRelu,
    dense5_1: Linear,
    dense5_2: Linear,
}

impl RNet {
    pub fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv1: conv(vb.pp("conv1"), 3, 28, 3)?,
            prelu1: PRelu::new(vb.pp("prelu1"), 28)?,
            conv2: conv(vb.pp("conv2"), 28, 48, 3)?,
            prelu2: PRelu::new(vb.pp("prelu2"), 48)?,
            conv3: conv(vb.pp("conv3"), 48, 64, 2)?,
            prelu3: PRelu::new(vb.pp("prelu3"), 64)?,
            dense4: Linear::new(vb.pp("dense4"), 576, 128, true)?,
            prelu4: PRelu::new(vb.pp("prelu4"), 128)?,
            dense5_1: Linear::new(vb.pp("dense5_1"), 128, 2, true)?,
            dense5_2: Linear::new(vb.pp("dense5_2"), 128, 4, true)?,
        })
    }

    /// `x` (batch, 3, 24, 24), normalised pixels. Returns the box regression (batch, 4) and the
    /// probabilities (batch, 2) of (no face, face).
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = self.prelu1.forward_pooled(&self.conv1.forward(x)?, 3, 2)?;
        let x = self.prelu2.forward_pooled(&self.conv2.forward(&x)?, 3, 2)?;
        let x = self.prelu3.forward(&self.conv3.forward(&x)?)?;
        let x = self.prelu4.forward(&self.dense4.forward(&flatten_whc(&x)?)?)?;
        let prob = softmax_pairs(&self.dense5_1.forward(&x)?)?;
        Ok((self.dense5_2.forward(&x)?, prob))
    }
}

/// Output network on 48x48 crops, with the five landmarks.
#[derive(Debug, Clone)]
pub struct ONet {
    conv1: Conv2d,
    prelu1: PRelu,
    conv2: Conv2d,
    prelu2: PRelu,
    conv3: Conv2d,
    prelu3: PRelu,
    conv4: Conv2d,
    prelu4: PRelu,
    dense5: Linear,
    prelu5: PRelu,
    dense6_1: Linear,
    dense6_2: Linear,
    dense6_3: Linear,
}

impl ONet {
    pub fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv1: conv(vb.pp("conv1"), 3, 32, 3)?,
            prelu1: PRelu::new(vb.pp("prelu1"), 32)?,
            conv2: conv(vb.pp("conv2"), 32, 64, 3)?,
            prelu2: PRelu::new(vb.pp("prelu2"), 64)?,
            conv3: conv(vb.pp("conv3"), 64, 64, 3)?,
            prelu3: PRelu::new(vb.pp("prelu3"), 64)?,
            conv4: conv(vb.pp("conv4"), 64, 128, 2)?,
            prelu4: PRelu::new(vb.pp("prelu4"), 128)?,
            dense5: Linear::new(vb.pp("dense5"), 1152, 256, true)?,
            prelu5: PRelu::new(vb.pp("prelu5"), 256)?,
            dense6_1: Linear::new(vb.pp("dense6_1"), 256, 2, true)?,
            dense6_2: Linear::new(vb.pp("dense6_2"), 256, 4, true)?,
            dense6_3: Linear::new(vb.pp("dense6_3"), 256, 10, true)?,
        })
    }

    /// `x` (batch, 3, 48, 48), normalised pixels. Returns, in facenet-pytorch's order, the box
    /// regression (batch, 4), the landmarks (batch, 10: five x then five y, as fractions of the
    /// crop) and the probabilities (batch, 2) of (no face, face).
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let x = self.prelu1.forward_pooled(&self.conv1.forward(x)?, 3, 2)?;
        let x = self.prelu2.forward_pooled(&self.conv2.forward(&x)?, 3, 2)?;
        let x = self.prelu3.forward_pooled(&self.conv3.forward(&x)?, 2, 2)?;
        let x = self.prelu4.forward(&self.conv4.forward(&x)?)?;
        let x = self.prelu5.forward(&self.dense5.forward(&flatten_whc(&x)?)?)?;
        let prob = softmax_pairs(&self.dense6_1.forward(&x)?)?;
        Ok((self.dense6_2.forward(&x)?, self.dense6_3.forward(&x)?, prob))
    }
}

/// The three networks, and [`Mtcnn::detect`], which runs them.
#[derive(Debug, Clone)]
pub struct Mtcnn {
    pub pnet: PNet,
    pub rnet: RNet,
    pub onet: ONet,
    device: Device,
}

impl Mtcnn {
    /// From weights named as in `assets/mtcnn.safetensors` (`pnet.*`, `rnet.*`, `onet.*`).
    pub fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            pnet: PNet::new(vb.pp("pnet"))?,
            rnet: RNet::new(vb.pp("rnet"))?,
            onet: ONet::new(vb.pp("onet"))?,
            device: vb.device().clone(),
        })
    }

    /// With the weights built into the binary (`assets/mtcnn.safetensors`), in f32.
    pub fn shipped(device: &Device) -> Result<Self> {
        Self::new(VarBuilder::from_buffered_safetensors(WEIGHTS.to_vec(), DType::F32, device)?)
    }
}
/// Settings of [`Mtcnn::detect`]; the defaults are facenet-pytorch's `MTCNN()`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectConfig {
    /// The smallest face searched for, in pixels: the first pyramid level scales the photo by
    /// `12 / min_face_size`.
    pub min_face_size: f64,
    /// Face probability thresholds of P-Net (`>=`), R-Net and O-Net (`>`).
    pub thresholds: [f32; 3],
    /// Scale between pyramid levels.
    pub factor: f64,
}

impl Default for DetectConfig {
    fn default() -> Self {
        Self { min_face_size: 20.0, thresholds: [0.6, 0.7, 0.7], factor: 0.709 }
    }
}

/// A detected face, in pixel coordinates of the photo (facenet-pytorch's convention: a pixel's
/// centre is at integer coordinates, boxes are not clipped to the photo).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Face {
    /// `[x1, y1, x2, y2]` (facenet-pytorch's `box`; `box` is a Rust keyword).
    pub bbox: [f32; 4],
    /// O-Net's face probability.
    pub score: f32,
    /// `[x, y]` of the image-left eye, the image-right eye, the nose, the image-left and the
    /// image-right mouth corner.
    pub landmarks: [[f32; 2]; 5],
}

impl Face {
    /// `(x2 - x1) * (y2 - y1)`, the size faces are ordered by.
    pub fn area(&self) -> f32 {
        (self.bbox[2] - self.bbox[0]) * (self.bbox[3] - self.bbox[1])
    }
}

/// P-Net input pixels per pyramid band (see [`Mtcnn::proposals`]): bounds the memory of one level
/// (about 40 bytes per pixel: the pixels and P-Net's first activations) whatever the photo's size.
const BAND_PIXELS: usize = 1 << 18;

/// R-Net and O-Net batch size (facenet-pytorch's `fixed_batch_process`).
const BATCH: usize = 512;

/// A box with its score and the box regression that refines it.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    bbox: [f32; 4],
    score: f32,
    reg: [f32; 4],
}

/// How [`nms`] measures the overlap of two boxes.
#[derive(Debug, Clone, Copy)]
enum Overlap {
    /// torchvision's `nms`: intersection over union, areas `(x2 - x1) * (y2 - y1)`.
    Union,
    /// facenet-pytorch's `nms_numpy(..., 'Min')`: intersection over the smaller area, both
    /// measured with `+ 1` (`(x2 - x1 + 1) * (y2 - y1 + 1)`).
    Min,
}

/// Greedy non-maximum suppression: visits the boxes by decreasing score (stable order for equal
/// scores) and keeps each one whose overlap with every box kept so far is at most `threshold`.
/// Returns the indices kept, by decreasing score.
fn nms(candidates: &[Candidate], threshold: f32, overlap: Overlap) -> Vec<usize> {
    let one = match overlap {
        Overlap::Union => 0.0,
        Overlap::Min => 1.0,
    };
    let area = |b: &[f32; 4]| (b[2] - b[0] + one) * (b[3] - b[1] + one);
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by(|&a, &b| candidates[b].score.total_cmp(&candidates[a].score));
    let mut keep: Vec<usize> = Vec::new();
    for i in order {
        let a = &candidates[i].bbox;
        let suppressed = keep.iter().any(|&k| {
            let b = &candidates[k].bbox;
            let w = (a[2].min(b[2]) - a[0].max(b[0]) + one).max(0.0);
            let h = (a[3].min(b[3]) - a[1].max(b[1]) + one).max(0.0);
            let inter = w * h;
            let ratio = match overlap {
                Overlap::Union => inter / (area(a) + area(b) - inter),
                Overlap::Min => inter / area(a).min(area(b)),
            };
            ratio > threshold
        });
        if !suppressed {
            keep.push(i);
        }
    }
    keep
}

/// facenet-pytorch's `rerec`: the square of side `max(w, h)` with the box's centre.
fn square(b: [f32; 4]) -> [f32; 4] {
    let (w, h) = (b[2] - b[0], b[3] - b[1]);
    let l = w.max(h);
    let x1 = b[0] + w * 0.5 - l * 0.5;
    let y1 = b[1] + h * 0.5 - l * 0.5;
    [x1, y1, x1 + l, y1 + l]
}

/// facenet-pytorch's `bbreg`: moves each side by the regression times the size `x2 - x1 + 1`.
fn regress(b: [f32; 4], reg: [f32; 4]) -> [f32; 4] {
    let (w, h) = (b[2] - b[0] + 1.0, b[3] - b[1] + 1.0);
    [b[0] + reg[0] * w, b[1] + reg[1] * h, b[2] + reg[2] * w, b[3] + reg[3] * h]
}

/// A rectangle of photo pixels: rows `y0..y1`, columns `x0..x1`.
#[derive(Debug, Clone, Copy)]
struct Region {
    x0: usize,
    y0: usize,
    x1: usize,
    y1: usize,
}

/// facenet-pytorch's `pad`: the pixels a box covers, `x1 - 1 .. x2` after truncating the
/// coordinates and clipping them to the photo; `None` for a box outside it.
fn crop_region(b: [f32; 4], width: usize, height: usize) -> Option<Region> {
    let (x, y) = ((b[0].trunc() as i64).max(1), (b[1].trunc() as i64).max(1));
    let (ex, ey) = ((b[2].trunc() as i64).min(width as i64), (b[3].trunc() as i64).min(height as i64));
    (ey > y - 1 && ex > x - 1).then(|| Region {
        x0: x as usize - 1,
        y0: y as usize - 1,
        x1: ex as usize,
        y1: ey as usize,
    })
}

/// The input pixels `floor(i * len_in / len_out) .. ceil((i + 1) * len_in / len_out)` that output
/// pixel `i` averages (PyTorch's adaptive average pooling).
fn area_window(i: usize, len_in: usize, len_out: usize) -> (usize, usize) {
    (i * len_in / len_out, ((i + 1) * len_in).div_ceil(len_out))
}

/// Resizes `region` of the photo to `out_h` x `out_w` as `interpolate(mode="area")` does (each
/// output pixel is the mean of its [`area_window`]s), keeps the output rows `rows`, and normalises
/// them as facenet-pytorch does, `(x - 127.5) * 0.0078125`. Returns (3, rows, out_w) values.
///
/// The window sums are exact integers, divided by the window height then width in f32 as PyTorch
/// does, so the values are PyTorch's where its f32 sums are exact (windows of up to 65,000 pixels).
fn area_resize(image: &RgbImage, region: Region, out_h: usize, out_w: usize, rows: Range<usize>) -> Vec<f32> {
    let stride = image.width() as usize * 3;
    let (in_h, in_w) = (region.y1 - region.y0, region.x1 - region.x0);
    let columns: Vec<(usize, usize)> = (0..out_w).map(|j| area_window(j, in_w, out_w)).collect();
    // Output rows (3 channels of out_w values) in parallel, each summing its window of input
    // rows; tasks of at least about 64K input samples.
    let samples_per_row = in_w * 3 * in_h.div_ceil(out_h);
    let resized_rows: Vec<Vec<f32>> = rows
        .into_par_iter()
        .with_min_len((1 << 16) / samples_per_row.max(1))
        .map_init(
            || vec![0u32; in_w * 3],
            |sums, i| {
                let (y0, y1) = area_window(i, in_h, out_h);
                sums.fill(0);
                for y in region.y0 + y0..region.y0 + y1 {
                    let row = &image.as_raw()[y * stride + region.x0 * 3..][..in_w * 3];
                    for (s, &v) in sums.iter_mut().zip(row) {
                        *s += u32::from(v);
                    }
                }
                let mut out = vec![0f32; 3 * out_w];
                for (j, &(x0, x1)) in columns.iter().enumerate() {
                    for c in 0..3 {
                        let sum: u32 = (x0..x1).map(|x| sums[x * 3 + c]).sum();
                        let mean = sum as f32 / (y1 - y0) as f32 / (x1 - x0) as f32;
                        out[c * out_w + j] = (mean - 127.5) * 0.0078125;
                    }
                }
                out
            },
        )
        .collect();
    // (rows, 3, out_w) to (3, rows, out_w).
    let n = resized_rows.len();
    let mut out = vec![0f32; 3 * n * out_w];
    for (r, row) in resized_rows.iter().enumerate() {
        for (c, channel) in row.chunks_exact(out_w).enumerate() {
            out[(c * n + r) * out_w..][..out_w].copy_from_slice(channel);
        }
    }
    out
}

impl Mtcnn {
    /// Detects faces as facenet-pytorch's `MTCNN(...).detect(image, landmarks=True)` does, with
    /// `select_largest=True`: faces are returned largest box first (by [`Face::area`]); an empty
    /// list when there is none.
    ///
    /// 1. Pyramid: scales `12 / min_face_size * factor^k` while the scaled short side is at least
    ///    12 px; each level is the photo area-resized to `int(h * scale + 1)` x `int(w * scale + 1)`.
    ///    P-Net proposes a 12x12 cell every 2 px where its probability is at least
    ///    `thresholds[0]`; NMS 0.5 per level, then NMS 0.7 over all levels; box regression
    ///    (by `x2 - x1`), squaring.
    /// 2. R-Net on the 24x24 area-resized crops of the boxes (clipped to the photo, not padded);
    ///    probability above `thresholds[1]`, NMS 0.7, box regression (by `x2 - x1 + 1`), squaring.
    /// 3. O-Net on 48x48 crops; probability above `thresholds[2]`; landmarks
    ///    `x = (x2 - x1 + 1) * p + x1 - 1` on the box before regression; box regression; NMS 0.7
    ///    on the smaller area.
    pub fn detect(&self, image: &RgbImage, config: &DetectConfig) -> Result<Vec<Face>> {
        let (width, height) = (image.width() as usize, image.height() as usize);
        let [t1, t2, t3] = config.thresholds;

        // Stage 1.
        let mut candidates = Vec::new();
        let mut scale = 12.0 / config.min_face_size;
        let mut short_side = width.min(height) as f64 * scale;
        while short_side >= 12.0 {
            let level = self.proposals(image, scale, t1)?;
            candidates.extend(nms(&level, 0.5, Overlap::Union).into_iter().map(|i| level[i]));
            scale *= config.factor;
            short_side *= config.factor;
        }
        let candidates: Vec<Candidate> = nms(&candidates, 0.7, Overlap::Union)
            .into_iter()
            .map(|i| {
                let Candidate { bbox: b, score, reg } = candidates[i];
                let (w, h) = (b[2] - b[0], b[3] - b[1]);
                let moved = [b[0] + reg[0] * w, b[1] + reg[1] * h, b[2] + reg[2] * w, b[3] + reg[3] * h];
                Candidate { bbox: square(moved), score, reg }
            })
            .collect();

        // Stage 2.
        let (candidates, regions) = Self::regions(candidates, width, height);
        let mut refined = Vec::new();
        for (chunk, regions) in candidates.chunks(BATCH).zip(regions.chunks(BATCH)) {
            let (reg, prob) = self.rnet.forward(&self.crops(image, regions, 24)?)?;
            let (reg, prob) = (reg.to_vec2::<f32>()?, prob.to_vec2::<f32>()?);
            for ((c, reg), prob) in chunk.iter().zip(reg).zip(prob) {
                if prob[1] > t2 {
                    refined.push(Candidate { bbox: c.bbox, score: prob[1], reg: [reg[0], reg[1], reg[2], reg[3]] });
                }
            }
        }
        let candidates: Vec<Candidate> = nms(&refined, 0.7, Overlap::Union)
            .into_iter()
            .map(|i| Candidate { bbox: square(regress(refined[i].bbox, refined[i].reg)), ..refined[i] })
            .collect();

        // Stage 3.
        let (candidates, regions) = Self::regions(candidates, width, height);
        let mut outputs = Vec::new();
        let mut landmarks = Vec::new();
        for (chunk, regions) in candidates.chunks(BATCH).zip(regions.chunks(BATCH)) {
            let (reg, points, prob) = self.onet.forward(&self.crops(image, regions, 48)?)?;
            let (reg, points, prob) = (reg.to_vec2::<f32>()?, points.to_vec2::<f32>()?, prob.to_vec2::<f32>()?);
            for (((c, reg), p), prob) in chunk.iter().zip(reg).zip(points).zip(prob) {
                if prob[1] > t3 {
                    let b = c.bbox;
                    let (w, h) = (b[2] - b[0] + 1.0, b[3] - b[1] + 1.0);
                    landmarks.push(std::array::from_fn(|k| [w * p[k] + b[0] - 1.0, h * p[k + 5] + b[1] - 1.0]));
                    let reg = [reg[0], reg[1], reg[2], reg[3]];
                    outputs.push(Candidate { bbox: regress(b, reg), score: prob[1], reg });
                }
            }
        }
        let mut faces: Vec<Face> = nms(&outputs, 0.7, Overlap::Min)
            .into_iter()
            .map(|i| Face { bbox: outputs[i].bbox, score: outputs[i].score, landmarks: landmarks[i] })
            .collect();
        faces.sort_by(|a, b| b.area().total_cmp(&a.area()));
        Ok(faces)
    }

    /// P-Net's proposals on one pyramid level, in row-major order of their cells: boxes
    /// `floor((2 * cell + 1) / scale) .. floor((2 * cell + 12) / scale)` (facenet-pytorch's
    /// `generateBoundingBox`, in f32), with their probability and regression.
    ///
    /// The level is resized and run through P-Net in bands of output rows, each with the input
    /// rows its cells see (P-Net is fully convolutional: cell row `r` sees input rows
    /// `2r .. 2r + 12`), which gives the outputs of the whole level with bounded memory.
    fn proposals(&self, image: &RgbImage, scale: f64, threshold: f32) -> Result<Vec<Candidate>> {
        let level_h = (image.height() as f64 * scale + 1.0) as usize;
        let level_w = (image.width() as f64 * scale + 1.0) as usize;
        let out_h = (level_h - 2).div_ceil(2) - 4;
        let band = (BAND_PIXELS / (2 * level_w)).max(1);
        let whole = Region { x0: 0, y0: 0, x1: image.width() as usize, y1: image.height() as usize };
        let scale = scale as f32;
        let mut found = Vec::new();
        for r0 in (0..out_h).step_by(band) {
            let r1 = (r0 + band).min(out_h);
            let rows = 2 * r0..if r1 == out_h { level_h } else { 2 * (r1 - 1) + 12 };
            let pixels = area_resize(image, whole, level_h, level_w, rows.clone());
            let x = Tensor::from_vec(pixels, (1, 3, rows.len(), level_w), &self.device)?;
            let (reg, prob) = self.pnet.forward(&x)?;
            let (reg, prob) = (reg.squeeze(0)?.to_vec3::<f32>()?, prob.get(0)?.get(1)?.to_vec2::<f32>()?);
            for (dy, row) in prob.iter().enumerate() {
                for (x, &p) in row.iter().enumerate() {
                    if p >= threshold {
                        let (cx, cy) = (x as f32, (r0 + dy) as f32);
                        let corner = |v: f32, offset: f32| ((2.0 * v + offset) / scale).floor();
                        found.push(Candidate {
                            bbox: [corner(cx, 1.0), corner(cy, 1.0), corner(cx, 12.0), corner(cy, 12.0)],
                            score: p,
                            reg: std::array::from_fn(|k| reg[k][dy][x]),
                        });
                    }
                }
            }
        }
        Ok(found)
    }

    /// The candidates whose box covers photo pixels, with those pixels. (facenet-pytorch skips
    /// the crop of a box outside the photo and then fails on the count mismatch; such a box is
    /// dropped here.)
    fn regions(candidates: Vec<Candidate>, width: usize, height: usize) -> (Vec<Candidate>, Vec<Region>) {
        candidates.into_iter().filter_map(|c| crop_region(c.bbox, width, height).map(|r| (c, r))).unzip()
    }

    /// The regions area-resized to `size` x `size` and normalised: (regions, 3, size, size).
    fn crops(&self, image: &RgbImage, regions: &[Region], size: usize) -> Result<Tensor> {
        let crops: Vec<Vec<f32>> = regions.par_iter().map(|&r| area_resize(image, r, size, size, 0..size)).collect();
        let pixels = crops.concat();
        Tensor::from_vec(pixels, (regions.len(), 3, size, size), &self.device)
    }
}
