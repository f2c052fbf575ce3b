// sdserver's browser UI: one form calling the A1111 API, with live progress from /sdapi/v1/progress.
"use strict";

const api = (path) => "sdapi/v1/" + path; // relative, so the UI works under --subpath too
const $ = (id) => document.getElementById(id);
const POLL_MS = 500;

async function getJSON(path) {
  const res = await fetch(api(path));
  if (!res.ok) throw new Error(`${path}: HTTP ${res.status}`);
  return res.json();
}

function fill(select, items, valueOf, labelOf) {
  select.replaceChildren(...items.map((item) => {
    const opt = document.createElement("option");
    opt.value = valueOf(item);
    opt.textContent = labelOf(item);
    return opt;
  }));
}

async function loadChoices() {
  try {
    const samplers = await getJSON("samplers");
    fill($("sampler_name"), samplers, (s) => s.name, (s) => s.name);
    $("sampler_name").value = samplers.some((s) => s.name === "Euler a") ? "Euler a" : samplers[0]?.name;
    const schedulers = await getJSON("schedulers");
    fill($("scheduler"), schedulers, (s) => s.name, (s) => s.label);
    const options = await getJSON("options");
    $("model").textContent = options.sd_model_checkpoint || "no model loaded";
  } catch (err) {
    showError(err.message);
  }
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

function payload() {
  const num = (id) => Number($(id).value);
  return {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    width: num("width"),
    height: num("height"),
    steps: num("steps"),
    cfg_scale: num("cfg_scale"),
    sampler_name: $("sampler_name").value,
    scheduler: $("scheduler").value || null,
    seed: num("seed"),
    batch_size: num("batch_size"),
  };
}

// The API returns raw base64 in the server's samples_format; the first bytes tell which.
function mimeOf(b64) {
  if (b64.startsWith("/9j/")) return "image/jpeg";
  if (b64.startsWith("UklGR")) return "image/webp";
  return "image/png";
}

function showImages(images) {
  $("gallery").replaceChildren(...images.map((b64) => {
    const img = document.createElement("img");
    img.src = `data:${mimeOf(b64)};base64,${b64}`;
    return img;
  }));
}

async function pollProgress(isRunning) {
  while (isRunning()) {
    try {
      const p = await getJSON("progress");
      const s = p.state;
      $("bar").value = p.progress;
      if (s.job_count > 0) {
        const queued = s.job_count > 1 ? `, ${s.job_count} passes/jobs pending` : "";
        $("statustext").textContent = `Step ${s.sampling_step}/${s.sampling_steps}${queued}`;
      }
      if (p.current_image && isRunning()) showImages([p.current_image]);
    } catch (err) {
      // a missed poll is harmless; the next one will tell
    }
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
}

function errorText(body, status) {
  if (!body) return `HTTP ${status}`;
  if (Array.isArray(body.detail)) return body.detail.map((d) => `${d.loc.join(".")}: ${d.msg}`).join("\n");
  return body.errors || body.detail || `HTTP ${status}`;
}

async function generate(event) {
  event.preventDefault();
  showError("");
  let running = true;
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  $("skip").disabled = false;
  $("statustext").textContent = "Queued";
  const poller = pollProgress(() => running);
  try {
    const res = await fetch(api("txt2img"), {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(payload()),
    });
    const body = await res.json().catch(() => null);
    if (!res.ok) throw new Error(errorText(body, res.status));
    const info = JSON.parse(body.info);
    running = false;
    showImages(body.images);
    $("info").textContent = info.infotexts.join("\n\n");
    $("statustext").textContent = `Done: seed ${info.seed}`;
    $("bar").value = 1;
  } catch (err) {
    showError(err.message);
    $("statustext").textContent = "Failed";
  } finally {
    running = false;
    await poller;
    $("generate").disabled = false;
    $("interrupt").disabled = true;
    $("skip").disabled = true;
  }
}

$("form").addEventListener("submit", generate);
$("interrupt").addEventListener("click", () => fetch(api("interrupt"), { method: "POST" }));
$("skip").addEventListener("click", () => fetch(api("skip"), { method: "POST" }));
loadChoices();
