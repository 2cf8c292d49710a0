// The visionzoo page: send images to /predict, draw the top-k as bars, and (with the toggle) the
// Grad-CAM heat map from /explain over each image. Plain JavaScript, no build step, no CDN.
"use strict";

const $ = (id) => document.getElementById(id);
let info = null;

function field(name, value) {
  if (value === null || value === undefined || value === "") return;
  const dt = document.createElement("dt");
  dt.textContent = name;
  const dd = document.createElement("dd");
  dd.textContent = value;
  $("card-fields").append(dt, dd);
}

async function loadCard() {
  try {
    const r = await fetch("/info");
    info = await r.json();
  } catch (e) {
    $("status").textContent = "server unreachable";
    $("status").className = "pill down";
    return;
  }
  $("model-name").textContent = info.arch;
  const p = info.preprocess;
  field("architecture", info.arch);
  field("task", info.task);
  field("weights", info.weights);
  if (info.accuracy && info.accuracy.acc1 != null) {
    const top5 = info.accuracy.acc5 != null ? `, top-5 ${info.accuracy.acc5}%` : "";
    field("accuracy", `top-1 ${info.accuracy.acc1}%${top5} (${info.accuracy.dataset})`);
  }
  field("classes", info.num_classes);
  field("preprocessing", `resize ${p.resize_size}, crop ${p.crop_size}, ${p.interpolation}`);
  field("backend", `${info.backend} (${info.precision})`);
  field("batching", `up to ${info.settings.max_batch}, ${info.settings.max_delay_ms} ms`);
  if (!info.explain) {
    $("explain-toggle").disabled = true;
    $("explain-toggle").parentElement.title = "explanations need the model's PyTorch weights";
  }
  pollReady();
}

async function pollReady() {
  try {
    const r = await fetch("/ready");
    if (r.ok) {
      $("status").textContent = "ready";
      $("status").className = "pill ready";
      return;
    }
    $("status").textContent = "warming up…";
  } catch (e) {
    $("status").textContent = "server unreachable";
    $("status").className = "pill down";
  }
  setTimeout(pollReady, 1000);
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error;
  } catch (e) { /* not JSON */ }
  return `the server answered ${response.status} ${response.statusText}`;
}

function drawBars(list, predictions) {
  list.replaceChildren();
  for (const p of predictions) {
    const li = document.createElement("li");
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = p.label;
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${(100 * p.probability).toFixed(1)}%`;
    fill.style.display = "block";
    track.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = `${(100 * p.probability).toFixed(1)}%`;
    li.append(label, track, value);
    list.append(li);
  }
}

async function explainInto(card, blob) {
  const heat = card.querySelector(".heatmap");
  const note = card.querySelector(".explain-note");
  if (!$("explain-toggle").checked) { heat.hidden = true; note.textContent = ""; return; }
  if (card.dataset.heatmap) { heat.hidden = false; return; }
  note.textContent = "explaining…";
  const r = await fetch("/explain", { method: "POST", body: blob, headers: { "Content-Type": "application/octet-stream" } });
  if (!r.ok) { note.textContent = await errorText(r); return; }
  const url = URL.createObjectURL(await r.blob());
  heat.src = url;
  await heat.decode().catch(() => {});
  card.dataset.heatmap = url;
  heat.hidden = !$("explain-toggle").checked;
  note.textContent = `heat map for "${r.headers.get("X-Target-Label")}" (${r.headers.get("X-Stage")})`;
  card.classList.add("explained");
}

async function classify(blob, name) {
  const card = $("result-template").content.firstElementChild.cloneNode(true);
  card.querySelector(".file-name").textContent = name;
  card.querySelector(".photo").src = URL.createObjectURL(blob);
  $("results").prepend(card);
  card._blob = blob;
  const started = performance.now();
  const topk = Math.max(1, Math.min(20, parseInt($("topk").value, 10) || 5));
  let r;
  try {
    r = await fetch(`/predict?topk=${topk}`, { method: "POST", body: blob,
                                              headers: { "Content-Type": "application/octet-stream" } });
  } catch (e) {
    showError(card, `could not reach the server (${e.message})`);
    return;
  }
  if (!r.ok) { showError(card, await errorText(r)); return; }
  const body = await r.json();
  drawBars(card.querySelector(".bars"), body.predictions);
  card.querySelector(".timing").textContent = `${Math.round(performance.now() - started)} ms`;
  card.classList.add("done");
  if ($("explain-toggle").checked) explainInto(card, blob);
}

function showError(card, message) {
  const p = card.querySelector(".error");
  p.textContent = message;
  p.hidden = false;
  card.querySelector(".photo").hidden = true;
  card.classList.add("failed");
}

function handleFiles(files) {
  for (const f of files) classify(f, f.name);
}

function setUpDrop() {
  const drop = $("drop");
  $("file-input").addEventListener("change", (e) => { handleFiles(e.target.files); e.target.value = ""; });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file-input").click(); });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => handleFiles(e.dataTransfer.files));
  $("explain-toggle").addEventListener("change", () => {
    for (const card of document.querySelectorAll(".result.done")) explainInto(card, card._blob);
  });
}

function setUpCamera() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) return;  // http on another host: no camera
  const video = $("camera-video");
  $("camera-button").hidden = false;
  $("camera-button").addEventListener("click", async () => {
    try {
      video.srcObject = await navigator.mediaDevices.getUserMedia({ video: true });
      $("camera").hidden = false;
    } catch (e) {
      $("status").textContent = `camera: ${e.message}`;
    }
  });
  $("camera-close").addEventListener("click", () => {
    for (const track of (video.srcObject ? video.srcObject.getTracks() : [])) track.stop();
    $("camera").hidden = true;
  });
  $("snap-button").addEventListener("click", () => {
    const canvas = document.createElement("canvas");
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    canvas.getContext("2d").drawImage(video, 0, 0);
    canvas.toBlob((blob) => classify(blob, `camera ${new Date().toLocaleTimeString()}`), "image/jpeg", 0.92);
  });
}

setUpDrop();
setUpCamera();
loadCard();
