//! One repository's folder in the hub cache, laid out as huggingface_hub lays it out
//! (`file_download.py`: `_hf_hub_download_to_cache_dir`, `_create_symlink`,
//! `_cache_commit_hash_for_specific_revision`; `.no_exist` as `_get_metadata_or_catch_error`
//! writes it; locks as its `WeakFileLock`, an exclusive `flock` on the same path, so that Python
//! and this tool never write the same blob at once):
//!
//! ```text
//! {cache}/models--owner--name/
//!     blobs/<etag>                      the files' bytes, named by LFS SHA-256 or git blob id
//!     blobs/<etag>.incomplete           a download under way (or interrupted, to resume)
//!     snapshots/<commit>/<path>         -> ../../blobs/<etag> (one more ../ per folder of path)
//!     refs/main                         the commit of main, no newline
//!     .no_exist/<commit>/<path>         empty: the file is not in the repository at that commit
//! {cache}/.locks/models--owner--name/<etag>.lock
//! ```

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use super::http::RemoteFailure;
use crate::{Error, Result};

pub(super) struct RepoCache {
    root: PathBuf,
    locks: PathBuf,
}

impl RepoCache {
    /// The folder of model repository `repo_id` (`owner/name`) in `cache`.
    pub fn new(cache: &Path, repo_id: &str) -> Self {
        let folder = format!("models--{}", repo_id.replace('/', "--"));
        Self { root: cache.join(&folder), locks: cache.join(".locks").join(folder) }
    }

    /// The commit `refs/main` names and its snapshot folder, when both exist.
    pub fn main_snapshot(&self) -> Option<(String, PathBuf)> {
        let commit = crate::io::read_text_bounded(&self.root.join("refs/main"), 4096).ok()?.trim().to_string();
        let dir = self.snapshot_dir(&commit);
        (is_name(&commit) && dir.is_dir()).then_some((commit, dir))
    }

    pub fn snapshot_dir(&self, commit: &str) -> PathBuf {
        self.root.join("snapshots").join(commit)
    }

    pub fn no_exist_dir(&self, commit: &str) -> PathBuf {
        self.root.join(".no_exist").join(commit)
    }

    fn blob(&self, etag: &str) -> PathBuf {
        self.root.join("blobs").join(etag)
    }

    pub fn has_blob(&self, etag: &str) -> bool {
        is_name(etag) && self.blob(etag).is_file()
    }

    /// Makes `blobs/<etag>`: `download` fills `blobs/<etag>.incomplete` (resuming what is there)
    /// and checks it, which is then renamed into place. Under the blob's lock; a blob that
    /// another process finished meanwhile is kept as it is.
    pub fn download_blob(
        &self,
        etag: &str,
        download: impl FnOnce(&Path) -> Result<(), RemoteFailure>,
    ) -> Result<(), RemoteFailure> {
        if !is_name(etag) {
            return Err(RemoteFailure::Refused(Error::Input(format!(
                "the hub gave {etag:?} as a file's etag, which cannot name a file: is HF_ENDPOINT a Hugging Face hub?"
            ))));
        }
        let blob = self.blob(etag);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |e: std::io::Error| RemoteFailure::Refused(Error::Output { path, msg: e.to_string() })
        };
        let blobs = blob.parent().expect("a blob has a folder");
        std::fs::create_dir_all(blobs).map_err(io(blobs))?;
        std::fs::create_dir_all(&self.locks).map_err(io(&self.locks))?;
        let lock_path = self.locks.join(format!("{etag}.lock"));
        let lock =
            OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io(&lock_path))?;
        lock.lock().map_err(io(&lock_path))?;
        if blob.is_file() {
            return Ok(());
        }
        let incomplete = blobs.join(format!("{etag}.incomplete"));
        download(&incomplete)?;
        std::fs::rename(&incomplete, &blob).map_err(io(&blob))
    }

    /// Points `snapshots/<commit>/<path>` at `blobs/<etag>` by a relative link.
    pub fn link(&self, commit: &str, path: &str, etag: &str) -> Result<()> {
        let pointer = self.snapshot_dir(commit).join(path);
        let depth = Path::new(path).components().count();
        let target = PathBuf::from("../".repeat(depth + 1)).join("blobs").join(etag);
        let io = |e: std::io::Error| Error::Output { path: pointer.clone(), msg: e.to_string() };
        std::fs::create_dir_all(pointer.parent().expect("a file has a folder")).map_err(io)?;
        match std::fs::remove_file(&pointer) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
        symlink_or_copy(&target, &pointer).map_err(io)
    }

    /// Records that `path` is not in the repository at `commit`.
    pub fn mark_absent(&self, commit: &str, path: &str) -> Result<()> {
        let marker = self.no_exist_dir(commit).join(path);
        let io = |e: std::io::Error| Error::Output { path: marker.clone(), msg: e.to_string() };
        std::fs::create_dir_all(marker.parent().expect("a file has a folder")).map_err(io)?;
        std::fs::write(&marker, b"").map_err(io)
    }

    /// Makes `refs/main` name `commit`.
    pub fn set_main(&self, commit: &str) -> Result<()> {
        let refs = self.root.join("refs");
        std::fs::create_dir_all(&refs).map_err(|e| Error::Output { path: refs.clone(), msg: e.to_string() })?;
        crate::io::write_bytes(&refs.join("main"), commit.as_bytes())
    }
}

/// A commit or etag that can name a file: letters, digits, `-` and `_` only.
fn is_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[cfg(unix)]
fn symlink_or_copy(target: &Path, pointer: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, pointer)
}

/// Without symbolic links the snapshot holds a copy, as huggingface_hub does on such systems.
#[cfg(not(unix))]
fn symlink_or_copy(target: &Path, pointer: &Path) -> std::io::Result<()> {
    std::fs::copy(pointer.parent().expect("a file has a folder").join(target), pointer).map(|_| ())
}
