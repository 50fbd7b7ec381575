//! `exp` and `erf` for the f32 kernels: branch-free and vectorisable (no calls), accurate far
//! below f32 rounding when computed in f64, where libm's scalar calls would keep the loops from
//! vectorising.

/// `e^x` to about 1e-13 relative for `|x| <= 700` (clamped beyond), without branches or calls:
/// `x = n ln 2 + r`, `|r| <= ln(2) / 2`, `e^r` by its Taylor series to degree 11, `2^n` built
/// in the exponent bits.
#[inline(always)]
pub(super) fn exp_fast(x: f64) -> f64 {
    // Adding 1.5 * 2^52 rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f64 = 6_755_399_441_055_744.0;
    const LN2_HI: f64 = 6.931_471_803_691_238e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    let x = x.clamp(-700.0, 700.0);
    let k = x * std::f64::consts::LOG2_E + ROUND;
    let n = k - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 39_916_800.0;
    for factorial in [3_628_800.0, 362_880.0, 40_320.0, 5_040.0, 720.0, 120.0, 24.0, 6.0, 2.0, 1.0, 1.0] {
        p = p * r + 1.0 / factorial;
    }
    // `n` (two's complement in the low bits of `k`) shifted into the exponent field.
    p * f64::from_bits((k.to_bits() << 52).wrapping_add(1023 << 52))
}

/// `erf(x) / x` as a polynomial in `u = x^2 / 8 - 1` on `|x| <= 4` (a least-squares fit at 200
/// Chebyshev nodes of `[0, 16]` in `x^2`, max error of `erf` 2.5e-9), lowest degree first.
const ERF_POLY: [f64; 18] = [
    0.353_530_996_361_568_7,
    -0.176_576_235_873_080_7,
    0.131_675_001_456_862_6,
    -0.107_710_289_379_435_91,
    0.090_212_042_672_547_29,
    -0.074_730_536_097_508_93,
    0.059_855_993_578_874_084,
    -0.045_744_001_736_530_01,
    0.033_217_001_103_456_57,
    -0.022_563_597_686_665_438,
    0.013_908_146_203_360_923,
    -0.008_382_074_166_124_522,
    0.005_577_363_691_163_23,
    -0.002_911_838_977_258_711_4,
    0.000_616_610_708_557_667_7,
    -0.000_324_302_590_033_131_84,
    0.000_596_425_075_442_104_2,
    -0.000_246_708_823_727_455_06,
];

/// `erf(x)` to 2e-8 absolute, without branches or calls: a polynomial on `|x| <= 4`, and
/// `erf(+-4)` (1 - 1.5e-8) beyond, for the f32 kernels.
#[inline(always)]
pub(super) fn erf_fast(x: f64) -> f64 {
    let x = x.clamp(-4.0, 4.0);
    let u = x * x * 0.125 - 1.0;
    let mut p = ERF_POLY[ERF_POLY.len() - 1];
    for &c in ERF_POLY[..ERF_POLY.len() - 1].iter().rev() {
        p = p * u + c;
    }
    p * x
}

#[cfg(test)]
mod tests {
    use super::{erf_fast, exp_fast};

    #[test]
    fn erf_fast_is_within_1e_7_of_libm() {
        let worst = (-80_000..=80_000)
            .map(|i| i as f64 * 1e-4)
            .map(|x| (erf_fast(x) - candle_core::cpu::erf::erf_f64(x)).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-7, "erf error {worst:e}");
        // And as the f32 kernels use it, rounded to f32, against libm's f32 erf.
        let worst_f32 = (-60_000..=60_000)
            .map(|i| i as f32 * 1e-4)
            .map(|x| (erf_fast(x as f64) as f32 - candle_core::cpu::erf::erf_f32(x)).abs())
            .fold(0.0, f32::max);
        assert!(worst_f32 < 1e-7, "f32 erf error {worst_f32:e}");
    }

    #[test]
    fn exp_fast_matches_exp() {
        let worst = (-70_000..=70_000)
            .map(|i| i as f64 * 1e-2)
            .map(|x| ((exp_fast(x) - x.exp()) / x.exp()).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-13, "exp relative error {worst:e}");
        assert!(exp_fast(-1e4) < 1e-300 && exp_fast(1e4) > 1e300);
    }
}
