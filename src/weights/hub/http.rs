//! The hub's HTTP protocol, as huggingface_hub speaks it (see the module docs of
//! [`hub`](super)): the file list, a file's metadata, and a resumable, checked transfer.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use ureq::http::{Response, Uri};
use ureq::{Agent, Body};

use crate::Error;

/// Consecutive dropped connections, without a byte between them, after which a transfer gives up
/// (huggingface_hub's `http_get` also retries 5 times).
const MAX_RETRIES: usize = 5;
/// Redirects followed at most (huggingface_hub's `_MAX_REDIRECTS` is 10 too).
const MAX_REDIRECTS: usize = 10;

/// Why the hub did not give the files.
#[derive(Debug)]
pub(super) enum RemoteFailure {
    /// It could not be reached at all (no network, wrong host): the message says so.
    Unreachable(String),
    /// It answered, but not with the files; or they could not be stored.
    Refused(Error),
}

impl RemoteFailure {
    pub fn into_error(self, repo: &str) -> Error {
        match self {
            Self::Unreachable(msg) => Error::Download { repo: repo.to_string(), msg },
            Self::Refused(error) => error,
        }
    }
}

/// A repository's files at one commit, from the hub's file list.
#[derive(Debug, Clone)]
pub(super) struct Listing {
    pub repo: String,
    pub commit: String,
    pub files: HashMap<String, RemoteFile>,
}

#[derive(Debug, Clone)]
pub(super) struct RemoteFile {
    pub size: u64,
    /// The LFS SHA-256 of a large file, else its git blob id: the name of its blob in the cache.
    pub etag: String,
}

/// What the `HEAD` of a file says.
#[derive(Debug, Clone)]
pub(super) struct FileMetadata {
    pub path: String,
    pub etag: String,
    pub size: u64,
    /// Where its bytes are (the CDN, for LFS files on the hub).
    pub location: String,
}

/// What a transfer reports.
#[derive(Debug, Clone, Copy)]
pub(super) enum Transfer {
    /// Bytes of the file on disk.
    Bytes(u64),
    /// The connection dropped; this is retry number `.0`, from where it stopped.
    Retry(usize),
}

/// The model info answer of `GET /api/models/{repo}/revision/{rev}?blobs=true` (fields read).
#[derive(Deserialize)]
struct ModelInfo {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    lfs: Option<LfsInfo>,
}

#[derive(Deserialize)]
struct LfsInfo {
    sha256: String,
    size: u64,
}

/// A connection to the hub for one repository.
pub(super) struct HubClient<'a> {
    agent: Agent,
    endpoint: &'a str,
    token: Option<&'a str>,
    repo: &'a str,
}

/// A transfer that stopped: retry it, or give up.
enum Stopped {
    Dropped(String),
    Failed(RemoteFailure),
}

impl<'a> HubClient<'a> {
    pub fn new(endpoint: &'a str, token: Option<&'a str>, repo: &'a str) -> Self {
        let agent = Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent(concat!("stableid/", env!("CARGO_PKG_VERSION")))
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .build()
            .into();
        Self { agent, endpoint, token, repo }
    }

    pub fn repo(&self) -> &'a str {
        self.repo
    }

    /// The files of `main` with their sizes and etags.
    pub fn listing(&self) -> Result<Listing, RemoteFailure> {
        let url = format!("{}/api/models/{}/revision/main?blobs=true", self.endpoint, self.repo);
        let response = self.call("GET", &url, None, None)?;
        let response = self.expect_success(response, &url, None)?;
        let text = response.into_body().with_config().limit(64 << 20).read_to_string();
        let info: ModelInfo = text
            .map_err(|e| e.to_string())
            .and_then(|text| serde_json::from_str(&text).map_err(|e| e.to_string()))
            .map_err(|e| self.not_a_hub(&format!("its file list is not the hub's JSON ({e})")))?;
        let mut files = HashMap::new();
        for sibling in info.siblings {
            let (size, etag) = match (sibling.lfs, sibling.size, sibling.blob_id) {
                (Some(lfs), _, _) => (lfs.size, lfs.sha256),
                (None, Some(size), Some(blob_id)) => (size, blob_id),
                _ => {
                    return Err(self.not_a_hub(&format!("its file list gives no size or id for {}", sibling.rfilename)))
                }
            };
            files.insert(sibling.rfilename, RemoteFile { size, etag });
        }
        Ok(Listing { repo: self.repo.to_string(), commit: info.sha, files })
    }

    /// The `HEAD` of `path` at `commit`, following redirects on the hub's hosts only (a redirect
    /// elsewhere, to a CDN, carries the metadata itself).
    pub fn metadata(&self, commit: &str, path: &str) -> Result<FileMetadata, RemoteFailure> {
        let mut url = format!("{}/{}/resolve/{commit}/{}", self.endpoint, self.repo, quote(path));
        for _ in 0..MAX_REDIRECTS {
            let response = self.call("HEAD", &url, None, None)?;
            let response = self.expect_success(response, &url, Some(path))?;
            let location = header(&response, "Location").map(|l| join_url(&url, &l));
            if let Some(target) =
                location.as_ref().filter(|t| response.status().is_redirection() && same_origin(&url, t))
            {
                url = target.clone();
                continue;
            }
            if header(&response, "X-Repo-Commit").is_none() {
                return Err(self.not_a_hub("its answer lacks the X-Repo-Commit header"));
            }
            let etag = header(&response, "X-Linked-Etag").or_else(|| header(&response, "ETag"));
            let etag = etag.map(|e| e.trim_start_matches("W/").trim_matches('"').to_string());
            let etag = etag.ok_or_else(|| self.not_a_hub(&format!("its answer for {path} has no ETag")))?;
            let size = header(&response, "X-Linked-Size").or_else(|| {
                (!response.status().is_redirection()).then(|| header(&response, "Content-Length")).flatten()
            });
            let size = size.and_then(|s| s.parse().ok());
            let size = size.ok_or_else(|| self.not_a_hub(&format!("its answer for {path} gives no size")))?;
            return Ok(FileMetadata { path: path.to_string(), etag, size, location: location.unwrap_or(url) });
        }
        Err(RemoteFailure::Refused(self.error(format!("more than {MAX_REDIRECTS} redirects for {path}"))))
    }

    /// Fills `incomplete` with the file's bytes, from where it stops (an interrupted run's part
    /// included), retrying dropped connections; then checks its size and, for an LFS file, its
    /// SHA-256. A file that fails the check is deleted; one that cannot be completed is kept
    /// for the next run to resume.
    pub fn download(
        &self,
        file: &FileMetadata,
        incomplete: &Path,
        report: &dyn Fn(Transfer),
    ) -> Result<(), RemoteFailure> {
        let stored = |e: std::io::Error| {
            RemoteFailure::Refused(Error::Output { path: incomplete.to_path_buf(), msg: e.to_string() })
        };
        let mut out = OpenOptions::new().create(true).append(true).open(incomplete).map_err(stored)?;
        let mut retries = 0;
        loop {
            let mut have = out.metadata().map_err(stored)?.len();
            if have > file.size {
                out.set_len(0).map_err(stored)?;
                have = 0;
            }
            report(Transfer::Bytes(have));
            if have == file.size {
                break;
            }
            let dropped = match self.transfer(file, have, (&mut out, incomplete), report) {
                Ok(()) => "the connection closed early".to_string(),
                Err(Stopped::Dropped(why)) => why,
                Err(Stopped::Failed(failure)) => return Err(failure),
            };
            let progressed = out.metadata().map_err(stored)?.len() > have;
            retries = if progressed { 1 } else { retries + 1 };
            if retries > MAX_RETRIES {
                return Err(RemoteFailure::Refused(self.error(format!(
                    "{}: {dropped}, {MAX_RETRIES} times in a row; what arrived is kept in {}: run again to resume",
                    file.path,
                    incomplete.display()
                ))));
            }
            report(Transfer::Retry(retries));
            std::thread::sleep(Duration::from_millis(200 * (retries as u64 - 1)));
        }
        drop(out);
        if is_sha256(&file.etag) {
            let actual = sha256_of(incomplete).map_err(stored)?;
            if actual != file.etag {
                std::fs::remove_file(incomplete).ok();
                return Err(RemoteFailure::Refused(self.error(format!(
                    "{}: the bytes received have SHA-256 {actual}, the hub's is {}: they were discarded; run again",
                    file.path, file.etag
                ))));
            }
        }
        Ok(())
    }

    /// One `GET` of the file's bytes from `have` on, appended to `out` (the file at `path`).
    fn transfer(
        &self,
        file: &FileMetadata,
        have: u64,
        (out, path): (&mut File, &Path),
        report: &dyn Fn(Transfer),
    ) -> Result<(), Stopped> {
        let range = (have > 0).then(|| format!("bytes={have}-"));
        let mut url = file.location.clone();
        let mut response = None;
        for _ in 0..MAX_REDIRECTS {
            let answer = self.call("GET", &url, range.as_deref(), Some(&file.path)).map_err(Stopped::Failed)?;
            match header(&answer, "Location").filter(|_| answer.status().is_redirection()) {
                Some(target) => url = join_url(&url, &target),
                None => {
                    response = Some(answer);
                    break;
                }
            }
        }
        let response = response.ok_or_else(|| {
            Stopped::Failed(RemoteFailure::Refused(
                self.error(format!("more than {MAX_REDIRECTS} redirects for {}", file.path)),
            ))
        })?;
        let stored = |e: std::io::Error| {
            Stopped::Failed(RemoteFailure::Refused(Error::Output { path: path.to_path_buf(), msg: e.to_string() }))
        };
        let mut have = have;
        match response.status().as_u16() {
            // A full answer to a ranged request (the server ignored the range): start over.
            200 if have > 0 => {
                out.set_len(0).map_err(stored)?;
                have = 0;
            }
            200 => {}
            206 => {
                let start = header(&response, "Content-Range")
                    .and_then(|r| r.strip_prefix("bytes ")?.split('-').next()?.parse::<u64>().ok());
                if start != Some(have) {
                    out.set_len(0).map_err(stored)?;
                    return Err(Stopped::Dropped(format!("the server sent another range than bytes={have}-")));
                }
            }
            // The range is past the file's end: the part on disk is not of this file.
            416 => {
                out.set_len(0).map_err(stored)?;
                return Err(Stopped::Dropped("the part on disk is longer than the file".into()));
            }
            _ => return Err(Stopped::Failed(self.status_failure(&response, &url, Some(&file.path)))),
        }
        let mut body = response.into_body().into_reader();
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let n = match body.read(&mut buffer) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) => return Err(Stopped::Dropped(e.to_string())),
            };
            out.write_all(&buffer[..n]).map_err(stored)?;
            have += n as u64;
            report(Transfer::Bytes(have));
        }
    }

    /// Sends a request (the token only to the hub's hosts); `file` names what is fetched.
    fn call(
        &self,
        method: &str,
        url: &str,
        range: Option<&str>,
        file: Option<&str>,
    ) -> Result<Response<Body>, RemoteFailure> {
        let mut request = match method {
            "HEAD" => self.agent.head(url),
            _ => self.agent.get(url),
        };
        // The real size, not a compressed one (huggingface_hub's `get_hf_file_metadata`).
        request = request.header("Accept-Encoding", "identity");
        if let Some(range) = range {
            request = request.header("Range", range);
        }
        if let Some(token) = self.token.filter(|_| self.is_hub_host(url)) {
            request = request.header("Authorization", &format!("Bearer {token}"));
        }
        request.call().map_err(|e| match e {
            ureq::Error::Io(_)
            | ureq::Error::ConnectionFailed
            | ureq::Error::HostNotFound
            | ureq::Error::Timeout(_)
            | ureq::Error::Tls(_) => RemoteFailure::Unreachable(format!(
                "cannot reach {} ({e}){}: check the network connection and HF_ENDPOINT, or work offline with models \
                 already in the cache (HF_HUB_OFFLINE=1)",
                self.endpoint,
                file.map(|f| format!(" for {f}")).unwrap_or_default()
            )),
            e => RemoteFailure::Refused(self.error(format!("{method} {url}: {e}"))),
        })
    }

    fn expect_success(
        &self,
        response: Response<Body>,
        url: &str,
        file: Option<&str>,
    ) -> Result<Response<Body>, RemoteFailure> {
        if response.status().is_success() || response.status().is_redirection() {
            Ok(response)
        } else {
            Err(self.status_failure(&response, url, file))
        }
    }

    /// The error for an answer other than the files, saying what to do.
    fn status_failure(&self, response: &Response<Body>, url: &str, file: Option<&str>) -> RemoteFailure {
        let status = response.status().as_u16();
        let code = header(response, "X-Error-Code");
        let msg = match (status, code.as_deref()) {
            (401, _) if self.token.is_some() => "the hub refused the access token (401 Unauthorized): the token in \
                HF_TOKEN (or the token file) is wrong or expired, or the repository does not exist: check the id, \
                and set HF_TOKEN to a valid token from your hub account's settings"
                .to_string(),
            (401, _) => "the hub answered 401 Unauthorized: the repository is private or gated, or does not exist: \
                check the id, or set HF_TOKEN to an access token that can read it"
                .to_string(),
            (403, Some("GatedRepo")) => "the repository is gated (403): accept its conditions on its hub page with \
                your account, then set HF_TOKEN to an access token of that account"
                .to_string(),
            (403, _) => {
                "access denied (403): set HF_TOKEN to an access token that can read this repository".to_string()
            }
            (404, Some("EntryNotFound")) => {
                format!("it has no file {} (404)", file.unwrap_or("?"))
            }
            (404, Some("RevisionNotFound")) => "it has no branch main (404)".to_string(),
            (404, _) => format!("no such repository on {} (404): check the id", self.endpoint),
            (429, _) | (500.., _) => format!("the hub answered {status} for {url}: try again later"),
            _ => format!("the hub answered {status} for {url}"),
        };
        RemoteFailure::Refused(self.error(msg))
    }

    fn not_a_hub(&self, problem: &str) -> RemoteFailure {
        RemoteFailure::Refused(
            self.error(format!(
                "{} does not answer as a Hugging Face hub: {problem} (check HF_ENDPOINT)",
                self.endpoint
            )),
        )
    }

    fn error(&self, msg: String) -> Error {
        Error::Download { repo: self.repo.to_string(), msg }
    }

    /// Whether the token may go to `url`: the endpoint's host, or the hub's own
    /// (huggingface_hub's `_is_same_or_hub_host`).
    fn is_hub_host(&self, url: &str) -> bool {
        [self.endpoint, super::DEFAULT_ENDPOINT, "https://hf.co"].iter().any(|hub| same_origin(hub, url))
    }
}

fn header(response: &Response<Body>, name: &str) -> Option<String> {
    response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// Scheme, lower-case host and port (the scheme's default if none).
fn origin(url: &str) -> Option<(String, String, u16)> {
    let uri: Uri = url.parse().ok()?;
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let port = uri.port_u16().unwrap_or(if scheme == "https" { 443 } else { 80 });
    Some((scheme, uri.host()?.to_ascii_lowercase(), port))
}

fn same_origin(a: &str, b: &str) -> bool {
    origin(a).is_some_and(|o| Some(o) == origin(b))
}

/// `location` (absolute, or relative to `base`) as an absolute URL.
fn join_url(base: &str, location: &str) -> String {
    if location.contains("://") {
        return location.to_string();
    }
    let Ok(uri) = base.parse::<Uri>() else { return location.to_string() };
    let root = format!("{}://{}", uri.scheme_str().unwrap_or("https"), uri.authority().map_or("", |a| a.as_str()));
    if location.starts_with('/') {
        format!("{root}{location}")
    } else {
        let dir = uri.path().rsplit_once('/').map_or("", |(dir, _)| dir);
        format!("{root}{dir}/{location}")
    }
}

/// A path in a URL: everything but unreserved characters and `/` percent-encoded.
fn quote(path: &str) -> String {
    path.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn is_sha256(etag: &str) -> bool {
    etag.len() == 64 && etag.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn sha256_of(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
