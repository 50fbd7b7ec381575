//! `stableid serve` on the tiny models, started as a process for the web app's tests, and an HTTP
//! client for its API.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::fixture;

/// A running `stableid serve`; killed when dropped.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub base: String,
    pub data: PathBuf,
    agent: ureq::Agent,
    token: Option<String>,
}

/// The flags that point `serve` at the tiny models (SD, ViT, SegFormer) and a names list of the
/// tiny tokenizer's words, written into `dir`.
pub fn tiny_model_args(dir: &Path) -> Vec<String> {
    let names = dir.join("names.txt");
    std::fs::write(&names, "great king\nnew man\nlove art\nred son\n").unwrap();
    [
        "--model",
        fixture("tiny-sd").to_str().unwrap(),
        "--face-encoder",
        fixture("tiny-vit").to_str().unwrap(),
        "--face-parser-weights",
        fixture("tiny-segformer").to_str().unwrap(),
        "--celeb-names",
        names.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

impl Server {
    /// Starts `stableid serve --bind 127.0.0.1:0 --data DATA` on the tiny models with `extra`
    /// flags, and waits for the URL it prints.
    pub fn start(data: &Path, extra: &[&str]) -> Self {
        let mut args: Vec<String> = vec!["serve".into(), "--bind".into(), "127.0.0.1:0".into(), "--data".into()];
        args.push(data.to_str().unwrap().into());
        args.extend(tiny_model_args(data.parent().unwrap()));
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_stableid"))
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the binary runs");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let url = line.trim().to_string();
        assert!(url.starts_with("http://127.0.0.1:"), "serve should print its URL first, printed {url:?}");
        let token = url.split_once("?token=").map(|(_, t)| t.to_string());
        let base = url.split("/?").next().unwrap().trim_end_matches('/').to_string();
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        Self { child, base, data: data.to_path_buf(), agent, token }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn authorised<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(token) => request.header("Authorization", format!("Bearer {token}")),
            None => request,
        }
    }

    /// GET `path`: status and body bytes.
    pub fn get(&self, path: &str) -> (u16, Vec<u8>) {
        let response = self.authorised(self.agent.get(&self.url(path))).call().unwrap();
        read(response)
    }

    /// GET `path` as JSON, expecting 200.
    pub fn get_json(&self, path: &str) -> Value {
        let (status, body) = self.get(path);
        assert_eq!(status, 200, "GET {path}: {}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    }

    /// POST a JSON value: status and the JSON answer.
    pub fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self.authorised(self.agent.post(&self.url(path))).send_json(body).unwrap();
        json_answer(response)
    }

    /// POST raw bytes with a content type: status and the JSON answer.
    pub fn post_bytes(&self, path: &str, content_type: &str, body: &[u8]) -> (u16, Value) {
        let response =
            self.authorised(self.agent.post(&self.url(path))).header("Content-Type", content_type).send(body).unwrap();
        json_answer(response)
    }

    pub fn delete(&self, path: &str) -> u16 {
        self.authorised(self.agent.delete(&self.url(path))).call().unwrap().status().as_u16()
    }

    /// Uploads a fixture photo; the photo's record (expects 201).
    pub fn upload(&self, fixture_photo: &str) -> Value {
        let bytes = std::fs::read(fixture(fixture_photo)).unwrap();
        let name = Path::new(fixture_photo).file_name().unwrap().to_str().unwrap();
        let (status, photo) = self.post_bytes(&format!("/api/photos?name={name}"), "image/jpeg", &bytes);
        assert_eq!(status, 201, "upload {fixture_photo}: {photo}");
        photo
    }

    /// Waits until job `id` has ended (at most `limit`); its last view.
    pub fn wait_for_job(&self, id: &str, limit: Duration) -> Value {
        let start = Instant::now();
        loop {
            let job = self.get_json(&format!("/api/jobs/{id}"));
            if ["done", "failed", "cancelled"].contains(&job["state"].as_str().unwrap()) {
                return job;
            }
            assert!(start.elapsed() < limit, "job {id} still {} after {limit:?}: {job}", job["state"]);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `request` as raw bytes over a new connection; the raw answer.
    pub fn raw(&self, request: &[u8]) -> String {
        let address = self.base.trim_start_matches("http://");
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        // The server may answer and close before the whole body is sent (a body over its limit):
        // the answer is read while the request is written, before the connection is reset.
        let mut writer = stream.try_clone().unwrap();
        let request = request.to_vec();
        let written = std::thread::spawn(move || {
            let _ = writer.write_all(&request);
        });
        let mut answer = Vec::new();
        let mut buffer = [0u8; 4096];
        while let Ok(n @ 1..) = stream.read(&mut buffer) {
            answer.extend_from_slice(&buffer[..n]);
        }
        written.join().unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// POST `body` with `content_type` as a raw request: the status of the answer.
    pub fn raw_post_status(&self, path: &str, content_type: &str, body: &[u8]) -> u16 {
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: {content_type}\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        let answer = self.raw(&request);
        answer
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no HTTP answer: {answer:?}"))
    }

    /// Stops the server (as a crash would: nothing is flushed on purpose).
    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn read(response: ureq::http::Response<ureq::Body>) -> (u16, Vec<u8>) {
    let status = response.status().as_u16();
    let body = response.into_body().with_config().limit(64 << 20).read_to_vec().unwrap();
    (status, body)
}

fn json_answer(response: ureq::http::Response<ureq::Body>) -> (u16, Value) {
    let (status, body) = read(response);
    let value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&body)))
    };
    (status, value)
}
