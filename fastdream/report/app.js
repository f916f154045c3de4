// The report page: a run (mesh viewer, turntables, previews slider, curves, prompt, config, metrics) or a
// batch index (one card per prompt). Static in report.html; with data.live set it polls api/data and updates.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("fd-data").textContent);
  var app = document.getElementById("app");
  var CURVES = ["loss", "loss_sds", "loss_orient", "loss_entropy", "loss_sparsity", "sds_grad_norm", "t",
                "occupancy", "samples_per_ray", "skipped", "time"];

  function el(tag, attrs, children) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    (children || []).forEach(function (c) { e.append(c); });
    return e;
  }
  function section(title, id) {
    var s = el("section", {id: id}, [el("h2", {}, [title])]);
    app.append(s);
    return s;
  }

  function drawCurve(canvas, rows, key) {
    var ctx = canvas.getContext("2d"), w = canvas.width, h = canvas.height, pad = 28;
    var pts = rows.filter(function (r) { return typeof r[key] === "number"; })
                  .map(function (r) { return [r.step, r[key]]; });
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, w, h);
    ctx.fillStyle = "#333"; ctx.font = "11px sans-serif"; ctx.fillText(key, pad, 12);
    if (!pts.length) return 0;
    var xs = pts.map(function (p) { return p[0]; }), ys = pts.map(function (p) { return p[1]; });
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs), y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys);
    if (x1 === x0) x1 = x0 + 1;
    if (y1 === y0) { y1 += 0.5 * (Math.abs(y1) || 1); y0 -= 0.5 * (Math.abs(y0) || 1); }
    ctx.fillStyle = "#777";
    ctx.fillText(y1.toPrecision(3), 2, pad - 4); ctx.fillText(y0.toPrecision(3), 2, h - 4);
    ctx.fillText("step " + x1, w - 70, h - 4);
    ctx.strokeStyle = "#1f5fbf"; ctx.lineWidth = 2; ctx.beginPath();
    pts.forEach(function (p, i) {
      var x = pad + (p[0] - x0) / (x1 - x0) * (w - 2 * pad), y = pad + (1 - (p[1] - y0) / (y1 - y0)) * (h - 2 * pad - 6);
      if (i) ctx.lineTo(x, y); else ctx.moveTo(x, y);
    });
    if (pts.length === 1) ctx.arc(pad, h / 2, 2, 0, 2 * Math.PI);
    ctx.stroke();
    return pts.length;
  }

  // ------------------------------------------------------------------------------------------ run page
  var run = {};
  function buildRun(d) {
    document.title = "fastdream: " + d.prompt;
    app.append(el("h1", {}, [d.prompt]));
    app.append(el("div", {"class": "muted", id: "summary"}, []));
    var mesh = section("Mesh", "mesh-section");
    run.meshBox = el("div", {id: "mesh-box"}, []);
    mesh.append(run.meshBox);
    var tt = section("Turntables", "turntables");
    run.videoBox = el("div", {"class": "row"}, []);
    tt.append(run.videoBox);
    var pv = section("Previews over training", "previews");
    run.slider = el("input", {type: "range", id: "preview-slider", min: "0", max: "0", value: "0", step: "1"}, []);
    run.stepLabel = el("span", {id: "preview-step"}, []);
    run.img = el("img", {id: "preview-img", alt: "preview"}, []);
    pv.append(el("div", {}, [run.slider, " ", run.stepLabel]), run.img);
    run.slider.addEventListener("input", function () { showPreview(+run.slider.value); });
    var cv = section("Training curves", "curves");
    run.curveBox = el("div", {}, []);
    cv.append(run.curveBox);
    var cfg = section("Configuration", "config");
    run.config = el("pre", {id: "config-text"}, []);
    cfg.append(run.config);
    var mt = section("metrics.json", "metrics");
    run.metrics = el("pre", {id: "metrics-text"}, []);
    mt.append(run.metrics);
    run.previews = []; run.glb = null; run.videos = {};
    updateRun(d);
  }
  function showPreview(i) {
    var p = run.previews[i];
    if (!p) { run.stepLabel.textContent = "no preview yet"; return; }
    run.img.src = p.src;
    run.img.dataset.step = p.step;
    run.stepLabel.textContent = "step " + p.step + " (" + (i + 1) + "/" + run.previews.length + ")";
  }
  function updateRun(d) {
    var m = d.metrics || {};
    var last = d.rows.length ? d.rows[d.rows.length - 1] : null;
    document.getElementById("summary").textContent =
      (last ? "step " + last.step + (d.steps ? "/" + d.steps : "") : "no steps logged yet") +
      (m.wall_time_s ? " \u00b7 " + m.wall_time_s + " s" : "") + (m.device ? " \u00b7 " + m.device : "") +
      (d.live ? " \u00b7 live" : "");
    if (d.glb !== run.glb) {
      run.glb = d.glb;
      run.meshBox.textContent = "";
      if (d.glb) {
        var mv = el("model-viewer", {id: "mesh-viewer", src: d.glb, "camera-controls": "", "interaction-prompt": "none",
                                     "shadow-intensity": "0", exposure: "1", alt: "mesh of " + d.prompt}, []);
        run.meshBox.append(mv);
      } else run.meshBox.append(el("p", {"class": "muted"}, ["no mesh yet"]));
    }
    ["colour", "textureless"].forEach(function (k) {
      var v = (d.videos || {})[k];
      if (!v || run.videos[k] === v.src) return;
      run.videos[k] = v.src;
      var old = document.getElementById("video-" + k);
      if (old) old.parentNode.remove();
      var media = v.type === "gif" ? el("img", {"class": "media", id: "video-" + k, src: v.src, alt: k})
        : el("video", {id: "video-" + k, src: v.src, controls: "", loop: "", muted: "", autoplay: "", playsinline: ""});
      run.videoBox.append(el("div", {}, [el("div", {}, [k]), media]));
    });
    var atEnd = +run.slider.value >= run.previews.length - 1;
    run.previews = d.previews;
    run.slider.max = String(Math.max(0, d.previews.length - 1));
    if (atEnd || +run.slider.value > d.previews.length - 1) run.slider.value = run.slider.max;
    showPreview(+run.slider.value);
    run.curveBox.textContent = "";
    CURVES.forEach(function (key) {
      if (!d.rows.some(function (r) { return typeof r[key] === "number"; })) return;
      var c = el("canvas", {width: "320", height: "160", "class": "curve-canvas", "data-key": key}, []);
      run.curveBox.append(el("div", {"class": "curve"}, [c]));
      drawCurve(c, d.rows, key);
    });
    run.config.textContent = d.config || "";
    run.metrics.textContent = d.metrics ? JSON.stringify(d.metrics, null, 2) : "not written yet (the run is not finished)";
  }

  // ------------------------------------------------------------------------------------------ index page
  function buildIndex(d) {
    document.title = "fastdream batch: " + d.title;
    app.append(el("h1", {}, ["Batch " + d.title]));
    app.append(el("div", {"class": "muted", id: "summary"}, []));
    run.cards = el("div", {"class": "cards", id: "cards"}, []);
    app.append(run.cards);
    updateIndex(d);
  }
  function updateIndex(d) {
    document.getElementById("summary").textContent = d.cards.length + " prompts" + (d.live ? " \u00b7 live" : "");
    run.cards.textContent = "";
    d.cards.forEach(function (c) {
      var body = [c.thumb ? el("img", {src: c.thumb, alt: c.prompt}) : el("div", {"class": "muted"}, ["no preview"]),
                  el("div", {}, [c.prompt]),
                  el("div", {}, [el("span", {"class": "status status-" + c.status}, [c.status]),
                                 c.seconds != null ? " \u00b7 " + Math.round(c.seconds) + " s" : ""])];
      if (c.r_precision) body.push(el("div", {"class": "muted"}, ["CLIP R-Precision " + c.r_precision]));
      if (c.error) body.push(el("div", {"class": "muted"}, [c.error]));
      run.cards.append(c.href ? el("a", {"class": "card", href: c.href}, body) : el("div", {"class": "card"}, body));
    });
  }

  var update = data.kind === "index" ? updateIndex : updateRun;
  (data.kind === "index" ? buildIndex : buildRun)(data);
  window.fastdreamReport = {data: data, drawn: true};
  if (data.live) {
    var poll = function () {
      fetch("api/data", {cache: "no-store"}).then(function (r) { return r.json(); })
        .then(function (d) { window.fastdreamReport.data = d; update(d); })
        .catch(function () { /* the server went away or is busy: try again next time */ })
        .finally(function () { setTimeout(poll, data.poll_ms || 1000); });
    };
    setTimeout(poll, data.poll_ms || 1000);
  }
})();
