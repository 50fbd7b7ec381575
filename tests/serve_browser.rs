//! The web app in a real browser (Debian's headless Chromium, driven through chromedriver's
//! WebDriver) on the tiny models: upload a photo and see its crop, learn a few steps while the
//! progress moves (with a preview and the loss curve), download the identity, generate with it,
//! see the image and its settings in the gallery and reuse them, make a tiny video that plays in
//! the gallery and reuse its settings, reload and find it all again.
//!
//! Chromium and chromedriver must be installed (`apt-get install -y chromium chromium-driver`, as
//! `.ci/run` does): without them this test fails, it never skips.
#![cfg(feature = "server")]

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::fixture;
use common::server::Server;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const WAIT: Duration = Duration::from_secs(120);

/// chromedriver on a free port; killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start() -> Self {
        for program in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(program).is_file(),
                "{program} is missing: install Chromium and its WebDriver with `apt-get install -y chromium chromium-driver` \
                 (.ci/run does)"
            );
        }
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let url = format!("http://127.0.0.1:{port}");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < WAIT, "chromedriver did not start listening on {url}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, url }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver, profile: &Path, downloads: &Path) -> Client {
    let capabilities = json!({
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,2400",
                format!("--user-data-dir={}", profile.display()),
            ],
            "prefs": {
                "download.default_directory": downloads.to_str().unwrap(),
                "download.prompt_for_download": false,
            },
        }
    });
    let Value::Object(capabilities) = capabilities else { unreachable!() };
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector).capabilities(capabilities).connect(&driver.url).await.expect("a browser session")
}

/// Runs `script` (a JS function body) in the page until it returns something truthy; returns it.
async fn wait_for_js(client: &Client, what: &str, script: &str) -> Value {
    let start = Instant::now();
    loop {
        let value = client.execute(script, vec![]).await.unwrap();
        if !(value.is_null() || value == json!(false) || value == json!(0) || value == json!("")) {
            return value;
        }
        if start.elapsed() > WAIT {
            let page = "return document.getElementById('message').textContent + ' | jobs: ' + \
                        document.getElementById('job-list').textContent";
            panic!("waited {WAIT:?} for {what}; the page says: {}", client.execute(page, vec![]).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn set_value(client: &Client, id: &str, value: &str) {
    let field = client.find(Locator::Id(id)).await.unwrap();
    field.clear().await.unwrap();
    field.send_keys(value).await.unwrap();
}

/// The first regular file in `dir` whose name ends with `suffix` (a finished download).
fn downloaded(dir: &Path, suffix: &str) -> Option<PathBuf> {
    std::fs::read_dir(dir).ok()?.flatten().map(|e| e.path()).find(|p| p.to_string_lossy().ends_with(suffix))
}

#[test]
fn upload_learn_download_generate_and_reuse_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let (profile, downloads) = (dir.path().join("profile"), dir.path().join("downloads"));
    std::fs::create_dir_all(&downloads).unwrap();
    let video_model = fixture("tiny-video");
    let server = Server::start(&dir.path().join("data"), &["--video-model", video_model.to_str().unwrap()]);
    let driver = Driver::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = browser(&driver, &profile, &downloads).await;
        client.goto(&format!("{}/", server.base)).await.unwrap();
        wait_for_js(&client, "the page to load its settings", "return document.getElementById('sampler').options.length").await;

        // Upload: the aligned crop and the mask overlay appear.
        let input = client.find(Locator::Id("photo-input")).await.unwrap();
        input.send_keys(fixture("photos/astronaut_1024x768.jpg").to_str().unwrap()).await.unwrap();
        let crop_width = wait_for_js(
            &client,
            "the aligned crop",
            "const img = document.querySelector('.photo img.crop'); return img && img.complete && img.naturalWidth",
        )
        .await;
        assert_eq!(crop_width, 512);
        let overlay = "const img = document.querySelector('.photo img.overlay'); return img && img.complete && img.naturalWidth";
        assert_eq!(wait_for_js(&client, "the mask overlay", overlay).await, 512);

        // Learn 8 steps with a preview every 3, recording every progress text the page shows.
        client
            .execute(
                "window.seen = []; new MutationObserver(() => window.seen.push(document.getElementById('progress-text').textContent))\
                 .observe(document.getElementById('progress-text'), { childList: true, characterData: true, subtree: true });",
                vec![],
            )
            .await
            .unwrap();
        set_value(&client, "learn-name", "Astro").await;
        set_value(&client, "learn-steps", "8").await;
        set_value(&client, "learn-preview-every", "3").await;
        client.find(Locator::Id("learn-button")).await.unwrap().click().await.unwrap();
        wait_for_js(&client, "the identity", "return document.querySelector('.identity a.download')").await;
        let seen: Vec<String> = serde_json::from_value(client.execute("return window.seen", vec![]).await.unwrap()).unwrap();
        let steps: Vec<&String> = seen.iter().filter(|text| text.starts_with("step ") && text.ends_with(" / 8")).collect();
        assert!(steps.len() >= 3, "the progress should move while learning: {seen:?}");
        assert!(seen.iter().any(|t| t == "step 8 / 8"), "{seen:?}");
        let previews = wait_for_js(&client, "the previews", "return document.querySelectorAll('#previews img').length").await;
        assert_eq!(previews, 2, "previews after steps 3 and 6");
        let curve = client.execute("return !document.getElementById('loss-curve').hidden", vec![]).await.unwrap();
        assert_eq!(curve, true, "the loss curve is drawn");

        // Download the identity: the browser saves a file the library reads.
        client.find(Locator::Css(".identity a.download")).await.unwrap().click().await.unwrap();
        let start = Instant::now();
        let file = loop {
            if let Some(file) = downloaded(&downloads, "Astro.safetensors") {
                break file;
            }
            assert!(start.elapsed() < WAIT, "no download in {}", downloads.display());
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let identity = stableid::identity::Identity::load(&file).unwrap();
        assert_eq!(identity.metadata["steps"], "8");

        // Generate with the identity: the image and its settings show in the gallery.
        client.find(Locator::Css(".identity input[type=checkbox]")).await.unwrap().click().await.unwrap();
        set_value(&client, "prompt", "v1* v2* on the moon").await;
        set_value(&client, "steps", "2").await;
        set_value(&client, "seed", "7").await;
        client.find(Locator::Id("generate-button")).await.unwrap().click().await.unwrap();
        let image_width = wait_for_js(
            &client,
            "the image in the gallery",
            "const img = document.querySelector('#gallery img'); return img && img.complete && img.naturalWidth",
        )
        .await;
        assert_eq!(image_width, 64);
        let settings = client.find(Locator::Css("#gallery .settings")).await.unwrap().text().await.unwrap();
        for needle in ["prompt: v1* v2* on the moon", "seed: 7", "steps: 2", "identities: Astro"] {
            assert!(settings.contains(needle), "{needle:?} in {settings:?}");
        }

        // Reuse fills the form with the image's settings.
        set_value(&client, "prompt", "something else").await;
        set_value(&client, "seed", "").await;
        client.find(Locator::Css("#gallery .reuse")).await.unwrap().click().await.unwrap();
        let form = client
            .execute("return [document.getElementById('prompt').value, document.getElementById('seed').value]", vec![])
            .await
            .unwrap();
        assert_eq!(form, json!(["v1* v2* on the moon", "7"]));

        // A tiny video: it plays in the gallery, and its Reuse brings back the video form.
        client.execute("const kind = document.getElementById('kind'); kind.value = 'video'; kind.dispatchEvent(new Event('change'));", vec![]).await.unwrap();
        for (id, value) in [("prompt", "a dog running"), ("video-frames", "2"), ("video-fps", "4"), ("video-steps", "1"), ("video-width", "32"), ("video-height", "24")] {
            set_value(&client, id, value).await;
        }
        client.find(Locator::Id("generate-button")).await.unwrap().click().await.unwrap();
        let video_width = wait_for_js(
            &client,
            "the video in the gallery",
            "const video = document.querySelector('#gallery .card.video video'); return video && video.readyState >= 1 && video.videoWidth",
        )
        .await;
        assert_eq!(video_width, 32);
        set_value(&client, "video-frames", "9").await;
        let form = client
            .execute(
                "const kind = document.getElementById('kind'); kind.value = 'image'; kind.dispatchEvent(new Event('change'));                  document.querySelector('#gallery .card.video .reuse').click();                  return [kind.value, document.getElementById('video-frames').value, document.getElementById('prompt').value,                  document.getElementById('video-frames').closest('fieldset').hidden]",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(form, json!(["video", "2", "a dog running", false]));

        // A reload shows it all again, and no error was shown on the way.
        client.refresh().await.unwrap();
        let shown = wait_for_js(
            &client,
            "the photo, identity and image after a reload",
            "return document.querySelectorAll('#gallery img').length === 1 && document.querySelectorAll('#gallery video').length === 1 \
             && document.querySelectorAll('.identity').length === 1 && document.querySelectorAll('.photo').length === 1",
        )
        .await;
        assert_eq!(shown, true);
        let message = client.find(Locator::Id("message")).await.unwrap().text().await.unwrap();
        assert_eq!(message, "", "no error on the page");
        client.close().await.unwrap();
    });
}
