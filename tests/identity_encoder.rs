//! An identity knows the text encoder it was learned on by content: the f16-rounded token-embedding
//! table's digest, the same for f32 and f16 copies of one encoder (ModelScope ships SD 2.1's in
//! fp16). A model with that encoder uses the identity silently, another one is reported.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::fixture;
use stableid::identity::{token_table_digest, Identity, TOKEN_TABLE_KEY};
use stableid::models::stable_diffusion::StableDiffusion;
use stableid::pipelines::identities_from_other_encoders;
use stableid::weights::ModelDir;

fn identity(recorded: Option<&str>, width: usize) -> Identity {
    let metadata: HashMap<String, String> =
        recorded.map(|d| (TOKEN_TABLE_KEY.to_string(), d.to_string())).into_iter().collect();
    let embeddings = Tensor::zeros((2, width), DType::F32, &Device::Cpu).unwrap();
    Identity { embeddings, source: PathBuf::from(format!("{recorded:?}.safetensors")), metadata }
}

#[test]
fn identities_are_matched_to_their_text_encoder_by_content() {
    let sd = StableDiffusion::load(&ModelDir::local(&fixture("tiny-sd")), &Device::Cpu, DType::F32).unwrap();
    let table = sd.text_encoder().token_embedding();
    let digest = token_table_digest(table).unwrap();
    // An fp16 copy of the encoder has the same digest; a table one level off somewhere has not.
    assert_eq!(token_table_digest(&table.to_dtype(DType::F16).unwrap()).unwrap(), digest);
    let mut values: Vec<f32> = table.flatten_all().unwrap().to_vec1().unwrap();
    values[7] += 0.01;
    let other = token_table_digest(&Tensor::from_vec(values, table.shape(), &Device::Cpu).unwrap()).unwrap();
    assert_ne!(other, digest);

    let width = sd.text_encoder().config().hidden_size;
    let identities = [identity(Some(&digest), width), identity(Some(&other), width), identity(None, width)];
    let reported = identities_from_other_encoders(&sd, &identities).unwrap();
    assert_eq!(reported.len(), 1);
    assert_eq!(reported[0].learned_on(&digest), Some(false));
    assert_eq!(identities[0].learned_on(&digest), Some(true));
    assert_eq!(identities[2].learned_on(&digest), None);
}

#[test]
fn generate_warns_about_an_identity_from_another_text_encoder() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("elsewhere.safetensors");
    let mut elsewhere = identity(Some(&"0".repeat(64)), 32);
    elsewhere.embeddings = (elsewhere.embeddings + 0.1).unwrap();
    elsewhere.save(&path).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_stableid"))
        .args(["generate", "v1* v2* in a garden", "--identity", path.to_str().unwrap(), "--model"])
        .arg(fixture("tiny-sd"))
        .args(["--steps", "1", "--out", dir.path().join("out").to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("elsewhere.safetensors was learned on another text encoder"), "{stderr}");
}
