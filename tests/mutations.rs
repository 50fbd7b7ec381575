//! Seeded mutations of valid inputs (issue 18): bit flips, bytes and integers overwritten with
//! boundary values, truncations, insertions and deletions, mostly in the headers, of a PNG, a
//! JPEG, an identity file, a zip and a legacy PyTorch checkpoint, each fed to the library's
//! reader; and config values of a model folder replaced by boundary values, the model then loaded. Whatever the
//! reader says, it must not panic, and it must answer within a bound. A failure names the seed
//! and the mutations, so it can be replayed.

mod common;

use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use common::bad_inputs::{fix_png_crcs, zip_entries, zip_of};
use common::fixture;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use stableid::identity::Identity;
use stableid::models::stable_diffusion::StableDiffusion;
use stableid::priors::photo::load_photo;
use stableid::weights::{open_checkpoint, ModelDir};

/// Longest any one input may take: far above the few milliseconds most take, and above the
/// second or two a mutated header claiming a photo of tens of megapixels (which is allowed to
/// decode) takes on a busy machine; far below the minutes an unbounded reader would take.
const TIME_BOUND: Duration = Duration::from_secs(10);

/// Values that break sizes and offsets: zero, one, the largest and smallest of each width.
const BOUNDARY_BYTES: [u8; 6] = [0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF];
const BOUNDARY_INTS: [u64; 8] = [0, 1, 0x7F, 0xFF, 0x7FFF_FFFF, 0xFFFF_FFFF, 0x7FFF_FFFF_FFFF_FFFF, u64::MAX];

/// One random change to `bytes`, mostly within `header`; returns what it did.
fn mutate(rng: &mut StdRng, bytes: &mut Vec<u8>, header: &Range<usize>) -> String {
    if bytes.is_empty() {
        bytes.push(0);
        return "pushed a byte".into();
    }
    let span = if rng.random_bool(0.7) && header.end.min(bytes.len()) > header.start {
        header.start..header.end.min(bytes.len())
    } else {
        0..bytes.len()
    };
    let at = rng.random_range(span);
    match rng.random_range(0..7) {
        0 => {
            let bit = rng.random_range(0..8);
            bytes[at] ^= 1 << bit;
            format!("flipped bit {bit} of byte {at}")
        }
        1 => {
            let value = if rng.random_bool(0.8) { BOUNDARY_BYTES[rng.random_range(0..6)] } else { rng.random() };
            bytes[at] = value;
            format!("byte {at} = {value:#04x}")
        }
        2 => {
            let width = [2, 4, 8][rng.random_range(0..3)];
            let value = BOUNDARY_INTS[rng.random_range(0..BOUNDARY_INTS.len())];
            let encoded = if rng.random_bool(0.5) { value.to_le_bytes() } else { value.to_be_bytes() };
            let end = (at + width).min(bytes.len());
            bytes[at..end].copy_from_slice(&encoded[..end - at]);
            format!("bytes {at}..{end} = {:02x?}", &encoded[..end - at])
        }
        3 => {
            bytes.truncate(at);
            format!("truncated to {at} bytes")
        }
        4 => {
            let inserted: Vec<u8> = (0..rng.random_range(1..=16)).map(|_| rng.random()).collect();
            let n = inserted.len();
            bytes.splice(at..at, inserted);
            format!("inserted {n} bytes at {at}")
        }
        5 => {
            let end = (at + rng.random_range(1..=16)).min(bytes.len());
            bytes.drain(at..end);
            format!("deleted bytes {at}..{end}")
        }
        _ => {
            // A stretch copied over another place: repeated chunks, markers and opcodes.
            let len = rng.random_range(1..=32).min(bytes.len() - at);
            let from = rng.random_range(0..=bytes.len() - len);
            let chunk = bytes[from..from + len].to_vec();
            bytes[at..at + len].copy_from_slice(&chunk);
            format!("bytes {at}..{} = bytes {from}..{}", at + len, from + len)
        }
    }
}

/// Mutates `original` `count` times (seeds `seed..seed + count`, one to three changes each, then
/// `finish` applied) and runs `read` on each; returns how many inputs were tried. Panics, and
/// inputs that take longer than [`TIME_BOUND`], fail the test with their seeds and changes.
fn run(
    what: &str,
    original: &[u8],
    header: Range<usize>,
    seed: u64,
    count: u64,
    finish: impl Fn(&mut StdRng, Vec<u8>) -> Vec<u8>,
    read: impl Fn(&Path),
) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(what);
    let start = Instant::now();
    let mut failures = Vec::new();
    let (mut errors, mut slowest) = (0, (Duration::ZERO, 0));
    for seed in seed..seed + count {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut bytes = original.to_vec();
        let changes: Vec<String> =
            (0..rng.random_range(1..=3)).map(|_| mutate(&mut rng, &mut bytes, &header)).collect();
        let bytes = finish(&mut rng, bytes);
        std::fs::write(&path, &bytes).unwrap();
        let began = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| read(&path)));
        let took = began.elapsed();
        slowest = slowest.max((took, seed));
        if let Err(panic) = outcome {
            let msg =
                panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
            failures.push(format!("{what} seed {seed} ({changes:?}): panicked: {}", msg.unwrap_or_default()));
            errors += 1;
        } else if took > TIME_BOUND {
            failures.push(format!("{what} seed {seed} ({changes:?}): took {took:?}"));
        }
    }
    eprintln!(
        "{what}: {count} mutations in {:.1} s, slowest {:.0} ms (seed {}), {errors} panics",
        start.elapsed().as_secs_f64(),
        slowest.0.as_secs_f64() * 1e3,
        slowest.1
    );
    assert!(failures.is_empty(), "{} of {count} mutations failed:\n{}", failures.len(), failures.join("\n"));
    count as usize
}

fn read_photo(path: &Path) {
    let _ = load_photo(path);
}

/// Opens a checkpoint and reads every tensor in it.
fn read_checkpoint(path: &Path) {
    if let Ok((weights, names)) = open_checkpoint(path, DType::F32, &Device::Cpu) {
        for name in names {
            let _ = weights.vb.get_unchecked(&name);
        }
    }
}

/// Where a JPEG's header segments end: at its first scan (start-of-scan marker).
fn jpeg_header_len(jpeg: &[u8]) -> usize {
    let mut at = 2;
    while jpeg[at + 1] != 0xDA {
        at += 2 + usize::from(u16::from_be_bytes([jpeg[at + 2], jpeg[at + 3]]));
    }
    at + 2 + usize::from(u16::from_be_bytes([jpeg[at + 2], jpeg[at + 3]]))
}

#[test]
fn mutated_pngs_never_panic() {
    let png = std::fs::read(fixture("photos/chelsea_300x256.png")).unwrap();
    // Signature and IHDR; the CRCs are fixed after most mutations, so that changed fields reach
    // the decoder instead of failing a checksum.
    let fix_crcs = |rng: &mut StdRng, mut bytes: Vec<u8>| {
        if rng.random_bool(0.8) {
            fix_png_crcs(&mut bytes);
        }
        bytes
    };
    run("photo.png", &png, 0..33, 1_000_000, 900, fix_crcs, read_photo);
}

#[test]
fn mutated_jpegs_never_panic() {
    let jpeg = std::fs::read(fixture("photos/astronaut_300x400.jpg")).unwrap();
    let header = 0..jpeg_header_len(&jpeg);
    run("photo.jpg", &jpeg, header, 2_000_000, 900, |_, bytes| bytes, read_photo);
}

#[test]
fn mutated_checkpoints_never_panic() {
    let zip = std::fs::read(fixture("checkpoints/zip.pth")).unwrap();
    let legacy = std::fs::read(fixture("checkpoints/legacy.pth")).unwrap();
    // The legacy file's pickles take most of it, before the storages.
    let mut tried = run("legacy.pth", &legacy, 0..legacy.len(), 3_000_000, 1000, |_, bytes| bytes, read_checkpoint);
    // The zip file's headers and central directory (whose fields have no checksum).
    tried += run("zip.pth", &zip, 0..zip.len(), 4_000_000, 500, |_, bytes| bytes, read_checkpoint);
    // Its data.pkl, put back into a valid zip (a changed entry would fail the zip's checksum).
    let entries = zip_entries(&zip);
    let pickle = entries.iter().position(|(name, _)| name.ends_with("data.pkl")).unwrap();
    let rezip = |_: &mut StdRng, bytes: Vec<u8>| {
        let mut entries = entries.clone();
        entries[pickle].1 = bytes;
        zip_of(&entries)
    };
    let pickle_len = entries[pickle].1.len();
    tried += run("data.pkl.pth", &entries[pickle].1, 0..pickle_len, 5_000_000, 1000, rezip, read_checkpoint);
    assert_eq!(tried, 2500);
}

#[test]
fn mutated_identity_files_never_panic() {
    let identity = std::fs::read(fixture("parity/identity_export.safetensors")).unwrap();
    // The safetensors header: its 8-byte length and the JSON after it.
    let header_len = 8 + u64::from_le_bytes(identity[..8].try_into().unwrap()) as usize;
    let read = |path: &Path| {
        let _ = Identity::load(path);
    };
    run("identity.safetensors", &identity, 0..header_len, 6_000_000, 1000, |_, bytes| bytes, read);
}

/// JSON values that break sizes, counts and types.
fn boundary_json(rng: &mut StdRng) -> serde_json::Value {
    use serde_json::json;
    let values = [
        json!(0),
        json!(1),
        json!(-1),
        json!(3),
        json!(7),
        json!(1_000_000_000u64),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(0.5),
        json!(1e300),
        json!(null),
        json!(""),
        json!("unknown"),
        json!(true),
        json!([]),
        json!([0]),
        json!([1, 2, 3, 4, 5, 6, 7, 8, 9]),
        json!({}),
    ];
    values[rng.random_range(0..values.len())].clone()
}

#[test]
fn mutated_model_configs_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    common::copy_dir(&fixture("tiny-sd"), dir.path());
    let model = ModelDir::local(dir.path());
    let configs = [
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "scheduler/scheduler_config.json",
        "tokenizer/tokenizer_config.json",
    ];
    let start = Instant::now();
    let mut failures = Vec::new();
    for (i, config) in configs.iter().enumerate() {
        let path = dir.path().join(config);
        let original: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let keys: Vec<String> = original.keys().cloned().collect();
        for seed in 0..150u64 {
            let seed = 7_000_000 + 1000 * i as u64 + seed;
            let mut rng = StdRng::seed_from_u64(seed);
            let mut mutated = original.clone();
            let changes: Vec<String> = (0..rng.random_range(1..=2))
                .map(|_| {
                    let key = &keys[rng.random_range(0..keys.len())];
                    match mutated.get_mut(key) {
                        // Within a list, one element changed.
                        Some(serde_json::Value::Array(items)) if !items.is_empty() && rng.random_bool(0.5) => {
                            let at = rng.random_range(0..items.len());
                            items[at] = boundary_json(&mut rng);
                            format!("{key}[{at}] = {}", items[at])
                        }
                        _ => {
                            let value = boundary_json(&mut rng);
                            let text = format!("{key} = {value}");
                            mutated.insert(key.clone(), value);
                            text
                        }
                    }
                })
                .collect();
            std::fs::write(&path, serde_json::to_string(&mutated).unwrap()).unwrap();
            let began = Instant::now();
            let outcome = catch_unwind(AssertUnwindSafe(|| StableDiffusion::load(&model, &Device::Cpu, DType::F32)));
            let took = began.elapsed();
            if outcome.is_err() {
                failures.push(format!("{config} seed {seed} ({changes:?}): panicked"));
            } else if took > TIME_BOUND {
                failures.push(format!("{config} seed {seed} ({changes:?}): took {took:?}"));
            }
        }
        std::fs::write(&path, serde_json::to_string(&original).unwrap()).unwrap();
    }
    eprintln!("model configs: {} mutations in {:.1} s", 150 * configs.len(), start.elapsed().as_secs_f64());
    assert!(failures.is_empty(), "{} mutations failed:\n{}", failures.len(), failures.join("\n"));
}
