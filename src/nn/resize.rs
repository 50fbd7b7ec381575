//! Nearest-neighbour resizing to any size, as PyTorch's `interpolate(mode="nearest")`: the UNet's
//! upsampler resizes to a skip connection's size with it, BiSeNet's context path to the next
//! feature map's.

use candle_core::{Result, Tensor};

/// PyTorch's `interpolate(mode="nearest", size=...)`: output pixel `i` reads input pixel
/// `floor(i * in / out)` (scale in f32). Written as index selects, which back-propagate for any
/// ratio (candle's `upsample_nearest2d` has no backward for non-integer factors).
pub(crate) fn resize_nearest(x: &Tensor, (out_h, out_w): (usize, usize)) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let rows = nearest_indices(h, out_h, x)?;
    let cols = nearest_indices(w, out_w, x)?;
    x.index_select(&rows, 2)?.index_select(&cols, 3)
}

fn nearest_indices(in_size: usize, out_size: usize, like: &Tensor) -> Result<Tensor> {
    let scale = in_size as f32 / out_size as f32;
    let idx: Vec<u32> = (0..out_size).map(|i| ((i as f32 * scale).floor() as usize).min(in_size - 1) as u32).collect();
    Tensor::from_vec(idx, out_size, like.device())
}
