// The PixelLLM page: upload an image, caption it (or a dragged box) with grounded words, localize a text,
// dense-caption it (every object's box and caption).
// Coordinates from the API are pixels of the image; they are scaled to the canvas when drawn.
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  file: $("file"),
  maxTokens: $("max-tokens"),
  captionBtn: $("caption-btn"),
  clearBox: $("clear-box"),
  regionForm: $("region-form"),
  regionBox: $("region-box"),
  regionBtn: $("region-btn"),
  denseBtn: $("dense-btn"),
  denseThreshold: $("dense-threshold"),
  regions: $("regions"),
  localizeForm: $("localize-form"),
  localizeText: $("localize-text"),
  localizeBtn: $("localize-btn"),
  stage: $("stage"),
  imageCanvas: $("image-canvas"),
  overlay: $("overlay"),
  ready: $("ready"),
  status: $("status"),
  error: $("error"),
  caption: $("caption"),
  localization: $("localization"),
  timings: $("timings"),
};
const LOCALIZE_COLOR = "#e0007a";
const FAINT_ALPHA = 0.35;

const state = {
  ready: false,
  maxBodyBytes: Infinity, // the service's body limit, from /readyz: a file over it is refused before it is sent
  busy: false,
  generation: 0, // bumped on every upload, so answers about an older image are dropped
  pick: 0, // bumped on every file chosen, so a slower decode of an earlier choice is dropped
  file: null,
  image: null,
  size: null, // the image size in the API's pixels: {width, height}
  words: [],
  active: -1,
  shown: null, // the last whole caption shown, {body, box}: a failed caption puts it (and its box) back
  promptBox: null,
  drag: null,
  localization: null,
  regions: [], // dense captions: {box, score, caption, words}
  activeRegion: -1,
  abort: null, // the AbortController of the request in flight: a new upload cancels it
};

// Colors: one per word, spread around the hue circle (golden angle), as #rrggbb.
function wordColor(i) {
  const h = (i * 137.508) % 360;
  const s = 0.8;
  const l = 0.42;
  const f = (n) => {
    const k = (n + h / 30) % 12;
    const c = l - s * Math.min(l, 1 - l) * Math.max(-1, Math.min(k - 3, 9 - k, 1));
    return Math.round(c * 255).toString(16).padStart(2, "0");
  };
  return `#${f(0)}${f(8)}${f(4)}`;
}

const fmt = (v) => (Math.round(v * 10) / 10).toString();
const mebibytes = (bytes) => `${(bytes / 2 ** 20).toFixed(2)} MiB`;
const boxText = (b) => `(${fmt(b.x0)}, ${fmt(b.y0)}) to (${fmt(b.x1)}, ${fmt(b.y1)})`;

function setStatus(text) {
  els.status.textContent = text;
}

function showError(error) {
  els.error.textContent = error ? String(error.message || error) : "";
  els.error.hidden = !error;
}

// Put `image` (an Image, or null) in place of the current one: its answers, requests and drawings go with it.
function setImage(file, image) {
  state.generation += 1;
  if (state.abort) state.abort.abort(); // the server stops decoding a caption nobody reads
  dragStart = null;
  Object.assign(state, { busy: false, file, image, words: [], active: -1, shown: null, drag: null });
  setPromptBox(null);
  Object.assign(state, { localization: null, regions: [], activeRegion: -1 });
  state.size = image && { width: image.naturalWidth, height: image.naturalHeight };
  for (const pane of [els.caption, els.localization, els.regions, els.timings]) pane.replaceChildren();
  showError(null); // an error about the image before is not about this one
  els.stage.hidden = !image;
}

// Forget the image (one the browser cannot show, or the service refused): nothing is shown that is not used.
function dropImage() {
  setImage(null, null);
  els.file.value = "";
  setStatus("Choose an image to start.");
  updateControls();
}

function updateControls() {
  const usable = state.ready && state.file !== null && !state.busy;
  els.captionBtn.disabled = !usable;
  els.localizeBtn.disabled = !usable;
  els.denseBtn.disabled = !usable;
  els.regionBtn.disabled = !usable;
  els.clearBox.disabled = state.promptBox === null || state.busy;
}

// --- drawing -------------------------------------------------------------------------------------------

function layout() {
  if (!state.image) return;
  const aspect = state.image.naturalWidth / state.image.naturalHeight;
  const maxWidth = els.stage.parentElement.clientWidth;
  const maxHeight = Math.max(window.innerHeight * 0.7, 200);
  const width = Math.max(1, Math.min(maxWidth, maxHeight * aspect));
  const height = width / aspect;
  const dpr = window.devicePixelRatio || 1;
  for (const canvas of [els.imageCanvas, els.overlay]) {
    canvas.style.width = `${width}px`;
    canvas.style.height = `${height}px`;
    canvas.width = Math.max(1, Math.round(width * dpr));
    canvas.height = Math.max(1, Math.round(height * dpr));
  }
  const ctx = els.imageCanvas.getContext("2d");
  ctx.drawImage(state.image, 0, 0, els.imageCanvas.width, els.imageCanvas.height);
  redraw();
}

function scales() {
  const canvas = els.overlay;
  return {
    sx: canvas.width / state.size.width,
    sy: canvas.height / state.size.height,
    unit: canvas.width / parseFloat(canvas.style.width), // device pixels per CSS pixel
  };
}

function strokeBox(ctx, box, color, width, dash = []) {
  const { sx, sy, unit } = scales();
  ctx.save();
  ctx.strokeStyle = color;
  ctx.lineWidth = width * unit;
  ctx.setLineDash(dash.map((d) => d * unit));
  ctx.strokeRect(box.x0 * sx, box.y0 * sy, (box.x1 - box.x0) * sx, (box.y1 - box.y0) * sy);
  ctx.restore();
}

function dot(ctx, point, color, radius, alpha) {
  const { sx, sy, unit } = scales();
  ctx.save();
  ctx.globalAlpha = alpha;
  ctx.fillStyle = color;
  ctx.beginPath();
  ctx.arc(point.x * sx, point.y * sy, radius * unit, 0, 2 * Math.PI);
  ctx.fill();
  ctx.restore();
}

function label(ctx, box, text, color) {
  const { sx, sy, unit } = scales();
  ctx.save();
  ctx.font = `bold ${12 * unit}px sans-serif`;
  ctx.fillStyle = color;
  ctx.textBaseline = "top";
  ctx.fillText(text, box.x0 * sx + 3 * unit, box.y0 * sy + 2 * unit);
  ctx.restore();
}

function redraw() {
  const ctx = els.overlay.getContext("2d");
  ctx.clearRect(0, 0, els.overlay.width, els.overlay.height);
  if (!state.image) return;
  const loc = state.localization;
  if (loc) {
    if (loc.mask) {
      ctx.save();
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(loc.mask, 0, 0, els.overlay.width, els.overlay.height);
      ctx.restore();
    }
    strokeBox(ctx, loc.box, LOCALIZE_COLOR, 3);
  }
  state.regions.forEach((region, i) => {
    const active = i === state.activeRegion;
    strokeBox(ctx, region.box, wordColor(i), active ? 4 : 2);
    label(ctx, region.box, String(i + 1), wordColor(i));
  });
  state.words.forEach((word, i) => dot(ctx, word.point, wordColor(i), 4, FAINT_ALPHA));
  if (state.active >= 0) {
    const word = state.words[state.active];
    const color = wordColor(state.active);
    strokeBox(ctx, word.box, color, 3);
    dot(ctx, word.point, "#ffffff", 7, 1);
    dot(ctx, word.point, color, 5, 1);
  }
  const box = state.drag || state.promptBox;
  if (box) {
    strokeBox(ctx, box, "#ffffff", 3);
    strokeBox(ctx, box, "#000000", 1.5, [6, 4]);
  }
}

function setActive(index) {
  state.active = index;
  for (const span of els.caption.querySelectorAll(".word")) {
    span.classList.toggle("active", Number(span.dataset.index) === index);
  }
  redraw();
}

// --- the box drawn with the mouse --------------------------------------------------------------------

function imagePoint(event) {
  const rect = els.overlay.getBoundingClientRect();
  const clamp = (v, hi) => Math.min(Math.max(v, 0), hi);
  return {
    x: clamp(((event.clientX - rect.left) / rect.width) * state.size.width, state.size.width),
    y: clamp(((event.clientY - rect.top) / rect.height) * state.size.height, state.size.height),
  };
}

// The box a region caption is asked for (null: the whole image), also shown in the region field.
function setPromptBox(box) {
  state.promptBox = box;
  els.regionBox.value = box ? [box.x0, box.y0, box.x1, box.y1].map(fmt).join(", ") : "";
  updateControls();
}

// A box typed as "x0, y0, x1, y1" (commas or spaces between) in pixels of the image, to 0.1 px as it is sent;
// an Error says what is wrong.
function typedBox(text) {
  const { width, height } = state.size;
  const values = text.trim().split(/[\s,]+/).map((v) => Math.round(Number(v) * 10) / 10);
  const wanted = `four numbers x0, y0, x1, y1 in pixels of the ${width} x ${height} image, with x0 < x1 and y0 < y1`;
  if (values.length !== 4 || !values.every(Number.isFinite)) return new Error(`Region: give ${wanted}.`);
  const [x0, y0, x1, y1] = values;
  if (!(x0 < x1 && y0 < y1 && x0 >= 0 && y0 >= 0 && x1 <= width && y1 <= height)) {
    return new Error(`Region: "${text.trim()}" is not ${wanted}.`);
  }
  return { x0, y0, x1, y1 };
}

function dragBox(start, end) {
  return {
    x0: Math.min(start.x, end.x),
    y0: Math.min(start.y, end.y),
    x1: Math.max(start.x, end.x),
    y1: Math.max(start.y, end.y),
  };
}

let dragStart = null;
let dragPointer = null; // the pointer drawing the box: another finger coming down cancels it (a pinch)

function cancelDrag() {
  dragStart = null;
  dragPointer = null;
  state.drag = null;
  redraw();
}

els.overlay.addEventListener("pointerdown", (event) => {
  if (dragStart) return cancelDrag();
  if (!state.image || state.busy || event.button !== 0) return; // a box drawn now would not be the one captioned
  dragStart = imagePoint(event);
  dragPointer = event.pointerId;
  els.overlay.setPointerCapture(event.pointerId);
});

els.overlay.addEventListener("pointermove", (event) => {
  if (!dragStart || event.pointerId !== dragPointer) return;
  state.drag = dragBox(dragStart, imagePoint(event));
  redraw();
});

// The least side of a dragged box, in image pixels: 1% of the image and 8 CSS pixels on screen, so a click or
// a shaky tap is not taken for a box.
function minDragSide() {
  const screenPixel = state.size.width / els.overlay.getBoundingClientRect().width;
  return Math.max(2, 0.01 * Math.min(state.size.width, state.size.height), 8 * screenPixel);
}

els.overlay.addEventListener("pointerup", (event) => {
  if (!dragStart || event.pointerId !== dragPointer) return;
  if (state.busy) return cancelDrag(); // a request began during the drag (the model became ready): not of this box
  const box = dragBox(dragStart, imagePoint(event));
  cancelDrag();
  const minSide = minDragSide();
  if (box.x1 - box.x0 >= minSide && box.y1 - box.y0 >= minSide) {
    setPromptBox(box);
    caption();
  }
});

els.overlay.addEventListener("pointercancel", (event) => {
  if (event.pointerId === dragPointer) cancelDrag();
});

els.clearBox.addEventListener("click", () => {
  setPromptBox(null);
  caption();
});

els.regionForm.addEventListener("submit", (event) => {
  event.preventDefault();
  if (!state.image || state.busy) return;
  const box = typedBox(els.regionBox.value);
  if (box instanceof Error) return showError(box);
  setPromptBox(box);
  caption();
});

// --- talking to the API ------------------------------------------------------------------------------

const errorText = (body, status) => {
  const error = body && body.error;
  return error ? `${error.code}: ${error.message}` : `HTTP ${status}`;
};

// An Error with the service's error `code` (if any), so the image it refused can be dropped.
function apiError(body, status) {
  return Object.assign(new Error(errorText(body, status)), { code: body?.error?.code });
}

// Codes that refuse the image itself: every later request with it would fail alike.
// What a request's form adds to the image's bytes (boundaries, part headers, fields), at most: a file within
// this of the body limit would be refused by the service as it arrives (a reset connection, no answer).
const FORM_BYTES = 4096;
const IMAGE_REFUSED = new Set(["unsupported_media_type", "invalid_image", "image_too_large", "payload_too_large"]);

// With API keys on (PIXELLLM_API_KEYS_FILE), the page asks for a key once and keeps it for this tab only.
const KEY_ITEM = "pixelllm-api-key";

function keyHeaders() {
  const key = sessionStorage.getItem(KEY_ITEM);
  return key ? { "X-API-Key": key } : {};
}

// What a header can carry, and every key is (pxl_ and URL-safe base64): a key pasted with a zero-width space or a
// typographic quote would make every request fail in the browser, before it is sent, with no 401 to ask again on.
const KEY_PATTERN = /^[\x21-\x7e]+$/;

// Ask for an API key after a 401 (none sent) or 403 (refused); false if the user cancels.
function askForKey(status) {
  let question = status === 401 ? "This server needs an API key:" : "That API key was refused. API key:";
  for (;;) {
    const key = window.prompt(question)?.trim();
    if (!key) return false;
    if (KEY_PATTERN.test(key)) {
      sessionStorage.setItem(KEY_ITEM, key);
      return true;
    }
    question = "That is not an API key: it has a space or a character no key has (pasted from formatted text?). API key:";
  }
}

// POST the image and `fields`. With `onWord` the answer is a stream of Server-Sent Events (read from the
// fetch body, as EventSource cannot POST): onWord(word) for each `word` event, and the body is the `done` event's.
async function post(path, fields, onWord = null) {
  if (state.file.size + FORM_BYTES > state.maxBodyBytes) {
    const error = new Error(
      `the image is ${mebibytes(state.file.size)}; this service takes at most ${mebibytes(state.maxBodyBytes)} per request, ` +
        `form fields included`,
    );
    error.code = "payload_too_large";
    throw error;
  }
  const form = new FormData();
  form.append("image", state.file);
  for (const [name, value] of fields) form.append(name, value);
  state.abort = new AbortController();
  const send = () => fetch(path, { method: "POST", body: form, headers: keyHeaders(), signal: state.abort.signal });
  let start = performance.now();
  let response = await sendOrSay(send);
  if ((response.status === 401 || response.status === 403) && askForKey(response.status)) {
    start = performance.now(); // the time spent typing the key is not the service's
    response = await sendOrSay(send);
  }
  if (!response.ok) throw apiError(await response.json().catch(() => null), response.status);
  const body = onWord ? await readEvents(response, onWord) : await response.json();
  return { body, roundTrip: performance.now() - start };
}

// A request that gets no answer at all says what may have happened (a service closes the connection on a
// body over its limit before the browser has sent it all), rather than the browser's bare "Failed to fetch".
async function sendOrSay(send) {
  try {
    return await send();
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new Error(
      `no answer from the service (${error.message}): it may be down, or the ${mebibytes(state.file.size)} image over its size limit`,
    );
  }
}

async function readEvents(response, onWord) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error("the connection closed before the caption was complete");
    buffer += value.replace(/\r\n?/g, "\n");
    for (let end = buffer.indexOf("\n\n"); end >= 0; end = buffer.indexOf("\n\n")) {
      const fields = {};
      for (const line of buffer.slice(0, end).split("\n")) {
        const colon = line.indexOf(":");
        if (colon > 0) fields[line.slice(0, colon)] = line.slice(colon + 1).replace(/^ /, "");
      }
      buffer = buffer.slice(end + 2);
      const data = fields.data ? JSON.parse(fields.data) : null;
      if (fields.event === "word") onWord(data);
      if (fields.event === "error") throw apiError(data, response.status);
      if (fields.event === "done") {
        reader.cancel();
        return data;
      }
    }
  }
}

// Run `work` (which calls the API) unless busy; drop its answer if another image was uploaded meanwhile.
// `work.prepare(body)` (optional, async) readies what `work.show(body, prepared)` draws, before that check;
// `work.fail()` (optional) undoes what a failed request showed of itself.
async function request(label, work) {
  if (state.busy || !state.ready || !state.file) return;
  const generation = state.generation;
  const pick = state.pick;
  state.busy = true;
  updateControls();
  showError(null);
  setStatus(`${label}…`);
  try {
    const onWord = work.onWord && ((word) => generation === state.generation && work.onWord(word));
    const { body, roundTrip } = await post(...work.request(), onWord);
    const prepared = work.prepare ? await work.prepare(body) : undefined;
    if (generation !== state.generation) return;
    state.size = body.image;
    work.show(body, prepared);
    showTimings(label, body, roundTrip);
    setStatus(`${label}: done in ${Math.round(roundTrip)} ms.`);
    checkFrame(body.image);
  } catch (error) {
    if (generation !== state.generation) return;
    if (IMAGE_REFUSED.has(error.code)) {
      if (pick !== state.pick) return; // another file is being opened: it replaces this one anyway
      dropImage();
      showError(`${error.message} (choose another image)`);
      return;
    }
    if (work.fail) work.fail();
    showError(error);
    setStatus(`${label} failed.`);
  } finally {
    if (generation === state.generation) {
      state.busy = false;
      updateControls();
      redraw();
    }
  }
}

// The service answers in pixels of the image as it decoded it; drawn over the browser's own decode, a size that
// differs (an EXIF rotation applied by one and not the other) would put every box in the wrong place.
function checkFrame(served) {
  const { naturalWidth: width, naturalHeight: height } = state.image;
  if (served.width === width && served.height === height) return;
  showError(
    `The service reads this image as ${served.width} x ${served.height} pixels, this browser shows it as ` +
      `${width} x ${height} (an EXIF rotation one of them does not apply?): the boxes drawn are not where they ` +
      `belong. Save the image upright (rotated, without EXIF orientation) and upload it again.`,
  );
}

// The caption so far: its words at their offsets (what lies between them is known once it is done).
const draft = (words) => words.reduce((text, word) => text.padEnd(word.start, " ") + word.text, "");

// A number field's text; what the browser cannot read as a number (it reports "") is an error, not the default.
function numberText(input, name) {
  if (input.validity.badInput) throw new Error(`${name}: not a number`);
  return input.value;
}

// The max_new_tokens field when one is typed in; without it the service decodes up to the model's own limit.
function maxTokens() {
  const value = numberText(els.maxTokens, "Max tokens");
  return value ? [["max_new_tokens", value]] : [];
}

// Streamed: each word and its point appear as soon as the model has decoded it. A caption that fails (of a
// box just dragged, or midway) gives way to the last whole caption again, with its box.
function caption() {
  const words = [];
  const box = state.promptBox;
  setPromptBox(box); // the region field shows the box captioned, not what was typed there and not sent
  return request("Caption", {
    request: () => {
      state.active = -1; // kept across the rebuilds of this caption's stream only
      const fields = maxTokens();
      if (box) fields.push(["box", [box.x0, box.y0, box.x1, box.y1].map((v) => v.toFixed(1)).join(",")]);
      return ["v1/caption?stream=true", fields];
    },
    onWord: (word) => {
      words.push(word);
      showCaption({ caption: draft(words), words });
      setStatus(`Caption… ${words.length} word${words.length === 1 ? "" : "s"}`);
      redraw();
    },
    show: (body) => {
      state.shown = { body, box };
      showCaption(body);
    },
    fail: () => {
      setPromptBox(state.shown && state.shown.box);
      state.active = -1;
      if (state.shown) showCaption(state.shown.body);
      else {
        state.words = [];
        els.caption.replaceChildren();
      }
    },
  });
}

function dense() {
  return request("Dense captions", {
    request: () => [
      "v1/dense",
      [...maxTokens(), ["score_threshold", numberText(els.denseThreshold, "Least region score") || "0.3"]],
    ],
    show: (body) => showRegions(body.regions),
  });
}

function localize(text) {
  return request("Localize", {
    request: () => [
      "v1/localize",
      [
        ["text", text],
        ["mask", "true"],
        ["mask_format", "png"],
      ],
    ],
    prepare: (body) => (body.results[0].mask?.png ? maskCanvas(body.results[0].mask) : null),
    show: (body, mask) => showLocalization(body.results[0], mask),
  });
}

// --- results -----------------------------------------------------------------------------------------

let rebuilding = false; // the caption's spans are being replaced: their blur is no user's

function showCaption(body) {
  state.words = body.words;
  if (state.active >= body.words.length) state.active = -1; // a word hovered while the caption streams stays so
  const focused = els.caption.contains(document.activeElement) ? Number(document.activeElement.dataset.index) : -1;
  rebuilding = true;
  els.caption.replaceChildren();
  rebuilding = false;
  let pos = 0;
  body.words.forEach((word, i) => {
    els.caption.append(body.caption.slice(pos, word.start));
    const span = document.createElement("span");
    const color = wordColor(i);
    span.className = "word";
    span.textContent = body.caption.slice(word.start, word.end);
    span.tabIndex = 0;
    span.dataset.index = String(i);
    span.dataset.color = color;
    span.classList.toggle("active", i === state.active);
    span.style.setProperty("--word-color", color);
    span.title = `point (${fmt(word.point.x)}, ${fmt(word.point.y)}), box ${boxText(word.box)}, score ${word.score.toFixed(2)}`;
    if (word.generated_text) span.title += `, verified (the decoder said "${word.generated_text}")`;
    span.addEventListener("focus", () => setActive(i));
    span.addEventListener("blur", () => rebuilding || setActive(-1));
    els.caption.append(span);
    pos = word.end;
    if (i === focused) span.focus({ preventScroll: true }); // a keyboard user stays on the word
  });
  els.caption.append(body.caption.slice(pos));
  if (!body.caption) els.caption.textContent = "(empty caption)";
}

function setActiveRegion(index) {
  state.activeRegion = index;
  for (const item of els.regions.children) item.classList.toggle("active", Number(item.dataset.index) === index);
  redraw();
}

function showRegions(regions) {
  state.regions = regions;
  state.activeRegion = -1;
  els.regions.replaceChildren(
    ...regions.map((region, i) => {
      const item = document.createElement("li");
      const color = wordColor(i);
      item.className = "word";
      item.tabIndex = 0;
      item.dataset.index = String(i);
      item.dataset.color = color;
      item.style.setProperty("--word-color", color);
      item.textContent = `${region.caption} (${region.score.toFixed(2)})`;
      item.title = `box ${boxText(region.box)}`;
      for (const on of ["mouseenter", "focus"]) item.addEventListener(on, () => setActiveRegion(i));
      for (const off of ["mouseleave", "blur"]) item.addEventListener(off, () => setActiveRegion(-1));
      return item;
    }),
  );
  if (!regions.length) els.regions.textContent = "(no region above the score threshold)";
}

// The mask (a PNG of the image's size) tinted, on a canvas of at most MASK_SIDE px a side: it is drawn
// scaled to the overlay anyway, and a photo-sized canvas would stall the page (or exceed a phone's limit).
const MASK_SIDE = 2048;

function maskCanvas(mask) {
  const image = new Image();
  image.src = `data:image/png;base64,${mask.png}`;
  return image.decode().then(() => {
    const [height, width] = mask.size;
    const scale = Math.min(1, MASK_SIDE / Math.max(width, height));
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(width * scale));
    canvas.height = Math.max(1, Math.round(height * scale));
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
    const pixels = ctx.getImageData(0, 0, canvas.width, canvas.height);
    const data = pixels.data;
    const [r, g, b] = [1, 3, 5].map((i) => parseInt(LOCALIZE_COLOR.slice(i, i + 2), 16));
    for (let i = 0; i < data.length; i += 4) {
      const alpha = data[i] > 127 ? 110 : 0;
      data[i] = r;
      data[i + 1] = g;
      data[i + 2] = b;
      data[i + 3] = alpha;
    }
    ctx.putImageData(pixels, 0, 0);
    return canvas;
  });
}

function showLocalization(result, mask) {
  state.localization = { box: result.box, mask };
  const swatch = document.createElement("span");
  swatch.className = "word";
  swatch.style.setProperty("--word-color", LOCALIZE_COLOR);
  swatch.textContent = result.text;
  els.localization.replaceChildren(swatch, `: box ${boxText(result.box)}, score ${result.score.toFixed(2)}`);
}

function showTimings(label, body, roundTrip) {
  const rows = [
    ["request", label],
    ["model", body.model],
    ["cache hit", body.cache_hit ? "yes" : "no"],
    ...Object.entries(body.timing_ms).map(([name, ms]) => [`${name} (ms)`, ms.toFixed(1)]),
    ["round trip (ms)", roundTrip.toFixed(1)],
  ];
  els.timings.replaceChildren(
    ...rows.flatMap(([name, value]) => {
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = name;
      dd.textContent = value;
      return [dt, dd];
    }),
  );
}

// --- wiring ------------------------------------------------------------------------------------------

els.file.addEventListener("change", async () => {
  const file = els.file.files[0];
  if (!file) return;
  const pick = ++state.pick;
  const image = new Image();
  const url = URL.createObjectURL(file);
  image.src = url;
  try {
    await image.decode();
  } catch {
    if (pick === state.pick) {
      dropImage();
      showError("This browser cannot display that file; choose a PNG, JPEG, WEBP, BMP or GIF image.");
    }
    return;
  } finally {
    URL.revokeObjectURL(url);
  }
  if (pick !== state.pick) return; // a file chosen after this one decoded first and is shown
  setImage(file, image);
  layout();
  updateControls();
  if (!state.ready) setStatus("Waiting for the model to load…");
  caption();
});

// Hover, on the caption rather than on each word: a streamed caption is rebuilt under a still mouse, and the
// word under it stays active (the next move lands on the new span and sets it again).
els.caption.addEventListener("mouseover", (event) => {
  const span = event.target.closest(".word");
  setActive(span ? Number(span.dataset.index) : -1);
});
els.caption.addEventListener("mouseleave", () => setActive(-1));
els.captionBtn.addEventListener("click", () => caption());
els.denseBtn.addEventListener("click", () => dense());
els.localizeForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = els.localizeText.value.trim();
  if (text) localize(text);
  else showError("Type a text to find: it is only spaces.");
});
// Also when a scrollbar comes or goes; in the next frame, as a resize during the observer's call loops.
new ResizeObserver(() => requestAnimationFrame(layout)).observe(els.stage.parentElement);

async function pollReady() {
  try {
    const response = await fetch("readyz");
    const body = await response.json();
    if (response.ok) {
      state.ready = true;
      state.maxBodyBytes = body.max_body_bytes ?? Infinity;
      els.ready.textContent = `model ${body.model} ready`;
      updateControls();
      if (state.file && !state.words.length) caption();
      return;
    }
    els.ready.textContent = body.error ? body.error.message : "model not ready";
  } catch {
    els.ready.textContent = "server unreachable";
  }
  setTimeout(pollReady, 2000);
}

pollReady();
