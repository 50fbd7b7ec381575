// The page of `stableid serve`: plain JavaScript over the JSON API of docs/api.md (nothing else),
// kept up to date by the server-sent events of /api/events. User text is only ever set as
// textContent or attribute values, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let recordsVersion = null;
let identities = [];
let currentJobId = null;

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

// Rebuilds a list only when its records changed: a rebuild of the same records would reload
// their images and replace elements the user may be about to click.
function showList(container, records, build) {
  const key = JSON.stringify(records);
  if (container.dataset.shown === key) return;
  container.dataset.shown = key;
  container.replaceChildren(...records.map(build));
}

function showMessage(text) {
  $("message").textContent = text;
  $("message").hidden = !text;
}

// Calls the API; throws an Error carrying the server's one-line reason.
async function api(method, path, body, contentType = "application/json") {
  const options = { method, headers: {} };
  if (body !== undefined) {
    options.body = contentType === "application/json" ? JSON.stringify(body) : body;
    options.headers["Content-Type"] = contentType;
  }
  const response = await fetch(path, options);
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) throw new Error((data && data.error) || `${method} ${path}: ${response.status}`);
  return data;
}

function numberOrUndefined(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

// ---- photos ----

async function uploadPhotos(files) {
  showMessage("");
  for (const file of files) {
    $("upload-status").textContent = `finding the face in ${file.name}...`;
    try {
      const query = new URLSearchParams({ name: file.name });
      await api("POST", `/api/photos?${query}`, file, file.type || "application/octet-stream");
    } catch (error) {
      showMessage(`${file.name}: ${error.message}`);
    }
  }
  $("upload-status").textContent = "";
  $("photo-input").value = "";
  await loadAll();
}

async function loadPhotos() {
  const photos = await api("GET", "/api/photos");
  const ticked = new Set([...document.querySelectorAll(".photo input:checked")].map((box) => box.value));
  const fresh = recordsVersion === null || ticked.size === 0;
  showList($("photo-list"), photos, (photo) => {
    const box = el("input", { type: "checkbox", value: photo.id });
    box.checked = fresh || ticked.has(photo.id);
    const notes = [`face ${Math.round(photo.face_fraction * 100)}%, hair ${Math.round(photo.hair_fraction * 100)}%`];
    if (photo.faces_found > 1) notes.push(`face ${photo.face} of ${photo.faces_found}`);
    if (photo.padded) notes.push("cut by the border: filled by reflection");
    return el(
      "div",
      { class: "card photo", "data-id": photo.id },
      el("img", { class: "crop", src: `/api/photos/${photo.id}/crop.png`, alt: "aligned crop" }),
      el("img", { class: "overlay", src: `/api/photos/${photo.id}/overlay.png`, alt: "face and hair masks" }),
      el("label", {}, el("span", { text: photo.name }), box),
      el("div", { class: "settings", text: notes.join("; ") }),
      el("div", { class: "actions" }, el("button", { type: "button", text: "Delete", onclick: () => remove(`/api/photos/${photo.id}`) })),
    );
  });
}

async function remove(path) {
  try {
    await api("DELETE", path);
  } catch (error) {
    showMessage(error.message);
  }
  await loadAll();
}

// ---- learning ----

async function startLearning(event) {
  event.preventDefault();
  showMessage("");
  const photos = [...document.querySelectorAll(".photo input:checked")].map((box) => box.value);
  const request = {
    name: $("learn-name").value,
    photos,
    steps: numberOrUndefined("learn-steps"),
    seed: numberOrUndefined("learn-seed"),
    lr: numberOrUndefined("learn-lr"),
    preview_every: numberOrUndefined("learn-preview-every"),
  };
  try {
    await api("POST", "/api/identities", request);
  } catch (error) {
    showMessage(`learning: ${error.message}`);
  }
}

// ---- identities ----

async function loadIdentities() {
  identities = await api("GET", "/api/identities");
  const ticked = new Set([...document.querySelectorAll(".identity input:checked")].map((box) => box.value));
  showList($("identity-list"), identities, (identity) => {
    const box = el("input", { type: "checkbox", value: identity.id });
    box.checked = ticked.has(identity.id);
    const last = identity.losses.length ? identity.losses[identity.losses.length - 1].toFixed(4) : "-";
    return el(
      "div",
      { class: "card identity", "data-id": identity.id },
      el("label", {}, el("strong", { text: identity.name }), box),
      el("div", { class: "settings", text: `${identity.steps} steps, seed ${identity.seed}, last loss ${last}` }),
      el(
        "div",
        { class: "actions" },
        el("a", { class: "download", href: `/api/identities/${identity.id}/file`, download: "", text: "Download" }),
        el("a", { class: "export", href: `/api/identities/${identity.id}/export?format=a1111`, download: "", text: "Export A1111/ComfyUI" }),
        el("a", { class: "export", href: `/api/identities/${identity.id}/export?format=diffusers`, download: "", text: "Export diffusers" }),
        el("button", { type: "button", text: "Delete", onclick: () => remove(`/api/identities/${identity.id}`) }),
      ),
    );
  });
}

// ---- poses ----

async function uploadPose(file) {
  showMessage("");
  const detect = $("pose-detect").checked;
  $("pose-status").textContent = detect ? `finding the pose in ${file.name}...` : `reading ${file.name}...`;
  try {
    const query = new URLSearchParams({ name: file.name, detect });
    const pose = await api("POST", `/api/poses?${query}`, file, file.type || "application/octet-stream");
    selectedPose = pose.id;
  } catch (error) {
    showMessage(`${file.name}: ${error.message}`);
  }
  $("pose-status").textContent = "";
  $("pose-input").value = "";
  await loadAll();
}

// The pose chosen for the next images ("" for none); kept across list rebuilds.
let selectedPose = "";

function chosenPose() {
  const box = document.querySelector('input[name="pose"]:checked');
  return box ? box.value : "";
}

async function loadPoses() {
  const poses = await api("GET", "/api/poses");
  if (!poses.some((pose) => pose.id === selectedPose)) selectedPose = "";
  showList($("pose-list"), poses, (pose) => {
    const box = el("input", { type: "radio", name: "pose", value: pose.id });
    const how = pose.detected ? `found in a photo (${pose.people} ${pose.people === 1 ? "person" : "people"})` : "skeleton";
    return el(
      "div",
      { class: "card pose", "data-id": pose.id },
      el("img", { src: `/api/poses/${pose.id}/pose.png`, alt: "pose skeleton" }),
      el("label", {}, el("span", { text: pose.name }), box),
      el("div", { class: "settings", text: `${pose.width}x${pose.height}, ${how}` }),
      el("div", { class: "actions" }, el("button", { type: "button", text: "Delete", onclick: () => remove(`/api/poses/${pose.id}`) })),
    );
  });
  for (const box of document.querySelectorAll('input[name="pose"]')) box.checked = box.value === selectedPose;
}

// ---- generation and gallery ----

function tickedIdentities() {
  return [...document.querySelectorAll(".identity input:checked")].map((box) => box.value);
}

// Shows the fields of the kind of output chosen.
function showKindFields() {
  const kind = $("kind").value;
  for (const node of document.querySelectorAll("#generate-form [data-kinds]")) {
    node.hidden = !node.dataset.kinds.split(" ").includes(kind);
  }
}

// The request of the form, as POST /api/images takes it.
function generateRequest() {
  const kind = $("kind").value;
  const common = {
    kind,
    prompt: $("prompt").value,
    seed: numberOrUndefined("seed"),
    identities: tickedIdentities(),
  };
  if (kind === "video") {
    return {
      ...common,
      negative_prompt: $("negative-prompt").value,
      frames: numberOrUndefined("video-frames"),
      fps: numberOrUndefined("video-fps"),
      steps: numberOrUndefined("video-steps"),
      guidance: numberOrUndefined("video-guidance"),
      width: numberOrUndefined("video-width"),
      height: numberOrUndefined("video-height"),
    };
  }
  if (kind === "3d") {
    return {
      ...common,
      negative_prompt: $("head-negative-prompt").value,
      iterations: numberOrUndefined("head-iterations"),
      size: numberOrUndefined("head-size"),
      guidance: numberOrUndefined("head-guidance"),
      points: numberOrUndefined("head-points"),
      preview_every: numberOrUndefined("head-preview-every"),
      turntable_views: numberOrUndefined("head-turntable-views"),
      fps: numberOrUndefined("head-fps"),
    };
  }
  const pose = chosenPose();
  return {
    ...common,
    negative_prompt: $("negative-prompt").value,
    steps: numberOrUndefined("steps"),
    guidance: numberOrUndefined("guidance"),
    sampler: $("sampler").value,
    num_images: numberOrUndefined("num-images"),
    width: numberOrUndefined("width"),
    height: numberOrUndefined("height"),
    pose: pose || undefined,
    control_scale: pose ? numberOrUndefined("control-scale") : undefined,
  };
}

async function startGenerating(event) {
  event.preventDefault();
  showMessage("");
  try {
    await api("POST", "/api/images", generateRequest());
  } catch (error) {
    showMessage(`generation: ${error.message}`);
  }
}

// Fills the form with an item's request: generating again makes the same item.
function reuse(item) {
  const r = item.request;
  const kind = r.kind || "image";
  $("kind").value = kind;
  showKindFields();
  $("prompt").value = r.prompt;
  $("seed").value = r.seed ?? "";
  if (kind === "video") {
    $("negative-prompt").value = r.negative_prompt;
    $("video-frames").value = r.frames;
    $("video-fps").value = r.fps;
    $("video-steps").value = r.steps;
    $("video-guidance").value = r.guidance;
    $("video-width").value = r.width ?? "";
    $("video-height").value = r.height ?? "";
  } else if (kind === "3d") {
    $("head-negative-prompt").value = r.negative_prompt;
    $("head-iterations").value = r.iterations;
    $("head-size").value = r.size;
    $("head-guidance").value = r.guidance;
    $("head-points").value = r.points;
    $("head-preview-every").value = r.preview_every;
    $("head-turntable-views").value = r.turntable_views;
    $("head-fps").value = r.fps;
  } else {
    $("negative-prompt").value = r.negative_prompt;
    $("steps").value = r.steps;
    $("guidance").value = r.guidance;
    $("sampler").value = r.sampler;
    $("num-images").value = 1;
    $("width").value = r.width ?? "";
    $("height").value = r.height ?? "";
    $("control-scale").value = r.control_scale ?? 1;
    selectedPose = r.pose || "";
    const poseThere = !r.pose || document.querySelector(`input[name="pose"][value="${r.pose}"]`);
    for (const box of document.querySelectorAll('input[name="pose"]')) box.checked = box.value === selectedPose;
    if (!poseThere) showMessage("the pose of this image was deleted since");
  }
  const wanted = new Set(r.identities);
  for (const box of document.querySelectorAll(".identity input")) box.checked = wanted.has(box.value);
  const missing = item.identities.filter((identity) => !identities.some((known) => known.id === identity.id));
  if (missing.length) showMessage(`identity ${missing.map((i) => i.name).join(", ")} was deleted since`);
  $("generate-section").scrollIntoView();
}

// What a gallery card shows of an item, and what it offers to download.
function media(item) {
  const base = `/api/images/${item.id}`;
  if (item.kind === "video" || item.kind === "3d") {
    const video = el("video", { src: `${base}/video.mp4`, controls: "", loop: "", muted: "", playsinline: "" });
    const downloads = [el("a", { href: `${base}/video.mp4`, download: "", text: item.kind === "3d" ? "Turntable MP4" : "Download" })];
    if (item.kind === "3d") downloads.push(el("a", { class: "ply", href: `${base}/splats.ply`, download: "", text: "Download PLY" }));
    return [video, downloads];
  }
  return [el("img", { src: `${base}/image.png`, alt: item.request.prompt }), [el("a", { href: `${base}/image.png`, download: "", text: "Download" })]];
}

async function loadGallery() {
  const items = await api("GET", "/api/images");
  showList($("gallery"), items, (item) => {
    const shown = ([key, value]) => value !== "" && !["Software", "software", "identity", "identities"].includes(key);
    const settings = item.settings.filter(shown).map(([key, value]) => `${key}: ${value}`);
    if (item.kind !== "image") settings.unshift(item.kind === "3d" ? "3D head" : "video");
    if (item.identities.length) settings.push(`identities: ${item.identities.map((i) => i.name).join(", ")}`);
    const [view, downloads] = media(item);
    return el(
      "div",
      { class: `card image ${item.kind === "3d" ? "head" : item.kind}`, "data-id": item.id, "data-kind": item.kind },
      view,
      el("div", { class: "settings", text: settings.join(" · ") }),
      el("div", { class: "warnings", text: (item.warnings || []).join("; ") }),
      el(
        "div",
        { class: "actions" },
        el("button", { type: "button", class: "reuse", text: "Reuse settings", onclick: () => reuse(item) }),
        ...downloads,
        el("button", { type: "button", text: "Delete", onclick: () => remove(`/api/images/${item.id}`) }),
      ),
    );
  });
}

// ---- jobs ----

function drawLosses(losses) {
  const canvas = $("loss-curve");
  canvas.hidden = losses.length === 0;
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  if (losses.length < 2) return;
  const low = Math.min(...losses);
  const high = Math.max(...losses);
  const x = (i) => 30 + (i / (losses.length - 1)) * (canvas.width - 40);
  const y = (loss) => canvas.height - 20 - ((loss - low) / (high - low || 1)) * (canvas.height - 30);
  context.strokeStyle = "#36c";
  context.beginPath();
  losses.forEach((loss, i) => (i === 0 ? context.moveTo(x(i), y(loss)) : context.lineTo(x(i), y(loss))));
  context.stroke();
  context.fillStyle = "#444";
  context.font = "11px sans-serif";
  context.fillText(`loss ${high.toFixed(3)}`, 2, 12);
  context.fillText(`${low.toFixed(3)}`, 2, canvas.height - 22);
  context.fillText(`step ${losses.length}`, canvas.width - 60, canvas.height - 5);
}

function formatSeconds(seconds) {
  if (seconds < 60) return `${Math.round(seconds)} s`;
  return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
}

function renderBoard(board) {
  const active = board.jobs.find((job) => job.state === "running") || board.jobs.find((job) => job.state === "queued");
  const shown = active || board.jobs.find((job) => job.id === currentJobId);
  $("current-job").hidden = !shown;
  if (shown) {
    currentJobId = shown.id;
    $("job-title").textContent = shown.title;
    $("job-phase").textContent = shown.state === "failed" ? `failed: ${shown.error}` : shown.phase;
    $("job-phase").className = shown.state === "failed" ? "failed" : "";
    $("job-progress").max = Math.max(shown.total, 1);
    $("job-progress").value = shown.step;
    $("progress-text").textContent = shown.total ? `step ${shown.step} / ${shown.total}` : "";
    $("eta-text").textContent = shown.eta_seconds != null && shown.state === "running" ? `ETA ${formatSeconds(shown.eta_seconds)}` : "";
    $("cancel-button").hidden = !(shown.state === "running" || shown.state === "queued");
    $("job-warnings").textContent = shown.warnings.map((warning) => `warning: ${warning}`).join("\n");
    drawLosses(shown.kind === "learn" ? shown.losses : []);
    // Only new previews are added: the images already shown are not fetched again.
    if ($("previews").dataset.ids !== shown.previews.join()) {
      $("previews").dataset.ids = shown.previews.join();
      $("previews").replaceChildren(
        ...shown.previews.map((id) => el("img", { src: `/api/previews/${id}/image.png`, alt: "preview", title: "preview" })),
      );
    }
  }
  $("job-list").replaceChildren(
    ...board.jobs.map((job) => {
      const text = `${job.title}: ${job.state}${job.error ? ` (${job.error})` : ""}`;
      const item = el("li", { class: `job ${job.state}`, "data-id": job.id, text });
      if (job.state === "queued" || job.state === "running") {
        item.append(" ", el("button", { type: "button", text: "Cancel", onclick: () => cancel(job.id) }));
      }
      return item;
    }),
  );
  const failed = board.jobs.find((job) => job.id === currentJobId && job.state === "failed");
  if (failed) showMessage(`${failed.title} failed: ${failed.error}`);
  if (board.records_version !== recordsVersion) {
    recordsVersion = board.records_version;
    loadAll();
  }
}

async function cancel(id) {
  try {
    await api("POST", `/api/jobs/${id}/cancel`);
  } catch (error) {
    showMessage(error.message);
  }
}

// One reload at a time, repeated while the records keep changing: answers to overlapping
// reloads could otherwise arrive out of order and show an older list over a newer one.
let reloading = false;
let reloadAgain = false;
async function loadAll() {
  if (reloading) {
    reloadAgain = true;
    return;
  }
  reloading = true;
  do {
    reloadAgain = false;
    try {
      await Promise.all([loadPhotos(), loadIdentities(), loadPoses(), loadGallery()]);
    } catch (error) {
      showMessage(error.message);
    }
  } while (reloadAgain);
  reloading = false;
}

async function start() {
  try {
    const info = await api("GET", "/api/info");
    $("model-info").textContent = `${info.model} on ${info.device} (${info.dtype}), version ${info.version}`;
    $("learn-steps").value = info.learn_defaults.steps;
    $("learn-seed").value = info.learn_defaults.seed;
    $("learn-lr").value = info.learn_defaults.lr;
    $("learn-preview-every").value = info.learn_defaults.preview_every;
    $("steps").value = info.generate_defaults.steps;
    $("guidance").value = info.generate_defaults.guidance;
    $("num-images").value = info.generate_defaults.num_images;
    $("sampler").replaceChildren(...info.samplers.map((name) => el("option", { value: name, text: name })));
    $("sampler").value = info.generate_defaults.sampler;
    $("control-scale").value = info.generate_defaults.control_scale;
    $("video-frames").value = info.video_defaults.frames;
    $("video-fps").value = info.video_defaults.fps;
    $("video-steps").value = info.video_defaults.steps;
    $("video-guidance").value = info.video_defaults.guidance;
    const head = info.three_d_defaults;
    $("head-negative-prompt").value = head.negative_prompt;
    $("head-iterations").value = head.iterations;
    $("head-size").value = head.size;
    $("head-guidance").value = head.guidance;
    $("head-points").value = head.points;
    $("head-preview-every").value = head.preview_every;
    $("head-turntable-views").value = head.turntable_views;
    $("head-fps").value = head.fps;
  } catch (error) {
    showMessage(error.message);
  }
  $("photo-input").addEventListener("change", (event) => uploadPhotos([...event.target.files]));
  $("learn-form").addEventListener("submit", startLearning);
  $("generate-form").addEventListener("submit", startGenerating);
  $("kind").addEventListener("change", showKindFields);
  showKindFields();
  $("pose-input").addEventListener("change", (event) => event.target.files[0] && uploadPose(event.target.files[0]));
  $("pose-list").parentElement.addEventListener("change", () => (selectedPose = chosenPose()));
  $("cancel-button").addEventListener("click", () => currentJobId && cancel(currentJobId));
  const events = new EventSource("/api/events");
  events.addEventListener("board", (event) => renderBoard(JSON.parse(event.data)));
  events.onerror = () => showMessage("lost the connection to the server; retrying...");
  events.onopen = () => {
    if ($("message").textContent.startsWith("lost the connection")) showMessage("");
  };
}

start();
