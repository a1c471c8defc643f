// numgpt playground: plain JavaScript, no build step, nothing fetched from outside.
// Every call goes through the same public API any client uses (/v1/models,
// /v1/completions streamed as server-sent events, /v1/internals), carrying the API key
// the user typed; the key lives in this tab's sessionStorage only.
"use strict";

const KEY_STORE = "numgpt.apiKey";
const $ = (id) => document.getElementById(id);

const state = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  model: null,          // the served model's id, from /v1/models
  controller: null,     // AbortController of the running stream
  steps: [],            // per generated token: {choice, token, p, top: [[token, p], ...]}
  internals: null,      // the last /v1/internals answer
};

// ------------------------------------------------------------------ errors and API calls

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

const STATUS_WORDS = {
  400: "The server refused the request",
  401: "The server needs a valid API key",
  404: "Not found",
  413: "The request is too large",
  415: "Wrong content type",
  429: "Too many requests",
  500: "The server failed",
  503: "The server cannot take this now",
};

function describeError(err) {
  if (err instanceof ApiError) {
    const words = STATUS_WORDS[err.status] || "The server answered an error";
    const hint = err.status === 401 ? " Type the key in the API key box above and press Use key." : "";
    return `${words} (HTTP ${err.status}): ${err.message}${hint}`;
  }
  return `Could not reach the server: ${err.message}`;
}

function showError(err) {
  const box = $("error");
  box.textContent = typeof err === "string" ? err : describeError(err);
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h.Authorization = "Bearer " + state.key;
  return h;
}

async function errorFrom(response) {
  let message = response.statusText || "no message";
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: keep the status text */ }
  const retry = response.headers.get("Retry-After");
  if (retry) message += ` (retry after ${retry} s)`;
  return new ApiError(response.status, message);
}

async function call(method, path, body, signal) {
  const response = await fetch(path, {
    method, headers: headers(), signal,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) throw await errorFrom(response);
  return response;
}

// ------------------------------------------------------------------------- the API key

function setKey(key) {
  state.key = key;
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
}

async function connect() {
  const needsKey = document.documentElement.dataset.apiKey === "required";
  if (needsKey && !state.key) {
    $("model-line").textContent = "This server needs an API key.";
    showError("This server needs an API key: type it in the API key box above and press Use key. " +
              "It stays in this browser tab only.");
    $("api-key").focus();
    return;
  }
  try {
    const models = await (await call("GET", "/v1/models")).json();
    state.model = models.data[0].id;
    $("model-line").textContent = `model: ${state.model}`;
    clearError();
  } catch (err) {
    $("model-line").textContent = "not connected";
    showError(err);
  }
}

// ---------------------------------------------------------------------- the request

function numberOr(id, fallback, parse) {
  const raw = $(id).value.trim();
  if (raw === "") return fallback;
  const v = parse(raw);
  return Number.isNaN(v) ? raw : v;  // a non-number goes to the server, which names it
}

// The escape rule of `numgpt generate --stop` (numgpt/cli.py, unescape): \n \t \r \\ \" \'
// become the character they name, read left to right; any other backslash stays as typed.
const ESCAPES = { n: "\n", t: "\t", r: "\r", "\\": "\\", '"': '"', "'": "'" };

function unescapeStop(text) {
  return text.replace(/\\([ntr\\"'])/g, (_, c) => ESCAPES[c]);
}

// One stop string per line of the box.
function stopStrings() {
  return $("stop").value.split("\n").filter((s) => s !== "").map(unescapeStop);
}

// The exact body the page sends; the copy buttons reproduce it.
function completionRequest() {
  const body = {
    model: state.model || undefined,
    prompt: $("prompt").value,
    max_tokens: numberOr("max-tokens", 16, (s) => parseInt(s, 10)),
    temperature: numberOr("temperature", 1, parseFloat),
    top_k: numberOr("top-k", 0, (s) => parseInt(s, 10)),
    top_p: numberOr("top-p", 1, parseFloat),
    n: numberOr("n", 1, (s) => parseInt(s, 10)),
    logprobs: 5,
    stream: true,
  };
  const seed = numberOr("seed", null, (s) => parseInt(s, 10));
  if (seed !== null) body.seed = seed;
  const stop = stopStrings();
  if (stop.length) body.stop = stop;
  return body;
}

// ----------------------------------------------------------------- token presentation

// Whitespace made visible in labels (the output itself keeps the real text).
function visible(token) {
  return token.replace(/ /g, "␣").replace(/\n/g, "↵").replace(/\t/g, "⇥") || "∅";
}

function percent(p) {
  return (p >= 0.9995 ? (100 * p).toFixed(1) : (100 * p).toPrecision(3)) + "%";
}

// top_logprobs entry {token: logprob} -> [[token, p], ...] most likely first.
function alternatives(top) {
  return Object.entries(top || {}).map(([t, lp]) => [t, Math.exp(lp)])
    .sort((a, b) => b[1] - a[1]);
}

// Shade on a log scale, 0.01% (level 0) to 100% (level 10): a small model's
// probabilities differ by orders of magnitude, which a linear scale would hide.
function shadeLevel(p) {
  return Math.max(0, Math.min(10, Math.round(10 + 2.5 * Math.log10(p))));
}

function outputBox(index, total) {
  let box = document.querySelector(`.choice[data-index="${index}"]`);
  if (box) return box.querySelector(".text");
  box = document.createElement("div");
  box.className = "choice";
  box.dataset.index = index;
  if (total > 1) {
    const h = document.createElement("h3");
    h.textContent = `choice ${index}`;
    box.appendChild(h);
  }
  const text = document.createElement("div");
  text.className = "text";
  text.setAttribute("role", "group");
  text.setAttribute("aria-label", `generated text${total > 1 ? " of choice " + index : ""}`);
  const prompt = document.createElement("span");
  prompt.className = "prompt-text";
  prompt.textContent = $("prompt").value;
  text.appendChild(prompt);
  box.appendChild(text);
  // keep choices in index order whatever order their first tokens arrive in
  const later = [...$("outputs").children].find((c) => Number(c.dataset.index) > index);
  $("outputs").insertBefore(box, later || null);
  return text;
}

function addToken(choice, total, text, logprobs) {
  const box = outputBox(choice, total);
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = text;
  if (logprobs && logprobs.tokens && logprobs.tokens.length) {
    const step = {
      choice, token: logprobs.tokens[0],
      p: Math.exp(logprobs.token_logprobs[0]),
      top: alternatives(logprobs.top_logprobs && logprobs.top_logprobs[0]),
    };
    span.dataset.step = state.steps.length;
    span.dataset.p = String(step.p);
    span.dataset.level = String(shadeLevel(step.p));
    span.setAttribute("aria-label", `${visible(step.token)}, probability ${percent(step.p)}`);
    span.tabIndex = state.steps.length === 0 ? 0 : -1;  // roving focus: one tab stop
    state.steps.push(step);
  }
  box.appendChild(span);
}

// --------------------------------------------------------------- tooltip and bar chart

function tipFor(span) {
  const step = state.steps[Number(span.dataset.step)];
  if (!step) return;
  const tip = $("tip");
  tip.replaceChildren();
  const head = document.createElement("p");
  head.className = "tip-head";
  head.textContent = `“${visible(step.token)}”: ${percent(step.p)}`;
  const list = document.createElement("ol");
  list.className = "alts";
  for (const [token, p] of step.top.slice(0, 5)) {
    const li = document.createElement("li");
    li.dataset.token = token;
    li.dataset.p = String(p);
    if (token === step.token) li.className = "chosen";
    const t = document.createElement("span");
    t.className = "alt-token";
    t.textContent = visible(token);
    const v = document.createElement("span");
    v.className = "alt-p";
    v.textContent = percent(p);
    li.append(t, v);
    list.appendChild(li);
  }
  tip.append(head, list);
  tip.hidden = false;
  const r = span.getBoundingClientRect();
  const w = tip.offsetWidth, h = tip.offsetHeight;
  const left = Math.max(4, Math.min(window.innerWidth - w - 4, r.left));
  const below = r.bottom + 6 + h < window.innerHeight;
  tip.style.setProperty("left", `${left + window.scrollX}px`);
  tip.style.setProperty("top", `${(below ? r.bottom + 6 : r.top - h - 6) + window.scrollY}px`);
  span.setAttribute("aria-describedby", "tip");
}

function hideTip() {
  $("tip").hidden = true;
}

function showDistribution(span) {
  const index = Number(span.dataset.step);
  const step = state.steps[index];
  if (!step) return;
  document.querySelectorAll(".tok.selected").forEach((s) => s.classList.remove("selected"));
  span.classList.add("selected");
  const position = state.steps.slice(0, index).filter((s) => s.choice === step.choice).length;
  $("dist-title").textContent =
    `Token ${position + 1}${state.steps.some((s) => s.choice !== step.choice) ? ` of choice ${step.choice}` : ""}: what could have come next`;
  const rows = step.top.slice(0, 5);
  const rest = Math.max(0, 1 - rows.reduce((sum, [, p]) => sum + p, 0));
  renderBars($("dist-bars"), [...rows.map(([t, p]) => ({
    label: visible(t), value: p, text: percent(p), chosen: t === step.token,
  })), { label: "everything else", value: rest, text: percent(rest), other: true }], 1);
  $("dist").hidden = false;
}

// Horizontal bars: [{label, value, text}], widths relative to `scale`.
function renderBars(list, rows, scale) {
  list.replaceChildren();
  for (const row of rows) {
    const li = document.createElement("li");
    if (row.chosen) li.classList.add("chosen");
    if (row.other) li.classList.add("other");
    li.dataset.value = String(row.value);
    const label = document.createElement("span");
    label.className = "bar-label";
    label.textContent = row.label;
    const track = document.createElement("span");
    track.className = "bar-track";
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.setProperty("width", `${Math.max(0, Math.min(100, 100 * row.value / scale))}%`);
    track.appendChild(bar);
    const value = document.createElement("span");
    value.className = "bar-value";
    value.textContent = row.text;
    li.append(label, track, value);
    list.appendChild(li);
  }
}

function tokenSpans() {
  return [...document.querySelectorAll(".tok[data-step]")];
}

function moveFocus(span, delta) {
  const spans = tokenSpans();
  const next = spans[spans.indexOf(span) + delta];
  if (!next) return;
  span.tabIndex = -1;
  next.tabIndex = 0;
  next.focus();
}

function wireTokens() {
  const out = $("outputs");
  const isTok = (el) => el && el.classList && el.classList.contains("tok") && el.dataset.step !== undefined;
  out.addEventListener("mouseover", (e) => { if (isTok(e.target)) tipFor(e.target); });
  out.addEventListener("mouseout", (e) => { if (isTok(e.target)) hideTip(); });
  out.addEventListener("focusin", (e) => { if (isTok(e.target)) tipFor(e.target); });
  out.addEventListener("focusout", hideTip);
  out.addEventListener("click", (e) => { if (isTok(e.target)) showDistribution(e.target); });
  out.addEventListener("keydown", (e) => {
    if (!isTok(e.target)) return;
    if (e.key === "ArrowRight" || e.key === "ArrowDown") { moveFocus(e.target, 1); e.preventDefault(); }
    if (e.key === "ArrowLeft" || e.key === "ArrowUp") { moveFocus(e.target, -1); e.preventDefault(); }
    if (e.key === "Enter" || e.key === " ") { showDistribution(e.target); e.preventDefault(); }
  });
}

// -------------------------------------------------------------------------- generate

function setRunning(running) {
  $("generate").disabled = running;
  $("stop-button").disabled = !running;
  document.body.classList.toggle("running", running);
}

// Server-sent events: yields each `data:` payload of a fetch response body.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart()).join("\n");
      if (data) yield data;
    }
  }
}

async function generate() {
  if (state.controller) return;
  clearError();
  hideTip();
  const body = completionRequest();
  $("outputs").replaceChildren();
  $("dist").hidden = true;
  state.steps = [];
  const controller = new AbortController();
  state.controller = controller;
  setRunning(true);
  $("gen-status").textContent = "Generating…";
  const started = performance.now();
  const finished = {};
  let tokens = 0;
  try {
    const response = await call("POST", "/v1/completions", body, controller.signal);
    for await (const data of events(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(500, chunk.error.message);
      for (const c of chunk.choices || []) {
        if (c.text || c.logprobs) {
          addToken(c.index, body.n, c.text, c.logprobs);
          tokens += c.logprobs ? c.logprobs.tokens.length : 0;
        }
        if (c.finish_reason) finished[c.index] = c.finish_reason;
      }
      const seconds = (performance.now() - started) / 1000;
      $("gen-status").textContent = `Generating… ${tokens} tokens, ${(tokens / seconds).toFixed(1)} tokens/s`;
    }
    const seconds = (performance.now() - started) / 1000;
    const reasons = [...new Set(Object.values(finished))].join(", ") || "none";
    $("gen-status").textContent =
      `Done: ${tokens} tokens in ${seconds.toFixed(2)} s (${(tokens / seconds).toFixed(1)} tokens/s); finish reason: ${reasons}.`;
  } catch (err) {
    if (err.name === "AbortError") {
      $("gen-status").textContent = `Stopped after ${tokens} tokens; the server freed the slot.`;
    } else {
      $("gen-status").textContent = "Failed.";
      showError(err);
    }
  } finally {
    state.controller = null;
    setRunning(false);
    document.body.dataset.generated = String(Number(document.body.dataset.generated || 0) + 1);
  }
}

function stop() {
  if (state.controller) state.controller.abort();
}

// ----------------------------------------------------------------- copy as curl / Python

function shellQuote(s) {
  return "'" + s.replace(/'/g, "'\\''") + "'";
}

function curlSnippet() {
  const body = completionRequest();
  const lines = [`curl -sN ${location.origin}/v1/completions`, `  -H "Content-Type: application/json"`];
  if (state.key) lines.push(`  -H "Authorization: Bearer $NUMGPT_API_KEY"`);
  lines.push(`  -d ${shellQuote(JSON.stringify(body))}`);
  return lines.join(" \\\n");
}

// JSON string and number literals are Python literals too (true/false/null are not, and none appear).
function pythonSnippet() {
  const body = completionRequest();
  const args = [`model=${JSON.stringify(body.model || "")}`, `prompt=${JSON.stringify(body.prompt)}`];
  for (const name of ["max_tokens", "temperature", "top_p", "n", "seed", "stop"]) {
    if (body[name] !== undefined) args.push(`${name}=${JSON.stringify(body[name])}`);
  }
  args.push(`logprobs=5`);
  args.push(`extra_body={"top_k": ${JSON.stringify(body.top_k)}}`);
  return [
    "import os",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url="${location.origin}/v1",`,
    `                api_key=os.environ.get("NUMGPT_API_KEY", "none"))`,
    "out = client.completions.create(",
    ...args.map((a) => `    ${a},`),
    ")",
    "for choice in out.choices:",
    "    print(choice.text)",
  ].join("\n");
}

async function copy(text, what) {
  const pre = $("snippet");
  pre.textContent = text;
  pre.hidden = false;
  pre.dataset.kind = what;
  let copied = false;
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      copied = true;
    }
  } catch (_) { /* no clipboard permission: the text is shown below to copy by hand */ }
  $("copy-status").textContent = copied
    ? `Copied ${what} to the clipboard${state.key ? " (the key is read from $NUMGPT_API_KEY)" : ""}.`
    : `Select the ${what} below and copy it.`;
}

// ------------------------------------------------------------------- inside the model

function fillSelect(select, n, keep) {
  if (select.options.length === n) return;
  select.replaceChildren();
  for (let i = 0; i < n; i++) select.add(new Option(String(i), String(i)));
  select.value = String(Math.min(keep, n - 1));
}

async function inspect() {
  clearError();
  const layer = Number($("layer").value || 0);
  $("in-status").textContent = "Running the prompt through the model…";
  try {
    const body = { prompt: $("in-prompt").value, layer };
    if (state.model) body.model = state.model;
    const data = await (await call("POST", "/v1/internals", body)).json();
    state.internals = data;
    fillSelect($("layer"), data.n_layer, layer);
    fillSelect($("head"), data.n_head, Number($("head").value || 0));
    const pos = $("norm-pos");
    pos.replaceChildren(...data.tokens.map((t, i) => new Option(`${i}: ${visible(t)}`, String(i))));
    pos.value = String(data.tokens.length - 1);
    drawHeatmap();
    drawNorms();
    $("in-status").textContent =
      `${data.tokens.length} tokens, ${data.n_layer} layers × ${data.n_head} heads. Hover a cell for its value, or tick "numbers".`;
  } catch (err) {
    $("in-status").textContent = "Failed.";
    showError(err);
  }
}

function drawHeatmap() {
  const data = state.internals;
  if (!data) return;
  const head = Number($("head").value || 0);
  const probs = data.attention[head];  // (T, T): row = query, column = key
  const tokens = data.tokens.map(visible);
  const numbers = $("show-numbers").checked;
  const table = $("heatmap");
  table.replaceChildren();
  table.dataset.layer = String(data.layer);
  table.dataset.head = String(head);
  table.dataset.probs = JSON.stringify(probs);
  table.classList.toggle("numbers", numbers);
  table.classList.toggle("dense", tokens.length > 24);
  $("heat-title").textContent = `Attention probabilities, layer ${data.layer}, head ${head}`;
  const caption = document.createElement("caption");
  caption.textContent = `Layer ${data.layer}, head ${head}: rows are queries, columns are keys`;
  table.appendChild(caption);
  const headRow = document.createElement("tr");
  const corner = document.createElement("th");
  corner.className = "corner";
  corner.textContent = "query ↓ key →";
  headRow.appendChild(corner);
  tokens.forEach((t, j) => {
    const th = document.createElement("th");
    th.scope = "col";
    th.className = "key";
    const label = document.createElement("span");  // turned upright in CSS (not the cell:
    label.textContent = t;                          // table cells ignore writing-mode)
    th.appendChild(label);
    th.title = `key ${j}: ${t}`;
    headRow.appendChild(th);
  });
  const thead = document.createElement("thead");
  thead.appendChild(headRow);
  table.appendChild(thead);
  const tbody = document.createElement("tbody");
  probs.forEach((row, i) => {
    const tr = document.createElement("tr");
    const th = document.createElement("th");
    th.scope = "row";
    th.className = "query";
    th.textContent = tokens[i];
    tr.appendChild(th);
    row.forEach((p, j) => {
      const td = document.createElement("td");
      td.dataset.p = String(p);
      if (j > i) td.className = "future";
      else {
        td.style.setProperty("--p", String(p));
        if (p > 0.55) td.className = "strong";  // light text on the dark cells
        td.title = `“${tokens[i]}” → “${tokens[j]}”: ${percent(p)}`;
        if (numbers) td.textContent = p.toFixed(2);
      }
      tr.appendChild(td);
    });
    tbody.appendChild(tr);
  });
  table.appendChild(tbody);
}

function drawNorms() {
  const data = state.internals;
  if (!data) return;
  const pos = Number($("norm-pos").value || 0);
  const column = data.residual_norms.map((row) => row[pos]);  // (L + 1,)
  const scale = Math.max(...data.residual_norms.flat());
  $("norms").dataset.norms = JSON.stringify(data.residual_norms);
  renderBars($("norms"), column.map((v, l) => ({
    label: l === 0 ? "embeddings" : `block ${l - 1}`, value: v, text: v.toFixed(2),
  })), scale);
}

// --------------------------------------------------------------------------- wiring

function init() {
  $("api-key").value = state.key;
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    setKey($("api-key").value.trim());
    connect();
  });
  $("key-forget").addEventListener("click", () => {
    setKey("");
    $("api-key").value = "";
    connect();
  });
  $("gen-form").addEventListener("submit", (e) => { e.preventDefault(); generate(); });
  $("stop-button").addEventListener("click", stop);
  $("copy-curl").addEventListener("click", () => copy(curlSnippet(), "curl command"));
  $("copy-python").addEventListener("click", () => copy(pythonSnippet(), "Python code"));
  $("in-form").addEventListener("submit", (e) => { e.preventDefault(); inspect(); });
  $("layer").addEventListener("change", () => { if (state.internals) inspect(); });
  $("head").addEventListener("change", drawHeatmap);
  $("show-numbers").addEventListener("change", drawHeatmap);
  $("norm-pos").addEventListener("change", drawNorms);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); generate(); }
    if (e.key === "Escape") { hideTip(); stop(); }
  });
  window.addEventListener("scroll", hideTip, { passive: true });
  wireTokens();
  connect().then(() => { document.body.dataset.ready = "1"; });
}

document.addEventListener("DOMContentLoaded", init);
