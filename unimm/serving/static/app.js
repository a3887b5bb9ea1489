// The chat page: talks to this server's OpenAI-compatible API, nothing else (no external assets).
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_UPLOAD_SIDE = 512; // uploads are scaled down in the browser: the model sees a few dozen pixels
const PARTIAL_IMAGES = 3; // previews per generated image (OpenAI's maximum): the image grows in 4 steps

const state = {
  model: null,
  history: [], // OpenAI chat messages of the conversation so far
  attachment: null, // data URL of the image for the next message
  busy: false,
};

// ---------------------------------------------------------------- messages in the log
function addMessage(role, text = "") {
  const hint = document.querySelector(".hint");
  if (hint) hint.remove();
  const element = document.createElement("div");
  element.className = `message ${role}`;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  element.append(body);
  $("messages").append(element);
  scrollDown();
  return element;
}

// One <img> per URL (an empty URL: filled in later), returned in order.
function addImages(message, urls, className) {
  const row = document.createElement("div");
  row.className = "images";
  const images = urls.map((url) => {
    const image = document.createElement("img");
    if (url) image.src = url;
    image.className = className;
    image.alt = className.split(" ")[0];
    row.append(image);
    return image;
  });
  message.append(row);
  scrollDown();
  return images;
}

function finish(message) {
  const text = message.querySelector(".text");
  if (!text.textContent && !message.querySelector("img")) {
    text.innerHTML = '<span class="empty">(empty answer)</span>';
  }
  message.dataset.done = "true";
}

function showError(error) {
  const message = addMessage("error", error.message || String(error));
  message.dataset.done = "true";
}

function scrollDown() {
  $("messages").scrollTop = $("messages").scrollHeight;
}

function setBusy(busy) {
  state.busy = busy;
  for (const id of ["send", "generate", "reset"]) $(id).disabled = busy;
}

// ---------------------------------------------------------------- requests
async function apiError(response) {
  try {
    const body = await response.json();
    return new Error(body.error?.message || `HTTP ${response.status}`);
  } catch {
    return new Error(`HTTP ${response.status}`);
  }
}

async function post(path, body) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  if (!response.ok) throw await apiError(response);
  return response;
}

// Server-sent events: calls onData with each JSON payload; an error payload throws. Ends at the end of the
// stream or at "[DONE]" (a chat stream's last event).
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const payload = JSON.parse(data);
        if (payload.error) throw new Error(payload.error.message);
        onData(payload);
      }
    }
  }
}

// A streamed chat completion: calls onText with each piece of the answer.
async function readStream(response, onText) {
  await readEvents(response, (chunk) => {
    const piece = chunk.choices?.[0]?.delta?.content;
    if (piece) onText(piece);
  });
}

async function ask() {
  const text = $("prompt").value.trim();
  if (state.busy || (!text && !state.attachment)) return;
  const content = [];
  if (state.attachment) content.push({ type: "image_url", image_url: { url: state.attachment } });
  if (text) content.push({ type: "text", text });
  const shown = addMessage("user", text);
  if (state.attachment) addImages(shown, [state.attachment], "uploaded");
  const message = { role: "user", content };
  $("prompt").value = "";
  clearAttachment();
  setBusy(true);
  const answer = addMessage("assistant");
  const answerText = answer.querySelector(".text");
  try {
    const response = await post("/v1/chat/completions", {
      model: state.model,
      messages: [...state.history, message],
      stream: true,
    });
    await readStream(response, (piece) => {
      answerText.textContent += piece;
      scrollDown();
    });
    state.history.push(message, { role: "assistant", content: answerText.textContent });
    finish(answer);
  } catch (error) {
    answer.remove();
    showError(error);
  } finally {
    setBusy(false);
  }
}

async function generate() {
  const prompt = $("prompt").value.trim();
  if (state.busy || !prompt) {
    if (!prompt) $("prompt").focus();
    return;
  }
  const guidance = Number($("guidance").value);
  const seedText = $("seed").value.trim();
  const count = Number($("count").value);
  const body = {
    model: state.model,
    prompt,
    n: count,
    guidance_scale: guidance,
    stream: true,
    partial_images: PARTIAL_IMAGES,
  };
  if (seedText) body.seed = Number(seedText);
  const request = addMessage("user", prompt);
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = `image · guidance ${guidance} · seed ${seedText || "random"}`;
  request.append(meta);
  $("prompt").value = "";
  setBusy(true);
  const answer = addMessage("assistant");
  try {
    // Each image grows as its rows are written: partial images replace each other, then the final one.
    const response = await post("/v1/images/generations", body);
    const images = addImages(answer, Array(count).fill(""), "generated partial");
    await readEvents(response, (event) => {
      const image = images[event.image_index ?? 0];
      image.src = `data:image/${event.output_format || "png"};base64,${event.b64_json}`;
      if (event.type === "image_generation.partial_image") {
        image.dataset.partials = String(Number(image.dataset.partials || 0) + 1);
      } else if (event.type === "image_generation.completed") {
        image.classList.remove("partial");
      }
      scrollDown();
    });
    finish(answer);
  } catch (error) {
    answer.remove();
    showError(error);
  } finally {
    setBusy(false);
  }
}

// ---------------------------------------------------------------- attachments
function clearAttachment() {
  state.attachment = null;
  $("attachment").hidden = true;
  $("image-input").value = "";
}

// Reads an image file and scales it down to MAX_UPLOAD_SIDE, as a PNG data URL.
function readImage(file) {
  return new Promise((resolve, reject) => {
    const url = URL.createObjectURL(file);
    const image = new Image();
    image.onload = () => {
      const scale = Math.min(1, MAX_UPLOAD_SIDE / Math.max(image.width, image.height));
      const canvas = document.createElement("canvas");
      canvas.width = Math.max(1, Math.round(image.width * scale));
      canvas.height = Math.max(1, Math.round(image.height * scale));
      canvas.getContext("2d").drawImage(image, 0, 0, canvas.width, canvas.height);
      URL.revokeObjectURL(url);
      resolve(canvas.toDataURL("image/png"));
    };
    image.onerror = () => {
      URL.revokeObjectURL(url);
      reject(new Error(`${file.name} is not an image the browser can read`));
    };
    image.src = url;
  });
}

async function attach(file) {
  try {
    state.attachment = await readImage(file);
    $("attachment-preview").src = state.attachment;
    $("attachment").hidden = false;
    $("attachment").dataset.ready = "true";
  } catch (error) {
    clearAttachment();
    showError(error);
  }
}

// ---------------------------------------------------------------- server status
async function checkHealth() {
  try {
    const response = await fetch("/health");
    const health = await response.json();
    $("status").textContent = health.queued ? `busy · ${health.queued} queued` : "ready";
    $("status").className = "status ok";
  } catch {
    $("status").textContent = "offline";
    $("status").className = "status down";
  }
}

async function init() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    ask();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      ask();
    }
  });
  $("generate").addEventListener("click", generate);
  $("guidance").addEventListener("input", () => ($("guidance-value").textContent = $("guidance").value));
  $("image-input").addEventListener("change", () => {
    const file = $("image-input").files[0];
    if (file) attach(file);
  });
  $("attachment-remove").addEventListener("click", clearAttachment);
  $("reset").addEventListener("click", () => {
    state.history = [];
    $("messages").replaceChildren();
  });
  try {
    const models = await (await fetch("/v1/models")).json();
    state.model = models.data[0].id;
    $("model").textContent = state.model;
  } catch {
    $("model").textContent = "unknown model";
  }
  checkHealth();
  setInterval(checkHealth, 5000);
}

init();
