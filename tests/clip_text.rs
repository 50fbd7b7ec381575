//! CLIP text encoder against transformers (fixture from tools/reference/clip_text_vae.py), and
//! its gradient with respect to the placeholder embeddings against finite differences.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::VarBuilder;
use common::{assert_close, fixture, load_config, load_tensors, max_abs_diff, var_builder};
use stableid::models::clip_text::{ClipTextConfig, ClipTextModel};

const WEIGHTS: &str = "tiny-sd/text_encoder/model.safetensors";

fn config() -> ClipTextConfig {
    load_config("tiny-sd/text_encoder/config.json")
}

fn load(dtype: DType) -> ClipTextModel {
    ClipTextModel::new(var_builder(&fixture(WEIGHTS), dtype), &config()).unwrap()
}

/// The fixture's ids (u32) and placeholder rows.
fn inputs(t: &HashMap<String, Tensor>) -> (Tensor, Tensor) {
    (t["ids"].to_dtype(DType::U32).unwrap(), t["extra"].clone())
}

#[test]
fn matches_transformers_with_placeholders() {
    let t = load_tensors("parity/clip_text.safetensors");
    let (ids, extra) = inputs(&t);
    let out = load(DType::F32).forward(&ids, Some(&extra)).unwrap();
    assert_close(&out, &t["output"], 1e-4, "last_hidden_state");
}

#[test]
fn matches_transformers_with_randomised_norms_and_biases() {
    let t = load_tensors("parity/clip_text.safetensors");
    let mut weights = load_tensors(WEIGHTS);
    for (name, value) in &t {
        if let Some(weight) = name.strip_prefix("perturbed.") {
            assert!(weights.insert(weight.to_string(), value.clone()).is_some(), "no weight {weight}");
        }
    }
    let model = ClipTextModel::new(VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu), &config()).unwrap();
    let (ids, extra) = inputs(&t);
    let out = model.forward(&ids, Some(&extra)).unwrap();
    assert_close(&out, &t["perturbed_output"], 1e-4, "last_hidden_state, perturbed weights");
}

#[test]
fn placeholders_take_rows_of_extra() {
    let model = load(DType::F32);
    let vocab = model.config().vocab_size as u32;
    let ids = Tensor::new(&[[5u32, vocab + 1, vocab, 7]], &Device::Cpu).unwrap();
    let extra = Tensor::new(&[[1f32; 32], [2f32; 32]], &Device::Cpu).unwrap();
    let emb = model.embed_tokens(&ids, Some(&extra)).unwrap().squeeze(0).unwrap();
    let table = model.token_embedding();
    assert_eq!(max_abs_diff(&emb.i(0).unwrap(), &table.i(5).unwrap()), 0.0);
    assert_eq!(max_abs_diff(&emb.i(1).unwrap(), &extra.i(1).unwrap()), 0.0);
    assert_eq!(max_abs_diff(&emb.i(2).unwrap(), &extra.i(0).unwrap()), 0.0);
    assert_eq!(max_abs_diff(&emb.i(3).unwrap(), &table.i(7).unwrap()), 0.0);
}

#[test]
fn ids_beyond_the_vocabulary_and_extra_rows_are_errors() {
    let model = load(DType::F32);
    let vocab = model.config().vocab_size as u32;
    let extra = Tensor::zeros((2, 32), DType::F32, &Device::Cpu).unwrap();
    let ids = |id: u32| Tensor::new(&[[1u32, id, 2]], &Device::Cpu).unwrap();
    assert!(model.forward(&ids(vocab), None).is_err());
    assert!(model.forward(&ids(vocab + 2), Some(&extra)).is_err());
    assert!(model.forward(&ids(vocab + 1), Some(&extra)).is_ok());
    let too_long = Tensor::zeros((1, 78), DType::U32, &Device::Cpu).unwrap();
    assert!(model.forward(&too_long, None).is_err());
}

#[test]
fn unsupported_activation_is_rejected_by_name() {
    let cfg = ClipTextConfig { hidden_act: "relu".into(), ..config() };
    let err = ClipTextModel::new(var_builder(&fixture(WEIGHTS), DType::F32), &cfg).unwrap_err().to_string();
    assert!(err.contains("clip text config: `hidden_act` = \"relu\""), "{err}");
}

/// d/d extra of sum(out * w), by autograd and by central differences, in f64. A cut anywhere in
/// the graph (a fused op without backward) makes autograd disagree.
#[test]
fn gradient_wrt_extra_matches_finite_differences() {
    let t = load_tensors("parity/clip_text.safetensors");
    let model = load(DType::F64);
    let (ids, extra) = inputs(&t);
    let extra = extra.to_dtype(DType::F64).unwrap();
    let shape = t["output"].dims().to_vec();
    let n: usize = shape.iter().product();
    let w: Vec<f64> = (0..n).map(|k| (0.37 * k as f64).sin()).collect();
    let w = Tensor::from_vec(w, shape, &Device::Cpu).unwrap();
    let objective = |e: &Tensor| -> Tensor { (model.forward(&ids, Some(e)).unwrap() * &w).unwrap().sum_all().unwrap() };

    let var = Var::from_tensor(&extra).unwrap();
    let grads = objective(var.as_tensor()).backward().unwrap();
    let grad = grads.get(var.as_tensor()).expect("no gradient reached extra").to_vec2::<f64>().unwrap();
    assert!(grad.iter().all(|row| row.iter().any(|g| g.abs() > 1e-2)), "a placeholder row got no gradient");

    // The shared norms and softmax compute in f32 even for f64 tensors, which leaves ~1e-5 of
    // rounding noise in the objective: the step must be large enough to keep the difference
    // quotient's noise (~noise / h) well below the tolerance; truncation error at this h is ~1e-5.
    let h = 5e-2;
    let scale = grad.iter().flatten().fold(0f64, |m, g| m.max(g.abs()));
    for (row, col) in [(0, 0), (0, 13), (0, 31), (1, 2), (1, 20)] {
        let mut plus = extra.to_vec2::<f64>().unwrap();
        let mut minus = plus.clone();
        plus[row][col] += h;
        minus[row][col] -= h;
        let f = |v: Vec<Vec<f64>>| objective(&Tensor::new(v, &Device::Cpu).unwrap()).to_scalar::<f64>().unwrap();
        let numeric = (f(plus) - f(minus)) / (2.0 * h);
        let analytic = grad[row][col];
        // Relative to the gradient's largest entry, so that small entries do not amplify noise.
        let rel = (numeric - analytic).abs() / scale;
        eprintln!("d/d extra[{row}][{col}]: autograd {analytic:.6e}, finite difference {numeric:.6e}, rel {rel:.1e}");
        assert!(rel < 1e-3, "extra[{row}][{col}]: autograd {analytic} vs finite difference {numeric}");
    }
}
