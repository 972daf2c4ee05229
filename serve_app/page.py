"""The upload page served at ``GET /``: one self-contained HTML document, no external assets."""

from __future__ import annotations

import html

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="rayvit-base" content="__BASE__">
<title>__TITLE__ — image classifier</title>
<style>
  :root { --accent: #2f6fde; --muted: #667085; --line: #e4e7ec; }
  * { box-sizing: border-box; }
  body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
         color: #101828; background: #f8f9fb; }
  main { max-width: 760px; margin: 0 auto; padding: 28px 18px 60px; }
  h1 { font-size: 22px; margin: 0 0 4px; }
  .sub { color: var(--muted); margin: 0 0 20px; }
  #drop { border: 2px dashed #b9c2d0; border-radius: 12px; background: #fff; padding: 34px 18px;
          text-align: center; cursor: pointer; transition: background .15s, border-color .15s; }
  #drop.over { border-color: var(--accent); background: #eef4ff; }
  #drop p { margin: 6px 0; }
  #drop .hint { color: var(--muted); font-size: 13px; }
  label.button { display: inline-block; background: var(--accent); color: #fff; border-radius: 8px;
                 padding: 8px 16px; cursor: pointer; font-weight: 600; }
  #file { position: absolute; left: -9999px; }
  #status { min-height: 22px; margin: 14px 0 6px; color: var(--muted); }
  #status.error { color: #b42318; }
  .card { display: flex; gap: 16px; background: #fff; border: 1px solid var(--line);
          border-radius: 12px; padding: 14px; margin-top: 12px; align-items: flex-start; }
  .card img { width: 96px; height: 96px; object-fit: contain; image-rendering: pixelated;
              background: #f2f4f7; border-radius: 8px; flex: none; }
  .card .body { flex: 1; min-width: 0; }
  .name { color: var(--muted); font-size: 12px; overflow: hidden; text-overflow: ellipsis;
          white-space: nowrap; }
  .label { font-size: 20px; font-weight: 700; margin: 2px 0 8px; }
  .label .pct { color: var(--muted); font-weight: 500; font-size: 15px; margin-left: 6px; }
  .row { display: grid; grid-template-columns: 110px 1fr 56px; gap: 8px; align-items: center;
         font-size: 13px; margin: 3px 0; }
  .bar { background: #eef0f4; border-radius: 5px; height: 12px; overflow: hidden; }
  .bar span { display: block; height: 100%; background: var(--accent); border-radius: 5px; }
  .row .p { text-align: right; font-variant-numeric: tabular-nums; color: var(--muted); }
  .err { color: #b42318; font-weight: 600; }
  footer { color: var(--muted); font-size: 12px; margin-top: 28px; }
</style>
</head>
<body>
<main>
  <h1>Image classifier</h1>
  <p class="sub">Model <b id="model-name">__TITLE__</b> · choose or drop images to classify them.</p>
  <div id="drop" tabindex="0">
    <p><label class="button" for="file">Choose images…</label></p>
    <p>or drag and drop them here</p>
    <p class="hint">PNG, JPEG, WebP, GIF, BMP or TIFF</p>
    <input id="file" type="file" accept="image/*" multiple>
  </div>
  <div id="status" role="status" aria-live="polite"></div>
  <div id="results"></div>
  <footer>POST /predict · GET /model · GET /healthz</footer>
</main>
<script>
(function () {
  "use strict";
  var base = document.querySelector('meta[name="rayvit-base"]').content.replace(/\\/+$/, "");
  var drop = document.getElementById("drop");
  var input = document.getElementById("file");
  var results = document.getElementById("results");
  var status = document.getElementById("status");

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function pct(p) { return (100 * p).toFixed(1) + "%"; }
  function setStatus(text, isError) {
    status.textContent = text;
    status.className = isError ? "error" : "";
  }

  function render(card, data) {
    var body = card.querySelector(".body");
    var label = el("div", "label", data.label);
    label.appendChild(el("span", "pct", pct(data.probability)));
    body.appendChild(label);
    data.top_k.forEach(function (t) {
      var row = el("div", "row");
      row.appendChild(el("span", "k", t.label));
      var bar = el("div", "bar");
      var fill = el("span");
      fill.style.width = Math.max(0.5, 100 * t.probability).toFixed(1) + "%";
      bar.appendChild(fill);
      row.appendChild(bar);
      row.appendChild(el("span", "p", pct(t.probability)));
      body.appendChild(row);
    });
  }

  function classify(file) {
    var card = el("div", "card");
    var img = el("img");
    img.alt = file.name;
    img.src = URL.createObjectURL(file);
    card.appendChild(img);
    var body = el("div", "body");
    body.appendChild(el("div", "name", file.name));
    card.appendChild(body);
    results.insertBefore(card, results.firstChild);
    return fetch(base + "/predict?top_k=5", {
      method: "POST",
      headers: { "Content-Type": file.type || "application/octet-stream" },
      body: file
    }).then(function (r) {
      return r.json().catch(function () { return { error: "HTTP " + r.status }; });
    }).then(function (data) {
      if (data.error) {
        body.appendChild(el("div", "err", data.error));
        return false;
      }
      render(card, data);
      return true;
    }).catch(function (e) {
      body.appendChild(el("div", "err", "request failed: " + e));
      return false;
    });
  }

  function handle(files) {
    files = Array.prototype.slice.call(files || []);
    if (!files.length) return;
    setStatus("Classifying " + files.length + " image" + (files.length > 1 ? "s" : "") + "…", false);
    Promise.all(files.map(classify)).then(function (oks) {
      var bad = oks.filter(function (ok) { return !ok; }).length;
      setStatus(bad ? bad + " of " + oks.length + " failed" : "Done", bad > 0);
    });
  }

  input.addEventListener("change", function () { handle(input.files); input.value = ""; });
  drop.addEventListener("click", function (e) { if (e.target === drop) input.click(); });
  drop.addEventListener("keydown", function (e) {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
  });
  ["dragenter", "dragover"].forEach(function (t) {
    drop.addEventListener(t, function (e) { e.preventDefault(); drop.classList.add("over"); });
  });
  ["dragleave", "drop"].forEach(function (t) {
    drop.addEventListener(t, function (e) { e.preventDefault(); drop.classList.remove("over"); });
  });
  drop.addEventListener("drop", function (e) { handle(e.dataTransfer && e.dataTransfer.files); });
  document.addEventListener("dragover", function (e) { e.preventDefault(); });
  document.addEventListener("drop", function (e) { e.preventDefault(); });
})();
</script>
</body>
</html>
"""


def upload_page(base: str, title: str) -> str:
    """The page, with requests going to ``base + '/predict'`` (the app's route prefix)."""
    return _PAGE.replace("__BASE__", html.escape(base, quote=True)).replace(
        "__TITLE__", html.escape(title, quote=True)
    )
