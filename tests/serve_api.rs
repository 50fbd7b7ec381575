//! `stableid serve`'s HTTP API (docs/api.md) on the tiny models: every route, its bad inputs
//! (4xx answers, never a crash, nothing left behind), a failing job that leaves the server
//! running, the queue with two clients at once, cancelling, the event stream, the token and host
//! guards, and the data folder surviving a restart.
#![cfg(feature = "server")]

mod common;

use std::io::{BufRead, BufReader};
use std::process::Command;
use std::time::Duration;

use common::fixture;
use common::server::{tiny_model_args, Server};
use serde_json::{json, Value};

const JOB_LIMIT: Duration = Duration::from_secs(120);

fn files_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

fn png_size(bytes: &[u8]) -> (u32, u32) {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let info = decoder.read_info().expect("a PNG").info().clone();
    (info.width, info.height)
}

/// Learns an identity called `name` from `photo` (ids), `steps` steps; the finished job.
fn learn(server: &Server, name: &str, photos: &[&str], steps: usize, preview_every: usize) -> Value {
    let (status, job) = server.post_json(
        "/api/identities",
        &json!({ "name": name, "photos": photos, "steps": steps, "preview_every": preview_every }),
    );
    assert_eq!(status, 202, "{job}");
    assert_eq!(job["kind"], "learn");
    server.wait_for_job(job["id"].as_str().unwrap(), JOB_LIMIT)
}

#[test]
fn page_and_assets_are_served_from_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let (status, page) = server.get("/");
    assert_eq!(status, 200);
    let page = String::from_utf8(page).unwrap();
    assert!(page.contains("<script src=\"/app.js\">") && page.contains("photo-input"), "{page}");
    for (path, needle) in [("/app.js", "EventSource(\"/api/events\")"), ("/app.css", "#loss-curve")] {
        let (status, body) = server.get(path);
        assert_eq!(status, 200, "{path}");
        assert!(String::from_utf8(body).unwrap().contains(needle), "{path}");
    }
    let info = server.get_json("/api/info");
    assert_eq!(info["samplers"], json!(["dpm++", "ddim", "euler"]));
    assert_eq!(info["learn_defaults"]["steps"], 450);
    assert_eq!(info["generate_defaults"]["steps"], 50);
    assert_eq!(info["generate_defaults"]["guidance"], 8.5);
}

#[test]
fn uploads_are_aligned_and_parsed_and_bad_ones_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &[]);

    let photo = server.upload("photos/astronaut_1024x768.jpg");
    let id = photo["id"].as_str().unwrap();
    assert_eq!(photo["name"], "astronaut_1024x768.jpg");
    assert_eq!(photo["aligned"], true);
    assert_eq!(photo["faces_found"], 1);
    assert!(photo["face_fraction"].as_f64().unwrap() > 0.01, "{photo}");
    assert_eq!(server.get_json(&format!("/api/photos/{id}")), photo);
    assert_eq!(server.get_json("/api/photos"), json!([photo]));
    for file in ["crop.png", "overlay.png"] {
        let (status, png) = server.get(&format!("/api/photos/{id}/{file}"));
        assert_eq!(status, 200, "{file}");
        assert_eq!(png_size(&png), (512, 512), "{file}");
    }
    // Several faces: the one asked for; a photo taken as an aligned crop already.
    let group = std::fs::read(fixture("photos/faces_3_480x320.png")).unwrap();
    let (status, second) = server.post_bytes("/api/photos?name=group.png&face=2", "image/png", &group);
    assert_eq!((status, second["face"].clone(), second["faces_found"].clone()), (201, json!(2), json!(3)), "{second}");
    let crop = std::fs::read(fixture("photos/astronaut_512.jpg")).unwrap();
    let (status, as_is) = server.post_bytes("/api/photos?as_is=true", "image/jpeg", &crop);
    assert_eq!((status, as_is["aligned"].clone()), (201, json!(false)), "{as_is}");
    let kept = files_in(&data.join("photos"));
    assert_eq!(kept.len(), 3 * 4, "upload, crop, overlay and record of each: {kept:?}");

    // Bad uploads: a 4xx saying why, and no file left.
    let cat = std::fs::read(fixture("photos/chelsea_300x256.png")).unwrap();
    let (status, error) = server.post_bytes("/api/photos?name=cat.png", "image/png", &cat);
    assert_eq!(status, 422, "{error}");
    let message = error["error"].as_str().unwrap();
    assert!(message.contains("\"cat.png\"") && message.contains("face") && !message.contains("upload"), "{message}");
    let (status, error) = server.post_bytes("/api/photos", "image/png", b"not an image at all");
    assert_eq!(status, 422, "{error}");
    assert!(error["error"].as_str().unwrap().contains("not an image"), "{error}");
    // Decompression bombs: headers claiming 10 gigapixels, refused before decoding.
    let png_bomb = common::bad_inputs::png_claiming(&cat, 100_000, 100_000);
    let jpeg_bomb = common::bad_inputs::jpeg_claiming(&crop, 65_535, 65_535, false);
    for bomb in [png_bomb, jpeg_bomb] {
        let (status, error) = server.post_bytes("/api/photos", "image/png", &bomb);
        assert_eq!(status, 422, "{error}");
        assert!(error["error"].as_str().unwrap().contains("megapixels"), "{error}");
    }
    let (status, error) = server.post_bytes("/api/photos", "image/png", b"");
    assert_eq!(status, 400, "{error}");
    let (status, error) = server.post_bytes("/api/photos", "text/plain", &crop);
    assert_eq!(status, 415, "{error}");
    let (status, error) = server.post_bytes("/api/photos?face=0", "image/jpeg", &crop);
    assert_eq!(status, 400, "{error}");
    let (status, error) = server.post_bytes("/api/photos?face=9", "image/jpeg", &crop);
    assert_eq!(status, 422, "{error}");
    let (status, error) = server.post_bytes("/api/photos?path=/etc/passwd", "image/jpeg", &crop);
    assert_eq!(status, 400, "unknown query fields are refused: {error}");
    let oversized = vec![0xFFu8; (50 << 20) + 1];
    assert_eq!(server.raw_post_status("/api/photos", "image/jpeg", &oversized), 413);
    assert_eq!(files_in(&data.join("photos")), kept, "failed uploads leave nothing");

    // Paths that are not generated ids reach nothing.
    for path in [
        "/api/photos/..%2F..%2Fetc%2Fpasswd/crop.png",
        "/api/photos/0123456789abcdef/crop.png",
        &format!("/api/photos/{id}/upload"),
        &format!("/api/photos/{id}/..%2Fcrop.png"),
        &format!("/api/photos/{id}/json"),
    ] {
        let (status, body) = server.get(path);
        assert_eq!(status, 404, "{path}: {}", String::from_utf8_lossy(&body));
        let error: Value = serde_json::from_slice(&body).unwrap();
        assert!(error["error"].is_string(), "{path}");
    }
    assert_eq!(server.delete(&format!("/api/photos/{id}")), 204);
    assert_eq!(server.delete(&format!("/api/photos/{id}")), 404);
    assert_eq!(files_in(&data.join("photos")).len(), 2 * 4);
}

#[test]
fn learn_with_previews_then_download_export_and_generate_reproducibly() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let photo = server.upload("photos/astronaut_512.jpg");
    let job = learn(&server, "Astro", &[photo["id"].as_str().unwrap()], 4, 2);
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!((job["step"].clone(), job["total"].clone()), (json!(4), json!(4)));
    assert_eq!(job["losses"].as_array().unwrap().len(), 4);
    // A preview after step 2, none after the last (the identity itself is the result).
    let previews = job["previews"].as_array().unwrap();
    assert_eq!(previews.len(), 1, "{job}");
    let (status, preview) = server.get(&format!("/api/previews/{}/image.png", previews[0].as_str().unwrap()));
    assert_eq!(status, 200);
    assert_eq!(png_size(&preview), (64, 64));

    let identity_id = job["identity"].as_str().unwrap();
    let identity = server.get_json(&format!("/api/identities/{identity_id}"));
    assert_eq!(identity["name"], "Astro");
    assert_eq!(identity["losses"], job["losses"]);
    assert_eq!(identity["metadata"]["steps"], "4");
    assert_eq!(server.get_json("/api/identities"), json!([identity]));

    // Download and exports: files the library (and so the command line) reads.
    let (status, file) = server.get(&format!("/api/identities/{identity_id}/file"));
    assert_eq!(status, 200);
    let saved = dir.path().join("astro.safetensors");
    std::fs::write(&saved, &file).unwrap();
    let loaded = stableid::identity::Identity::load(&saved).unwrap();
    assert_eq!(loaded.embeddings.dims(), &[2, 32]);
    for format in ["a1111", "diffusers"] {
        let (status, exported) = server.get(&format!("/api/identities/{identity_id}/export?format={format}"));
        assert_eq!(status, 200, "{format}");
        let path = dir.path().join(format!("astro-{format}.safetensors"));
        std::fs::write(&path, &exported).unwrap();
        let exported = stableid::identity::Identity::load(&path).unwrap();
        assert_eq!(exported.embeddings.to_vec2::<f32>().unwrap(), loaded.embeddings.to_vec2::<f32>().unwrap());
    }
    let (status, error) = server.get(&format!("/api/identities/{identity_id}/export?format=ckpt"));
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&error));

    // Two images with the identity; each record's request makes its image again.
    let request = json!({
        "prompt": "v1* v2* as an astronaut", "negative_prompt": "blurry", "seed": 5, "steps": 2,
        "guidance": 7.5, "sampler": "ddim", "num_images": 2, "identities": [identity_id],
    });
    let (status, job) = server.post_json("/api/images", &request);
    assert_eq!(status, 202, "{job}");
    let job = server.wait_for_job(job["id"].as_str().unwrap(), JOB_LIMIT);
    assert_eq!(job["state"], "done", "{job}");
    let images = job["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    let gallery = server.get_json("/api/images");
    assert_eq!(gallery.as_array().unwrap().len(), 2);
    let first = server.get_json(&format!("/api/images/{}", images[0].as_str().unwrap()));
    assert_eq!(first["request"]["seed"], 5);
    assert_eq!(first["request"]["num_images"], 1);
    assert_eq!(first["identities"], json!([{ "id": identity_id, "name": "Astro" }]));
    let settings: std::collections::HashMap<String, String> =
        serde_json::from_value::<Vec<(String, String)>>(first["settings"].clone()).unwrap().into_iter().collect();
    assert_eq!(settings["prompt"], "v1* v2* as an astronaut");
    assert_eq!(settings["sampler"], "ddim");
    assert_eq!(settings["identity"], format!("identities/{identity_id}.safetensors"));
    let second = server.get_json(&format!("/api/images/{}", images[1].as_str().unwrap()));
    assert_eq!(second["request"]["seed"], 6);

    let (_, original) = server.get(&format!("/api/images/{}/image.png", images[0].as_str().unwrap()));
    let (status, again) = server.post_json("/api/images", &first["request"]);
    assert_eq!(status, 202);
    let again = server.wait_for_job(again["id"].as_str().unwrap(), JOB_LIMIT);
    let (_, remade) = server.get(&format!("/api/images/{}/image.png", again["images"][0].as_str().unwrap()));
    let pixels = |png: &[u8]| image::load_from_memory(png).unwrap().to_rgb8().into_raw();
    assert_eq!(pixels(&remade), pixels(&original), "the reused settings make the same image");

    // Deleting an identity removes its files and exports; its images stay.
    assert_eq!(server.delete(&format!("/api/identities/{identity_id}")), 204);
    assert!(files_in(&server.data.join("identities")).is_empty());
    assert_eq!(server.get_json("/api/images").as_array().unwrap().len(), 3);
    assert_eq!(server.delete(&format!("/api/images/{}", images[1].as_str().unwrap())), 204);
    assert_eq!(server.get_json("/api/images").as_array().unwrap().len(), 2);
}

#[test]
fn bad_requests_get_4xx_and_a_failing_job_leaves_the_server_running() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let photo = server.upload("photos/astronaut_512.jpg");
    let photo_id = photo["id"].as_str().unwrap();

    let post_raw = |path: &str, content_type: &str, body: &str| server.post_bytes(path, content_type, body.as_bytes());
    let (status, error) = post_raw("/api/images", "application/json", "{\"prompt\": ");
    assert_eq!(status, 400, "{error}");
    assert!(error["error"].as_str().unwrap().contains("JSON"), "{error}");
    let (status, _) = post_raw("/api/images", "application/json", "{\"prompt\": 7}");
    assert_eq!(status, 422);
    let (status, _) = post_raw("/api/images", "text/plain", "{\"prompt\": \"x\"}");
    assert_eq!(status, 415, "JSON routes take only JSON (no cross-site form posts)");
    let long = format!("{{\"prompt\": \"{}\"}}", "a".repeat(70_000));
    assert_eq!(server.raw_post_status("/api/images", "application/json", long.as_bytes()), 413);
    let (status, error) = server.post_json("/api/images", &json!({ "prompt": "x", "bogus": 1 }));
    assert_eq!(status, 422, "unknown fields are refused: {error}");

    let generate_errors = [
        (json!({ "prompt": "x", "steps": 0 }), 422, "steps"),
        (json!({ "prompt": "x", "sampler": "plms" }), 422, "sampler"),
        (json!({ "prompt": "x", "num_images": 0 }), 422, "num_images"),
        (json!({ "prompt": "x", "num_images": 1000 }), 422, "num_images"),
        (json!({ "prompt": "x", "width": 60 }), 422, "width"),
        (json!({ "prompt": "x", "width": 4294967296u64 }), 422, "width"),
        (json!({ "prompt": "x", "seed": u64::MAX }), 422, "seed"),
        (json!({ "prompt": "x", "identities": ["0123456789abcdef"] }), 404, "identity"),
        (json!({ "prompt": "x", "identities": ["../../x"] }), 404, "identity"),
    ];
    for (request, expected, needle) in generate_errors {
        let (status, error) = server.post_json("/api/images", &request);
        assert_eq!(status, expected, "{request}: {error}");
        assert!(error["error"].as_str().unwrap().contains(needle), "{request}: {error}");
    }
    let learn_errors = [
        (json!({ "name": "", "photos": [photo_id] }), 400, "name"),
        (json!({ "name": "x", "photos": [] }), 400, "photos"),
        (json!({ "name": "x", "photos": ["fedcba9876543210"] }), 404, "photo"),
        (json!({ "name": "x", "photos": [photo_id], "steps": 0 }), 422, "steps"),
        (json!({ "name": "x", "photos": [photo_id], "lr": -1.0 }), 422, "lr"),
    ];
    for (request, expected, needle) in learn_errors {
        let (status, error) = server.post_json("/api/identities", &request);
        assert_eq!(status, expected, "{request}: {error}");
        assert!(error["error"].as_str().unwrap().contains(needle), "{request}: {error}");
    }
    assert!(server.get_json("/api/jobs")["jobs"].as_array().unwrap().is_empty(), "nothing refused was queued");

    for (method, path, expected) in [
        ("GET", "/api/nothing", 404),
        ("GET", "/etc/passwd", 404),
        ("GET", "/api/jobs/0123456789abcdef", 404),
        ("POST", "/api/jobs/0123456789abcdef/cancel", 404),
        ("GET", "/api/identities/0123456789abcdef/file", 404),
        ("GET", "/api/images/0123456789abcdef/image.png", 404),
        ("GET", "/api/previews/0123456789abcdef/image.png", 404),
        ("DELETE", "/api/images/0123456789abcdef", 404),
        ("PUT", "/api/images", 405),
    ] {
        let answer = server.raw(
            format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
                .as_bytes(),
        );
        assert!(answer.starts_with(&format!("HTTP/1.1 {expected}")), "{method} {path}: {answer}");
    }

    // A job that fails says why, and the next one runs.
    let (status, job) = server.post_json("/api/images", &json!({ "prompt": "v1* v2* on the moon", "steps": 1 }));
    assert_eq!(status, 202, "{job}");
    let job = server.wait_for_job(job["id"].as_str().unwrap(), JOB_LIMIT);
    assert_eq!(job["state"], "failed");
    assert!(job["error"].as_str().unwrap().contains("no identity was given"), "{job}");
    let (_, job) = server.post_json("/api/images", &json!({ "prompt": "the moon", "steps": 1 }));
    assert_eq!(server.wait_for_job(job["id"].as_str().unwrap(), JOB_LIMIT)["state"], "done");
}

#[test]
fn two_clients_queue_their_jobs_and_can_cancel_them() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let photo = server.upload("photos/astronaut_512.jpg");
    let photo_id = photo["id"].as_str().unwrap().to_string();

    // Two clients at once: each uploads and asks for images; every job runs, one at a time.
    let (first, second) = std::thread::scope(|scope| {
        let client = |seed: u64| {
            let server = &server;
            scope.spawn(move || {
                let photo = server.upload("photos/astronaut_1024x768.jpg");
                let (status, job) =
                    server.post_json("/api/images", &json!({ "prompt": "a portrait", "steps": 3, "seed": seed }));
                assert_eq!(status, 202, "{job}");
                (photo, job["id"].as_str().unwrap().to_string())
            })
        };
        let (a, b) = (client(1), client(2));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_ne!(first.0["id"], second.0["id"]);
    for id in [&first.1, &second.1] {
        assert_eq!(server.wait_for_job(id, JOB_LIMIT)["state"], "done");
    }
    assert_eq!(server.get_json("/api/images").as_array().unwrap().len(), 2);

    // A long learning run, a generation queued behind it: cancelling the queued job drops it at
    // once, cancelling the running one stops it at its next step, and nothing is stored.
    let (_, long) =
        server.post_json("/api/identities", &json!({ "name": "Long", "photos": [photo_id], "steps": 100000 }));
    let long_id = long["id"].as_str().unwrap();
    let (_, queued) = server.post_json("/api/images", &json!({ "prompt": "queued", "steps": 1 }));
    let queued_id = queued["id"].as_str().unwrap();
    let board = server.get_json("/api/jobs");
    let running = board["jobs"].as_array().unwrap().iter().filter(|j| j["state"] == "running").count();
    assert!(running <= 1, "one job at a time: {board}");
    assert_eq!(server.get_json(&format!("/api/jobs/{queued_id}"))["state"], "queued");
    let (status, cancelled) = server.post_json(&format!("/api/jobs/{queued_id}/cancel"), &json!({}));
    assert_eq!((status, cancelled["state"].clone()), (200, json!("cancelled")), "{cancelled}");
    // Wait for the learning to be under way, then cancel it.
    let start = std::time::Instant::now();
    while server.get_json(&format!("/api/jobs/{long_id}"))["step"].as_u64().unwrap() == 0 {
        assert!(start.elapsed() < JOB_LIMIT, "learning never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, _) = server.post_json(&format!("/api/jobs/{long_id}/cancel"), &json!({}));
    assert_eq!(status, 200);
    let ended = server.wait_for_job(long_id, JOB_LIMIT);
    assert_eq!(ended["state"], "cancelled", "{ended}");
    assert!(ended["identity"].is_null());
    assert!(server.get_json("/api/identities").as_array().unwrap().is_empty());
    assert!(
        files_in(&server.data.join("work")).iter().all(|f| !f.ends_with(".ckpt.safetensors")),
        "no checkpoint left"
    );
    assert_eq!(server.get_json(&format!("/api/jobs/{queued_id}"))["state"], "cancelled", "a cancelled job never runs");
}

#[test]
fn the_event_stream_sends_the_board_at_once_and_on_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(60))).build().into();
    let response = agent.get(&format!("{}/api/events", server.base)).call().unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut lines = BufReader::new(response.into_body().into_reader()).lines();
    let mut next_board = || -> Value {
        loop {
            let line = lines.next().unwrap().unwrap();
            if let Some(data) = line.strip_prefix("data: ") {
                return serde_json::from_str(data).unwrap();
            }
        }
    };
    let board = next_board();
    assert_eq!(board["jobs"], json!([]));
    let (_, job) = server.post_json("/api/images", &json!({ "prompt": "a cat", "steps": 3 }));
    let mut states = Vec::new();
    loop {
        let board = next_board();
        let job = board["jobs"].as_array().unwrap().iter().find(|j| j["id"] == job["id"]).unwrap().clone();
        states.push((job["state"].as_str().unwrap().to_string(), job["step"].as_u64().unwrap()));
        if job["state"] == "done" {
            break;
        }
    }
    // (A change seen late is folded into the next board: the queued state may be skipped.)
    assert!(["queued", "running"].contains(&states.first().unwrap().0.as_str()), "{states:?}");
    assert!(states.iter().any(|(state, step)| state == "running" && *step > 0), "step progress is sent: {states:?}");
    assert_eq!(states.last().unwrap(), &("done".to_string(), 3));
}

#[test]
fn the_data_folder_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &[]);
    let photo = server.upload("photos/astronaut_512.jpg");
    let (_, job) = server.post_json("/api/images", &json!({ "prompt": "a cat", "steps": 1, "seed": 3 }));
    server.wait_for_job(job["id"].as_str().unwrap(), JOB_LIMIT);
    let images = server.get_json("/api/images");
    server.stop();
    // A stray file and a damaged record are skipped, not fatal.
    std::fs::write(data.join("images/notes.txt"), "mine").unwrap();
    std::fs::write(data.join("images/ffffffffffffffff.json"), "{ damaged").unwrap();

    let server = Server::start(&data, &[]);
    assert_eq!(server.get_json("/api/photos"), json!([photo]));
    assert_eq!(server.get_json("/api/images"), images);
    let (status, _) = server.get(&format!("/api/images/{}/image.png", images[0]["id"].as_str().unwrap()));
    assert_eq!(status, 200);
    assert_eq!(server.get_json("/api/jobs")["jobs"], json!([]), "jobs are not kept, their outputs are");
}

#[test]
fn other_hosts_need_a_token_and_loopback_needs_a_loopback_host_name() {
    let dir = tempfile::tempdir().unwrap();
    // Reachable from other machines without a token: refused before anything starts.
    let mut args = vec!["serve".to_string(), "--bind".into(), "0.0.0.0:0".into(), "--data".into()];
    args.push(dir.path().join("open").to_str().unwrap().into());
    args.extend(tiny_model_args(dir.path()));
    let output = Command::new(env!("CARGO_BIN_EXE_stableid")).args(&args).output().unwrap();
    common::assert_fails_with(&output, &["--bind 0.0.0.0:0", "token"]);
    assert!(!dir.path().join("open").exists(), "nothing is created");

    let server = Server::start(&dir.path().join("data"), &["--token", "s3cret"]);
    let request = |extra: &str| {
        server.raw(format!("GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{extra}\r\n").as_bytes())
    };
    assert!(request("").starts_with("HTTP/1.1 401"), "no token");
    assert!(request("Authorization: Bearer wrong\r\n").starts_with("HTTP/1.1 401"));
    assert!(request("Authorization: Bearer s3cret\r\n").starts_with("HTTP/1.1 200"));
    assert!(request("Cookie: stableid_token=s3cret\r\n").starts_with("HTTP/1.1 200"));
    let page = server.raw(b"GET /?token=s3cret HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.to_lowercase().contains("set-cookie: stableid_token=s3cret; path=/; httponly; samesite=strict"),
        "{page}"
    );
    assert_eq!(server.get_json("/api/photos"), json!([]), "the test client sends the token");

    // DNS rebinding: a loopback server refuses other host names.
    let answer = server.raw(b"GET /api/info HTTP/1.1\r\nHost: evil.example:7860\r\nAuthorization: Bearer s3cret\r\nConnection: close\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
}
