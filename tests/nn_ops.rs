//! The ops of `stableid::nn` against candle's reference ops: forward values, input
//! gradients (against candle's autograd of the plain ops and against central finite
//! differences), no gradient for frozen weights, and candle's autograd when a weight is trainable.

use candle_core::{DType, Device, Tensor, Var, D};
use rand::{rngs::StdRng, Rng, SeedableRng};
use stableid::nn::{self, Conv2dConfig};

/// `|actual - expected| <= tol * max(1, max|expected|)`, in f64 (`common::assert_close`
/// compares in f32).
fn assert_close(actual: &Tensor, expected: &Tensor, tol: f64, what: &str) {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shapes");
    let (a, e) = (actual.to_dtype(DType::F64).unwrap(), expected.to_dtype(DType::F64).unwrap());
    let diff = scalar(&(&a - &e).unwrap().abs().unwrap().max_all().unwrap());
    let scale = scalar(&e.abs().unwrap().max_all().unwrap()).max(1.0);
    assert!(diff <= tol * scale, "{what}: max abs diff {diff:e} exceeds {tol:e} x {scale}");
    eprintln!("{what}: max abs diff {diff:e} (scale {scale})");
}

/// Deterministic standard-normal f64 tensor.
fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let data: Vec<f64> = (0..shape.iter().product()).map(|_| rng.sample(rand_distr::StandardNormal)).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().unwrap()
}

/// `sum(f(inputs) * w)` with a fixed random `w`, so that every output element matters.
fn objective(f: &dyn Fn(&[Tensor]) -> Tensor, inputs: &[Tensor]) -> Tensor {
    let y = f(inputs);
    let w = randn(y.dims(), 99);
    (y * w).unwrap().sum_all().unwrap()
}

/// Checks `op` against `reference` on `inputs` (f64), differentiating w.r.t. the inputs flagged
/// in `tracked`: equal values untracked and tracked, input gradients equal to the reference's
/// autograd and to central finite differences along a random direction, no gradient for
/// `frozen` tensors.
fn check(
    what: &str,
    op: &dyn Fn(&[Tensor]) -> Tensor,
    reference: &dyn Fn(&[Tensor]) -> Tensor,
    inputs: &[Tensor],
    tracked: &[bool],
    frozen: &[&Tensor],
) {
    assert_close(&op(inputs), &reference(inputs), 1e-12, &format!("{what}: untracked forward"));
    let vars: Vec<Option<Var>> =
        inputs.iter().zip(tracked).map(|(t, &tr)| tr.then(|| Var::from_tensor(t).unwrap())).collect();
    let args: Vec<Tensor> =
        inputs.iter().zip(&vars).map(|(t, v)| v.as_ref().map_or(t.clone(), |v| v.as_tensor().clone())).collect();
    assert_close(&op(&args), &reference(&args), 1e-12, &format!("{what}: tracked forward"));

    let grads = objective(op, &args).backward().unwrap();
    let expected = objective(reference, &args).backward().unwrap();
    for frozen in frozen {
        assert!(grads.get(frozen).is_none(), "{what}: a gradient was computed for a frozen tensor");
    }
    for (i, var) in vars.iter().enumerate() {
        let Some(var) = var else { continue };
        let grad = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{what}: no gradient for input {i}"));
        assert_close(
            grad,
            expected.get(var.as_tensor()).unwrap(),
            1e-10,
            &format!("{what}: d/d input {i} vs autograd"),
        );

        let direction = randn(var.dims(), 50 + i as u64);
        let h = 1e-5;
        let moved = |delta: f64| {
            let mut moved = inputs.to_vec();
            moved[i] = (&inputs[i] + (&direction * delta).unwrap()).unwrap();
            scalar(&objective(op, &moved))
        };
        let numeric = (moved(h) - moved(-h)) / (2.0 * h);
        let exact = scalar(&(grad * &direction).unwrap().sum_all().unwrap());
        let rel = (numeric - exact).abs() / exact.abs().max(1e-12);
        eprintln!("{what}: d/d input {i} along a random direction: {exact:.10e}, finite difference {numeric:.10e}");
        assert!(rel < 1e-7, "{what}: input {i}: autograd {exact} vs finite difference {numeric}");
    }
}

fn linear_reference(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
    let y = x.matmul(&w.t().unwrap()).unwrap();
    match b {
        Some(b) => y.broadcast_add(b).unwrap(),
        None => y,
    }
}

#[test]
fn linear_matches_matmul() {
    let (w, b) = (randn(&[5, 7], 1), randn(&[5], 2));
    let x = randn(&[6, 7], 3);
    check(
        "linear",
        &|a| nn::linear(&a[0], &w, Some(&b)).unwrap(),
        &|a| linear_reference(&a[0], &w, Some(&b)),
        std::slice::from_ref(&x),
        &[true],
        &[&w, &b],
    );
    check(
        "linear without bias",
        &|a| nn::linear(&a[0], &w, None).unwrap(),
        &|a| linear_reference(&a[0], &w, None),
        &[x],
        &[true],
        &[&w],
    );
}

#[test]
fn linear_with_trainable_weights_falls_back_to_autograd() {
    let x = randn(&[4, 3], 4);
    let f = |a: &[Tensor]| nn::linear(&a[0], &a[1], Some(&a[2])).unwrap();
    let g = |a: &[Tensor]| linear_reference(&a[0], &a[1], Some(&a[2]));
    check("linear, trainable weight", &f, &g, &[x, randn(&[2, 3], 5), randn(&[2], 6)], &[true, true, true], &[]);
}

fn conv_reference(x: &Tensor, w: &Tensor, b: &Tensor, padding: usize, stride: usize) -> Tensor {
    let y = x.conv2d(w, padding, stride, 1, 1).unwrap();
    y.broadcast_add(&b.reshape((1, b.dim(0).unwrap(), 1, 1)).unwrap()).unwrap()
}

#[test]
fn conv2d_matches_candle_conv2d() {
    // (input h, w, kernel, padding, stride): UNet/VAE 3x3 convs, the UNet's strided downsampler on
    // even and odd sizes, the VAE's unpadded strided one, 1x1 shortcuts, an unpadded 3x3, padding
    // beyond the kernel, an even kernel.
    let cases = [
        (6, 5, 3, 1, 1),
        (6, 8, 3, 1, 2),
        (7, 5, 3, 1, 2),
        (7, 9, 3, 0, 2),
        (5, 4, 1, 0, 1),
        (6, 7, 3, 0, 1),
        (5, 6, 3, 3, 1),
        (6, 6, 2, 3, 2),
    ];
    for (i, &(h, w, k, padding, stride)) in cases.iter().enumerate() {
        let weight = randn(&[4, 3, k, k], 10 + i as u64);
        let bias = randn(&[4], 20 + i as u64);
        let x = randn(&[2, 3, h, w], 30 + i as u64);
        check(
            &format!("conv2d {h}x{w} kernel {k} padding {padding} stride {stride}"),
            &|a| nn::conv2d(&a[0], &weight, Some(&bias), Conv2dConfig { padding, stride }).unwrap(),
            &|a| conv_reference(&a[0], &weight, &bias, padding, stride),
            &[x],
            &[true],
            &[&weight, &bias],
        );
    }
}

#[test]
fn conv2d_gradient_where_candle_conv2d_backward_fails() {
    // Stride 2 on an odd height and an even width: candle's conv2d backward takes one output
    // padding for both axes and fails; the finite differences still hold.
    let (weight, bias) = (randn(&[4, 3, 3, 3], 45), randn(&[4], 46));
    let x = Var::from_tensor(&randn(&[1, 3, 5, 6], 47)).unwrap();
    let f = |x: &Tensor| nn::conv2d(x, &weight, Some(&bias), Conv2dConfig { padding: 1, stride: 2 }).unwrap();
    let reference = |x: &Tensor| conv_reference(x, &weight, &bias, 1, 2);
    assert!(objective(&|a| reference(&a[0]), &[x.as_tensor().clone()]).backward().is_err());
    let grads = objective(&|a| f(&a[0]), &[x.as_tensor().clone()]).backward().unwrap();
    let grad = grads.get(x.as_tensor()).unwrap();
    let direction = randn(&[1, 3, 5, 6], 48);
    let h = 1e-5;
    let moved = |delta: f64| {
        let moved = (x.as_tensor() + (&direction * delta).unwrap()).unwrap();
        scalar(&objective(&|a| reference(&a[0]), &[moved]))
    };
    let numeric = (moved(h) - moved(-h)) / (2.0 * h);
    let exact = scalar(&(grad * &direction).unwrap().sum_all().unwrap());
    assert!((numeric - exact).abs() < 1e-7 * exact.abs(), "autograd {exact} vs finite difference {numeric}");
}

#[test]
fn conv2d_with_trainable_kernel_falls_back_to_autograd() {
    let f = |a: &[Tensor]| nn::conv2d(&a[0], &a[1], Some(&a[2]), Conv2dConfig { padding: 1, stride: 2 }).unwrap();
    let g = |a: &[Tensor]| conv_reference(&a[0], &a[1], &a[2], 1, 2);
    // Sizes where candle's own conv2d backward works: it takes one output padding for both axes,
    // so stride 2 on an odd height and an even width fails there (not with `nn::conv2d`).
    let inputs = [randn(&[1, 2, 5, 7], 40), randn(&[3, 2, 3, 3], 41), randn(&[3], 42)];
    check("conv2d, trainable kernel", &f, &g, &inputs, &[true, true, true], &[]);
}

/// Normalisation from plain candle ops, over the last dimension of `x` viewed as `stats`.
fn norm_reference(x: &Tensor, stats: &[usize], w: &Tensor, b: &Tensor, eps: f64) -> Tensor {
    let xs = x.reshape(stats).unwrap();
    let mean = xs.mean_keepdim(D::Minus1).unwrap();
    let centered = xs.broadcast_sub(&mean).unwrap();
    let var = centered.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    let normed = centered.broadcast_div(&(var + eps).unwrap().sqrt().unwrap()).unwrap();
    normed.reshape(x.shape()).unwrap().broadcast_mul(w).unwrap().broadcast_add(b).unwrap()
}

#[test]
fn group_and_layer_norm_match_their_definitions() {
    let (gw, gb) = (randn(&[6], 60), randn(&[6], 61));
    let (gw4, gb4) = (gw.reshape((1, 6, 1, 1)).unwrap(), gb.reshape((1, 6, 1, 1)).unwrap());
    check(
        "group norm",
        &|a| nn::group_norm(&a[0], 3, &gw, &gb, 1e-5).unwrap(),
        &|a| norm_reference(&a[0], &[2, 3, 2 * 4 * 5], &gw4, &gb4, 1e-5),
        &[randn(&[2, 6, 4, 5], 62)],
        &[true],
        &[&gw, &gb],
    );
    let (lw, lb) = (randn(&[8], 63), randn(&[8], 64));
    check(
        "layer norm",
        &|a| nn::layer_norm(&a[0], &lw, &lb, 1e-5).unwrap(),
        &|a| norm_reference(&a[0], &[2, 3, 8], &lw, &lb, 1e-5),
        &[randn(&[2, 3, 8], 65)],
        &[true],
        &[&lw, &lb],
    );
}

#[test]
fn norms_compute_half_precision_inputs_in_f32() {
    let (w, b) = (randn(&[4], 66).to_dtype(DType::F32).unwrap(), randn(&[4], 67).to_dtype(DType::F32).unwrap());
    let x = randn(&[1, 4, 3, 3], 68).to_dtype(DType::F32).unwrap();
    let expected = nn::group_norm(&x, 2, &w, &b, 1e-6).unwrap();
    let x16 = Var::from_tensor(&x.to_dtype(DType::F16).unwrap()).unwrap();
    let y = nn::group_norm(x16.as_tensor(), 2, &w, &b, 1e-6).unwrap();
    assert_eq!(y.dtype(), DType::F16);
    assert_close(&y, &expected, 1e-2, "group norm, f16 input");
    let grad = y.to_dtype(DType::F32).unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(grad.get(x16.as_tensor()).unwrap().dtype(), DType::F16);
}

/// Attention from plain candle ops (scores scaled after the product, composite softmax).
fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Tensor {
    let scale = 1.0 / (q.dim(D::Minus1).unwrap() as f64).sqrt();
    let scores = (q.contiguous().unwrap().matmul(&k.t().unwrap().contiguous().unwrap()).unwrap() * scale).unwrap();
    let scores = match mask {
        Some(m) => scores.broadcast_add(m).unwrap(),
        None => scores,
    };
    candle_nn::ops::softmax(&scores, D::Minus1).unwrap().matmul(&v.contiguous().unwrap()).unwrap()
}

/// (batch, seq, heads * dim) -> (batch, heads, seq, dim), a strided view as the models pass.
fn heads(x: &Tensor, heads: usize) -> Tensor {
    let (b, n, c) = x.dims3().unwrap();
    x.reshape((b, n, heads, c / heads)).unwrap().transpose(1, 2).unwrap()
}

#[test]
fn attention_matches_softmax_attention() {
    let (q, k, v) = (randn(&[2, 5, 12], 70), randn(&[2, 4, 12], 71), randn(&[2, 4, 12], 72));
    let f = |a: &[Tensor]| nn::attention(&heads(&a[0], 3), &heads(&a[1], 3), &heads(&a[2], 3), None).unwrap();
    let g = |a: &[Tensor]| attention_reference(&heads(&a[0], 3), &heads(&a[1], 3), &heads(&a[2], 3), None);
    let inputs = [q, k, v];
    check("cross-attention", &f, &g, &inputs, &[true, true, true], &[]);
    // The UNet's first cross-attention: the query does not depend on what is learned, the context does.
    check("cross-attention, frozen query", &f, &g, &inputs, &[false, true, true], &[]);
    check("cross-attention, frozen keys and values", &f, &g, &inputs, &[true, false, false], &[]);

    // CLIP's causal self-attention.
    let mask: Vec<f64> =
        (0..6).flat_map(|i| (0..6).map(move |j| if j > i { f64::NEG_INFINITY } else { 0.0 })).collect();
    let mask = Tensor::from_vec(mask, (6, 6), &Device::Cpu).unwrap();
    let x = randn(&[1, 6, 8], 73);
    let f = |a: &[Tensor]| {
        let h = heads(&a[0], 2);
        nn::attention(&h, &h, &h, Some(&mask)).unwrap()
    };
    let g = |a: &[Tensor]| {
        let h = heads(&a[0], 2);
        attention_reference(&h, &h, &h, Some(&mask))
    };
    check("causal self-attention", &f, &g, &[x], &[true], &[&mask]);
}

#[test]
fn add_passes_the_gradient_to_the_tracked_side_only() {
    let b = randn(&[1, 3, 1, 1], 80);
    check(
        "add",
        &|a| nn::add(&a[0], &b).unwrap(),
        &|a| a[0].broadcast_add(&b).unwrap(),
        &[randn(&[2, 3, 2, 2], 81)],
        &[true],
        &[&b],
    );
}

/// `x * Phi(x)` from candle's differentiable `erf` (candle's own `gelu_erf` backward uses
/// 0.398942 for `1 / sqrt(2 pi)`, a relative error of 7e-7).
fn gelu_reference(x: &Tensor) -> Tensor {
    let cdf = (((x * std::f64::consts::FRAC_1_SQRT_2).unwrap().erf().unwrap() + 1.0).unwrap() * 0.5).unwrap();
    (x * cdf).unwrap()
}

#[test]
fn activations_match_their_definitions() {
    // Wide enough for the CPU kernels to split their rows over threads.
    let x = randn(&[2, 3, 150, 160], 90);
    check("silu", &|a| nn::silu(&a[0]).unwrap(), &|a| a[0].silu().unwrap(), std::slice::from_ref(&x), &[true], &[]);
    check("gelu (erf)", &|a| nn::gelu_erf(&a[0]).unwrap(), &|a| gelu_reference(&a[0]), &[x], &[true], &[]);
    let geglu_reference = |h: &Tensor| {
        let half = h.dim(D::Minus1).unwrap() / 2;
        (h.narrow(D::Minus1, 0, half).unwrap() * gelu_reference(&h.narrow(D::Minus1, half, half).unwrap())).unwrap()
    };
    let h = randn(&[2, 300, 64], 91);
    check("geglu", &|a| nn::geglu(&a[0]).unwrap(), &|a| geglu_reference(&a[0]), &[h], &[true], &[]);
}

#[test]
fn activations_in_f32_and_f16() {
    let x = randn(&[4, 6], 92);
    for dtype in [DType::F32, DType::F16] {
        let xv = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
        let grads =
            nn::geglu(xv.as_tensor()).unwrap().to_dtype(DType::F32).unwrap().sum_all().unwrap().backward().unwrap();
        let expected = {
            let xv = Var::from_tensor(&x).unwrap();
            let g = nn::geglu(xv.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
            g.get(xv.as_tensor()).unwrap().clone()
        };
        let grad = grads.get(xv.as_tensor()).unwrap();
        assert_eq!(grad.dtype(), dtype);
        assert_close(
            grad,
            &expected,
            if dtype == DType::F16 { 1e-2 } else { 1e-6 },
            &format!("geglu gradient in {dtype:?}"),
        );
    }
}

#[test]
fn conv2d_input_gradient_of_a_half_precision_input() {
    let (weight, bias) = (randn(&[4, 3, 3, 3], 93), randn(&[4], 94));
    let x = randn(&[1, 3, 6, 5], 95);
    let gradient = |dtype: DType| {
        let xv = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
        let (w, b) = (weight.to_dtype(dtype).unwrap(), bias.to_dtype(dtype).unwrap());
        let y = nn::conv2d(xv.as_tensor(), &w, Some(&b), Conv2dConfig { padding: 1, stride: 2 }).unwrap();
        let grads = y.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
        grads.get(xv.as_tensor()).unwrap().clone()
    };
    let half = gradient(DType::F16);
    assert_eq!(half.dtype(), DType::F16);
    assert_close(&half, &gradient(DType::F64), 1e-2, "conv2d input gradient in f16");
}
