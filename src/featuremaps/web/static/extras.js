/* featuremaps viewer, beside app.js: the CAM panel of a run (class evidence beside the layer strip)
 * and opening a run from the address (/?run=ID&layer=NAME|INDEX&channel=C, what the channel page
 * links to). Uses dom.js's helpers (api, el, $, $$) and app.js's globals (app, ensureViews), and
 * listens to the events its RunView sends: fm-run-shown (a run's layers are on screen) and
 * fm-run-reset. */
"use strict";

const cam = { methods: null, open: false };

function camPanel(view) {
  return $(".cam-panel", view.el);
}

function camParams(view, extra = {}) {
  const p = camPanel(view);
  const q = new URLSearchParams({ method: $(".cam-method", p).value || "gradcam" });
  const target = $(".cam-target", p).value.trim();
  const layer = $(".cam-layer", p).value.trim();
  if (target) q.set("target", target);
  if (layer) q.set("layer", layer);
  for (const [k, v] of Object.entries(extra)) q.set(k, v);
  return q;
}

function camClear(view, message = "") {
  const p = camPanel(view);
  const img = $(".cam-img", p);
  img.hidden = true;
  img.removeAttribute("src");
  $(".cam-title", p).textContent = "";
  $(".cam-top5 tbody", p).replaceChildren();
  $(".cam-channels", p).replaceChildren();
  $(".cam-msg", p).textContent = message;
  view.camDone = false;
}

function camGoToChannel(view, layerIndex, channel) {
  setActive(view);
  if (view.layer !== layerIndex) view.selectLayer(layerIndex);
  view.selectChannel(channel);
  const grid = $(".grid-wrap", view.el);
  if (grid) grid.scrollIntoView({ block: "nearest" });
}

async function camCompute(view) {
  if (!view.job || view.job.state !== "done") return;
  const p = camPanel(view);
  const id = view.job.id;
  const base = `/api/runs/${id}`;
  $(".cam-msg", p).textContent = "computing: one forward and backward pass…";
  $(".cam-go", p).disabled = true;
  let r;
  try {
    r = await api(`${base}/cam.json?${camParams(view)}`);
  } catch (e) {
    if (view.job && view.job.id === id) camClear(view, e.message);
    $(".cam-go", p).disabled = false;
    return;
  }
  $(".cam-go", p).disabled = false;
  if (!view.job || view.job.id !== id) return;
  const img = $(".cam-img", p);
  img.src = `${base}/cam.png?${camParams(view, { legend: "0", alpha: "0.5" })}`;
  img.hidden = false;
  $(".cam-title", p).textContent = r.title;
  $(".cam-msg", p).textContent = `map ${r.map_shape.join("×")} at ${r.layer} · computed once, kept`;
  const rows = r.top_classes.map((c) => {
    const bar = el("span", { class: "pbar" });
    bar.style.width = `${Math.max(1, Math.round(c.probability * 80))}px`;
    const tr = el("tr", { class: c.index === r.target ? "target" : "", title: "explain this class", "data-index": String(c.index) }, [
      el("td", { class: "cam-label", text: c.label }),
      el("td", { class: "cam-prob", text: `${(c.probability * 100).toFixed(c.probability < 0.01 ? 2 : 1)}%` }),
      el("td", {}, [bar]),
    ]);
    tr.addEventListener("click", () => {
      $(".cam-target", p).value = String(c.index);
      camCompute(view);
    });
    return tr;
  });
  $(".cam-top5 tbody", p).replaceChildren(...rows);
  const total = r.contributions_total;
  const chips = r.channels.map((c) => {
    const share = total ? ` · ${((100 * c.contribution) / total).toFixed(1)}%` : "";
    const kids = [];
    if (c.layer_index !== null) kids.push(el("img", { src: `${base}/layers/${c.layer_index}/channels/${c.channel}.png?cmap=${encodeURIComponent($("#cmap").value)}`, alt: `channel ${c.channel}` }));
    kids.push(el("span", { text: `#${c.channel}${share}` }));
    const chip = el("button", { type: "button", class: "cam-ch", "data-channel": String(c.channel), title: `contribution ${fmt(c.contribution)}` }, kids);
    if (c.layer_index === null) {
      chip.setAttribute("aria-disabled", "true");
      chip.title = `this run did not capture ${r.layer}; run it with that layer to see the channel`;
    } else {
      chip.addEventListener("click", () => camGoToChannel(view, c.layer_index, c.channel));
    }
    return chip;
  });
  $(".cam-channels", p).replaceChildren(...chips);
  view.camDone = true;
}

function camSetup(view) {
  const p = camPanel(view);
  if (!p || view.camReady) return;
  view.camReady = true;
  const select = $(".cam-method", p);
  for (const m of cam.methods || [{ id: "gradcam", label: "Grad-CAM" }]) select.append(el("option", { value: m.id, text: m.label }));
  const toggle = $(".cam-toggle", view.el);
  toggle.addEventListener("click", () => {
    cam.open = p.hidden;
    for (const v of app.views) {
      camPanel(v).hidden = !cam.open;
      $(".cam-toggle", v.el).setAttribute("aria-expanded", String(cam.open));
      if (cam.open && !v.camDone) camCompute(v);
    }
  });
  $(".cam-go", p).addEventListener("click", () => camCompute(view));
  select.addEventListener("change", () => camCompute(view));
  for (const sel of [".cam-target", ".cam-layer"]) {
    $(sel, p).addEventListener("keydown", (ev) => {
      if (ev.key === "Enter") camCompute(view);
    });
  }
}

document.addEventListener("fm-run-shown", (ev) => {
  const view = ev.detail;
  camSetup(view);
  camClear(view);
  $(".cam-toggle", view.el).disabled = false;
  camPanel(view).hidden = !cam.open;
});

document.addEventListener("fm-run-reset", (ev) => {
  const view = ev.detail;
  if (!camPanel(view)) return;
  camSetup(view);
  camClear(view);
  $(".cam-toggle", view.el).disabled = true;
});

document.addEventListener("fm-run-done", (ev) => {
  const view = ev.detail;
  if (cam.open && !view.camDone) camCompute(view);
});

/* -- /?run=ID&layer=..&channel=..: open a run that exists ------------------------------------------- */
async function openRunFromAddress() {
  const q = new URLSearchParams(window.location.search);
  const id = q.get("run");
  if (!id) return;
  for (let i = 0; i < 200 && !app.options; i++) await new Promise((r) => setTimeout(r, 50));
  if (!app.options) return;
  ensureViews(1);
  const view = app.views[0];
  const token = ++view.token;
  view.reset();
  view.setState({ state: "queued", message: "opening the run" });
  let job;
  for (;;) {
    try {
      job = await api(`/api/runs/${encodeURIComponent(id)}`);
    } catch (e) {
      view.fail(e.message);
      return;
    }
    if (token !== view.token) return;
    view.job = job;
    view.setState(job);
    if ((job.state === "rendering" || job.state === "done") && !view.stripBuilt) view.showRun(job);
    if (job.state === "done") {
      view.finish(job);
      break;
    }
    if (job.state === "failed") {
      view.fail(job.error || job.message);
      return;
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  const layer = q.get("layer");
  if (layer !== null) {
    let i = job.layers.findIndex((l) => l.name === layer);
    if (i < 0 && /^\d+$/.test(layer)) i = Number(layer);
    if (i >= 0 && i < job.layers.length && job.layers[i].spatial) {
      view.selectLayer(i);
      const c = Number(q.get("channel"));
      if (q.get("channel") !== null && Number.isInteger(c) && c >= 0 && c < job.layers[i].shape[1]) view.selectChannel(c);
    }
  }
}

async function initExtras() {
  try {
    cam.methods = (await api("/api/cam/methods")).methods;
  } catch (e) {
    cam.methods = null;
  }
  openRunFromAddress();
}

document.addEventListener("DOMContentLoaded", initExtras);
