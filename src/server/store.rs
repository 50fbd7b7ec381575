//! The data folder: everything the web app makes, under names it generates, each thing with a
//! JSON record beside its files, so that a restart finds it all again:
//!
//! ```text
//! DATA/photos/ID.upload, ID.crop.png, ID.overlay.png, ID.json   an upload, its aligned crop, masks
//! DATA/identities/ID.safetensors, ID.json                        a learned identity
//! DATA/identities/ID.FORMAT.safetensors                          its exports, made when asked for
//! DATA/images/ID.png, ID.json                                    a generated image, its settings
//! DATA/images/ID.mp4, ID.json                                    a generated video, its settings
//! DATA/images/ID.ply, ID.mp4, ID.png, ID.json                    a 3D head: splats, turntable, front
//! DATA/poses/ID.png, ID.json                                     a pose skeleton (uploaded or detected)
//! DATA/previews/ID.png, ID.json                                  a sample image made while learning
//!                                                                (an identity or a 3D head)
//! DATA/work/                                                     checkpoints, the celebrity basis cache
//! ```
//!
//! Ids are 16 random hex digits; a request's id is used only after it was found among the records
//! ([`is_id`] first), so no request reaches a path of its choosing. Files are written atomically
//! ([`crate::io::write_atomically`]), the record last: a record always has its files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::io::{read_text_bounded, write_bytes, SMALL_FILE_LIMIT};
use crate::{Error, Result};

/// Whether `id` has the form of a generated id (16 lower-case hex digits).
pub fn is_id(id: &str) -> bool {
    id.len() == 16 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A new random id.
pub fn new_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The kinds of things kept, each in its folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Photo,
    Identity,
    /// The gallery: images, videos and 3D heads ([`GalleryRecord`]).
    Gallery,
    Preview,
    Pose,
}

impl Kind {
    const ALL: [Kind; 5] = [Kind::Photo, Kind::Identity, Kind::Gallery, Kind::Preview, Kind::Pose];

    fn folder(self) -> &'static str {
        match self {
            Kind::Photo => "photos",
            Kind::Identity => "identities",
            // The gallery's first items were images only: the folder keeps its name.
            Kind::Gallery => "images",
            Kind::Preview => "previews",
            Kind::Pose => "poses",
        }
    }
}

/// An uploaded photo and what its analysis found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PhotoRecord {
    pub id: String,
    /// The file name the browser gave (shown only, never used as a path).
    pub name: String,
    pub created: u64,
    pub sha256: String,
    /// Aligned from a detected face (else taken as an aligned crop already).
    pub aligned: bool,
    /// The face aligned, numbered from 1, largest first.
    pub face: usize,
    pub faces_found: usize,
    /// The crop reaches past the photo (filled by reflection).
    pub padded: bool,
    pub face_fraction: f64,
    pub hair_fraction: f64,
}

/// A learned identity.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdentityRecord {
    pub id: String,
    pub name: String,
    pub created: u64,
    /// The photos it was learned from.
    pub photos: Vec<String>,
    pub steps: usize,
    pub seed: u64,
    /// The loss of every step.
    pub losses: Vec<f64>,
    /// The identity file's metadata (model, settings, photo hashes).
    pub metadata: HashMap<String, String>,
}

/// What a gallery item is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum MediaKind {
    /// `ID.png`.
    #[default]
    #[serde(rename = "image")]
    Image,
    /// `ID.mp4`.
    #[serde(rename = "video")]
    Video,
    /// A 3D head: `ID.ply` (the Gaussians), `ID.mp4` (the turntable), `ID.png` (its front view).
    #[serde(rename = "3d")]
    ThreeD,
}

impl MediaKind {
    /// The files of an item of this kind, as the API names them and as stored (`ID.SUFFIX`).
    pub fn files(self) -> &'static [(&'static str, &'static str)] {
        match self {
            MediaKind::Image => &[("image.png", "png")],
            MediaKind::Video => &[("video.mp4", "mp4")],
            MediaKind::ThreeD => &[("video.mp4", "mp4"), ("splats.ply", "ply"), ("image.png", "png")],
        }
    }
}

/// A gallery item: a generated image, video or 3D head.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GalleryRecord {
    pub id: String,
    /// Records written before videos and 3D existed are images.
    #[serde(default)]
    pub kind: MediaKind,
    pub created: u64,
    /// The request that made it (with its `kind`), this item's seed in it: sent back as is, it
    /// makes the item again.
    pub request: serde_json::Value,
    /// The identities of the prompt, in placeholder order (`v1* v2*` is the first).
    pub identities: Vec<IdentityRef>,
    /// What the file's metadata holds (prompt, seed, sampler, size, model, ...).
    pub settings: Vec<(String, String)>,
    /// What the job warned about (an identity learned on another text encoder, ...).
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// A pose skeleton (an OpenPose map) that steers images through the pose ControlNet.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoseRecord {
    pub id: String,
    /// The file name the browser gave (shown only, never used as a path).
    pub name: String,
    pub created: u64,
    /// SHA-256 of the uploaded file.
    pub sha256: String,
    /// The skeleton was detected in a photo of a person (else the upload is the skeleton).
    pub detected: bool,
    /// The people found (a detected pose).
    pub people: Option<usize>,
    pub width: u32,
    pub height: u32,
}

/// An identity as an image refers to it (it may have been deleted since).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdentityRef {
    pub id: String,
    pub name: String,
}

/// A sample image drawn with an identity as learned so far, or a 3D head's front view as trained
/// so far.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreviewRecord {
    pub id: String,
    pub created: u64,
    pub job: String,
    /// The learning step or 3D iteration after which it was drawn.
    pub step: usize,
    pub prompt: String,
    pub seed: u64,
}

/// The records of one kind, by id.
type Records = HashMap<String, serde_json::Value>;

/// The data folder and its records (shared by the request handlers and the job worker).
#[derive(Clone)]
pub struct Store {
    root: PathBuf,
    records: Arc<Mutex<HashMap<Kind, Records>>>,
}

impl Store {
    /// Opens (creating) the data folder and reads its records; a record that cannot be read is
    /// skipped with a warning, never deleted.
    pub fn open(root: &Path) -> Result<Self> {
        let mut records = HashMap::new();
        for kind in Kind::ALL {
            let folder = root.join(kind.folder());
            std::fs::create_dir_all(&folder).map_err(|e| Error::Output {
                path: folder.clone(),
                msg: format!("cannot create the data folder: {e}"),
            })?;
            records.insert(kind, read_records(&folder)?);
        }
        let work = root.join("work");
        std::fs::create_dir_all(&work).map_err(|e| Error::Output { path: work, msg: e.to_string() })?;
        Ok(Self { root: root.to_path_buf(), records: Arc::new(Mutex::new(records)) })
    }

    /// `DATA/FOLDER/ID.SUFFIX` of a generated `id`.
    pub fn path(&self, kind: Kind, id: &str, suffix: &str) -> PathBuf {
        debug_assert!(is_id(id), "only generated ids make paths");
        self.root.join(kind.folder()).join(format!("{id}.{suffix}"))
    }

    /// A folder for the job worker's own files (checkpoints, caches).
    pub fn work_dir(&self) -> PathBuf {
        self.root.join("work")
    }

    /// The record of `id`, if `id` is a generated id with a record of this kind.
    pub fn get<T: DeserializeOwned>(&self, kind: Kind, id: &str) -> Option<T> {
        if !is_id(id) {
            return None;
        }
        let records = self.records.lock().expect("records lock");
        records[&kind].get(id).and_then(|v| serde_json::from_value(v.clone()).ok())
    }

    /// All records of a kind, newest first.
    pub fn list<T: DeserializeOwned>(&self, kind: Kind) -> Vec<T> {
        let records = self.records.lock().expect("records lock");
        let mut values: Vec<&serde_json::Value> = records[&kind].values().collect();
        values.sort_by_key(|v| {
            (std::cmp::Reverse(v["created"].as_u64().unwrap_or(0)), v["id"].as_str().map(String::from))
        });
        values.into_iter().filter_map(|v| serde_json::from_value(v.clone()).ok()).collect()
    }

    /// Writes the record `id` of `kind` (its files are written before).
    pub fn put<T: Serialize>(&self, kind: Kind, id: &str, record: &T) -> Result<()> {
        let value = serde_json::to_value(record).map_err(|e| Error::Internal(format!("record of {id}: {e}")))?;
        let text = serde_json::to_string_pretty(&value).map_err(|e| Error::Internal(e.to_string()))?;
        write_bytes(&self.path(kind, id, "json"), text.as_bytes())?;
        self.records.lock().expect("records lock").get_mut(&kind).expect("every kind").insert(id.to_string(), value);
        Ok(())
    }

    /// Removes the record `id` and every file of it (`ID.*`); whether there was one.
    pub fn delete(&self, kind: Kind, id: &str) -> Result<bool> {
        if !is_id(id) {
            return Ok(false);
        }
        let removed = self.records.lock().expect("records lock").get_mut(&kind).expect("every kind").remove(id);
        if removed.is_some() {
            self.remove_files(kind, id)?;
        }
        Ok(removed.is_some())
    }

    /// Removes the files `ID.*` of a generated id (those of a failed upload, say).
    pub fn remove_files(&self, kind: Kind, id: &str) -> Result<()> {
        let folder = self.root.join(kind.folder());
        let prefix = format!("{id}.");
        for entry in std::fs::read_dir(&folder)?.flatten() {
            if entry.file_name().to_str().is_some_and(|name| name.starts_with(&prefix)) {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(())
    }
}

/// The `ID.json` records of a folder.
fn read_records(folder: &Path) -> Result<Records> {
    let mut records = Records::new();
    for entry in std::fs::read_dir(folder)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_suffix(".json").filter(|id| is_id(id)) else { continue };
        let parsed = read_text_bounded(&entry.path(), SMALL_FILE_LIMIT)
            .map_err(|e| e.to_string())
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).map_err(|e| e.to_string()));
        match parsed {
            Ok(value) if value["id"] == id => {
                records.insert(id.to_string(), value);
            }
            Ok(_) => eprintln!("warning: {}: its id does not match its name; skipped", entry.path().display()),
            Err(e) => eprintln!("warning: {}: unreadable record ({e}); skipped", entry.path().display()),
        }
    }
    Ok(records)
}
