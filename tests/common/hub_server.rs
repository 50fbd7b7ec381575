//! A small Hugging Face hub on 127.0.0.1 for the download tests: the routes huggingface_hub 2.4
//! uses to fetch a model, answered as huggingface.co answers them.
//!
//! - `GET /api/models/{repo}/revision/{rev}?blobs=true`: `{"sha", "siblings": [{"rfilename",
//!   "size", "blobId", "lfs": {"sha256", "size", "pointerSize"}}]}`;
//! - `HEAD`/`GET /{repo}/resolve/{rev}/{path}`: a regular file with `ETag` (its git blob id),
//!   `Content-Length` and `X-Repo-Commit`; an LFS file as a 302 to the CDN with `X-Linked-Etag`,
//!   `X-Linked-Size` and `X-Repo-Commit`;
//! - the CDN, another host (127.0.0.2, as cdn-lfs.huggingface.co is another host than
//!   huggingface.co): `GET /cdn/{sha256}`, the bytes, with `Range` requests answered 206;
//! - errors with `X-Error-Code` (`RepoNotFound`, `EntryNotFound`, `GatedRepo`), 401 for a wrong or
//!   missing token when one is required.
//!
//! Faults on demand: a connection dropped part-way through a file once, corrupted bytes. Every
//! request is logged for the tests to check what was (not) asked.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use sha1::Sha1;
use sha2::{Digest, Sha256};

/// A request as the server saw it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
}

/// A file of a repository: its path, bytes, and whether the hub stores it with LFS.
#[derive(Debug, Clone)]
pub struct HubFile {
    pub path: String,
    pub bytes: Vec<u8>,
    pub lfs: bool,
}

impl HubFile {
    /// The blob name huggingface_hub gives it: the SHA-256 of an LFS file, the git blob id of
    /// another.
    pub fn etag(&self) -> String {
        if self.lfs {
            hex(&Sha256::digest(&self.bytes))
        } else {
            let mut git = Sha1::new();
            git.update(format!("blob {}\0", self.bytes.len()).as_bytes());
            git.update(&self.bytes);
            hex(&git.finalize())
        }
    }
}

#[derive(Default)]
struct State {
    cdn_url: String,
    repos: HashMap<String, (String, Vec<HubFile>)>,
    token: Option<String>,
    gated: HashSet<String>,
    /// sha256 -> bytes after which the next transfer of that blob stops.
    drop_once: HashMap<String, usize>,
    corrupt: HashSet<String>,
    requests: Vec<Request>,
}

pub struct HubServer {
    pub url: String,
    pub cdn_url: String,
    state: Arc<Mutex<State>>,
}

impl HubServer {
    /// Starts serving on a free port of 127.0.0.1, and the CDN on one of 127.0.0.2 (until the
    /// test process ends).
    pub fn start() -> Self {
        let hub = TcpListener::bind("127.0.0.1:0").unwrap();
        let cdn = TcpListener::bind("127.0.0.2:0").unwrap();
        let url = format!("http://{}", hub.local_addr().unwrap());
        let cdn_url = format!("http://{}", cdn.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State { cdn_url: cdn_url.clone(), ..State::default() }));
        for listener in [hub, cdn] {
            let shared = state.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    let state = shared.clone();
                    std::thread::spawn(move || serve(stream, &state));
                }
            });
        }
        Self { url, cdn_url, state }
    }

    /// Hosts `repo` with `files`; weights (`.safetensors`, `.bin`, `.pth`) are LFS files.
    pub fn add_repo(&self, repo: &str, files: Vec<(String, Vec<u8>)>) {
        let files = files
            .into_iter()
            .map(|(path, bytes)| {
                let lfs = [".safetensors", ".bin", ".pth"].iter().any(|ext| path.ends_with(ext));
                HubFile { path, bytes, lfs }
            })
            .collect();
        let commit = hex(&Sha1::digest(repo.as_bytes()));
        self.state.lock().unwrap().repos.insert(repo.to_string(), (commit, files));
    }

    /// Hosts `repo` with the files of the folder `dir` (and `extra` ones).
    pub fn add_folder(&self, repo: &str, dir: &Path, extra: Vec<(String, Vec<u8>)>) {
        let mut files = Vec::new();
        collect(dir, dir, &mut files);
        files.extend(extra);
        self.add_repo(repo, files);
    }

    pub fn commit(&self, repo: &str) -> String {
        self.state.lock().unwrap().repos[repo].0.clone()
    }

    pub fn file(&self, repo: &str, path: &str) -> HubFile {
        self.state.lock().unwrap().repos[repo].1.iter().find(|f| f.path == path).unwrap().clone()
    }

    /// Every request then needs `Authorization: Bearer {token}`.
    pub fn require_token(&self, token: &str) {
        self.state.lock().unwrap().token = Some(token.to_string());
    }

    /// `repo` answers 403 GatedRepo.
    pub fn gate(&self, repo: &str) {
        self.state.lock().unwrap().gated.insert(repo.to_string());
    }

    /// The next transfer of `path`'s bytes stops after `after` bytes, the connection closed.
    pub fn drop_once(&self, repo: &str, path: &str, after: usize) {
        let etag = self.file(repo, path).etag();
        self.state.lock().unwrap().drop_once.insert(etag, after);
    }

    /// `path`'s bytes are served with their first byte changed.
    pub fn corrupt(&self, repo: &str, path: &str) {
        let etag = self.file(repo, path).etag();
        self.state.lock().unwrap().corrupt.insert(etag);
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().requests.clone()
    }
}

fn collect(root: &Path, dir: &Path, files: &mut Vec<(String, Vec<u8>)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect(root, &path, files);
        } else {
            let name = path.strip_prefix(root).unwrap().to_str().unwrap().replace('\\', "/");
            files.push((name, std::fs::read(&path).unwrap()));
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An answer: status, headers, body, and how many of the body's bytes to send before closing.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    cut_after: Option<usize>,
}

impl Answer {
    fn new(status: u16) -> Self {
        Self { status, headers: Vec::new(), body: Vec::new(), cut_after: None }
    }

    fn header(mut self, name: &str, value: impl ToString) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    fn error(status: u16, code: &str, message: &str) -> Self {
        Self::new(status).header("X-Error-Code", code).header("X-Error-Message", message)
    }
}

fn serve(stream: TcpStream, state: &Mutex<State>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let mut headers = HashMap::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    let request = Request {
        method: method.clone(),
        path: target.clone(),
        range: headers.get("range").cloned(),
        authorization: headers.get("authorization").cloned(),
    };
    let answer = answer(&request, state);
    state.lock().unwrap().requests.push(request);
    let mut out = stream;
    let mut head = format!("HTTP/1.1 {} X\r\n", answer.status);
    for (name, value) in &answer.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !answer.headers.iter().any(|(n, _)| n == "Content-Length") {
        head.push_str(&format!("Content-Length: {}\r\n", answer.body.len()));
    }
    head.push_str("Connection: close\r\n\r\n");
    let _ = out.write_all(head.as_bytes());
    if method != "HEAD" {
        let sent = answer.cut_after.unwrap_or(answer.body.len()).min(answer.body.len());
        let _ = out.write_all(&answer.body[..sent]);
    }
    let _ = out.flush();
    let _ = out.shutdown(std::net::Shutdown::Both);
}

fn answer(request: &Request, state: &Mutex<State>) -> Answer {
    let mut state = state.lock().unwrap();
    let (path, _query) = request.path.split_once('?').unwrap_or((&request.path, ""));
    if let Some(etag) = path.strip_prefix("/cdn/") {
        return cdn(&mut state, etag, request.range.as_deref());
    }
    let (api, rest) = match path.strip_prefix("/api/models/") {
        Some(rest) => (true, rest),
        None => (false, path.trim_start_matches('/')),
    };
    let segments: Vec<&str> = rest.splitn(4, '/').collect();
    if segments.len() < 4 {
        return Answer::error(404, "RepoNotFound", "Repository not found");
    }
    let repo = format!("{}/{}", segments[0], segments[1]);
    if let Some(token) = &state.token {
        if request.authorization.as_deref() != Some(&format!("Bearer {token}")) {
            let message = if request.authorization.is_some() {
                "Invalid credentials in Authorization header"
            } else {
                "Repository not found"
            };
            return Answer::error(401, "RepoNotFound", message);
        }
    }
    if state.gated.contains(&repo) {
        return Answer::error(403, "GatedRepo", "Access to this model is restricted");
    }
    let Some((commit, files)) = state.repos.get(&repo) else {
        return Answer::error(404, "RepoNotFound", "Repository not found");
    };
    let (kind, revision, file) = (segments[2], segments[3], "");
    let (revision, file) = if api { (revision, file) } else { revision.split_once('/').unwrap_or((revision, file)) };
    if revision != "main" && revision != commit {
        return Answer::error(404, "RevisionNotFound", "Revision not found");
    }
    match (api, kind) {
        (true, "revision") => {
            let siblings: Vec<serde_json::Value> = files
                .iter()
                .map(|f| {
                    // An LFS file's blob id is its pointer's, not a name of the file's bytes.
                    let blob_id = if f.lfs { hex(&Sha1::digest(f.etag().as_bytes())) } else { f.etag() };
                    let mut sibling =
                        serde_json::json!({ "rfilename": f.path, "size": f.bytes.len(), "blobId": blob_id });
                    if f.lfs {
                        let lfs = serde_json::json!({ "sha256": f.etag(), "size": f.bytes.len(), "pointerSize": 134 });
                        sibling["lfs"] = lfs;
                    }
                    sibling
                })
                .collect();
            let body = serde_json::json!({ "id": repo, "sha": commit, "siblings": siblings });
            let mut answer = Answer::new(200).header("Content-Type", "application/json");
            answer.body = body.to_string().into_bytes();
            answer
        }
        (false, "resolve") => {
            let Some(found) = files.iter().find(|f| f.path == file) else {
                return Answer::error(404, "EntryNotFound", "Entry not found").header("X-Repo-Commit", commit);
            };
            let answer = Answer::new(if found.lfs { 302 } else { 200 }).header("X-Repo-Commit", commit);
            if found.lfs {
                // As the hub: the metadata on the redirect to the CDN, which serves the bytes.
                answer
                    .header("Location", format!("{}/cdn/{}", state.cdn_url, found.etag()))
                    .header("X-Linked-Etag", format!("\"{}\"", found.etag()))
                    .header("X-Linked-Size", found.bytes.len())
                    .header("ETag", "\"a-git-pointer-id\"")
                    .header("Content-Length", 0)
            } else {
                let mut answer = answer.header("ETag", format!("\"{}\"", found.etag()));
                answer.body = found.bytes.clone();
                answer
            }
        }
        _ => Answer::error(404, "RepoNotFound", "Not found"),
    }
}

/// The CDN: an LFS blob by its SHA-256, whole or from a `bytes=N-` range.
fn cdn(state: &mut State, etag: &str, range: Option<&str>) -> Answer {
    let found = state.repos.values().flat_map(|(_, files)| files).find(|f| f.lfs && f.etag() == etag).cloned();
    let Some(found) = found else { return Answer::new(404) };
    let mut bytes = found.bytes.clone();
    if state.corrupt.contains(etag) {
        bytes[0] ^= 0xFF;
    }
    let total = bytes.len();
    let start = range.and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse::<usize>().ok());
    let mut answer = match start {
        Some(start) if start >= total => return Answer::new(416).header("Content-Range", format!("bytes */{total}")),
        Some(start) => Answer::new(206).header("Content-Range", format!("bytes {start}-{}/{total}", total - 1)),
        None => Answer::new(200),
    };
    answer.body = bytes[start.unwrap_or(0)..].to_vec();
    answer.cut_after = state.drop_once.remove(etag);
    answer
}
