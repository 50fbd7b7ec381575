//! The celebrity-name basis: the shipped names against the real CLIP vocabulary, the statistics
//! against PyTorch (fixture from tools/reference/celeb_basis.py), the error for bad names, and the
//! disk cache.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixture, load_config, load_tensors, var_builder};
use stableid::models::clip_text::{ClipTextConfig, ClipTextModel};
use stableid::priors::celeb_basis::{validate, CelebBasis, CelebNames};
use stableid::tokenizer::ClipTokenizer;
use stableid::Error;

const TINY_WEIGHTS: &str = "tiny-sd/text_encoder/model.safetensors";
const FIXTURE: &str = "parity/celeb_basis.safetensors";

fn real_tokenizer() -> ClipTokenizer {
    ClipTokenizer::from_dir(&fixture("tokenizer")).unwrap()
}

fn tiny_tokenizer() -> ClipTokenizer {
    ClipTokenizer::from_dir(&fixture("tiny-sd/tokenizer")).unwrap()
}

/// The tiny text encoder's token-embedding table, loaded as the pipeline loads it, from `weights`.
fn token_embedding(weights: &Path, dtype: DType) -> Tensor {
    let cfg: ClipTextConfig = load_config("tiny-sd/text_encoder/config.json");
    ClipTextModel::new(var_builder(weights, dtype), &cfg).unwrap().token_embedding().clone()
}

/// The stand-in names the reference script used with the tiny tokenizer (fixture metadata).
fn tiny_names() -> CelebNames {
    let bytes = std::fs::read(fixture(FIXTURE)).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let names: Vec<String> = serde_json::from_str(&header.metadata().as_ref().unwrap()["tiny_names"]).unwrap();
    CelebNames::parse(&names.join("\n"), "the tiny names")
}

fn ids_of(t: &Tensor) -> Vec<[u32; 2]> {
    t.to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap().into_iter().map(|row| [row[0], row[1]]).collect()
}

#[test]
fn shipped_names_are_two_real_clip_tokens() {
    let names = CelebNames::shipped();
    assert!(names.len() >= 300, "only {} shipped names", names.len());
    let mut distinct = names.names().to_vec();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), names.len(), "the shipped list has duplicates");
    assert!(names.names().iter().all(|n| n.split_whitespace().count() == 2), "every name is two words");

    let ids = validate(&names, &real_tokenizer()).unwrap();
    // The same ids as transformers' CLIPTokenizer and open_clip on the real vocabulary.
    let expected = ids_of(&load_tensors(FIXTURE)["shipped_ids"]);
    assert_eq!(ids, expected);
    assert_eq!(CelebNames::default(), names);
}

#[test]
fn basis_matches_torch_on_tiny_model() {
    let t = load_tensors(FIXTURE);
    let ids = validate(&tiny_names(), &tiny_tokenizer()).unwrap();
    assert_eq!(ids, ids_of(&t["tiny_ids"]));
    let basis = CelebBasis::compute(&token_embedding(&fixture(TINY_WEIGHTS), DType::F32), &ids).unwrap();
    assert_eq!(basis.mean.dtype(), DType::F32);
    // Values are of order 0.02: a much tighter bound than the usual 1e-4.
    assert_close(&basis.mean, &t["tiny_mean"], 1e-7, "mean");
    assert_close(&basis.std, &t["tiny_std"], 1e-7, "std (unbiased)");
}

#[test]
fn compute_is_mean_and_unbiased_std_per_position() {
    // Three names over a 5 x 2 table: position 0 takes rows 0, 1, 2 and position 1 rows 3, 3, 4.
    let table = Tensor::new(&[[1f32, 10.], [2., 20.], [4., 40.], [-1., 0.5], [2., 0.5]], &Device::Cpu).unwrap();
    let basis = CelebBasis::compute(&table, &[[0, 3], [1, 3], [2, 4]]).unwrap();
    let mean = Tensor::new(&[[7f32 / 3., 70. / 3.], [0., 0.5]], &Device::Cpu).unwrap();
    // Unbiased: sum of squared deviations / (n - 1).
    let std = Tensor::new(&[[(7f32 / 3.).sqrt(), (700f32 / 3.).sqrt()], [3f32.sqrt(), 0.]], &Device::Cpu).unwrap();
    assert_close(&basis.mean, &mean, 1e-6, "mean");
    assert_close(&basis.std, &std, 1e-6, "std");

    assert!(CelebBasis::compute(&table, &[[0, 1]]).is_err(), "one name has no unbiased std");
    let past = CelebBasis::compute(&table, &[[0, 1], [2, 5]]).unwrap_err().to_string();
    assert!(past.contains("token id 5"), "{past}");
}

#[test]
fn error_lists_every_bad_name() {
    let text =
        "# a comment\n\ntom hanks\nzxqv brrglington\n  brad pitt  \nmadonna\nbarack obama\nkarl heinz rummenigge\n";
    let names = CelebNames::parse(text, "my-names.txt");
    assert_eq!(names.len(), 6, "blank lines and comments are ignored");
    let err = validate(&names, &real_tokenizer()).unwrap_err();
    assert!(matches!(err, Error::Input(_)));
    let msg = err.to_string();
    for bad in ["zxqv brrglington", "madonna", "karl heinz rummenigge"] {
        assert!(msg.contains(&format!("\"{bad}\"")), "{bad} missing from: {msg}");
    }
    for good in ["tom hanks", "brad pitt", "barack obama"] {
        assert!(!msg.contains(good), "{good} wrongly listed: {msg}");
    }
    assert!(msg.starts_with("3 celebrity name(s) in my-names.txt"), "{msg}");
    assert!(msg.contains("[\"madonna</w>\"]"), "the tokens are shown: {msg}");

    let one = validate(&CelebNames::parse("tom hanks", "one.txt"), &real_tokenizer()).unwrap_err();
    assert!(one.to_string().contains("at least two"), "{one}");
}

#[test]
fn names_file_and_default() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("names.txt");
    std::fs::write(&path, "# mine\ntom hanks\n\nbrad pitt\n").unwrap();
    let names = CelebNames::load(Some(&path)).unwrap();
    assert_eq!(names.names(), ["tom hanks", "brad pitt"]);
    assert_eq!(CelebNames::load(None).unwrap(), CelebNames::shipped());
    let missing = CelebNames::load(Some(&dir.path().join("nope.txt"))).unwrap_err();
    assert!(matches!(missing, Error::MissingFile { .. }), "{missing}");
}

/// The cache files in `dir`.
fn cache_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
}

fn same(a: &CelebBasis, b: &CelebBasis) -> bool {
    let eq = |x: &Tensor, y: &Tensor| x.to_vec2::<f32>().unwrap() == y.to_vec2::<f32>().unwrap();
    eq(&a.mean, &b.mean) && eq(&a.std, &b.std)
}

/// A basis of zero std: what `compute` gives on an all-zero table, so any recomputation from
/// `zeros` below is told apart from a cache hit.
fn is_recomputed_from_zeros(b: &CelebBasis) -> bool {
    b.std.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() == 0.0
}

#[test]
fn cache_hits_and_misses() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let weights = dir.path().join("model.safetensors");
    std::fs::copy(fixture(TINY_WEIGHTS), &weights).unwrap();
    let tokenizer = tiny_tokenizer();
    let names = tiny_names();
    let table = token_embedding(&weights, DType::F32);
    let zeros = table.zeros_like().unwrap();
    let load = |names: &CelebNames, table: &Tensor| {
        CelebBasis::load_or_compute(&cache, &weights, names, &tokenizer, table).unwrap()
    };

    let first = load(&names, &table);
    assert!(same(&first, &CelebBasis::compute(&table, &validate(&names, &tokenizer).unwrap()).unwrap()));
    let files = cache_files(&cache);
    assert_eq!(files.len(), 1);

    // A hit: the cached values come back, not statistics of the table passed in.
    assert!(same(&load(&names, &zeros), &first));
    assert_eq!(cache_files(&cache), files);

    // Other names: a miss, and a second cache file.
    let fewer = CelebNames::parse(&names.names()[1..].join("\n"), "fewer");
    assert!(is_recomputed_from_zeros(&load(&fewer, &zeros)));
    assert_eq!(cache_files(&cache).len(), 2);

    // A corrupt cache file is recomputed and rewritten, whether truncated or with a flipped value.
    let bytes = std::fs::read(&files[0]).unwrap();
    std::fs::write(&files[0], &bytes[..bytes.len() / 2]).unwrap();
    assert!(is_recomputed_from_zeros(&load(&names, &zeros)));
    // The file now holds the zero-std basis; the last byte is that of the last std value.
    let mut flipped = std::fs::read(&files[0]).unwrap();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x40;
    std::fs::write(&files[0], &flipped).unwrap();
    assert!(same(&load(&names, &table), &first), "recomputed from the real table");
    assert!(same(&load(&names, &zeros), &first), "and cached again");

    // Other weights, same header and size (one byte of the token-embedding table flipped in place): a miss.
    let mut bytes = std::fs::read(&weights).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let at = st.tensor("embeddings.token_embedding.weight").unwrap().data().as_ptr() as usize - bytes.as_ptr() as usize;
    bytes[at + 2] ^= 0x01;
    std::fs::write(&weights, &bytes).unwrap();
    assert!(is_recomputed_from_zeros(&load(&names, &zeros)));

    // Loading the same weights in another dtype: a miss too.
    let before = cache_files(&cache).len();
    let half = token_embedding(&weights, DType::F16);
    let from_half = load(&names, &half);
    assert_eq!(cache_files(&cache).len(), before + 1);
    assert_eq!(from_half.mean.dtype(), DType::F32);
}
