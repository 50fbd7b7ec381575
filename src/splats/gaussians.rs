//! A cloud of 3D Gaussians, parameterised as 3DGS trains them.

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// Gaussians as candle tensors (any float dtype, one device), `N` of them:
///
/// - `means` `[N, 3]`: centres in world coordinates;
/// - `log_scales` `[N, 3]`: the log of the standard deviations along the local axes;
/// - `rotations` `[N, 4]`: quaternions `(w, x, y, z)`, normalised when used;
/// - `opacity_logits` `[N]`: opacity = sigmoid(logit);
/// - `sh_dc` `[N, 3]`: degree-0 spherical-harmonic coefficient per colour channel;
/// - `sh_rest` `[N, K, 3]` with `K = (degree + 1)^2 - 1` (3, 8 or 15), or `None` for degree 0.
#[derive(Debug, Clone)]
pub struct Gaussians {
    pub means: Tensor,
    pub log_scales: Tensor,
    pub rotations: Tensor,
    pub opacity_logits: Tensor,
    pub sh_dc: Tensor,
    pub sh_rest: Option<Tensor>,
}

impl Gaussians {
    /// Checks the shapes against each other and returns the count.
    pub fn len(&self) -> Result<usize> {
        let n = self.means.dims2().map(|(n, _)| n)?;
        let expect = |name: &str, tensor: &Tensor, dims: &[usize]| -> Result<()> {
            if tensor.dims() != dims {
                return Err(Error::Input(format!(
                    "Gaussians: {name} has shape {:?}, expected {dims:?}",
                    tensor.dims()
                )));
            }
            Ok(())
        };
        expect("means", &self.means, &[n, 3])?;
        expect("log_scales", &self.log_scales, &[n, 3])?;
        expect("rotations", &self.rotations, &[n, 4])?;
        expect("opacity_logits", &self.opacity_logits, &[n])?;
        expect("sh_dc", &self.sh_dc, &[n, 3])?;
        if let Some(rest) = &self.sh_rest {
            let k = rest.dims().get(1).copied().unwrap_or(0);
            if ![3, 8, 15].contains(&k) {
                return Err(Error::Input(format!(
                    "Gaussians: {k} higher-order SH coefficients per channel; degrees 1 to 3 have 3, 8 or 15"
                )));
            }
            expect("sh_rest", rest, &[n, k, 3])?;
        }
        Ok(n)
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// The spherical-harmonic degree of the colours (0 to 3).
    pub fn sh_degree(&self) -> usize {
        match self.sh_rest.as_ref().map(|rest| rest.dims()[1]) {
            Some(3) => 1,
            Some(8) => 2,
            Some(15) => 3,
            _ => 0,
        }
    }

    /// The parameters in the order of [`Self::from_parts`].
    pub fn parts(&self) -> Vec<&Tensor> {
        let mut parts = vec![&self.means, &self.log_scales, &self.rotations, &self.opacity_logits, &self.sh_dc];
        parts.extend(self.sh_rest.as_ref());
        parts
    }

    /// Gaussians from parameters in the order of [`Self::parts`].
    pub fn from_parts(mut parts: Vec<Tensor>) -> Result<Self> {
        if !(5..=6).contains(&parts.len()) {
            return Err(Error::Internal(format!("Gaussians from {} tensors, expected 5 or 6", parts.len())));
        }
        let sh_rest = (parts.len() == 6).then(|| parts.pop()).flatten();
        let mut parts = parts.into_iter();
        let mut next = || parts.next().expect("five parts");
        let gaussians = Self {
            means: next(),
            log_scales: next(),
            rotations: next(),
            opacity_logits: next(),
            sh_dc: next(),
            sh_rest,
        };
        gaussians.len()?;
        Ok(gaussians)
    }

    /// Every parameter converted to `dtype` on `device`.
    pub fn to(&self, dtype: DType, device: &Device) -> Result<Self> {
        Self::from_parts(
            self.parts()
                .into_iter()
                .map(|t| t.to_dtype(dtype)?.to_device(device))
                .collect::<candle_core::Result<_>>()?,
        )
    }

    /// The colour whose degree-0 coefficient is `sh`: `SH_C0 sh + 0.5`, and its inverse.
    pub fn rgb_to_sh(rgb: f64) -> f64 {
        (rgb - 0.5) / super::project::SH_C0
    }
}
