/* featuremaps viewer: plain JavaScript, no build step, no external files.
 *
 * A run is a job on the server (POST /api/runs), polled until it is done; every picture is an
 * <img> whose URL names the run and the drawing parameters, so the browser caches them and the
 * model never runs again when only the display changes. */
"use strict";

const app = {
  options: null,
  image: null, // {file} or {sample}
  previewUrl: null,
  views: [],
  active: 0,
  alpha: 0.5,
  runToken: 0,
};

const pct = (v) => (v === null || v === undefined ? "–" : `${(v * 100).toFixed(v > 0 && v < 0.01 ? 2 : 1)}%`);
const shapeText = (s) => s.join("×");

function displayParams(extra = {}) {
  const p = new URLSearchParams({ reduce: $("#reduce").value, norm: $("#norm").value, cmap: $("#cmap").value });
  for (const [k, v] of Object.entries(extra)) if (v !== null && v !== undefined) p.set(k, v);
  return p;
}

function debounce(fn, ms) {
  let t = null;
  return (...args) => {
    clearTimeout(t);
    t = setTimeout(() => fn(...args), ms);
  };
}

function showError(message) {
  const box = $("#error");
  box.textContent = message || "";
  box.hidden = !message;
}

/* ------------------------------------------------------------------------------------------ */
/* One run on screen: its layer strip, channel grid and channel view                          */
/* ------------------------------------------------------------------------------------------ */
class RunView {
  constructor(label) {
    this.label = label;
    this.el = $("#view-template").content.firstElementChild.cloneNode(true);
    this.el.dataset.label = label;
    $(".tag", this.el).textContent = label;
    $("#views").insertBefore(this.el, $("#compare-section"));
    this.job = null;
    this.layer = null; // index
    this.channel = null; // channel number
    this.page = 0;
    this.perPage = 128;
    this.grid = null; // layout from grid.json
    this.stripBuilt = false;
    this.token = 0;
    this.status = null;

    $(".grid-img", this.el).addEventListener("click", (ev) => this.onGridClick(ev));
    $(".grid-img", this.el).addEventListener("load", () => this.placeMark());
    $(".p-prev", this.el).addEventListener("click", () => this.setPage(this.page - 1));
    $(".p-next", this.el).addEventListener("click", () => this.setPage(this.page + 1));
    for (const tab of $$(".tab", this.el)) tab.addEventListener("click", () => this.showTab(tab.dataset.tab));
    const alpha = $(".alpha", this.el);
    alpha.value = String(app.alpha);
    const slide = debounce(() => this.drawOverlay(), 60);
    alpha.addEventListener("input", () => {
      app.alpha = Number(alpha.value);
      for (const v of app.views) {
        $(".alpha", v.el).value = alpha.value;
        $(".alpha-out", v.el).textContent = app.alpha.toFixed(2);
      }
      slide();
      for (const v of app.views) if (v !== this) v.drawOverlay();
    });
    this.el.addEventListener("pointerdown", () => setActive(this));
  }

  remove() {
    this.token++;
    this.el.remove();
  }

  get base() {
    return `/api/runs/${this.job.id}`;
  }

  /* -- the run's life ------------------------------------------------------------------------ */
  async start(form) {
    const token = ++this.token;
    this.reset();
    this.setState({ state: "queued", message: "sending the image" });
    let job;
    try {
      job = await api("/api/runs", { method: "POST", body: form });
    } catch (e) {
      this.fail(e.message);
      return null;
    }
    this.job = job;
    if (job.request) {
      $(".v-model", this.el).textContent = job.request.model;
      const src = job.request.source ? ` · ${job.request.source.replace(/^sample:/, "")}` : "";
      $(".v-meta", this.el).textContent = `${job.request.weights} weights · ${job.request.mode} mode${src}`;
    }
    while (token === this.token) {
      this.setState(job);
      if ((job.state === "rendering" || job.state === "done") && !this.stripBuilt) this.showRun(job);
      if (job.state === "done") {
        this.finish(job);
        return job;
      }
      if (job.state === "failed") {
        this.fail(job.error || job.message);
        return job;
      }
      await new Promise((r) => setTimeout(r, job.state === "rendering" ? 120 : 200));
      try {
        job = await api(`/api/runs/${job.id}`);
      } catch (e) {
        this.fail(e.message);
        return null;
      }
      this.job = job;
    }
    return null;
  }

  reset() {
    this.job = null;
    this.layer = null;
    this.channel = null;
    this.page = 0;
    this.grid = null;
    this.stripBuilt = false;
    this.el.classList.remove("has-run");
    $(".strip", this.el).replaceChildren();
    $(".v-model", this.el).textContent = "";
    $(".v-meta", this.el).textContent = "";
    $(".v-random", this.el).hidden = true;
    $(".v-error", this.el).hidden = true;
    const dl = $(".v-download", this.el);
    dl.removeAttribute("href");
    dl.setAttribute("aria-disabled", "true");
    $(".numbers tbody", this.el).replaceChildren();
    this.clearGrid("Click a layer above to see its channels.");
    this.clearChannel();
    document.dispatchEvent(new CustomEvent("fm-run-reset", { detail: this })); // extras.js: the CAM panel
  }

  setState(job) {
    this.status = job;
    const s = $(".v-state", this.el);
    s.textContent = job.state === "done" ? "" : job.message || job.state;
    s.dataset.state = job.state;
    updateProgress(app.views.map((v) => v.status));
  }

  fail(message) {
    const box = $(".v-error", this.el);
    box.textContent = message;
    box.hidden = false;
    $(".v-state", this.el).textContent = "failed";
    $(".v-state", this.el).dataset.state = "failed";
    this.status = { state: "failed", message };
    updateProgress(app.views.map((v) => v.status));
  }

  finish(job) {
    const dl = $(".v-download", this.el);
    dl.href = `${this.base}/download`;
    dl.setAttribute("download", "");
    dl.removeAttribute("aria-disabled");
    const t = job.timings || {};
    const parts = [];
    if (t.capture_s !== undefined) parts.push(`forward pass ${t.capture_s.toFixed(2)} s`);
    if (t.load_s !== undefined && t.load_s > 0.05) parts.push(`model load ${t.load_s.toFixed(1)} s`);
    $(".v-state", this.el).textContent = parts.join(" · ");
    $(".v-state", this.el).dataset.state = "done";
    this.status = job;
    updateProgress(app.views.map((v) => v.status));
    refreshStatus();
    maybeCompare();
    document.dispatchEvent(new CustomEvent("fm-run-done", { detail: this }));
  }

  /* -- the layer strip ----------------------------------------------------------------------- */
  showRun(job) {
    this.stripBuilt = true;
    refreshStatus(); // the forward pass is done: the header counts it now, not when the folder is written
    this.el.classList.add("has-run");
    $(".v-model", this.el).textContent = job.model;
    const size = job.input_size ? `${job.input_size[1]}×${job.input_size[0]}` : "";
    const src = job.source ? ` · ${job.source.replace(/^sample:/, "")}` : "";
    $(".v-meta", this.el).textContent = `${job.weights} · ${job.mode} mode · ${size}${src}`;
    $(".v-meta", this.el).title = `weights ${job.weights} · mode ${job.mode} · input ${size}${src}`;
    $(".v-random", this.el).hidden = !!job.pretrained;
    const strip = $(".strip", this.el);
    strip.replaceChildren();
    job.layers.forEach((layer, i) => {
      const card = el("button", { type: "button", class: "card", role: "option", "data-index": String(i), title: `${layer.name} (${layer.type})` });
      const kind = el("span", { class: "kind", "data-kind": layer.kind, text: layer.kind });
      if (layer.spatial) {
        const img = el("img", { alt: layer.name, loading: "eager", decoding: "async" });
        img.addEventListener("error", () => card.classList.add("broken"));
        card.append(el("div", { class: "thumb" }, [img, kind]));
      } else {
        card.append(el("div", { class: "thumb flat" }, [kind, document.createTextNode("not spatial")]));
      }
      const zeros = layer.stats.zero_fraction ?? 0;
      const bar = el("span", { class: "zbar" }, [el("i")]);
      bar.firstChild.style.width = `${Math.round(zeros * 100)}%`;
      card.append(
        el("span", { class: "lname", text: layer.name }),
        el("span", { class: "lshape", text: shapeText(layer.shape.slice(1)) }),
        el("span", { class: "lstat", title: "fraction of zeros" }, [bar, el("b", { text: `${pct(zeros)} zeros` })]),
      );
      card.addEventListener("click", () => {
        setActive(this);
        this.selectLayer(i);
      });
      strip.append(card);
    });
    this.fillNumbers();
    this.drawThumbs();
    const first = job.layers.findIndex((l) => l.spatial);
    if (first >= 0) this.selectLayer(first);
    document.dispatchEvent(new CustomEvent("fm-run-shown", { detail: this }));
  }

  drawThumbs() {
    if (!this.job) return;
    const q = displayParams().toString();
    for (const card of $$(".card", this.el)) {
      const img = $("img", card);
      if (img) {
        card.classList.remove("broken");
        img.src = `${this.base}/layers/${card.dataset.index}/thumb.png?${q}`;
      }
    }
  }

  fillNumbers() {
    const body = $(".numbers tbody", this.el);
    body.replaceChildren();
    this.job.layers.forEach((l, i) => {
      const s = l.stats;
      const barCell = (value, cls) => {
        const td = el("td", {}, [el("span", { class: "barcell" }, [el("span", { class: `zbar ${cls}` }, [el("i")]), el("b", { text: pct(value) })])]);
        $("i", td).style.width = `${Math.round((value || 0) * 100)}%`;
        return td;
      };
      const zeros = barCell(s.zero_fraction, "");
      const dead = el("td", { text: pct(s.dead_fraction) });
      const row = el("tr", { "data-index": String(i) }, [
        el("td", { text: l.name }),
        el("td", { text: shapeText(l.shape.slice(1)) }),
        el("td", { text: fmt(s.min) }),
        el("td", { text: fmt(s.max) }),
        el("td", { text: fmt(s.mean) }),
        el("td", { text: fmt(s.std) }),
        zeros,
        dead,
      ]);
      row.addEventListener("click", () => this.selectLayer(i));
      body.append(row);
    });
  }

  showTab(name) {
    for (const t of $$(".tab", this.el)) t.classList.toggle("active", t.dataset.tab === name);
    $(".t-channels", this.el).hidden = name !== "channels";
    $(".t-numbers", this.el).hidden = name !== "numbers";
    $(".pager", this.el).hidden = name !== "channels";
  }

  /* -- a layer's channels -------------------------------------------------------------------- */
  selectLayer(i, { keepChannel = false } = {}) {
    if (!this.job || i < 0 || i >= this.job.layers.length) return;
    const changed = i !== this.layer;
    this.layer = i;
    for (const c of $$(".card", this.el)) c.classList.toggle("selected", Number(c.dataset.index) === i);
    for (const r of $$(".numbers tr", this.el)) r.classList.toggle("selected", Number(r.dataset.index) === i);
    const card = $(`.card[data-index="${i}"]`, this.el);
    if (card) card.scrollIntoView({ block: "nearest", inline: "nearest" });
    const layer = this.job.layers[i];
    if (changed) {
      this.page = 0;
      if (!keepChannel) this.channel = null;
    }
    this.fillLayerStats(layer);
    if (!layer.spatial) {
      this.clearGrid(`${layer.name} has output shape ${shapeText(layer.shape)}: no maps to draw.`);
      this.clearChannel();
      return;
    }
    this.loadGrid();
    if (this.channel === null) this.clearChannel(true);
    this.drawChannel();
    this.drawOverlay();
  }

  fillLayerStats(layer) {
    const s = layer.stats;
    const rows = [
      ["layer", `${layer.name} (${layer.type})`],
      ["output", shapeText(layer.shape)],
      ["range", `${fmt(s.min)} … ${fmt(s.max)}`],
      ["mean ± std", `${fmt(s.mean)} ± ${fmt(s.std)}`],
      ["zeros", pct(s.zero_fraction)],
      ["dead channels", pct(s.dead_fraction)],
    ];
    $(".layer-stats tbody", this.el).replaceChildren(...rows.map(([k, v]) => el("tr", {}, [el("th", { text: k }), el("td", { text: v })])));
  }

  clearGrid(message) {
    const img = $(".grid-img", this.el);
    img.hidden = true;
    img.removeAttribute("src");
    $(".grid-mark", this.el).hidden = true;
    const msg = $(".grid-msg", this.el);
    msg.textContent = message;
    msg.hidden = false;
    $(".p-text", this.el).textContent = "";
    $(".p-prev", this.el).disabled = true;
    $(".p-next", this.el).disabled = true;
    $(".grid-note", this.el).hidden = true;
    this.grid = null;
  }

  gridParams() {
    return new URLSearchParams({ norm: $("#norm").value, cmap: $("#cmap").value, page: String(this.page), per_page: String(this.perPage) });
  }

  async loadGrid() {
    if (!this.job || this.layer === null) return;
    const i = this.layer;
    const q = this.gridParams().toString();
    const token = this.token;
    let layout;
    try {
      layout = await api(`${this.base}/layers/${i}/grid.json?${q}`);
    } catch (e) {
      if (this.layer === i) this.clearGrid(e.message);
      return;
    }
    if (token !== this.token || this.layer !== i) return;
    this.grid = layout;
    const img = $(".grid-img", this.el);
    img.src = `${this.base}/layers/${i}/grid.png?${q}`;
    img.hidden = false;
    $(".grid-msg", this.el).hidden = true;
    $(".p-text", this.el).textContent =
      layout.pages > 1 ? `page ${layout.page + 1} / ${layout.pages} · ${layout.total} channels` : `${layout.total} channels`;
    const note = $(".grid-note", this.el);
    note.textContent = layout.scale_note || "";
    note.hidden = !layout.scale_note;
    $(".p-prev", this.el).disabled = layout.page <= 0;
    $(".p-next", this.el).disabled = layout.page >= layout.pages - 1;
    this.placeMark();
  }

  setPage(p) {
    if (!this.grid || p < 0 || p >= this.grid.pages || p === this.page) return;
    this.page = p;
    this.loadGrid();
  }

  onGridClick(ev) {
    const g = this.grid;
    if (!g) return;
    const img = ev.currentTarget;
    const rect = img.getBoundingClientRect();
    const x = ((ev.clientX - rect.left) * img.naturalWidth) / rect.width;
    const y = ((ev.clientY - rect.top) * img.naturalHeight) / rect.height;
    const col = Math.floor((x - g.x0 - g.sep) / g.cell_w);
    const row = Math.floor((y - g.y0 - g.sep) / g.cell_h);
    if (col < 0 || row < 0 || col >= g.cols || row >= g.rows) return;
    const k = row * g.cols + col;
    if (k >= g.channels.length) return;
    setActive(this);
    this.selectChannel(g.channels[k]);
  }

  placeMark() {
    const mark = $(".grid-mark", this.el);
    const g = this.grid;
    const img = $(".grid-img", this.el);
    const k = g && this.channel !== null ? g.channels.indexOf(this.channel) : -1;
    if (k < 0 || !img.naturalWidth || img.hidden) {
      mark.hidden = true;
      return;
    }
    const s = img.clientWidth / img.naturalWidth;
    const row = Math.floor(k / g.cols);
    const col = k % g.cols;
    const left = g.x0 + g.sep + col * g.cell_w;
    const top = g.y0 + g.sep + row * g.cell_h;
    mark.style.left = `${img.offsetLeft + left * s - 2}px`;
    mark.style.top = `${img.offsetTop + top * s - 2}px`;
    mark.style.width = `${g.tile_w * s + 4}px`;
    mark.style.height = `${(g.tile_h + g.label_h) * s + 4}px`;
    mark.hidden = false;
  }

  /* -- one channel ----------------------------------------------------------------------------- */
  selectChannel(c) {
    if (!this.job || this.layer === null) return;
    this.channel = c;
    if (this.grid && !this.grid.channels.includes(c)) {
      const p = Math.floor(c / this.perPage);
      if (p !== this.page) {
        this.page = p;
        this.loadGrid();
      }
    }
    this.placeMark();
    this.drawChannel();
    this.drawOverlay();
  }

  moveChannel(step) {
    const layer = this.job && this.layer !== null ? this.job.layers[this.layer] : null;
    if (!layer || !layer.spatial) return;
    const n = layer.shape[1];
    const c = this.channel === null ? 0 : Math.min(n - 1, Math.max(0, this.channel + step));
    this.selectChannel(c);
  }

  clearChannel(keepOverlay = false) {
    const c = $(".c-img", this.el);
    c.hidden = true;
    c.removeAttribute("src");
    $(".c-title", this.el).textContent = "Channel";
    $(".c-cap", this.el).textContent = "click a channel in the grid";
    $(".c-range", this.el).textContent = "";
    $(".c-page", this.el).hidden = true;
    if (!keepOverlay) {
      const o = $(".o-img", this.el);
      o.hidden = true;
      o.removeAttribute("src");
    }
  }

  async drawChannel() {
    if (!this.job || this.layer === null) return;
    const layer = this.job.layers[this.layer];
    if (!layer.spatial) return;
    const q = displayParams();
    q.delete("reduce");
    const scaleUrl = `/api/cmaps/${encodeURIComponent($("#cmap").value)}.png`;
    $(".scale-bar", this.el).src = scaleUrl;
    if (this.channel === null) {
      $(".c-title", this.el).textContent = `${layer.name} · channel ${$("#reduce").value}`;
      this.setScale(null);
      return;
    }
    const i = this.layer;
    const c = this.channel;
    const img = $(".c-img", this.el);
    img.src = `${this.base}/layers/${i}/channels/${c}.png?${q}`;
    img.hidden = false;
    const page = $(".c-page", this.el);
    page.href = `/channel?${new URLSearchParams({ run: this.job.id, layer: String(i), channel: String(c) })}`;
    page.hidden = false;
    $(".c-title", this.el).textContent = `${layer.name} · channel ${c}`;
    $(".c-cap", this.el).textContent = `channel ${c} of ${layer.shape[1]} · ${shapeText(layer.shape.slice(2))}`;
    try {
      const info = await api(`${this.base}/layers/${i}/channels/${c}.json?${q}`);
      if (this.layer !== i || this.channel !== c) return;
      $(".c-range", this.el).replaceChildren(
        el("span", { text: "values " }),
        el("strong", { class: "c-minmax", text: `${fmt(info.min)} … ${fmt(info.max)}` }),
        el("span", { text: ` · mean ${fmt(info.mean)} · zeros ${pct(info.zero_fraction)}` }),
      );
      this.setScale(info.scale, info.scale_layers);
    } catch (e) {
      $(".c-range", this.el).textContent = e.message;
    }
  }

  setScale(scale, layers = null) {
    const lo = $(".s-lo", this.el);
    const hi = $(".s-hi", this.el);
    const mid = $(".s-mid", this.el);
    if (!scale) {
      lo.textContent = "low";
      hi.textContent = "high";
      mid.textContent = "each map its own range";
      return;
    }
    lo.textContent = fmt(scale[0]);
    hi.textContent = fmt(scale[1]);
    const norm = $("#norm").value;
    // the same words as the grid's header (grid.json's scale_note), so that the two agree
    const across = layers ? `one global range across ${layers} layer${layers === 1 ? "" : "s"}` : "one global range across all layers";
    mid.textContent = norm === "map" ? "colour scale: this channel" : norm === "layer" ? "colour scale: one range for the layer" : norm === "global" ? `colour scale: ${across}` : "colour scale: fixed";
  }

  drawOverlay() {
    if (!this.job || this.layer === null || !this.job.layers[this.layer].spatial) return;
    const extra = { alpha: app.alpha.toFixed(2) };
    if (this.channel !== null) extra.channel = String(this.channel);
    const q = displayParams(extra);
    const o = $(".o-img", this.el);
    o.src = `${this.base}/layers/${this.layer}/overlay.png?${q}`;
    o.hidden = false;
    const what = this.channel !== null ? `channel ${this.channel}` : `channel ${$("#reduce").value}`;
    $(".o-cap", this.el).textContent = `${what} over the input`;
  }

  redraw() {
    if (!this.job || !this.stripBuilt) return;
    this.drawThumbs();
    if (this.layer !== null && this.job.layers[this.layer].spatial) {
      this.loadGrid();
      this.drawChannel();
      this.drawOverlay();
    }
  }
}

/* ------------------------------------------------------------------------------------------ */
/* Page-level controls                                                                         */
/* ------------------------------------------------------------------------------------------ */
function setActive(view) {
  app.active = Math.max(0, app.views.indexOf(view));
  for (const v of app.views) v.el.classList.toggle("active", v === view && app.views.length > 1);
}

function updateProgress(jobs) {
  const box = $("#progress");
  box.hidden = false;
  const order = ["queued", "loading", "running", "rendering", "done"];
  // the least advanced run decides the steps
  let rank = order.length - 1;
  let failed = false;
  let message = "";
  for (const j of jobs) {
    if (!j) {
      rank = 0;
      message = "waiting";
      continue;
    }
    if (j.state === "failed") failed = true;
    const r = order.indexOf(j.state);
    if (r >= 0 && r <= rank) {
      rank = r;
      message = j.message || j.state;
    }
  }
  $$("#steps li").forEach((li, k) => {
    li.classList.toggle("done", k < rank || (k === rank && order[rank] === "done"));
    li.classList.toggle("current", k === rank && order[rank] !== "done");
  });
  const bar = $("#bar");
  bar.style.width = `${Math.round((100 * (rank + (order[rank] === "done" ? 0 : 0.5))) / (order.length - 1))}%`;
  box.classList.toggle("busy", order[rank] !== "done" && !failed);
  box.classList.toggle("failed", failed);
  $("#progress-text").textContent = failed ? "the run failed" : order[rank] === "done" ? "done" : message;
}

async function refreshStatus() {
  try {
    const s = await api("/api/status");
    $("#server-status").textContent = `${s.forward_passes} forward pass${s.forward_passes === 1 ? "" : "es"} · ${s.models_loaded.length} model${s.models_loaded.length === 1 ? "" : "s"} loaded`;
  } catch (e) {
    $("#server-status").textContent = "server unreachable";
  }
}

function fillSelect(select, items, value) {
  select.replaceChildren(...items.map((it) => el("option", { value: it.value, text: it.label })));
  if (value !== undefined && items.some((it) => it.value === value)) select.value = value;
}

function buildConfig(box, defaults) {
  const o = app.options;
  const field = (label, cls) => {
    const s = el("select", { class: cls, "aria-label": `${box.dataset.label} ${label}` });
    box.append(el("label", { class: "field" }, [document.createTextNode(label), s]));
    return s;
  };
  const model = field("Model", "f-model");
  const weights = field("Weights", "f-weights");
  const mode = field("Mode", "f-mode");
  const layers = field("Layers", "f-layers");
  fillSelect(model, o.models.map((m) => ({ value: m.name, label: m.name })), defaults.model);
  fillSelect(
    weights,
    o.weights.map((w) => ({ value: w.id, label: w.label })),
    defaults.weights,
  );
  const modeLabels = { network: "network (real forward pass)", conv: "conv chain", "conv-relu": "conv → ReLU chain", "conv-pool": "conv → pool chain" };
  fillSelect(mode, o.modes.map((m) => ({ value: m, label: modeLabels[m] || m })), defaults.mode);
  const layerLabels = { default: "default (convs / all steps)", conv: "conv", relu: "activations", pool: "pools", norm: "norms", all: "all leaf modules" };
  fillSelect(layers, o.layers.map((l) => ({ value: l, label: layerLabels[l] || l })), "default");
  const note = el("div", { class: "weights-note" });
  box.append(note);
  const update = () => {
    const w = o.weights.find((x) => x.id === weights.value);
    const m = o.models.find((x) => x.name === model.value);
    if (w && !w.pretrained) note.textContent = "random weights: untrained network";
    else if (w && w.id === "DEFAULT" && m && m.pretrained_cached === false) note.textContent = "pretrained weights are not cached here; without internet the run will fail.";
    else note.textContent = "";
    note.hidden = !note.textContent;
  };
  model.addEventListener("change", update);
  weights.addEventListener("change", update);
  update();
}

function configValues(box) {
  return {
    model: $(".f-model", box).value,
    weights: $(".f-weights", box).value,
    mode: $(".f-mode", box).value,
    layers: $(".f-layers", box).value,
  };
}

function chooseFile(file) {
  if (!file) return;
  const limit = app.options.limits.max_upload_bytes;
  if (file.size > limit) {
    showError(`${file.name} is ${(file.size / 2 ** 20).toFixed(1)} MB, larger than the limit of ${(limit / 2 ** 20).toFixed(1)} MB; use a smaller image`);
    return;
  }
  app.image = { file };
  setPreview(URL.createObjectURL(file), file.name);
  run();
}

function chooseSample(name) {
  app.image = { sample: name };
  setPreview(null, `sample: ${name}`);
  const img = $("#preview");
  img.src = `/api/samples/${encodeURIComponent(name)}.png`;
  img.hidden = false;
  for (const b of $$("#samples button")) b.classList.toggle("selected", b.dataset.sample === name);
  run();
}

function setPreview(url, label) {
  if (app.previewUrl) URL.revokeObjectURL(app.previewUrl);
  app.previewUrl = url;
  const img = $("#preview");
  if (url) {
    img.src = url;
    img.hidden = false;
    for (const b of $$("#samples button")) b.classList.remove("selected");
  } else {
    img.hidden = true;
    img.removeAttribute("src");
  }
  $("#drop-text").textContent = label;
  $("#drop").classList.toggle("has-image", true);
}

function ensureViews(n) {
  while (app.views.length > n) app.views.pop().remove();
  while (app.views.length < n) app.views.push(new RunView(String.fromCharCode(65 + app.views.length)));
  $("#views").classList.toggle("two", n > 1);
  $("#empty").hidden = true;
  setActive(app.views[Math.min(app.active, n - 1)]);
}

async function run() {
  showError("");
  if (!app.image) {
    showError("choose an image or a sample first");
    return;
  }
  const compare = $("#compare").checked;
  const configs = [configValues($("#cfg-a"))];
  if (compare) configs.push(configValues($("#cfg-b")));
  const size = $("#size").value.trim();
  ensureViews(configs.length);
  $("#compare-section").hidden = true;
  const token = ++app.runToken;
  $("#run").disabled = true;
  updateProgress([{ state: "queued", message: "sending the image" }]);
  try {
    await Promise.all(
      configs.map((cfg, k) => {
        const form = new FormData();
        if (app.image.file) form.append("image", app.image.file, app.image.file.name);
        else form.append("sample", app.image.sample);
        for (const [key, value] of Object.entries(cfg)) form.append(key, value);
        if (size) form.append("size", size);
        return app.views[k].start(form);
      }),
    );
  } finally {
    if (token === app.runToken) $("#run").disabled = false;
  }
}

function maybeCompare() {
  const views = app.views;
  const section = $("#compare-section");
  if (views.length < 2 || !views.every((v) => v.job && v.job.state === "done")) {
    section.hidden = true;
    return;
  }
  const norm = $("#norm").value;
  const q = new URLSearchParams({ runs: views.map((v) => v.job.id).join(","), reduce: $("#reduce").value, cmap: $("#cmap").value, norm });
  $("#compare-img").src = `/api/compare.png?${q}`;
  const ranges = { map: "each tile its own range", layer: "one range per column", global: "one range for every tile" };
  $("#compare-scale").textContent = `channel ${$("#reduce").value} of each run, one kind of map per row · ${ranges[norm] || "fixed range"}`;
  section.hidden = false;
}

function redrawAll() {
  $("#cmap-preview").src = `/api/cmaps/${encodeURIComponent($("#cmap").value)}.png`;
  for (const v of app.views) v.redraw();
  maybeCompare();
}

function onKey(ev) {
  const t = ev.target;
  if (t && (t.tagName === "INPUT" || t.tagName === "SELECT" || t.tagName === "TEXTAREA" || t.isContentEditable)) return;
  if (ev.altKey || ev.ctrlKey || ev.metaKey) return;
  const view = app.views[app.active];
  if (!view || !view.job || !view.stripBuilt) return;
  const layers = view.job.layers;
  let handled = true;
  switch (ev.key) {
    case "ArrowLeft":
      view.selectLayer(Math.max(0, (view.layer ?? 0) - 1));
      break;
    case "ArrowRight":
      view.selectLayer(Math.min(layers.length - 1, (view.layer ?? -1) + 1));
      break;
    case "ArrowUp":
      view.moveChannel(ev.shiftKey && view.grid ? -view.grid.cols : -1);
      break;
    case "ArrowDown":
      view.moveChannel(ev.shiftKey && view.grid ? view.grid.cols : 1);
      break;
    case "PageUp":
      view.setPage(view.page - 1);
      break;
    case "PageDown":
      view.setPage(view.page + 1);
      break;
    default:
      handled = false;
  }
  if (handled) ev.preventDefault();
}

async function init() {
  try {
    app.options = await api("/api/options");
  } catch (e) {
    showError(e.message);
    return;
  }
  const o = app.options;
  const firstWeights = o.weights[0] ? o.weights[0].id : "";
  buildConfig($("#cfg-a"), { model: o.models[0].name, weights: firstWeights, mode: "network" });
  buildConfig($("#cfg-b"), { model: (o.models[1] || o.models[0]).name, weights: firstWeights, mode: "network" });
  fillSelect($("#reduce"), o.reductions.map((r) => ({ value: r, label: `channel ${r}` })), "mean");
  const normLabels = { map: "per map (each its own range)", layer: "per layer (one range)", global: "global (all layers)" };
  fillSelect($("#norm"), o.norms.map((n) => ({ value: n, label: normLabels[n] || n })), "map");
  fillSelect($("#cmap"), o.cmaps.map((c) => ({ value: c, label: c })), "viridis");
  $("#cmap-preview").src = `/api/cmaps/viridis.png`;
  const size = $("#size");
  size.min = String(o.limits.min_input_size);
  size.max = String(o.limits.max_input_size);

  const samples = $("#samples");
  samples.append(el("span", { class: "muted", text: "or a sample:" }));
  for (const s of o.samples) {
    const b = el("button", { type: "button", class: "chip", "data-sample": s, text: s });
    b.addEventListener("click", () => chooseSample(s));
    samples.append(b);
  }

  const file = $("#file");
  file.addEventListener("change", () => {
    if (file.files && file.files[0]) chooseFile(file.files[0]);
    file.value = "";
  });
  const drop = $("#drop");
  drop.addEventListener("dragover", (ev) => {
    ev.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    const f = ev.dataTransfer && ev.dataTransfer.files && ev.dataTransfer.files[0];
    if (f) chooseFile(f);
  });
  drop.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" || ev.key === " ") {
      ev.preventDefault();
      file.click();
    }
  });
  $("#compare").addEventListener("change", () => {
    $("#cfg-b").hidden = !$("#compare").checked;
    $("#cfg-a").classList.toggle("labelled", $("#compare").checked);
  });
  $("#run").addEventListener("click", run);
  for (const id of ["#reduce", "#norm", "#cmap"]) $(id).addEventListener("change", redrawAll);
  document.addEventListener("keydown", onKey);
  window.addEventListener("resize", debounce(() => app.views.forEach((v) => v.placeMark()), 100));
  refreshStatus();
}

document.addEventListener("DOMContentLoaded", init);
