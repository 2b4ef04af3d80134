"""The demo page of the web service: one self-contained HTML document (inline CSS and JS, no external
resource, so it works offline and under a strict Content-Security-Policy). A person drops or chooses a
photo; the page posts it to `/predict?top=5&explain=true` and shows each model's top-5 side by side as
bars, with the model's explanation overlay (ViT attention rollout, CNN Grad-CAM) when there is one.

Its title and class count come from the run (`page_text`: "Which dog breed is it?" and "120 breeds"
for Stanford Dogs, "Which class is it?" and "10 classes of <dataset folder>" otherwise), or from
`serve --title`; they are HTML-escaped into the page when it is served. Answers from the server are put
into the page with `textContent` only (never `innerHTML`), so a class name cannot inject markup. The
preview shows only once the browser has decoded the photo, and a refused upload clears it (no broken
image). When a prediction has rendered, `document.body.dataset.state` is `"done"` (`"error"` after a
refusal): tests and scripts can wait on it.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path

from visionpoc.results import DatasetInfo

# default-src 'none': nothing leaves for another origin; the page talks only to its own server
CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>__TITLE__ · visionpoc demo</title>
<style>
  :root { --fg: #1d232b; --muted: #5d6b7a; --line: #dde3ea; --accent: #2b6cb0; --bg: #f6f8fa; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
         color: var(--fg); background: var(--bg); }
  main { max-width: 1100px; margin: 0 auto; padding: 24px; }
  h1 { font-size: 22px; margin: 0 0 4px; }
  .muted { color: var(--muted); }
  #drop { display: block; margin: 18px 0; padding: 28px; border: 2px dashed #9fb3c8; border-radius: 10px;
          background: #fff; text-align: center; cursor: pointer; }
  #drop.over { border-color: var(--accent); background: #eef5fc; }
  #drop input { display: block; margin: 10px auto 0; }
  #top { display: flex; gap: 20px; align-items: flex-start; flex-wrap: wrap; }
  #preview { width: 240px; max-height: 320px; object-fit: contain; border-radius: 8px; display: none; }
  #status { min-height: 1.4em; }
  #error { color: #b00020; font-weight: 600; min-height: 1.4em; }
  #results { margin-top: 16px; display: grid; grid-template-columns: repeat(auto-fit, minmax(300px, 1fr)); gap: 16px; }
  .model-card { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 14px 16px; }
  .model-card h2 { font-size: 17px; margin: 0; }
  .latency { color: var(--muted); font-size: 13px; margin-bottom: 10px; }
  .bar-row { display: grid; grid-template-columns: 1fr 56px; gap: 8px; align-items: center; margin: 5px 0; }
  .bar-label { font-size: 14px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
  .bar-track { grid-column: 1 / 3; height: 8px; background: #edf1f5; border-radius: 4px; overflow: hidden; }
  .bar { height: 100%; background: var(--accent); }
  .bar-row:first-of-type .bar { background: #2f855a; }
  .pct { text-align: right; font-variant-numeric: tabular-nums; font-size: 14px; }
  figure { margin: 12px 0 0; }
  figure img { width: 100%; max-width: 300px; border-radius: 6px; image-rendering: auto; }
  figcaption { color: var(--muted); font-size: 13px; }
</style>
</head>
<body data-state="idle">
<main>
  <h1>__TITLE__</h1>
  <div class="muted" id="models">__SUMMARY__</div>
  <label id="drop" for="file">
    <strong>Drop __PHOTO__ here</strong> or choose a file (JPEG, PNG, WebP…)
    <input type="file" id="file" name="file" accept="image/*">
  </label>
  <div id="top">
    <img id="preview" alt="the uploaded photo">
    <div><div id="status" class="muted"></div><div id="error" role="alert"></div></div>
  </div>
  <section id="results" aria-live="polite"></section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
const preview = $("preview");
// shown once the browser has decoded the file; a file it cannot show, or a refused upload, leaves no
// broken-image icon behind
function clearPreview() {
  preview.style.display = "none";
  const url = preview.getAttribute("src");
  preview.removeAttribute("src");  // removing (not emptying) src fires no further error event
  if (url) URL.revokeObjectURL(url);
}
preview.addEventListener("load", () => { preview.style.display = "block"; });
preview.addEventListener("error", clearPreview);

function card(answer) {
  const c = el("article", "model-card");
  c.dataset.model = answer.model;
  c.appendChild(el("h2", "", answer.model));
  c.appendChild(el("div", "latency", "inference " + answer.latency_ms.toFixed(1) + " ms"));
  for (const t of answer.top) {
    const row = el("div", "bar-row");
    row.appendChild(el("span", "bar-label", t.label));
    row.appendChild(el("span", "pct", (100 * t.probability).toFixed(1) + "%"));
    const track = el("div", "bar-track"), bar = el("div", "bar");
    bar.style.width = (100 * t.probability).toFixed(1) + "%";
    track.appendChild(bar);
    row.appendChild(track);
    c.appendChild(row);
  }
  if (answer.explanation) {
    const fig = el("figure");
    const img = el("img");
    img.src = "data:image/png;base64," + answer.explanation.png_base64;
    img.alt = answer.explanation.method + " of " + answer.model;
    fig.appendChild(img);
    fig.appendChild(el("figcaption", "", answer.explanation.method + ": where the model looked"));
    c.appendChild(fig);
  }
  return c;
}

async function predict(file) {
  document.body.dataset.state = "busy";
  $("error").textContent = "";
  $("results").replaceChildren();
  clearPreview();
  preview.src = URL.createObjectURL(file);
  $("status").textContent = "Predicting " + file.name + "…";
  const form = new FormData();
  form.append("file", file);
  try {
    const r = await fetch("/predict?top=5&explain=true", { method: "POST", body: form });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error || JSON.stringify(body.detail || body));
    $("results").replaceChildren(...body.models.map(card));
    $("status").textContent = file.name + ": " + body.models.length + " models answered.";
    document.body.dataset.state = "done";
  } catch (err) {
    clearPreview();
    $("status").textContent = "";
    $("error").textContent = "Could not predict: " + err.message;
    document.body.dataset.state = "error";
  }
}

$("file").addEventListener("change", (e) => { if (e.target.files.length) predict(e.target.files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) predict(e.dataTransfer.files[0]);
});
</script>
</body>
</html>
"""


@dataclass(frozen=True)
class PageText:
    """The run's words on the page."""

    title: str  # the heading and the tab's title: "Which dog breed is it?"
    classes: str  # what the models choose from: "120 breeds", "10 classes of flowers"
    photo: str  # what to drop: "a dog photo", "a photo"


def page_text(dataset: DatasetInfo, title: str | None = None) -> PageText:
    """The page's words for a run on `dataset`; `title` (`serve --title`) replaces the default title."""
    n = dataset.num_classes
    if dataset.source == "stanford_dogs":
        return PageText(title or "Which dog breed is it?", f"{n} breeds", "a dog photo")
    name = Path(dataset.root).name or dataset.root
    return PageText(title or "Which class is it?", f"{n} classes of {name}", "a photo")


def render_page(text: PageText, models: list[str]) -> str:
    """The page, with the run's words (HTML-escaped) and the labels of the loaded `models`."""
    fill = {"TITLE": text.title, "SUMMARY": f"Models: {', '.join(models)} · {text.classes}", "PHOTO": text.photo}
    return re.sub(r"__(TITLE|SUMMARY|PHOTO)__", lambda m: html.escape(fill[m.group(1)]), PAGE)
