/* featuremaps viewer: the channel page (/channel?run=ID&layer=I&channel=C or ?atlas=ID&layer=NAME&channel=C).
 *
 * Plain JavaScript, no build step. Everything on it is drawn by the server (the library): the
 * channel's map and overlay for a run, the top images' crops with the channel's heatmap, the
 * distribution of its per-image max and its portrait, from an atlas the viewer serves. */
"use strict";

function chError(message) {
  const box = $("#ch-error");
  box.textContent = message || "";
  box.hidden = !message;
}

function setLink(id, href) {
  const a = $(id);
  if (href) a.href = href;
  a.hidden = !href;
}

/* -- the portrait -------------------------------------------------------------------------------- */
const portrait = { base: null, timer: null };

async function showPortrait() {
  clearTimeout(portrait.timer);
  const img = $("#ch-portrait");
  const state = $("#ch-portrait-state");
  const make = $("#ch-make");
  let p;
  try {
    p = await api(`${portrait.base}.json`);
  } catch (e) {
    state.textContent = e.message;
    make.hidden = true;
    return;
  }
  $("#ch-portrait-section").dataset.state = p.state;
  if (p.state === "done") {
    img.src = p.url;
    img.hidden = false;
    state.textContent = "the picture that excites this channel most (made by optimization)";
    make.hidden = true;
    return;
  }
  img.hidden = true;
  make.disabled = p.state === "queued" || p.state === "running";
  make.hidden = !p.make;
  if (p.state === "none") state.textContent = "no portrait yet";
  else if (p.state === "queued") state.textContent = "waiting for the portrait worker…";
  else if (p.state === "running") state.textContent = p.progress ? `making the portrait: step ${p.progress[0]} of ${p.progress[1]}` : "making the portrait…";
  else if (p.state === "failed") state.textContent = `the portrait failed: ${p.error}`;
  else state.textContent = p.error || "no portrait can be made here";
  if (p.state === "queued" || p.state === "running") portrait.timer = setTimeout(showPortrait, 700);
}

async function makePortrait() {
  $("#ch-make").disabled = true;
  try {
    await api(portrait.base, { method: "POST" });
  } catch (e) {
    $("#ch-portrait-state").textContent = e.message;
    $("#ch-make").disabled = false;
    return;
  }
  showPortrait();
}

/* -- an atlas's top images and distribution -------------------------------------------------------- */
async function showAtlas(jsonUrl, k) {
  const crops = $("#ch-crops");
  crops.replaceChildren(el("span", { class: "muted", text: "capturing the top images again for their heatmaps…" }));
  $("#ch-top-section").hidden = false;
  let v;
  try {
    v = await api(`${jsonUrl}?k=${k}`);
  } catch (e) {
    crops.replaceChildren(el("span", { class: "error", text: e.message }));
    return null;
  }
  const a = v.atlas;
  $("#ch-top-title").textContent = `Top ${v.top.length} images of ${a.images}`;
  const rf = v.receptive_field ? `receptive field ${v.receptive_field[0]}×${v.receptive_field[1]} px` : "the whole image";
  $("#ch-top-note").textContent = `atlas ${a.folder} · ${a.model} · ${a.weights} · each crop is ${rf}, the heatmap is the channel over it`;
  crops.replaceChildren();
  for (const hit of v.top) {
    const heat = el("img", { class: "heat", src: hit.crop, alt: `crop ${hit.rank} with the channel's heatmap`, "data-rank": String(hit.rank) });
    heat.addEventListener("error", () => cropFailed(heat, hit.crop));
    const bare = el("img", { class: "bare", src: hit.picture, alt: `crop ${hit.rank}` });
    const links = el("div", { class: "links" }, [el("a", { class: "maps-link", href: hit.maps, target: "_blank", rel: "noopener", text: "full maps" })]);
    if (v.can_run) {
      const b = el("button", { type: "button", class: "run-link", text: "open in the viewer" });
      b.addEventListener("click", () => openRun(hit.maps.replace(/maps\.png$/, "run"), b));
      links.append(b);
    }
    crops.append(
      el("figure", { class: "crop", "data-rank": String(hit.rank) }, [
        el("div", { class: "imgs" }, [heat, bare]),
        el("figcaption", { class: "cap", title: hit.image, text: `#${hit.rank} ${hit.name} · max ${fmt(hit.value)} at (${hit.y}, ${hit.x})` }),
        links,
      ]),
    );
  }
  const d = v.distribution;
  $("#ch-dist").src = v.distribution_png;
  $("#ch-dist-section").hidden = false;
  const q = d.quantiles || {};
  const rows = [
    ["images", String(d.count)],
    ["min … max", `${fmt(d.min)} … ${fmt(d.max)}`],
    ["mean", fmt(d.mean)],
    ["median", fmt(q.p50)],
    ["1% … 99%", `${fmt(q.p01)} … ${fmt(q.p99)}`],
  ];
  $("#ch-dist-numbers").replaceChildren(...rows.map(([k2, val]) => el("tr", {}, [el("th", { text: k2 }), el("td", { text: val })])));
  return v;
}

async function cropFailed(img, url) {
  // a crop is drawn by capturing the image again: say why that could not be done (the model's weights...)
  const fig = img.closest(".crop");
  if (!fig || fig.classList.contains("broken")) return;
  fig.classList.add("broken");
  let why = "the crop could not be drawn";
  try {
    await api(url);
  } catch (e) {
    why = e.message;
  }
  fig.append(el("div", { class: "cap error", text: why }));
}

async function openRun(url, button) {
  button.disabled = true;
  button.textContent = "starting a run…";
  try {
    const job = await api(url, { method: "POST" });
    window.location.href = job.page;
  } catch (e) {
    button.textContent = e.message;
  }
}

/* -- the page ------------------------------------------------------------------------------------- */
async function initChannel() {
  const q = new URLSearchParams(window.location.search);
  const channel = Number(q.get("channel"));
  const layer = q.get("layer");
  const k = Math.min(32, Math.max(1, Number(q.get("k") || 9)));
  $("#ch-make").addEventListener("click", makePortrait);
  if (layer === null || !Number.isInteger(channel) || q.get("channel") === null || (!q.get("run") && !q.get("atlas"))) {
    chError("this page shows one channel: /channel?run=ID&layer=INDEX&channel=C or /channel?atlas=ID&layer=NAME&channel=C");
    return;
  }
  if (q.get("atlas")) {
    const aid = q.get("atlas");
    const base = `/api/atlases/${encodeURIComponent(aid)}/layers/${encodeURIComponent(layer)}/channels/${channel}`;
    document.title = `featuremaps · ${layer} #${channel}`;
    $("#ch-title").textContent = `${layer} · channel ${channel}`;
    portrait.base = `${base}/portrait`;
    const v = await showAtlas(`${base}.json`, k);
    if (!v) {
      chError($("#ch-crops").textContent);
      $("#ch-portrait-section").hidden = true;
      return;
    }
    $("#ch-meta").textContent = `atlas ${v.atlas.folder} · ${v.atlas.model} · ${v.atlas.weights} · ${v.atlas.images} images`;
    const n = v.atlas.layers.find((l) => l.name === layer);
    const mk = (c) => `/channel?${new URLSearchParams({ atlas: aid, layer, channel: String(c) })}`;
    setLink("#ch-prev", channel > 0 ? mk(channel - 1) : null);
    setLink("#ch-next", n && channel + 1 < n.channels ? mk(channel + 1) : null);
    showPortrait();
    return;
  }
  const run = q.get("run");
  let p;
  try {
    p = await api(`/api/runs/${encodeURIComponent(run)}/layers/${encodeURIComponent(layer)}/channels/${channel}/page.json`);
  } catch (e) {
    chError(e.message);
    $("#ch-portrait-section").hidden = true;
    return;
  }
  document.title = `featuremaps · ${p.layer.name} #${channel}`;
  $("#ch-title").textContent = `${p.layer.name} · channel ${channel} of ${p.layer.channels}`;
  const src = p.source ? ` · ${String(p.source).replace(/^sample:/, "")}` : "";
  $("#ch-meta").textContent = `run ${p.run} · ${p.model} · ${p.weights}${src}`;
  setLink("#ch-prev", p.previous);
  setLink("#ch-next", p.next);
  setLink("#ch-run", p.run_page);
  $("#ch-run-section").hidden = false;
  $("#ch-map").src = p.channel_png;
  $("#ch-overlay").src = p.overlay_png;
  api(p.channel_json)
    .then((info) => {
      $("#ch-values").textContent = `values ${fmt(info.min)} … ${fmt(info.max)} · mean ${fmt(info.mean)} · zeros ${(100 * info.zero_fraction).toFixed(1)}%`;
    })
    .catch((e) => {
      $("#ch-values").textContent = e.message;
    });
  portrait.base = p.portrait;
  showPortrait();
  if (!p.atlases.length) {
    $("#ch-no-atlas").hidden = false;
    $("#ch-no-atlas-text").textContent =
      `No atlas of ${p.model} (${p.weights}) with ${p.layer.name} is served. Make one with \`featuremaps atlas FOLDER --model ${p.model} --layers ${p.layer.name}\` and start the viewer with --atlas ATLAS to see the images that excite this channel most and its distribution.`;
    return;
  }
  const select = $("#ch-atlas");
  select.replaceChildren(...p.atlases.map((a, i) => el("option", { value: String(i), text: a.label })));
  $("#ch-atlas-choice").hidden = p.atlases.length < 2;
  select.addEventListener("change", () => showAtlas(p.atlases[Number(select.value)].channel_json, k));
  showAtlas(p.atlases[0].channel_json, k);
}

document.addEventListener("DOMContentLoaded", initChannel);
