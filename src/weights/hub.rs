//! Models from the Hugging Face hub: found in the standard hub cache, fetched into it when missing.
//!
//! Reproduces what `huggingface_hub` 2.4 (`file_download.py`: `hf_hub_download`,
//! `_hf_hub_download_to_cache_dir`, `get_hf_file_metadata`, `http_get`; `hf_api.py`: `model_info`
//! with `files_metadata=True`; `constants.py`) does for a model repository on `main`, so that Python
//! tools and this one share one cache:
//! - the cache folder is `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else `HF_HOME/hub`, else
//!   `XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`; the endpoint `HF_ENDPOINT`
//!   (default `https://huggingface.co`); the token `HF_TOKEN`, else the token file
//!   (`HF_TOKEN_PATH`, else `HF_HOME/token`), sent as `Authorization: Bearer` to the endpoint's
//!   host only; `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) set to 1/ON/YES/TRUE means offline;
//! - the repository's layout (`hub/cache.rs`): `models--owner--name/blobs/<etag>`,
//!   `snapshots/<commit>/<path>` as relative symbolic links to the blobs, `refs/main` holding the
//!   commit, `.no_exist/<commit>/<path>` for files known to be absent, `.locks/` beside;
//! - the protocol (`hub/http.rs`): the file list with sizes and LFS hashes from
//!   `GET {endpoint}/api/models/{repo}/revision/main?blobs=true`; per file a `HEAD` of
//!   `{endpoint}/{repo}/resolve/{commit}/{path}` that follows redirects on the same host only and
//!   reads `X-Repo-Commit`, `X-Linked-Etag` (else `ETag`), `X-Linked-Size` (else
//!   `Content-Length`) and `Location`; the `GET` of that location (without the token if it is on
//!   another host) into `blobs/<etag>.incomplete`, resumed with `Range` after a dropped
//!   connection, checked for its size, renamed into place.
//!
//! Deviations, on purpose:
//! - only the files a loader reads are fetched ([`ModelFiles`]: configs, one weights file per
//!   component, safetensors before `.bin`, the fp16 variant first when half precision is asked
//!   for), as diffusers' `from_pretrained` does, not the whole repository;
//! - a model whose files are all in the cache is used without asking the hub (huggingface_hub asks
//!   for the newest commit each time unless offline); when the hub cannot be reached, usable
//!   cached files are used as they are;
//! - `blobs/<etag>.incomplete` is kept when a download fails, and the next run resumes it
//!   (huggingface_hub before 1.0 did so; 2.4 restarts from zero in a file of its own);
//! - an LFS file's bytes are checked against its SHA-256 (its etag) before they enter the cache;
//! - no Xet storage protocol: files come over plain HTTP, which the hub serves for every file.

mod cache;
mod files;
mod http;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use files::ModelFiles;

use self::cache::RepoCache;
use self::files::LocalState;
use self::http::{HubClient, RemoteFailure};
use crate::{Error, Result};

/// The hub's public endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// What a download reports as it goes, for progress bars and a web page alike.
#[derive(Debug, Clone, Copy)]
pub enum DownloadEvent<'a> {
    /// Before the first byte: `files` files of `repo`, `bytes` bytes in all (parts already on
    /// disk from an interrupted run included); `notice` is what the user must know of them (a
    /// licence).
    Start { repo: &'a str, files: usize, bytes: u64, notice: Option<&'a str> },
    /// `done` of the announced `bytes` are on disk; `file` is the one being fetched.
    Progress { repo: &'a str, file: &'a str, done: u64, bytes: u64 },
    /// A dropped connection: the download of `file` resumes where it stopped.
    Retry { repo: &'a str, file: &'a str, attempt: usize },
    /// Every file is in the cache.
    Finish { repo: &'a str },
}

/// Receives [`DownloadEvent`]s.
pub type DownloadProgress = Arc<dyn Fn(&DownloadEvent) + Send + Sync>;

/// Where models come from: local folders, the hub cache, and unless offline the hub itself.
#[derive(Clone)]
pub struct Hub {
    cache: PathBuf,
    endpoint: String,
    token: Option<String>,
    offline: bool,
    progress: DownloadProgress,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("cache", &self.cache)
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("offline", &self.offline)
            .finish()
    }
}

impl Hub {
    /// The cache folder, endpoint, token and offline mode as huggingface_hub reads them from the
    /// environment; no progress reports.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let home = var("HF_HOME").map(|p| expand_home(&p)).unwrap_or_else(|| {
            let cache = var("XDG_CACHE_HOME").map(|p| expand_home(&p)).unwrap_or_else(|| expand_home("~/.cache"));
            cache.join("huggingface")
        });
        let cache = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(|p| expand_home(&p))
            .unwrap_or_else(|| home.join("hub"));
        let token_file = var("HF_TOKEN_PATH").map(|p| expand_home(&p)).unwrap_or_else(|| home.join("token"));
        let token = var("HF_TOKEN").or_else(|| var("HUGGING_FACE_HUB_TOKEN")).or_else(|| {
            let text = crate::io::read_text_bounded(&token_file, 4096).ok()?;
            Some(text.trim().to_string()).filter(|t| !t.is_empty())
        });
        let is_true =
            |name: &str| var(name).is_some_and(|v| ["1", "ON", "YES", "TRUE"].contains(&v.to_uppercase().as_str()));
        Self {
            cache,
            endpoint: var("HF_ENDPOINT")
                .map_or_else(|| DEFAULT_ENDPOINT.to_string(), |e| e.trim_end_matches('/').to_string()),
            token,
            offline: is_true("HF_HUB_OFFLINE") || is_true("TRANSFORMERS_OFFLINE"),
            progress: Arc::new(|_| {}),
        }
    }

    /// This hub with another cache folder.
    pub fn with_cache(mut self, cache: impl Into<PathBuf>) -> Self {
        self.cache = cache.into();
        self
    }

    /// This hub with another endpoint (a mirror, or a test server).
    pub fn with_endpoint(mut self, endpoint: &str) -> Self {
        self.endpoint = endpoint.trim_end_matches('/').to_string();
        self
    }

    /// This hub with another access token, or none.
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// Offline as well when `offline` (an offline environment stays offline): nothing is fetched,
    /// only what the cache holds is used.
    pub fn offline(mut self, offline: bool) -> Self {
        self.offline |= offline;
        self
    }

    /// This hub reporting downloads to `progress`.
    pub fn with_progress(mut self, progress: DownloadProgress) -> Self {
        self.progress = progress;
        self
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache
    }

    /// The folder of the model `spec`: a local folder as it is, or a hub id (`owner/name`) whose
    /// `files` are in the cache, fetched first when some are missing (unless offline).
    pub fn resolve(&self, spec: &str, files: &ModelFiles) -> Result<PathBuf> {
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(path.to_path_buf());
        }
        if !is_hub_id(spec) {
            return Err(Error::MissingFile {
                what: files.what.to_string(),
                path: path.to_path_buf(),
                hint: format!("pass a local folder or a Hugging Face hub id such as {}", files.example),
            });
        }
        let repo = RepoCache::new(&self.cache, spec);
        let local = repo.main_snapshot().map(|(commit, dir)| {
            let state = files.local_state(&dir, &repo.no_exist_dir(&commit));
            (dir, state)
        });
        let usable = match local {
            Some((dir, LocalState::Complete)) => return Ok(dir),
            Some((dir, LocalState::Usable)) => Some(dir),
            Some((_, LocalState::Missing(_))) | None => None,
        };
        if self.offline {
            return usable.ok_or_else(|| self.not_cached(spec, files, &repo));
        }
        let client = HubClient::new(&self.endpoint, self.token.as_deref(), spec);
        match self.fetch(&client, &repo, files) {
            Ok(dir) => Ok(dir),
            // No network: what the cache holds will do.
            Err(RemoteFailure::Unreachable(_)) if usable.is_some() => Ok(usable.expect("checked")),
            Err(failure) => Err(failure.into_error(spec)),
        }
    }

    /// Fetches what `files` needs of `repo` at the hub's `main` into the cache.
    fn fetch(&self, client: &HubClient, repo: &RepoCache, files: &ModelFiles) -> Result<PathBuf, RemoteFailure> {
        let listing = client.listing()?;
        let plan = files.select(&listing).map_err(RemoteFailure::Refused)?;
        let snapshot = repo.snapshot_dir(&listing.commit);
        let missing: Vec<_> = plan.fetch.iter().filter(|f| !snapshot.join(&f.path).is_file()).collect();
        let to_download: Vec<_> = missing.iter().filter(|f| !repo.has_blob(&f.etag)).collect();
        let bytes = to_download.iter().map(|f| f.size).sum();
        let name = client.repo();
        if !to_download.is_empty() {
            let notice = files.notice;
            (self.progress)(&DownloadEvent::Start { repo: name, files: to_download.len(), bytes, notice });
        }
        let mut done = 0;
        for file in &missing {
            let metadata = client.metadata(&listing.commit, &file.path)?;
            if !repo.has_blob(&metadata.etag) {
                let base = done;
                let report = |event: http::Transfer| match event {
                    http::Transfer::Bytes(on_disk) => {
                        let event =
                            DownloadEvent::Progress { repo: name, file: &file.path, done: base + on_disk, bytes };
                        (self.progress)(&event)
                    }
                    http::Transfer::Retry(attempt) => {
                        (self.progress)(&DownloadEvent::Retry { repo: name, file: &file.path, attempt })
                    }
                };
                repo.download_blob(&metadata.etag, |incomplete| client.download(&metadata, incomplete, &report))?;
                done += metadata.size;
            }
            repo.link(&listing.commit, &file.path, &metadata.etag).map_err(RemoteFailure::Refused)?;
        }
        for absent in &plan.absent {
            repo.mark_absent(&listing.commit, absent).map_err(RemoteFailure::Refused)?;
        }
        repo.set_main(&listing.commit).map_err(RemoteFailure::Refused)?;
        if !to_download.is_empty() {
            (self.progress)(&DownloadEvent::Finish { repo: name });
        }
        Ok(snapshot)
    }

    /// The error for a model that offline mode cannot find complete in the cache.
    fn not_cached(&self, spec: &str, files: &ModelFiles, repo: &RepoCache) -> Error {
        let missing = match repo.main_snapshot().map(|(c, dir)| files.local_state(&dir, &repo.no_exist_dir(&c))) {
            Some(LocalState::Missing(missing)) => format!(" (its snapshot lacks {})", missing.join(", ")),
            _ => String::new(),
        };
        Error::MissingFile {
            what: format!("{} {spec}", files.what),
            path: self.cache.clone(),
            hint: format!(
                "offline mode is on (HF_HUB_OFFLINE or the offline option), and the hub cache does not hold it{missing}; run once online \
                 to download it, or fetch it with `huggingface-cli download {spec}` (or set HF_HOME / HF_HUB_CACHE \
                 to where it is), or pass a local folder"
            ),
        }
    }
}

/// `owner/name`, as the hub spells repository ids.
fn is_hub_id(spec: &str) -> bool {
    let mut parts = spec.split('/');
    let ok = |part: Option<&str>| {
        part.is_some_and(|p| {
            !p.is_empty()
                && !p.starts_with(['.', '-'])
                && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// `~/x` as `$HOME/x`.
fn expand_home(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(path),
    }
}

#[cfg(test)]
mod tests {
    use super::is_hub_id;

    #[test]
    fn hub_ids_are_owner_slash_name() {
        assert!(is_hub_id("stabilityai/stable-diffusion-2-1-base"));
        assert!(is_hub_id("jayanta/vit-base-patch16-224-in21k-face-recognition"));
        for not_an_id in ["model", "a/b/c", "./a", "../x", "/abs/path", "a/", "/a", "a/.hidden", "a/b c"] {
            assert!(!is_hub_id(not_an_id), "{not_an_id}");
        }
    }
}
