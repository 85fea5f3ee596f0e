"use strict";
// The playground: a form built from /openapi.json at load (so it follows api/schemas.py), submitted
// through fal's queue routes, followed on the status stream, with a gallery of results.
// URLs are relative so the page also works under a proxy's path prefix.

const $ = (id) => document.getElementById(id);
const STEP_LOG = /^step (\d+)\/(\d+)/; // the denoiser's progress lines in the request's logs
const SAFE_INT = 2 ** 53; // larger bounds (the seed's) lose precision as JavaScript numbers

let openapi = null;
let readers = []; // [name, () => value or undefined] for the current endpoint's fields
let run = null; // the submitted request's URLs while it runs

window.addEventListener("DOMContentLoaded", () => load().catch((err) => setStatus(err.message, "error")));

async function load() {
  const [schema, config] = await Promise.all([getJSON("openapi.json"), getJSON("playground/config")]);
  openapi = schema;
  $("api-key-field").hidden = !config.api_key_required;
  $("tiny-notice").hidden = !config.tiny_preset;
  for (const path of queueablePaths()) {
    const option = new Option(`${openapi.paths[path].post.summary} (${path})`, path);
    $("endpoint").add(option);
  }
  $("endpoint").addEventListener("change", renderFields);
  $("form").addEventListener("submit", (event) => {
    event.preventDefault(); // the browser has checked required fields and ranges already
    generate().catch((err) => finish(err.message, "error"));
  });
  $("cancel").addEventListener("click", () => cancel().catch((err) => setStatus(err.message, "error")));
  renderFields();
  $("generate").disabled = false;
  setStatus("Ready");
}

// ---------------------------------------------------------------- the form, from the schema

function queueablePaths() {
  return Object.keys(openapi.paths).filter((path) => openapi.paths[path].post && openapi.paths[`/queue${path}`]);
}

function resolve(schema) {
  return schema.$ref ? openapi.components.schemas[schema.$ref.split("/").pop()] : schema;
}

function renderFields() {
  const body = resolve(openapi.paths[$("endpoint").value].post.requestBody.content["application/json"].schema);
  const required = new Set(body.required || []);
  $("fields").replaceChildren();
  readers = Object.entries(body.properties).map(([name, prop]) => {
    const { element, read } = control(name, prop, required.has(name));
    $("fields").append(element);
    return [name, read];
  });
}

function control(name, prop, required) {
  const variants = (prop.anyOf || prop.oneOf || [prop]).map(resolve);
  const options = variants.filter((v) => v.type !== "null");
  const choices = options.find((v) => v.enum);
  const object = options.find((v) => v.type === "object");
  const scalar = options.find((v) => !v.enum && v.type !== "object");
  const wrapper = fieldWrapper(name, prop, choices ? null : scalar);
  let read;
  if (choices) {
    read = selectControl(wrapper, name, choices.enum, prop.default, object);
  } else if (scalar.type === "boolean") {
    const input = Object.assign(document.createElement("input"), { type: "checkbox", name, checked: !!prop.default });
    wrapper.prepend(input);
    read = () => input.checked;
  } else if (scalar.type === "array" && scalar.items) {
    read = listControl(wrapper, name, resolve(scalar.items));
  } else if (scalar.type === "integer" || scalar.type === "number") {
    const input = numberInput(name, scalar, prop.default, required);
    if (variants.length > options.length) input.placeholder = "random";
    wrapper.append(input);
    read = () => (input.value === "" ? undefined : Number(input.value));
  } else {
    read = textControl(wrapper, name, scalar, prop.default, required);
  }
  return { element: wrapper, read };
}

function fieldWrapper(name, prop, range) {
  const wrapper = document.createElement("label");
  wrapper.className = "field";
  wrapper.dataset.field = name;
  const hint = [prop.description];
  const [min, max] = range ? bounds(range) : [];
  if (min !== undefined || max !== undefined) hint.push(`Range ${min ?? "..."} to ${max ?? "..."}.`);
  if (prop.default !== undefined && prop.default !== null) hint.push(`Default: ${JSON.stringify(prop.default)}.`);
  wrapper.append(prop.title || name, Object.assign(document.createElement("span"), {
    className: "hint", textContent: hint.filter(Boolean).join(" "),
  }));
  return wrapper;
}

// A number field's [minimum, maximum]; the seed's 64-bit bounds are left to the server.
function bounds(schema) {
  return [schema.minimum, schema.maximum].map((b) => (b !== undefined && Math.abs(b) <= SAFE_INT ? b : undefined));
}

function numberInput(name, schema, value, required) {
  const input = Object.assign(document.createElement("input"), { type: "number", name, required });
  input.step = schema.type === "integer" ? "1" : "any";
  const [min, max] = bounds(schema);
  if (min !== undefined) input.min = min;
  if (max !== undefined) input.max = max;
  if (value !== undefined && value !== null) input.value = value;
  return input;
}

// An enum as a select; a preset-or-object field (image_size) adds "custom" with the object's fields.
function selectControl(wrapper, name, values, value, object) {
  const select = Object.assign(document.createElement("select"), { name });
  for (const v of values) select.add(new Option(v, v, false, v === value));
  wrapper.append(select);
  if (!object) return () => select.value;
  select.add(new Option("custom", ""));
  const custom = Object.assign(document.createElement("div"), { className: "custom-size", hidden: true });
  const parts = Object.entries(object.properties).map(([key, sub]) => {
    const input = numberInput(`${name}.${key}`, sub, sub.default, true);
    input.title = `${sub.title || key}: ${sub.description || ""}`;
    custom.append(input);
    return [key, input];
  });
  wrapper.append(custom);
  select.addEventListener("change", () => {
    custom.hidden = select.value !== "";
    for (const [, input] of parts) input.disabled = custom.hidden; // hidden inputs skip validation
  });
  select.dispatchEvent(new Event("change"));
  return () => (select.value ? select.value : Object.fromEntries(parts.map(([k, i]) => [k, Number(i.value)])));
}

// A list of objects (loras: [{path, scale}]) as rows of the item's fields, added and removed by buttons.
function listControl(wrapper, name, item) {
  const rows = Object.assign(document.createElement("div"), { className: "list-rows" });
  const entries = [];
  const add = Object.assign(document.createElement("button"), { type: "button", textContent: `Add ${name} row` });
  add.className = "add-row";
  add.addEventListener("click", () => {
    const row = Object.assign(document.createElement("div"), { className: "list-row" });
    const inputs = Object.entries(item.properties).map(([key, sub]) => {
      const numeric = sub.type === "number" || sub.type === "integer";
      const input = numeric ? numberInput(`${name}.${key}`, sub, sub.default, false)
        : Object.assign(document.createElement("input"), { name: `${name}.${key}`, required: true });
      input.placeholder = key;
      input.title = `${key}: ${sub.description || ""}`;
      row.append(input);
      return [key, input, numeric];
    });
    const remove = Object.assign(document.createElement("button"), { type: "button", textContent: "Remove" });
    remove.addEventListener("click", () => {
      row.remove();
      entries.splice(entries.indexOf(inputs), 1);
    });
    row.append(remove);
    rows.append(row);
    entries.push(inputs);
  });
  wrapper.append(rows, add);
  return () => (entries.length ? entries.map((inputs) => Object.fromEntries(
    inputs.filter(([, input]) => input.value !== "").map(([key, input, numeric]) => [key, numeric ? Number(input.value) : input.value]),
  )) : undefined);
}

function textControl(wrapper, name, schema, value, required) {
  const long = name === "prompt";
  const input = Object.assign(document.createElement(long ? "textarea" : "input"), { name, required });
  if (schema.maxLength) input.maxLength = schema.maxLength;
  if (value !== undefined && value !== null) input.value = value;
  wrapper.append(input);
  if (name.endsWith("image_url")) wrapper.append(uploadButton(input));
  return () => (input.value === "" ? undefined : input.value);
}

// An uploaded file goes in as a data URI, which the server accepts in image_url.
function uploadButton(target) {
  const box = document.createElement("span");
  const file = Object.assign(document.createElement("input"), { type: "file", accept: "image/*" });
  const preview = Object.assign(document.createElement("img"), { className: "preview", hidden: true, alt: "" });
  file.addEventListener("change", () => {
    if (!file.files.length) return;
    const reader = new FileReader();
    reader.onload = () => {
      target.value = reader.result;
      preview.src = reader.result;
      preview.hidden = false;
    };
    reader.readAsDataURL(file.files[0]);
  });
  box.append(file, preview);
  return box;
}

function readBody() {
  const body = {};
  for (const [name, read] of readers) {
    const value = read();
    if (value !== undefined) body[name] = value;
  }
  return body;
}

// ---------------------------------------------------------------- a run through the queue

async function generate() {
  const body = readBody();
  $("logs").textContent = "";
  setProgress(0);
  setRunning(true);
  setStatus("Submitting...");
  run = await call("POST", `queue${$("endpoint").value}`, body);
  const last = await follow(`${run.status_url}/stream?logs=1`);
  if (last.error_type === "cancelled") return finish("Cancelled", "cancelled");
  if (last.error) return finish(`Failed: ${last.error}`, "error");
  const output = await call("GET", run.response_url);
  setProgress(1);
  addResults(output, run.request_id);
  finish(`Done in ${last.metrics?.inference_time?.toFixed(2) ?? "?"} s`);
}

// The status stream (server-sent events), read with fetch: EventSource cannot send the API key.
async function follow(url) {
  const response = await fetch(url, { headers: authHeaders() });
  if (!response.ok) throw new Error(await errorText(response));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let last = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, end).split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5)).join("\n");
      buffer = buffer.slice(end + 2);
      if (data) {
        last = JSON.parse(data);
        showStatus(last);
      }
    }
  }
  if (last?.status !== "COMPLETED") throw new Error("The status stream ended before the request completed");
  return last;
}

function showStatus(status) {
  if (status.status === "IN_QUEUE") setStatus(`In queue, position ${status.queue_position}`);
  if (status.status === "IN_PROGRESS") setStatus("Running");
  for (const entry of status.logs || []) { // each event carries only the new entries
    $("logs").textContent += `${entry.timestamp ?? ""} ${entry.message}\n`;
    const step = STEP_LOG.exec(entry.message);
    if (step) setProgress(Number(step[1]) / Number(step[2]));
  }
  $("logs").scrollTop = $("logs").scrollHeight;
}

async function cancel() {
  if (!run) return;
  const response = await fetch(run.cancel_url, { method: "PUT", headers: authHeaders() });
  if (response.status === 202) setStatus("Cancelling...");
  else if (response.status !== 400) throw new Error(await errorText(response)); // 400: it had completed
}

function addResults(output, requestId) {
  output.images.forEach((image, i) => {
    const figure = Object.assign(document.createElement("figure"), { className: "result" });
    figure.dataset.requestId = requestId;
    const img = Object.assign(document.createElement("img"), { src: image.url, alt: output.prompt });
    const caption = document.createElement("figcaption");
    const flagged = output.has_nsfw_concepts[i];
    caption.append(
      span("seed", `seed ${output.seed}`), " · ", `${image.width}×${image.height}`, " · ",
      span(`nsfw${flagged ? " flagged" : ""}`, `NSFW: ${flagged ? "yes (blacked out)" : "no"}`), " · ",
      Object.assign(document.createElement("a"), {
        className: "download", href: image.url, download: image.file_name, textContent: "Download",
      }),
    );
    figure.append(img, caption);
    $("gallery").prepend(figure);
  });
}

// ---------------------------------------------------------------- helpers

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Key ${key}` } : {};
}

async function call(method, url, body) {
  const headers = { ...authHeaders(), ...(body ? { "Content-Type": "application/json" } : {}) };
  const response = await fetch(url, { method, headers, body: body && JSON.stringify(body) });
  if (!response.ok) throw new Error(await errorText(response));
  return response.json();
}

async function getJSON(url) {
  return call("GET", url);
}

async function errorText(response) {
  if (response.status === 401) $("api-key-field").hidden = false;
  const body = await response.json().catch(() => ({}));
  const detail = Array.isArray(body.detail)
    ? body.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ")
    : body.detail;
  return `${response.status}: ${detail || response.statusText}`;
}

function span(className, textContent) {
  return Object.assign(document.createElement("span"), { className, textContent });
}

function setStatus(text, kind = "") {
  $("status").textContent = text;
  $("status").className = kind;
}

function setProgress(value) {
  $("progress").value = value;
}

function setRunning(running) {
  $("generate").disabled = running;
  $("cancel").disabled = !running;
}

function finish(text, kind = "") {
  setStatus(text, kind);
  setRunning(false);
  run = null;
}
