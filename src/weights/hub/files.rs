//! Which files of a model repository a loader reads: checked in a cached snapshot, chosen from the
//! hub's file list.

use std::path::Path;

use super::http::Listing;
use crate::{Error, Result};

/// The files a loader reads from a model repository, declared beside the loader (e.g.
/// [`ModelDir::files`](crate::weights::ModelDir::files)), so that what is fetched is what is read.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// What the model is, for messages ("face parser").
    pub what: &'static str,
    /// A hub id of such a model, for messages.
    pub example: &'static str,
    /// What a user must know before fetching it (a licence), said when a download starts.
    pub notice: Option<&'static str>,
    required: Vec<String>,
    optional: Vec<String>,
    /// Per weights file, the names the loader accepts, the one it prefers first.
    weights: Vec<Vec<String>>,
}

/// How much of a [`ModelFiles`] a cached snapshot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum LocalState {
    /// Everything, each weights file in the preferred form the repository has: no need to ask.
    Complete,
    /// Enough to load, but the hub may have a preferred form or an optional file.
    Usable,
    /// These files (or, for weights, any of their forms) are missing.
    Missing(Vec<String>),
}

/// A file to fetch: its path in the repository, size and etag (LFS SHA-256, else git blob id).
#[derive(Debug, Clone)]
pub(super) struct PlannedFile {
    pub path: String,
    pub size: u64,
    pub etag: String,
}

/// What to fetch, and the files known to be absent at this commit (recorded in `.no_exist/`).
#[derive(Debug, Clone)]
pub(super) struct Plan {
    pub fetch: Vec<PlannedFile>,
    pub absent: Vec<String>,
}

impl ModelFiles {
    pub fn new(what: &'static str, example: &'static str) -> Self {
        Self { what, example, notice: None, required: Vec::new(), optional: Vec::new(), weights: Vec::new() }
    }

    /// Says `notice` (a licence) when a download starts.
    pub fn notice(mut self, notice: &'static str) -> Self {
        self.notice = Some(notice);
        self
    }

    /// A file the loader cannot do without (a config).
    pub fn file(mut self, path: impl Into<String>) -> Self {
        self.required.push(path.into());
        self
    }

    /// A file the loader reads when it is there.
    pub fn optional(mut self, path: impl Into<String>) -> Self {
        self.optional.push(path.into());
        self
    }

    /// A weights file: one of `names` (paths in the repository), the loader's preference first.
    pub fn weights(mut self, names: impl IntoIterator<Item = String>) -> Self {
        self.weights.push(names.into_iter().collect());
        self
    }

    /// How much of these files the snapshot `dir` holds; `no_exist` is the folder of files known
    /// to be absent at its commit.
    pub(super) fn local_state(&self, dir: &Path, no_exist: &Path) -> LocalState {
        let present = |path: &String| dir.join(path).is_file();
        let absent = |path: &String| no_exist.join(path).is_file();
        let mut missing: Vec<String> = self.required.iter().filter(|p| !present(p)).cloned().collect();
        let mut complete = self.optional.iter().all(|p| present(p) || absent(p));
        for names in &self.weights {
            match names.iter().position(present) {
                Some(i) => complete &= names[..i].iter().all(absent),
                None => missing.push(names.join(" or ")),
            }
        }
        match (missing.is_empty(), complete) {
            (false, _) => LocalState::Missing(missing),
            (true, true) => LocalState::Complete,
            (true, false) => LocalState::Usable,
        }
    }

    /// Chooses the files to fetch from the repository's `listing`: every required and present
    /// optional file, and each weights file in the first form the repository has.
    pub(super) fn select(&self, listing: &Listing) -> Result<Plan> {
        let planned = |path: &String| {
            listing.files.get(path).map(|f| PlannedFile { path: path.clone(), size: f.size, etag: f.etag.clone() })
        };
        let mut fetch = Vec::new();
        let mut absent = Vec::new();
        for path in &self.required {
            fetch.push(planned(path).ok_or_else(|| self.not_in_repo(listing, path))?);
        }
        for path in &self.optional {
            match planned(path) {
                Some(file) => fetch.push(file),
                None => absent.push(path.clone()),
            }
        }
        for names in &self.weights {
            let i = names.iter().position(|n| listing.files.contains_key(n));
            let i = i.ok_or_else(|| self.not_in_repo(listing, &names.join(" or ")))?;
            fetch.push(planned(&names[i]).expect("listed"));
            absent.extend(names[..i].iter().cloned());
        }
        Ok(Plan { fetch, absent })
    }

    fn not_in_repo(&self, listing: &Listing, file: &str) -> Error {
        Error::UnsupportedModel(format!(
            "{} (commit {}) has no {file}: is it a {} (such as {})?",
            listing.repo, listing.commit, self.what, self.example
        ))
    }
}
