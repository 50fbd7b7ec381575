//! First-run downloads (`src/weights/hub/`) against a small hub on 127.0.0.1
//! (`tests/common/hub_server.rs`): a fresh cache fills in huggingface_hub's layout with only the
//! files the loaders read, and the model works; half precision fetches the fp16 variant; a
//! dropped connection and an interrupted run resume; offline mode never touches the network;
//! wrong tokens, gated and missing repositories, and corrupted bytes get one clear error line.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device};
use common::hub_server::HubServer;
use common::{assert_fails_with, fixture};
use sha2::{Digest, Sha256};
use stableid::models::stable_diffusion::StableDiffusion;
use stableid::weights::{DownloadEvent, Hub, ModelDir};

const REPO: &str = "someone/tiny-sd";

/// The files `ModelDir::files(F32)` reads of the tiny model, all in the fixture.
const PIPELINE_FILES: [&str; 12] = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
];

/// A hub serving the tiny model as `REPO`, with files no loader reads beside it: a PyTorch copy
/// of the UNet's weights and a model card.
fn tiny_hub() -> HubServer {
    let server = HubServer::start();
    let unet = std::fs::read(fixture("tiny-sd/unet/diffusion_pytorch_model.safetensors")).unwrap();
    let extra = vec![
        ("unet/diffusion_pytorch_model.bin".to_string(), unet[..5000].to_vec()),
        ("README.md".to_string(), b"# tiny-sd\n".to_vec()),
    ];
    server.add_folder(REPO, &fixture("tiny-sd"), extra);
    server
}

/// A hub on `server` with its own cache in `home`, recording every event.
fn test_hub(server: &HubServer, home: &Path) -> (Hub, Arc<Mutex<Vec<String>>>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let log = events.clone();
    let hub = Hub::from_env().with_cache(home.join("hub")).with_endpoint(&server.url).with_token(None).with_progress(
        Arc::new(move |event: &DownloadEvent| {
            let line = match *event {
                DownloadEvent::Start { files, bytes, .. } => format!("start {files} {bytes}"),
                DownloadEvent::Retry { file, attempt, .. } => format!("retry {file} {attempt}"),
                DownloadEvent::Finish { .. } => "finish".to_string(),
                DownloadEvent::Progress { .. } => return,
            };
            log.lock().unwrap().push(line);
        }),
    );
    (hub, events)
}

/// `stableid ARGS` with a fresh environment for the hub: `HF_HOME` is `home`, the endpoint
/// `server`, and `extra` variables.
fn stableid(args: &[&str], home: &Path, server: &HubServer, extra: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_stableid"));
    command.args(args).env("HF_HOME", home).env("HF_ENDPOINT", &server.url);
    for name in ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"] {
        command.env_remove(name);
    }
    for (name, value) in extra {
        command.env(name, value);
    }
    command.output().expect("the binary runs")
}

fn repo_dir(home: &Path, repo: &str) -> PathBuf {
    home.join("hub").join(format!("models--{}", repo.replace('/', "--")))
}

/// Asserts the layout huggingface_hub reads: `refs/main` names the commit; each file of `paths`
/// is a relative link `../../blobs/<etag>` (one `../` more per folder) to a blob holding the
/// hub's bytes, named by their SHA-256 for LFS files and by their git blob id otherwise; no
/// partial download is left.
fn assert_cache_layout(home: &Path, server: &HubServer, repo: &str, paths: &[&str]) {
    let dir = repo_dir(home, repo);
    let commit = server.commit(repo);
    assert_eq!(std::fs::read_to_string(dir.join("refs/main")).unwrap(), commit, "refs/main, without a newline");
    for path in paths {
        let file = server.file(repo, path);
        let pointer = dir.join("snapshots").join(&commit).join(path);
        let target = std::fs::read_link(&pointer).unwrap_or_else(|e| panic!("{}: {e}", pointer.display()));
        let depth = path.matches('/').count() + 1;
        assert_eq!(target, PathBuf::from(format!("{}blobs/{}", "../".repeat(depth + 1), file.etag())), "{path}");
        assert_eq!(std::fs::read(&pointer).unwrap(), file.bytes, "{path}: the hub's bytes");
        if file.lfs {
            let sha = Sha256::digest(&file.bytes).iter().map(|b| format!("{b:02x}")).collect::<String>();
            assert_eq!(file.etag(), sha, "{path}: an LFS blob is named by its SHA-256");
        }
    }
    let blobs: Vec<String> =
        std::fs::read_dir(dir.join("blobs")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(!blobs.iter().any(|b| b.ends_with(".incomplete")), "no partial download left: {blobs:?}");
}

fn cdn_gets(server: &HubServer) -> Vec<common::hub_server::Request> {
    server.requests().into_iter().filter(|r| r.method == "GET" && r.path.starts_with("/cdn/")).collect()
}

#[test]
fn a_fresh_cache_fills_with_the_files_read_and_generate_runs_then_offline() {
    let server = tiny_hub();
    let home = tempfile::tempdir().unwrap();
    let out = home.path().join("out");
    let args = ["generate", "a cat", "--model", REPO, "--steps", "1", "--seed", "1", "--out", out.to_str().unwrap()];
    let output = stableid(&args, home.path(), &server, &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(out.join("00000-1.png").is_file());

    // Said before it starts: how many files and how many bytes.
    let bytes: u64 = PIPELINE_FILES.iter().map(|p| server.file(REPO, p).bytes.len() as u64).sum();
    let announced = format!("downloading 12 files of {REPO} ({})", indicatif::HumanBytes(bytes));
    assert!(stderr.contains(&announced), "expected {announced:?} in: {stderr}");
    assert_cache_layout(home.path(), &server, REPO, &PIPELINE_FILES);
    let snapshot = repo_dir(home.path(), REPO).join("snapshots").join(server.commit(REPO));
    assert!(!snapshot.join("unet/diffusion_pytorch_model.bin").exists(), "the .bin duplicate is not fetched");
    assert!(!snapshot.join("README.md").exists(), "nor the model card");
    let requested: Vec<String> = server.requests().into_iter().map(|r| r.path).collect();
    assert!(!requested.iter().any(|p| p.ends_with(".bin") || p.ends_with("README.md")), "{requested:?}");

    // Now in the cache: offline mode uses it, without a request.
    let before = server.requests().len();
    let output = stableid(&args, home.path(), &server, &[("HF_HUB_OFFLINE", "1")]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let output = stableid(&args, home.path(), &server, &[]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(server.requests().len(), before, "a complete cached model is used without asking the hub");
}

#[test]
fn half_precision_fetches_the_fp16_variant_and_the_model_loads() {
    // The UNet also as an fp16 variant, as SD 2.1-base has it; the text encoder without one.
    let server = tiny_hub();
    let unet_path = fixture("tiny-sd/unet/diffusion_pytorch_model.safetensors");
    let tensors = candle_core::safetensors::load(&unet_path, &Device::Cpu).unwrap();
    let half: std::collections::HashMap<_, _> =
        tensors.into_iter().map(|(name, t)| (name, t.to_dtype(DType::F16).unwrap())).collect();
    let dir = tempfile::tempdir().unwrap();
    let half_path = dir.path().join("half.safetensors");
    candle_core::safetensors::save(&half, &half_path).unwrap();
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for path in PIPELINE_FILES {
        files.push((path.to_string(), std::fs::read(fixture("tiny-sd").join(path)).unwrap()));
    }
    files.push(("unet/diffusion_pytorch_model.fp16.safetensors".into(), std::fs::read(&half_path).unwrap()));
    server.add_repo(REPO, files);

    let home = tempfile::tempdir().unwrap();
    let (hub, _) = test_hub(&server, home.path());
    let model = ModelDir::resolve(REPO, &hub, DType::F16).unwrap();
    assert!(model.root().join("unet/diffusion_pytorch_model.fp16.safetensors").is_file());
    assert!(!model.root().join("unet/diffusion_pytorch_model.safetensors").exists(), "only the variant asked for");
    assert!(model.root().join("text_encoder/model.safetensors").is_file(), "no variant: the full one");
    let no_exist = repo_dir(home.path(), REPO).join(".no_exist").join(server.commit(REPO));
    assert!(no_exist.join("text_encoder/model.fp16.safetensors").is_file(), "absence recorded as huggingface_hub does");
    let sd = StableDiffusion::load(&model, &Device::Cpu, DType::F16).unwrap();
    assert_eq!(sd.dtype(), DType::F16);

    // Complete for f16 now: no more requests.
    let before = server.requests().len();
    ModelDir::resolve(REPO, &hub, DType::F16).unwrap();
    assert_eq!(server.requests().len(), before);
}

#[test]
fn a_dropped_connection_and_an_interrupted_run_resume() {
    let unet = "unet/diffusion_pytorch_model.safetensors";

    // The connection drops once, part-way through the UNet's weights: the same run resumes.
    let server = tiny_hub();
    server.drop_once(REPO, unet, 100_000);
    let home = tempfile::tempdir().unwrap();
    let (hub, events) = test_hub(&server, home.path());
    ModelDir::resolve(REPO, &hub, DType::F32).unwrap();
    assert_cache_layout(home.path(), &server, REPO, &PIPELINE_FILES);
    let etag = server.file(REPO, unet).etag();
    let unet_gets: Vec<_> = cdn_gets(&server).into_iter().filter(|r| r.path.ends_with(&etag)).collect();
    assert_eq!(unet_gets.len(), 2, "{unet_gets:?}");
    assert_eq!(unet_gets[0].range, None);
    assert_eq!(unet_gets[1].range.as_deref(), Some("bytes=100000-"), "resumed where it stopped");
    assert!(events.lock().unwrap().contains(&format!("retry {unet} 1")), "{:?}", events.lock().unwrap());

    // A run stopped part-way left `blobs/<etag>.incomplete`: the next one resumes it.
    let server = tiny_hub();
    let home = tempfile::tempdir().unwrap();
    let blobs = repo_dir(home.path(), REPO).join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let bytes = server.file(REPO, unet).bytes;
    std::fs::write(blobs.join(format!("{etag}.incomplete")), &bytes[..5000]).unwrap();
    let (hub, events) = test_hub(&server, home.path());
    ModelDir::resolve(REPO, &hub, DType::F32).unwrap();
    assert_cache_layout(home.path(), &server, REPO, &PIPELINE_FILES);
    let unet_gets: Vec<_> = cdn_gets(&server).into_iter().filter(|r| r.path.ends_with(&etag)).collect();
    assert_eq!(unet_gets.len(), 1);
    assert_eq!(unet_gets[0].range.as_deref(), Some("bytes=5000-"));
    let total: u64 = PIPELINE_FILES.iter().map(|p| server.file(REPO, p).bytes.len() as u64).sum();
    assert_eq!(events.lock().unwrap()[0], format!("start 12 {total}"), "the size announced counts the part on disk");
}

#[test]
fn offline_mode_never_touches_the_network() {
    let server = tiny_hub();
    let home = tempfile::tempdir().unwrap();
    let out = home.path().join("out");
    let args = ["generate", "a cat", "--model", REPO, "--steps", "1", "--out", out.to_str().unwrap()];
    let output = stableid(&[&args[..], &["--offline"]].concat(), home.path(), &server, &[]);
    assert_fails_with(&output, &[REPO, "offline", "huggingface-cli download"]);
    let output = stableid(&args, home.path(), &server, &[("HF_HUB_OFFLINE", "1")]);
    assert_fails_with(&output, &[REPO, "offline", "huggingface-cli download"]);
    assert!(server.requests().is_empty(), "{:?}", server.requests());
    assert!(!out.exists(), "nothing written");
}

#[test]
fn tokens_gated_and_missing_repositories_get_one_clear_line() {
    let server = tiny_hub();
    server.require_token("hf_right");
    let home = tempfile::tempdir().unwrap();
    let out = home.path().join("out");
    let args = ["generate", "a cat", "--model", REPO, "--steps", "1", "--out", out.to_str().unwrap()];

    let output = stableid(&args, home.path(), &server, &[("HF_TOKEN", "hf_wrong")]);
    assert_fails_with(&output, &[REPO, "401", "HF_TOKEN", "wrong or expired"]);
    let output = stableid(&args, home.path(), &server, &[]);
    assert_fails_with(&output, &[REPO, "401", "private or gated", "HF_TOKEN"]);
    assert!(!repo_dir(home.path(), REPO).join("snapshots").exists(), "nothing cached");

    // The right token (here from the token file huggingface-cli login writes) is sent to the hub,
    // and not to the CDN, another host.
    std::fs::write(home.path().join("token"), "hf_right\n").unwrap();
    let output = stableid(&args, home.path(), &server, &[]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let requests = server.requests();
    assert!(requests.iter().any(|r| r.authorization.as_deref() == Some("Bearer hf_right")));
    let cdn = cdn_gets(&server);
    assert!(!cdn.is_empty() && cdn.iter().all(|r| r.authorization.is_none()), "{cdn:?}");

    let server = tiny_hub();
    server.gate(REPO);
    let home = tempfile::tempdir().unwrap();
    let output = stableid(&args, home.path(), &server, &[]);
    assert_fails_with(&output, &[REPO, "gated", "accept its conditions", "HF_TOKEN"]);
    let args = ["generate", "a cat", "--model", "someone/no-such-model", "--out", out.to_str().unwrap()];
    let output = stableid(&args, home.path(), &server, &[]);
    assert_fails_with(&output, &["someone/no-such-model", "no such repository", "404"]);
    let args = ["generate", "a cat", "--model", "someone/tiny-sd", "--out", out.to_str().unwrap()];
    let output = stableid(&args, home.path(), &server, &[("HF_ENDPOINT", "http://127.0.0.1:9")]);
    assert_fails_with(&output, &[REPO, "cannot reach http://127.0.0.1:9", "HF_HUB_OFFLINE"]);
}

#[test]
fn corrupted_bytes_never_enter_the_cache() {
    let unet = "unet/diffusion_pytorch_model.safetensors";
    let server = tiny_hub();
    server.corrupt(REPO, unet);
    let home = tempfile::tempdir().unwrap();
    let (hub, _) = test_hub(&server, home.path());
    let message = ModelDir::resolve(REPO, &hub, DType::F32).unwrap_err().to_string();
    assert!(message.contains(REPO) && message.contains("SHA-256") && message.contains("discarded"), "{message}");
    let dir = repo_dir(home.path(), REPO);
    let etag = server.file(REPO, unet).etag();
    assert!(!dir.join("blobs").join(&etag).exists());
    assert!(!dir.join("blobs").join(format!("{etag}.incomplete")).exists());
    assert!(!dir.join("snapshots").join(server.commit(REPO)).join(unet).exists());
    assert!(!dir.join("refs/main").exists(), "main is not pointed at an incomplete snapshot");
}
