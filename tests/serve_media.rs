//! `stableid serve`'s poses, videos and 3D heads (docs/api.md) on the tiny models: a pose
//! uploaded as a skeleton or found in a photo steers an image through the tiny ControlNet and is
//! recorded with it; a video job makes an MP4 of the frames asked for, refusing identities of
//! another width and warning about those of another text encoder; a 3D job trains with
//! previews and stores its PLY and turntable, and can be cancelled; bad input gets a 4xx and
//! queues nothing.
#![cfg(feature = "server")]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{Device, Tensor};
use common::fixture;
use common::pose_weights::write_test_weights;
use common::server::Server;
use common::video_files::decode_mp4;
use serde_json::{json, Value};
use stableid::identity::{Identity, TOKEN_TABLE_KEY};

const JOB_LIMIT: Duration = Duration::from_secs(120);

/// An identity of `width`-wide random vectors with `metadata` put into the data folder as the
/// server stores a learned one (before the server starts): its id.
fn stored_identity(data: &Path, id: &str, width: usize, metadata: &[(&str, &str)]) -> String {
    let folder = data.join("identities");
    std::fs::create_dir_all(&folder).unwrap();
    let identity = Identity {
        embeddings: Tensor::randn(0f32, 1.0, (2, width), &Device::Cpu).unwrap(),
        source: PathBuf::new(),
        metadata: metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    };
    identity.save(&folder.join(format!("{id}.safetensors"))).unwrap();
    let record = json!({
        "id": id, "name": format!("Random {width}"), "created": 1, "photos": [], "steps": 0, "seed": 0,
        "losses": [], "metadata": {},
    });
    std::fs::write(folder.join(format!("{id}.json")), record.to_string()).unwrap();
    id.to_string()
}

/// The settings of a gallery item as a map.
fn settings(item: &Value) -> HashMap<String, String> {
    serde_json::from_value::<Vec<(String, String)>>(item["settings"].clone()).unwrap().into_iter().collect()
}

/// Posts a gallery job expecting 202; the finished job.
fn run_job(server: &Server, request: &Value) -> Value {
    let (status, job) = server.post_json("/api/images", request);
    assert_eq!(status, 202, "{request}: {job}");
    server.wait_for_job(job["id"].as_str().unwrap(), JOB_LIMIT)
}

/// Each request is refused with `status` and a message naming `needle`.
fn refused(server: &Server, cases: &[(Value, u16, &str)]) {
    for (request, status, needle) in cases {
        let (got, error) = server.post_json("/api/images", request);
        assert_eq!(got, *status, "{request}: {error}");
        assert!(error["error"].as_str().unwrap().contains(needle), "{request}: {error}");
    }
}

fn pixels(png: &[u8]) -> Vec<u8> {
    image::load_from_memory(png).unwrap().to_rgb8().into_raw()
}

#[test]
fn posed_images_record_their_skeleton_and_remake_the_same_image() {
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("body.safetensors");
    write_test_weights(&weights, false);
    let controlnet = fixture("tiny-controlnet");
    let server = Server::start(
        &dir.path().join("data"),
        &["--controlnet", controlnet.to_str().unwrap(), "--pose-model", weights.to_str().unwrap()],
    );
    let info = server.get_json("/api/info");
    assert_eq!(info["controlnet"], controlnet.to_str().unwrap());
    assert_eq!(info["kinds"], json!(["image", "video", "3d"]));

    // A skeleton used as it is, and one found in a photo (the random network "finds" people).
    let skeleton = std::fs::read(fixture("controlnet/pose_75x70.png")).unwrap();
    let (status, pose) = server.post_bytes("/api/poses?name=pose.png", "image/png", &skeleton);
    assert_eq!(status, 201, "{pose}");
    assert_eq!(
        (pose["detected"].clone(), pose["width"].clone(), pose["height"].clone()),
        (json!(false), json!(75), json!(70))
    );
    let pose_id = pose["id"].as_str().unwrap();
    let (status, png) = server.get(&format!("/api/poses/{pose_id}/pose.png"));
    assert_eq!(status, 200);
    assert_eq!(pixels(&png), image::open(fixture("controlnet/pose_75x70.png")).unwrap().to_rgb8().into_raw());
    let photo = std::fs::read(fixture("photos/astronaut_512.jpg")).unwrap();
    let (status, found) = server.post_bytes("/api/poses?name=me.jpg&detect=true", "image/jpeg", &photo);
    assert_eq!(status, 201, "{found}");
    assert_eq!(found["detected"], true);
    assert!(found["people"].as_u64().unwrap() >= 1, "{found}");
    assert_eq!((found["width"].clone(), found["height"].clone()), (json!(512), json!(512)));
    assert_eq!(server.get_json("/api/poses").as_array().unwrap().len(), 2);

    // Bad pose uploads: a 4xx, nothing kept.
    let (status, error) = server.post_bytes("/api/poses?name=notes.png", "image/png", b"not an image");
    assert_eq!(status, 422, "{error}");
    assert!(error["error"].as_str().unwrap().contains("\"notes.png\""), "{error}");
    let (status, error) = server.post_bytes("/api/poses?detect=true", "image/png", b"not an image");
    assert_eq!(status, 422, "{error}");
    assert_eq!(server.post_bytes("/api/poses", "image/png", b"").0, 400);
    assert_eq!(server.post_bytes("/api/poses", "text/plain", &skeleton).0, 415);
    assert_eq!(server.post_bytes("/api/poses?path=/etc/passwd", "image/png", &skeleton).0, 400);
    assert_eq!(std::fs::read_dir(server.data.join("poses")).unwrap().count(), 2 * 2, "a PNG and a record each");

    // A posed image takes the skeleton's size (rounded down to multiples of 8) and records it.
    let request = json!({ "prompt": "a dancer", "steps": 2, "seed": 3, "pose": pose_id, "control_scale": 0.5 });
    let job = run_job(&server, &request);
    assert_eq!(job["state"], "done", "{job}");
    let image_id = job["images"][0].as_str().unwrap();
    let item = server.get_json(&format!("/api/images/{image_id}"));
    assert_eq!(item["kind"], "image");
    assert_eq!(item["request"]["pose"], pose_id);
    assert_eq!(item["request"]["kind"], "image");
    let recorded = settings(&item);
    assert_eq!(recorded["size"], "72x64");
    assert_eq!(recorded["control_scale"], "0.5");
    assert_eq!(recorded["controlnet"], controlnet.to_str().unwrap());
    assert!(recorded["control_image"].starts_with(&format!("poses/{pose_id}.png (sha256 ")), "{recorded:?}");
    let (_, first) = server.get(&format!("/api/images/{image_id}/image.png"));
    let again = run_job(&server, &item["request"]);
    let (_, remade) = server.get(&format!("/api/images/{}/image.png", again["images"][0].as_str().unwrap()));
    assert_eq!(pixels(&remade), pixels(&first), "the recorded request makes the same image");
    let plain = run_job(&server, &json!({ "prompt": "a dancer", "steps": 2, "seed": 3, "width": 72, "height": 64 }));
    let (_, unposed) = server.get(&format!("/api/images/{}/image.png", plain["images"][0].as_str().unwrap()));
    assert_ne!(pixels(&unposed), pixels(&first), "the pose steers the image");

    refused(
        &server,
        &[
            (json!({ "prompt": "x", "pose": "0123456789abcdef" }), 404, "pose"),
            (json!({ "prompt": "x", "control_scale": 0.5 }), 422, "control_scale"),
        ],
    );
    assert_eq!(server.delete(&format!("/api/poses/{pose_id}")), 204);
    assert_eq!(server.get(&format!("/api/poses/{pose_id}/pose.png")).0, 404);

    // A ControlNet that is not there: the job fails with the one-line reason, the server goes on.
    drop(server);
    let server = Server::start(&dir.path().join("data"), &["--controlnet", "/nowhere/controlnet"]);
    let found_id = found["id"].as_str().unwrap();
    let job = run_job(&server, &json!({ "prompt": "a dancer", "steps": 1, "pose": found_id }));
    assert_eq!(job["state"], "failed", "{job}");
    let error = job["error"].as_str().unwrap();
    assert!(error.contains("/nowhere/controlnet") && !error.contains('\n'), "{error}");
    assert_eq!(run_job(&server, &json!({ "prompt": "a dancer", "steps": 1 }))["state"], "done");
}

#[test]
fn videos_are_mp4s_of_the_frames_asked_for_and_bad_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let identity = stored_identity(&data, "00000000000000a1", 32, &[]);
    let narrow = stored_identity(&data, "00000000000000b2", 16, &[]);
    let foreign = stored_identity(&data, "00000000000000d4", 32, &[(TOKEN_TABLE_KEY, "another encoder's digest")]);
    let video_model = fixture("tiny-video");
    let server = Server::start(&data, &["--video-model", video_model.to_str().unwrap()]);
    let info = server.get_json("/api/info");
    assert_eq!(
        (info["video_defaults"]["frames"].clone(), info["video_defaults"]["fps"].clone()),
        (json!(16), json!(8))
    );
    assert_eq!(info["video_defaults"]["guidance"], 9.0);

    let request = json!({
        "kind": "video", "prompt": "v1* v2* is cooking", "frames": 3, "fps": 4, "width": 32, "height": 24,
        "steps": 2, "seed": 7, "identities": [identity],
    });
    let job = run_job(&server, &request);
    assert_eq!((job["state"].clone(), job["kind"].clone()), (json!("done"), json!("video")), "{job}");
    let item = server.get_json(&format!("/api/images/{}", job["images"][0].as_str().unwrap()));
    assert_eq!(item["kind"], "video");
    assert_eq!(
        item["request"],
        json!({
            "kind": "video", "prompt": "v1* v2* is cooking", "negative_prompt": "", "seed": 7, "frames": 3, "fps": 4,
            "width": 32, "height": 24, "steps": 2, "guidance": 9.0, "sampler": null, "identities": [identity],
        })
    );
    let recorded = settings(&item);
    assert_eq!((recorded["frames"].as_str(), recorded["fps"].as_str()), ("3", "4"));
    assert_eq!(recorded["identity"], format!("identities/{identity}.safetensors"));
    let (status, mp4) = server.get(&format!("/api/images/{}/video.mp4", item["id"].as_str().unwrap()));
    assert_eq!(status, 200);
    let saved = dir.path().join("video.mp4");
    std::fs::write(&saved, mp4).unwrap();
    let (frames, size, fps) = decode_mp4(&saved);
    assert_eq!((frames.len(), size), (3, (32, 24)));
    assert!((fps - 4.0).abs() < 1e-6, "{fps}");
    assert_eq!(server.get(&format!("/api/images/{}/image.png", item["id"].as_str().unwrap())).0, 404);
    assert_eq!(item["warnings"], json!([]));

    // An identity learned on another text encoder of the same width: a warning, as `stableid video` gives.
    let warned = run_job(
        &server,
        &json!({ "kind": "video", "prompt": "v1* v2*", "frames": 1, "width": 32, "height": 24, "steps": 1, "identities": [foreign] }),
    );
    assert_eq!(warned["state"], "done", "{warned}");
    let warnings = warned["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 1, "{warned}");
    assert!(warnings[0].as_str().unwrap().contains("another text encoder"), "{warned}");
    let warned_item = server.get_json(&format!("/api/images/{}", warned["images"][0].as_str().unwrap()));
    assert_eq!(warned_item["warnings"], warned["warnings"]);
    assert_eq!(server.get_json("/api/images").as_array().unwrap().len(), 2);

    refused(
        &server,
        &[
            (json!({ "kind": "video", "prompt": "x", "frames": 0 }), 422, "frames"),
            (json!({ "kind": "video", "prompt": "x", "fps": 0 }), 422, "fps"),
            (json!({ "kind": "video", "prompt": "x", "width": 30 }), 422, "width"),
            (json!({ "kind": "video", "prompt": "x", "sampler": "plms" }), 422, "sampler"),
            (json!({ "kind": "video", "prompt": "x", "num_images": 2 }), 422, "num_images"),
            (json!({ "kind": "video", "prompt": "v1* v2*", "identities": [narrow] }), 422, "16-wide"),
            (json!({ "kind": "video", "prompt": "x", "identities": ["0123456789abcdef"] }), 404, "identity"),
            (json!({ "kind": "gif", "prompt": "x" }), 422, "unknown variant `gif`"),
            (json!({ "kind": 3, "prompt": "x" }), 422, "kind = 3"),
        ],
    );
    assert_eq!(server.get_json("/api/jobs")["jobs"].as_array().unwrap().len(), 2, "nothing refused was queued");
}

#[test]
fn three_d_heads_train_with_previews_store_ply_and_turntable_and_can_be_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let identity = stored_identity(&data, "00000000000000c3", 32, &[]);
    let server = Server::start(&data, &[]);
    let defaults = &server.get_json("/api/info")["three_d_defaults"];
    assert_eq!((defaults["iterations"].clone(), defaults["size"].clone()), (json!(5000), json!(512)));
    assert_eq!((defaults["guidance"].clone(), defaults["points"].clone()), (json!(7.5), json!(81920)));

    let request = json!({
        "kind": "3d", "prompt": "v1* v2* wearing a hat", "identities": [identity], "iterations": 4, "size": 32,
        "points": 120, "preview_every": 2, "turntable_views": 4, "fps": 4,
    });
    let job = run_job(&server, &request);
    assert_eq!((job["state"].clone(), job["kind"].clone()), (json!("done"), json!("3d")), "{job}");
    assert_eq!(job["previews"].as_array().unwrap().len(), 2, "after iterations 2 and 4: {job}");
    let (status, preview) = server.get(&format!("/api/previews/{}/image.png", job["previews"][0].as_str().unwrap()));
    assert_eq!((status, image::load_from_memory(&preview).unwrap().width()), (200, 32));
    let id = job["images"][0].as_str().unwrap();
    let item = server.get_json(&format!("/api/images/{id}"));
    assert_eq!(item["kind"], "3d");
    assert_eq!(item["request"]["seed"], 0, "stableid 3d's seed");
    let recorded = settings(&item);
    assert_eq!((recorded["iterations"].as_str(), recorded["prompt"].as_str()), ("4", "v1* v2* wearing a hat"));
    assert_eq!(recorded["identities"], format!("identities/{identity}.safetensors"));

    let (status, ply) = server.get(&format!("/api/images/{id}/splats.ply"));
    assert_eq!(status, 200);
    let saved = dir.path().join("head.ply");
    std::fs::write(&saved, ply).unwrap();
    let gaussians = stableid::splats::read_ply(&saved, &Device::Cpu).unwrap();
    assert_eq!(gaussians.len().unwrap().to_string(), recorded["gaussians"]);
    let metadata = stableid::splats::ply_metadata(&saved).unwrap();
    assert!(metadata.iter().any(|(k, v)| k == "prompt" && v == "v1* v2* wearing a hat"), "{metadata:?}");
    let (_, mp4) = server.get(&format!("/api/images/{id}/video.mp4"));
    let turntable = dir.path().join("turntable.mp4");
    std::fs::write(&turntable, mp4).unwrap();
    let (frames, size, _) = decode_mp4(&turntable);
    assert_eq!((frames.len(), size), (4, (32, 32)));
    let (status, front) = server.get(&format!("/api/images/{id}/image.png"));
    assert_eq!((status, image::load_from_memory(&front).unwrap().width()), (200, 32));
    assert_eq!(server.get(&format!("/api/images/{id}/other.bin")).0, 404);

    refused(
        &server,
        &[
            (json!({ "kind": "3d", "prompt": "x", "size": 36 }), 422, "size"),
            (json!({ "kind": "3d", "prompt": "x", "iterations": 0 }), 422, "iterations"),
            (json!({ "kind": "3d", "prompt": "x", "points": 0 }), 422, "points"),
            (json!({ "kind": "3d", "prompt": "x", "turntable_views": 0 }), 422, "turntable_views"),
            (json!({ "kind": "3d", "prompt": "x", "steps": 3 }), 422, "steps"),
        ],
    );

    // A long run, cancelled once under way: nothing stored, no checkpoint left.
    let (status, long) = server.post_json(
        "/api/images",
        &json!({ "kind": "3d", "prompt": "a hat", "iterations": 100000, "size": 32, "points": 60, "preview_every": 0 }),
    );
    assert_eq!(status, 202, "{long}");
    let long_id = long["id"].as_str().unwrap();
    let start = std::time::Instant::now();
    while server.get_json(&format!("/api/jobs/{long_id}"))["step"].as_u64().unwrap() == 0 {
        assert!(start.elapsed() < JOB_LIMIT, "the 3D run never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let running = server.get_json(&format!("/api/jobs/{long_id}"));
    assert_eq!((running["total"].clone(), running["state"].clone()), (json!(100000), json!("running")));
    assert!(running["eta_seconds"].as_f64().unwrap() > 0.0, "{running}");
    assert_eq!(server.post_json(&format!("/api/jobs/{long_id}/cancel"), &json!({})).0, 200);
    assert_eq!(server.wait_for_job(long_id, JOB_LIMIT)["state"], "cancelled");
    assert_eq!(server.get_json("/api/images").as_array().unwrap().len(), 1);
    assert!(std::fs::read_dir(data.join("work"))
        .unwrap()
        .all(|f| { !f.unwrap().file_name().to_string_lossy().ends_with(".ckpt.safetensors") }));
}
