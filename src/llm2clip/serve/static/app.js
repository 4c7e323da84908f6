// The search page: text, uploaded-image and click-a-result queries against /v1/search. No build step.
"use strict";

const $ = (id) => document.getElementById(id);
const status = $("status"), results = $("results"), queryImage = $("query-image");

function k() {
  const v = parseInt($("k").value, 10);
  return Number.isFinite(v) && v > 0 ? Math.min(v, 200) : 24;
}

function say(html, isError) {
  status.className = isError ? "error" : "";
  status.innerHTML = html;
}

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

async function run(body, label) {
  const btn = $("search-btn");
  btn.disabled = true;
  say("searching ...");
  const t0 = performance.now();
  try {
    const resp = await fetch("/v1/search", body);
    const data = await resp.json().catch(() => ({ detail: resp.statusText }));
    const roundTrip = performance.now() - t0;
    if (!resp.ok) {
      const d = data.detail;
      // FastAPI's validation errors are a list of {loc, msg}; the rest are one string
      const msg = Array.isArray(d) ? d.map((e) => `${(e.loc || []).filter((x) => x !== "body").join(".")}: ${e.msg}`).join("; ") : d;
      say(escapeHtml(typeof msg === "string" ? msg : JSON.stringify(msg)), true);
      return;
    }
    show(data, roundTrip, label);
  } catch (err) {
    say("the server did not answer: " + escapeHtml(err), true);
  } finally {
    btn.disabled = false;
  }
}

function show(data, roundTrip, label) {
  let line = `${data.hits.length} results for ${escapeHtml(label)} in ${data.latency_ms.toFixed(0)} ms ` +
    `(server), ${roundTrip.toFixed(0)} ms round trip; ${data.images} images, index version ${data.index_version}`;
  if (data.truncated) line += ` <span class="warn" id="truncated">The query was longer than the caption ` +
    `encoder's limit: only its start was used.</span>`;
  say(line);
  results.innerHTML = "";
  for (const h of data.hits) {
    const card = document.createElement("figure");
    card.className = "hit";
    card.dataset.row = h.row;
    card.title = `${h.file}\nclick: search by this image`;
    card.innerHTML = `<img loading="lazy" alt="${escapeHtml(h.file)}" src="/v1/thumb/${h.row}">` +
      `<figcaption class="meta"><div class="name">${escapeHtml(h.file)}</div>` +
      `<div class="score">#${h.rank} &middot; ${h.score.toFixed(4)}</div></figcaption>`;
    card.addEventListener("click", () => byRow(h.row, h.file));
    results.appendChild(card);
  }
}

function byText() {
  const text = $("query").value;
  if (!text.trim()) { say("type a description first", true); return; }
  queryImage.innerHTML = "";
  run({ method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ text, k: k() }) },
    "the text query");
}

function byRow(row, file) {
  queryImage.innerHTML = `<img alt="query image" src="/v1/thumb/${row}">`;
  window.scrollTo({ top: 0, behavior: "smooth" });
  run({ method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ row, k: k() }) },
    file);
}

function byFile(file) {
  if (!file) return;
  const form = new FormData();
  form.append("image", file);
  form.append("k", String(k()));
  queryImage.innerHTML = "";
  const img = document.createElement("img");
  img.alt = "query image";
  img.src = URL.createObjectURL(file);
  queryImage.appendChild(img);
  run({ method: "POST", body: form }, file.name);
}

$("text-form").addEventListener("submit", (e) => { e.preventDefault(); byText(); });
$("query").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) byText(); });
$("file").addEventListener("change", (e) => byFile(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  byFile(e.dataTransfer.files[0]);
});

fetch("/health").then((r) => r.json()).then((h) => {
  $("info").textContent = `${h.images} images, index version ${h.index_version}`;
}).catch(() => {});
