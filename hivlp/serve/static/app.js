// The search page: one query asked at both levels (coarse alone, coarse-to-fine) through the JSON API;
// the switch shows either answer, and each card says where the other level ranked the same item.
"use strict";

const $ = (id) => document.getElementById(id);
const STAGES = ["encode", "coarse", "rerank", "describe"];
const state = { level: "fine", text: "", file: null, results: null, health: null };

function params() {
  const u = new URLSearchParams(location.search);
  state.text = u.get("text") || "";
  state.level = u.get("level") === "coarse" ? "coarse" : "fine";
  if (u.get("k")) $("k").value = u.get("k");
  if (u.get("shortlist")) $("shortlist").value = u.get("shortlist");
  $("q").value = state.text;
}

function fmt(ms) {
  return ms >= 100 ? ms.toFixed(0) : ms >= 10 ? ms.toFixed(1) : ms.toFixed(2);
}

async function loadHealth() {
  try {
    const h = await (await fetch("/healthz")).json();
    state.health = h;
    const rows = h.index.rows;
    const parts = [
      `<b>${esc(h.index.name)}</b>`,
      esc(h.index.backend === "milvus" ? `Milvus ${h.index.index_type}` : "in memory"),
      rows.image != null ? `${rows.image.toLocaleString()} images` : null,
      rows.text != null ? `${rows.text.toLocaleString()} captions` : null,
      `${h.index.dim}-d, coarse ${h.index.coarse_dim}-d`,
    ].filter(Boolean);
    $("health").innerHTML = parts.join('<span class="dot">&middot;</span>');
    $("health").title = `model ${h.model.source}`;
    $("fine-label").textContent = `${h.index.coarse_dim}-d shortlist, ${h.index.dim}-d re-rank`;
    $("coarse-label").textContent = `${h.index.coarse_dim}-d prefix alone`;
  } catch (e) {
    $("health").textContent = "server not reachable";
  }
}

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

async function ask(level) {
  const k = $("k").value, shortlist = $("shortlist").value || "100";
  const t0 = performance.now();
  let resp;
  if (state.file) {
    const form = new FormData();
    form.append("image", state.file, state.file.name || "upload");
    form.append("k", k); form.append("shortlist", shortlist); form.append("level", level);
    resp = await fetch("/api/search", { method: "POST", body: form });
  } else {
    const q = new URLSearchParams({ text: state.text, k, shortlist, level });
    resp = await fetch(`/api/search?${q}`);
  }
  const body = await resp.json().catch(() => ({ detail: `HTTP ${resp.status}` }));
  if (!resp.ok) throw new Error(typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail));
  body.round_trip_ms = performance.now() - t0;
  return body;
}

async function run() {
  if (!state.text.trim() && !state.file) return;
  $("welcome").hidden = true;
  $("error").hidden = true;
  document.body.classList.add("busy");
  try {
    // one after the other, so neither request's stage times include waiting for the other's encoding
    const fine = await ask("fine");
    const coarse = await ask("coarse");
    state.results = { fine, coarse };
    render();
  } catch (e) {
    $("error").textContent = e.message;
    $("error").hidden = false;
    $("results").innerHTML = "";
    $("status").hidden = true;
  } finally {
    document.body.classList.remove("busy");
  }
}

function render() {
  const cur = state.results[state.level];
  const other = state.results[state.level === "fine" ? "coarse" : "fine"];
  const otherRank = new Map(other.hits.map((h) => [h.id, h.rank]));
  document.querySelectorAll(".switch button").forEach((b) =>
    b.setAttribute("aria-checked", String(b.dataset.level === state.level)));
  document.body.dataset.level = state.level;

  const kinds = cur.searched === "image" ? "images" : "captions";
  const same = cur.hits.filter((h) => otherRank.has(h.id)).length;
  const query = cur.query.text != null ? `&ldquo;${esc(cur.query.text)}&rdquo;` : `image <i>${esc(cur.query.image)}</i>`;
  $("summary").innerHTML =
    `Top ${cur.hits.length} ${kinds} for ${query} &mdash; ` +
    (state.level === "fine"
      ? `coarse-to-fine (shortlist ${cur.shortlist}); ${cur.hits.length - same} of them are not in the coarse level's top ${other.hits.length}`
      : `coarse level alone; ${cur.hits.length - same} of them drop out after the re-rank`);

  const t = cur.timings_ms;
  const total = Math.max(t.total, 1e-6);
  const bar = STAGES.map((s) => `<i class="seg ${s}" style="width:${(100 * (t[s] || 0)) / total}%" title="${s} ${fmt(t[s] || 0)} ms"></i>`).join("");
  const chips = STAGES.map((s) =>
    `<span class="stage ${s}"><i></i>${s} <b>${s === "rerank" && state.level === "coarse" ? "skipped" : fmt(t[s] || 0) + " ms"}</b></span>`).join("");
  $("timings").innerHTML =
    `<div class="bar">${bar}</div><div class="chips">${chips}<span class="stage total">server total <b>${fmt(t.total)} ms</b></span>` +
    `<span class="stage rt">round trip <b>${fmt(cur.round_trip_ms)} ms</b></span></div>`;
  $("notes").innerHTML = cur.notes.map((n) => `<li>${esc(n)}</li>`).join("");
  $("status").hidden = false;

  const best = cur.hits.length ? cur.hits[0].score : 1, worst = cur.hits.length ? cur.hits[cur.hits.length - 1].score : 0;
  $("results").className = `grid ${cur.searched === "text" ? "captions" : "images"}`;
  $("results").innerHTML = cur.hits.map((h) => {
    const r = otherRank.get(h.id);
    const otherName = state.level === "fine" ? "coarse" : "fine";
    let delta;
    if (r == null) delta = `<span class="delta new" title="not in the ${otherName} level's top ${other.hits.length}">new</span>`;
    else if (r === h.rank) delta = `<span class="delta same" title="same rank at the ${otherName} level">=</span>`;
    else delta = `<span class="delta ${r > h.rank ? "up" : "down"}" title="${otherName} level: #${r}">${r > h.rank ? "&#9650;" : "&#9660;"}${Math.abs(r - h.rank)}</span>`;
    const width = best > worst ? 15 + (85 * (h.score - worst)) / (best - worst) : 100;
    const cap = h.kind === "image"
      ? `<p class="caption ref" title="a reference caption of this image (dataset)">${esc(h.caption || h.filename)}</p>`
      : `<p class="caption">${esc(h.caption)}</p>`;
    return `<figure class="card">
      <div class="thumbwrap"><img class="thumb" src="${esc(h.thumbnail)}" alt="${esc(h.caption || h.filename)}" decoding="async">
        <span class="rank">#${h.rank}</span>${delta}
        <button type="button" class="more" data-thumb="${esc(h.thumbnail)}" data-name="${esc(h.filename)}" title="find captions for this image">captions &rarr;</button></div>
      <figcaption>${cap}
        <div class="meta"><span class="score" title="cosine similarity">${h.score.toFixed(3)}</span><span class="file">${esc(h.filename)}</span></div>
        <div class="scorebar"><i style="width:${width}%"></i></div>
      </figcaption></figure>`;
  }).join("");
}

function setLevel(level) {
  state.level = level;
  syncUrl();
  if (state.results) render();
}

function syncUrl() {
  const u = new URLSearchParams();
  if (!state.file && state.text) u.set("text", state.text);
  if (state.level !== "fine") u.set("level", state.level);
  if ($("k").value !== "10") u.set("k", $("k").value);
  if ($("shortlist").value !== "100") u.set("shortlist", $("shortlist").value);
  history.replaceState(null, "", `/${u.toString() ? "?" + u : ""}`);
}

function useImage(file) {
  if (!file) return;
  state.file = file;
  const img = $("query-image");
  img.src = URL.createObjectURL(file);
  img.hidden = false;
  $("clear-image").hidden = false;
  $("q").value = "";
  $("q").placeholder = file.name || "uploaded image";
  syncUrl();
  run();
}

function clearImage() {
  state.file = null;
  $("query-image").hidden = true;
  $("clear-image").hidden = true;
  $("q").placeholder = "Describe a picture, e.g. a dog runs on the grass";
  $("q").focus();
}

document.addEventListener("DOMContentLoaded", () => {
  params();
  loadHealth();
  $("search-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.text = $("q").value;
    if (state.text.trim()) clearImage();
    syncUrl();
    run();
  });
  $("file").addEventListener("change", (ev) => useImage(ev.target.files[0]));
  $("clear-image").addEventListener("click", clearImage);
  document.querySelectorAll(".switch button").forEach((b) => b.addEventListener("click", () => setLevel(b.dataset.level)));
  ["k", "shortlist"].forEach((id) => $(id).addEventListener("change", () => { syncUrl(); run(); }));
  $("results").addEventListener("click", async (ev) => {
    const b = ev.target.closest("button.more");
    if (!b) return;
    const blob = await (await fetch(b.dataset.thumb)).blob();
    useImage(new File([blob], b.dataset.name || "image.jpg", { type: "image/jpeg" }));
  });
  let depth = 0;
  document.addEventListener("dragenter", (ev) => { ev.preventDefault(); depth++; $("drop").hidden = false; });
  document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; $("drop").hidden = true; } });
  document.addEventListener("dragover", (ev) => ev.preventDefault());
  document.addEventListener("drop", (ev) => {
    ev.preventDefault(); depth = 0; $("drop").hidden = true;
    if (ev.dataTransfer.files.length) useImage(ev.dataTransfer.files[0]);
  });
  document.body.dataset.level = state.level;
  document.querySelectorAll(".switch button").forEach((b) =>
    b.setAttribute("aria-checked", String(b.dataset.level === state.level)));
  if (state.text) run();
});
