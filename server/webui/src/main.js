// The collector's web view: a runs table, a run page (live layer rotation curves coloured by
// depth, a layer x step heatmap of step angles, alerts on the timeline, Layca rates requested vs
// applied) and a comparison page. It reads only the collector's JSON API (/api/v1, same origin)
// and polls it: a poll works through every proxy and with a bearer token, which EventSource
// cannot send. Routes live in the URL's hash so the server serves one page for all of them.
import uPlot from "uplot";

const API = "/api/v1";
const TOKEN_KEY = "layrot.token";
const POLL_MS = 750; // live updates: a new report shows within about one poll
const RUNS_POLL_MS = 2000;
// History the page asks for: at most this many values per column (steps x layers), and at most
// MAX_POINTS steps; the API's `stride` downsamples, `fields` leaves out the columns the page does not draw.
const MAX_VALUES = 60000;
const MAX_POINTS = 1000;
const FIELDS = "fields=rotation,step_angle";
const DIGITS = 4; // rotations and step angles are printed with this many decimals

// ------------------------------------------------------------------ the API, with the read token
class AuthError extends Error {}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

async function api(path) {
  const headers = {};
  const t = token();
  if (t) headers.Authorization = "Bearer " + t;
  const r = await fetch(API + path, { headers, cache: "no-store" });
  if (r.status === 401) {
    showLogin(true);
    throw new AuthError("this collector needs its read token");
  }
  if (!r.ok) {
    let msg = r.statusText;
    try {
      msg = (await r.json()).error.message;
    } catch (_) {
      /* not JSON: keep the status text */
    }
    throw new Error(`${r.status}: ${msg}`);
  }
  return r.json();
}

const enc = encodeURIComponent;

function showLogin(needed) {
  document.getElementById("login").hidden = !needed;
  document.getElementById("logout").hidden = !token();
  if (needed) setStatus(token() ? "the token was refused" : "this collector needs its read token", true);
}

function setStatus(text, error = false) {
  const el = document.getElementById("status");
  el.textContent = text;
  el.className = error ? "error" : "";
}

// ------------------------------------------------------------------ small helpers
const h = (tag, attrs = {}, ...children) => {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  return el;
};

const fmt = (v, digits = DIGITS) => (v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toFixed(digits));
const fmtRate = (v) => (v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toPrecision(4));
// The indicator (core/indicator.py): the share of layers whose rotation reached the target.
const fmtShare = (r) => (r === null || r === undefined || Number.isNaN(r) ? "–" : `${(100 * r).toFixed(0)} %`);
const fmtTime = (t) => (t ? new Date(t * 1000).toLocaleString() : "–");

// Viridis (matplotlib's, as the CLI's curves figure draws): 9 stops, linearly interpolated.
const VIRIDIS = [
  [68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
  [31, 158, 137], [53, 183, 121], [109, 205, 89], [180, 222, 44], [253, 231, 37],
];
function viridis(x) {
  const t = Math.min(1, Math.max(0, x)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(t));
  const f = t - i;
  return VIRIDIS[i].map((c, k) => Math.round(c + f * (VIRIDIS[i + 1][k] - c)));
}
const rgb = (c) => `rgb(${c[0]},${c[1]},${c[2]})`;
const depthColor = (i, n) => rgb(viridis(n > 1 ? i / (n - 1) : 0));
const RUN_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"];

function colorbar(label, left, right) {
  const c = h("canvas", { width: 200, height: 1 });
  const ctx = c.getContext("2d");
  for (let x = 0; x < 200; x++) {
    ctx.fillStyle = rgb(viridis(x / 199));
    ctx.fillRect(x, 0, 1, 1);
  }
  return h("div", { class: "colorbar" }, label, h("span", {}, left), c, h("span", {}, right));
}

// History chunks (columnar) -> one table: steps[], and per key rows[step][layer].
function mergeHistory(doc, into) {
  const out = into || { names: doc.layer_names, steps: [], loss: [], rotation: [], step_angle: [], rho: [] };
  for (const ch of doc.chunks || []) {
    for (let i = 0; i < ch.steps.length; i++) {
      const s = ch.steps[i];
      if (out.steps.length && s <= out.steps[out.steps.length - 1]) continue; // already have it
      out.steps.push(s);
      out.loss.push(ch.loss[i] ?? null);
      out.rotation.push(ch.rotation[i]);
      out.step_angle.push(ch.step_angle ? ch.step_angle[i] : null);
      out.rho.push(ch.rho ? ch.rho[i] : null);
    }
  }
  if (doc.error) throw new Error(doc.error.message);
  return out;
}

function strideFor(step, layers) {
  const points = Math.max(100, Math.min(MAX_POINTS, Math.floor(MAX_VALUES / Math.max(1, layers))));
  return Math.max(1, Math.ceil(step / points));
}

// The first step at or after `s` that a `stride` query keeps after the one it kept last (see the API).
function nextSince(lastStep, stride) {
  return stride > 1 ? (Math.floor(lastStep / stride) + 1) * stride : lastStep + 1;
}

// ------------------------------------------------------------------ views
let current = null; // the shown view: { stop() }

function chartWidth(el) {
  return Math.max(320, (el.clientWidth || document.body.clientWidth - 40) - 4);
}

function runsView(root) {
  const body = h("tbody");
  const compare = h("button", { type: "button", disabled: true }, "compare selected");
  const selected = new Set();
  compare.addEventListener("click", () => {
    location.hash = "#/compare/" + [...selected].map(enc).join(",");
  });
  root.replaceChildren(
    h("h1", {}, "Runs"),
    h(
      "table",
      { id: "runs" },
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          h("th", {}, ""),
          h("th", {}, "run"),
          h("th", {}, "framework"),
          h("th", { class: "num" }, "step"),
          h("th", {}, "connected"),
          h("th", { class: "num" }, "min rotation"),
          h("th", { class: "num" }, "mean rotation"),
          h("th", { class: "num", title: "share of layers whose rotation reached the target (serve --rotation-target)" }, "at target"),
          h("th", { class: "num", title: "layers still below the target past the judged share of the run" }, "under-rotated"),
          h("th", { class: "num" }, "layers"),
          h("th", { class: "num" }, "open alerts"),
          h("th", {}, "last report"),
        ),
      ),
      body,
    ),
    h("p", {}, compare),
    h("p", { class: "muted" }, "rotation: cosine distance of each layer's weights to their initialization (1 = orthogonal)."),
  );
  let timer = 0;
  let stopped = false;
  async function refresh() {
    try {
      const [{ runs }, { alerts }] = await Promise.all([api("/runs"), api("/alerts?limit=1000").catch(() => ({ alerts: [] }))]);
      const open = {};
      for (const a of alerts) if (!a.resolved) open[a.run] = (open[a.run] || 0) + 1;
      body.replaceChildren(
        ...runs.map((r) => {
          const box = h("input", { type: "checkbox", "aria-label": "compare " + r.run, checked: selected.has(r.run) });
          box.addEventListener("change", () => {
            if (box.checked) selected.add(r.run);
            else selected.delete(r.run);
            compare.disabled = selected.size < 1;
          });
          return h(
            "tr",
            { "data-run": r.run, class: open[r.run] ? "open-alerts" : "" },
            h("td", {}, box),
            h("td", { "data-col": "run" }, h("a", { href: "#/run/" + enc(r.run) }, r.run)),
            h("td", { "data-col": "framework" }, r.framework),
            h("td", { "data-col": "step", class: "num" }, r.step),
            h("td", { "data-col": "connected", class: r.connected ? "yes" : "no" }, r.connected ? "yes" : "no"),
            h("td", { "data-col": "min_rotation", class: "num" }, fmt(r.min_rotation)),
            h("td", { "data-col": "mean_rotation", class: "num" }, fmt(r.mean_rotation)),
            h("td", { "data-col": "at_target", class: "num", title: `rotation >= ${r.rotation_target}` }, fmtShare(r.layers_at_target_ratio)),
            h("td", { "data-col": "under_rotated", class: "num" + (r.layers_under_rotated ? " sev-warning" : "") }, r.indicator_judged ? r.layers_under_rotated : "–"),
            h("td", { "data-col": "num_layers", class: "num" }, r.num_layers),
            h("td", { "data-col": "open_alerts", class: "num" }, open[r.run] || 0),
            h("td", { "data-col": "last_report" }, fmtTime(r.last_report)),
          );
        }),
      );
      if (!runs.length) body.replaceChildren(h("tr", {}, h("td", { colspan: 12, class: "muted" }, "no runs yet")));
      setStatus(`${runs.length} runs · updated ${new Date().toLocaleTimeString()}`);
      root.dataset.ready = "1";
    } catch (e) {
      if (!(e instanceof AuthError)) setStatus(String(e.message || e), true);
    }
    if (!stopped) timer = setTimeout(refresh, RUNS_POLL_MS);
  }
  refresh();
  return {
    stop() {
      stopped = true;
      clearTimeout(timer);
    },
  };
}

// Vertical marks at alert steps, and the indicator's rotation target as a horizontal line.
function alertMarks(getAlerts, getTarget) {
  return {
    hooks: {
      draw: [
        (u) => {
          const ctx = u.ctx;
          ctx.save();
          const target = getTarget();
          if (target > 0) {
            const y = u.valToPos(target, "y", true);
            ctx.strokeStyle = "#888";
            ctx.lineWidth = devicePixelRatio;
            ctx.setLineDash([2 * devicePixelRatio, 4 * devicePixelRatio]);
            ctx.beginPath();
            ctx.moveTo(u.bbox.left, y);
            ctx.lineTo(u.bbox.left + u.bbox.width, y);
            ctx.stroke();
          }
          for (const a of getAlerts()) {
            const x = u.valToPos(a.step, "x", true);
            if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
            ctx.strokeStyle = a.severity === "critical" ? "#c53030" : "#d97706";
            ctx.globalAlpha = a.resolved ? 0.35 : 0.9;
            ctx.lineWidth = 1.5 * devicePixelRatio;
            ctx.setLineDash([4 * devicePixelRatio, 3 * devicePixelRatio]);
            ctx.beginPath();
            ctx.moveTo(x, u.bbox.top);
            ctx.lineTo(x, u.bbox.top + u.bbox.height);
            ctx.stroke();
          }
          ctx.restore();
        },
      ],
    },
  };
}

function curvesChart(el, hist, getAlerts, getTarget, readout) {
  const L = hist.names.length;
  const series = [{ label: "step" }];
  for (let l = 0; l < L; l++) series.push({ label: hist.names[l], stroke: depthColor(l, L), width: 1.25, points: { show: false } });
  const data = curveData(hist);
  const opts = {
    width: chartWidth(el),
    height: 320,
    series,
    legend: { show: false }, // 200 legend entries help no one: the readout below names the nearest layer
    cursor: { focus: { prox: 30 }, points: { show: false } },
    focus: { alpha: 0.25 },
    scales: { x: { time: false }, y: { range: (u, min, max) => [0, Math.max(1.05, max * 1.05)] } },
    axes: [{ label: "step" }, { label: "cosine distance to initialization", size: 60 }],
    plugins: [alertMarks(getAlerts, getTarget)],
    hooks: {
      setCursor: [(u) => showNearest(u)],
      setSeries: [(u) => showNearest(u)],
    },
  };
  let focused = null;
  opts.hooks.setSeries.unshift((u, i) => {
    focused = i;
  });
  function showNearest(u) {
    const idx = u.cursor.idx;
    if (idx === null || idx === undefined) return;
    const step = u.data[0][idx];
    let l = focused ? focused - 1 : -1;
    if (l < 0) {
      // nearest curve to the cursor's y
      const y = u.posToVal(u.cursor.top, "y");
      let best = Infinity;
      for (let k = 1; k < u.data.length; k++) {
        const v = u.data[k][idx];
        if (v !== null && Math.abs(v - y) < best) {
          best = Math.abs(v - y);
          l = k - 1;
        }
      }
    }
    if (l < 0) return;
    const v = u.data[l + 1][idx];
    readout.replaceChildren(
      "step ",
      h("b", { "data-k": "step" }, step),
      " · layer ",
      h("b", { "data-k": "layer" }, hist.names[l]),
      ` (#${l}) · rotation `,
      h("b", { "data-k": "rotation" }, fmt(v)),
    );
  }
  return new uPlot(opts, data, el);
}

function curveData(hist) {
  const L = hist.names.length;
  const data = [hist.steps.slice()];
  for (let l = 0; l < L; l++) data.push(hist.rotation.map((row) => row[l]));
  return data;
}

// Layer (rows, input at the top) x step (columns) heatmap of log10 step angles.
function drawHeatmap(canvas, hist) {
  const S = hist.steps.length;
  const L = hist.names.length;
  const ctx = canvas.getContext("2d");
  const width = canvas.clientWidth || 800;
  canvas.width = width;
  canvas.height = Math.min(400, Math.max(120, L * 6));
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!S || !L) return null;
  let lo = Infinity;
  let hi = -Infinity;
  for (const row of hist.step_angle)
    for (const v of row)
      if (v > 0) {
        const lv = Math.log10(v);
        if (lv < lo) lo = lv;
        if (lv > hi) hi = lv;
      }
  if (!Number.isFinite(lo)) return null;
  if (hi - lo < 1e-9) {
    // one angle everywhere (e.g. Layca at a fixed rate): centre it in the colour scale
    lo -= 0.5;
    hi += 0.5;
  }
  const off = document.createElement("canvas");
  off.width = S;
  off.height = L;
  const img = off.getContext("2d").createImageData(S, L);
  for (let s = 0; s < S; s++)
    for (let l = 0; l < L; l++) {
      const v = hist.step_angle[s][l];
      const p = (l * S + s) * 4;
      if (v > 0) {
        const c = viridis((Math.log10(v) - lo) / (hi - lo));
        img.data[p] = c[0];
        img.data[p + 1] = c[1];
        img.data[p + 2] = c[2];
        img.data[p + 3] = 255;
      }
    }
  off.getContext("2d").putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(off, 0, 0, canvas.width, canvas.height);
  return { lo, hi };
}

function alertsTable(alerts) {
  if (!alerts.length) return h("p", { class: "muted", id: "alerts" }, "no alerts");
  return h(
    "div",
    { class: "scroll" },
    h(
      "table",
      { id: "alerts" },
      h("thead", {}, h("tr", {}, ...["step", "severity", "kind", "layer", "angle", "state", "message"].map((t) => h("th", {}, t)))),
      h(
        "tbody",
        {},
        ...alerts.map((a) =>
          h(
            "tr",
            { "data-step": a.step },
            h("td", { class: "num" }, a.step),
            h("td", { class: "sev-" + a.severity }, a.severity),
            h("td", {}, a.kind),
            h("td", {}, a.layer || (a.layers || []).join(", ")),
            h("td", { class: "num" }, fmt(a.angle)),
            h("td", {}, a.resolved ? "resolved" : "open"),
            h("td", {}, a.message),
          ),
        ),
      ),
    ),
  );
}

function controlPanel(el, ctl, charts) {
  const req = ctl.requested_rho || [];
  const app = ctl.applied_rho || [];
  if (!ctl.requested && !app.length) {
    el.replaceChildren(h("p", { class: "muted" }, "no Layca control on this run (control set RUN … to steer it)"));
    return;
  }
  const n = Math.max(req.length, app.length);
  const idx = [...Array(n).keys()];
  const info = h(
    "p",
    {},
    `requested version ${ctl.requested_version || "–"}`,
    ctl.requested ? ` (${ctl.requested.mode}, alpha ${ctl.requested.alpha})` : "",
    ` · applied version ${ctl.applied_version || "–"} at step ${ctl.applied_step || "–"}`,
    ctl.rejected_reason ? h("span", { class: "sev-critical" }, ` · rejected: ${ctl.rejected_reason}`) : "",
  );
  const chartEl = h("div", {});
  const names = ctl.layer_names || [];
  const table = h(
    "div",
    { class: "scroll" },
    h(
      "table",
      { id: "rates" },
      h("thead", {}, h("tr", {}, h("th", {}, "#"), h("th", {}, "layer"), h("th", { class: "num" }, "requested rho"), h("th", { class: "num" }, "applied rho"))),
      h("tbody", {}, ...idx.map((i) => h("tr", {}, h("td", {}, i), h("td", {}, names[i] || ""), h("td", { class: "num" }, fmtRate(req[i])), h("td", { class: "num" }, fmtRate(app[i]))))),
    ),
  );
  el.replaceChildren(info, chartEl, table);
  const nul = (v) => (v === undefined || v === null || Number.isNaN(v) ? null : v);
  charts.push(
    new uPlot(
      {
        width: chartWidth(el),
        height: 200,
        series: [
          { label: "layer" },
          { label: "requested", stroke: "#2b6cb0", width: 2, points: { show: true, size: 5 } },
          { label: "applied", stroke: "#c05621", width: 1, dash: [5, 4], points: { show: true, size: 4 } },
        ],
        // Rates of a profile differ by orders of magnitude between first and last layers: a log axis.
        scales: { x: { time: false }, y: { distr: 3 } },
        axes: [
          { label: "layer index (input → output)", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500] },
          { label: "rho (rad / step)", size: 70 },
        ],
      },
      [idx, idx.map((i) => nul(req[i])), idx.map((i) => nul(app[i]))],
      chartEl,
    ),
  );
}

function runView(root, run) {
  const charts = [];
  let stopped = false;
  let timer = 0;
  let hist = null;
  let stride = 1;
  let alerts = [];
  let target = 0;
  const summary = h("div", { class: "summary", id: "summary" });
  const curvesEl = h("div", { id: "curves", class: "panel" });
  const readout = h("div", { class: "readout", id: "readout" }, "hover the curves to read a layer's value");
  const heat = h("canvas", { id: "heatmap", height: 200 });
  const heatReadout = h("div", { class: "readout", id: "heat-readout" }, "hover the heatmap to read a step angle");
  const heatBar = h("div", {});
  const heatAxis = h("div", { class: "heat-axis" });
  const alertsEl = h("div", {});
  const controlEl = h("div", { id: "control" });
  const layersEl = h("div", { class: "scroll" });
  root.replaceChildren(
    h("p", {}, h("a", { href: "#/" }, "← runs")),
    h("h1", {}, "Run ", h("span", { id: "run-name" }, run)),
    summary,
    h("h2", {}, "Layer rotation curves"),
    colorbar("layer depth", "input", "output"),
    curvesEl,
    readout,
    h("h2", {}, "Step angles (layer × step)"),
    heatAxis,
    heat,
    heatBar,
    heatReadout,
    h("h2", {}, "Alerts"),
    alertsEl,
    h("h2", {}, "Layca rates: requested vs applied"),
    controlEl,
    h("h2", {}, "Layers (newest report)"),
    layersEl,
  );
  let heatScale = null;
  heat.addEventListener("mousemove", (ev) => {
    if (!hist || !hist.steps.length) return;
    const r = heat.getBoundingClientRect();
    const s = Math.min(hist.steps.length - 1, Math.floor(((ev.clientX - r.left) / r.width) * hist.steps.length));
    const l = Math.min(hist.names.length - 1, Math.floor(((ev.clientY - r.top) / r.height) * hist.names.length));
    heatReadout.replaceChildren("step ", h("b", {}, hist.steps[s]), " · layer ", h("b", {}, hist.names[l]), " · step angle ", h("b", {}, fmt(hist.step_angle[s][l])), " rad");
  });

  function renderSummary(d) {
    target = d.rotation_target || 0;
    const item = (k, label, v) => h("span", {}, label + " ", h("b", { "data-k": k }, v));
    summary.replaceChildren(
      item("framework", "framework", d.framework || "–"),
      item("step", "step", d.step),
      item("connected", "connected", d.connected ? "yes" : "no"),
      item("min_rotation", "min rotation", fmt(d.min_rotation)),
      item("mean_rotation", "mean rotation", fmt(d.mean_rotation)),
      item("at_target", `at target (≥ ${d.rotation_target})`, fmtShare(d.layers_at_target_ratio)),
      item("under_rotated", "under-rotated", d.indicator_judged ? d.layers_under_rotated : "– (not judged yet)"),
      item("num_layers", "layers", d.num_layers),
      item("layca", "Layca", d.layca ? "yes" : "no"),
      item("host", "host", d.host || "–"),
    );
    layersEl.replaceChildren(
      h(
        "table",
        { id: "layers" },
        h("thead", {}, h("tr", {}, ...["#", "layer", "step", "rotation", "step angle", "weight norm", "rho", "under-rotated"].map((t) => h("th", {}, t)))),
        h(
          "tbody",
          {},
          ...(d.layers || []).map((lay) =>
            h(
              "tr",
              { "data-layer": lay.name },
              h("td", {}, lay.index),
              h("td", {}, h("span", { style: `color:${depthColor(lay.index, d.layers.length)}` }, "■ "), lay.name),
              h("td", { class: "num", "data-col": "step" }, lay.step),
              h("td", { class: "num", "data-col": "rotation" }, fmt(lay.rotation)),
              h("td", { class: "num", "data-col": "step_angle" }, fmt(lay.step_angle)),
              h("td", { class: "num", "data-col": "weight_norm" }, fmt(lay.weight_norm)),
              h("td", { class: "num", "data-col": "rho" }, fmtRate(lay.rho)),
              h("td", { "data-col": "under_rotated", class: lay.under_rotated ? "sev-warning" : "" }, lay.under_rotated ? "yes" : ""),
            ),
          ),
        ),
      ),
    );
  }

  function redrawHeat() {
    heatScale = drawHeatmap(heat, hist);
    const n = hist.steps.length;
    heatAxis.replaceChildren(
      h("span", {}, n ? `step ${hist.steps[0]}` : ""),
      h("span", {}, `rows: layers, input (top) → output (bottom)${stride > 1 ? ` · one step in ${stride}` : ""}`),
      h("span", {}, n ? `step ${hist.steps[n - 1]}` : ""),
    );
    heatBar.replaceChildren(heatScale ? colorbar("log10 step angle (rad)", heatScale.lo.toFixed(2), heatScale.hi.toFixed(2)) : "");
  }

  async function load() {
    const detail = await api("/runs/" + enc(run));
    renderSummary(detail);
    stride = strideFor(detail.step, detail.num_layers);
    hist = mergeHistory(await api(`/runs/${enc(run)}/history?stride=${stride}&${FIELDS}`));
    alerts = (await api("/alerts?limit=0&run=" + enc(run))).alerts;
    alertsEl.replaceChildren(alertsTable(alerts));
    charts.push(curvesChart(curvesEl, hist, () => alerts, () => target, readout));
    redrawHeat();
    controlPanel(controlEl, await api(`/runs/${enc(run)}/control`).catch(() => ({})), charts);
    root.dataset.ready = "1";
  }

  async function poll() {
    try {
      const detail = await api("/runs/" + enc(run));
      renderSummary(detail);
      const last = hist.steps.length ? hist.steps[hist.steps.length - 1] : 0;
      const since = nextSince(last, stride);
      const before = hist.steps.length;
      if (detail.step >= since) mergeHistory(await api(`/runs/${enc(run)}/history?stride=${stride}&since_step=${since}&${FIELDS}`), hist);
      const fresh = (await api("/alerts?limit=0&run=" + enc(run))).alerts;
      const alertsChanged = JSON.stringify(fresh) !== JSON.stringify(alerts);
      alerts = fresh;
      if (alertsChanged) alertsEl.replaceChildren(alertsTable(alerts));
      if (hist.steps.length !== before || alertsChanged) {
        charts[0].setData(curveData(hist));
        redrawHeat();
      }
      setStatus(`step ${detail.step} · updated ${new Date().toLocaleTimeString()}`);
    } catch (e) {
      if (!(e instanceof AuthError)) setStatus(String(e.message || e), true);
    }
    if (!stopped) timer = setTimeout(poll, POLL_MS);
  }

  load()
    .then(() => {
      if (!stopped) timer = setTimeout(poll, POLL_MS);
    })
    .catch((e) => {
      if (!(e instanceof AuthError)) {
        setStatus(String(e.message || e), true);
        root.append(h("p", { class: "sev-critical" }, String(e.message || e)));
      }
    });
  return {
    stop() {
      stopped = true;
      clearTimeout(timer);
      for (const c of charts) c.destroy();
    },
  };
}

function compareView(root, runs) {
  const charts = [];
  const meanEl = h("div", { class: "panel" });
  const minEl = h("div", { class: "panel" });
  const depthEl = h("div", { class: "panel" });
  const table = h("tbody");
  root.replaceChildren(
    h("p", {}, h("a", { href: "#/" }, "← runs")),
    h("h1", {}, "Compare ", runs.length, " runs"),
    h(
      "table",
      { id: "compare" },
      h("thead", {}, h("tr", {}, ...["run", "step", "min rotation", "mean rotation", "at target"].map((t) => h("th", {}, t)))),
      table,
    ),
    h("div", { class: "grid2" }, h("div", {}, h("h2", {}, "Mean layer rotation"), meanEl), h("div", {}, h("h2", {}, "Smallest layer rotation"), minEl)),
    h("h2", {}, "Newest rotation by depth"),
    depthEl,
  );
  let stopped = false;
  (async () => {
    const hists = [];
    for (const run of runs) {
      const d = await api("/runs/" + enc(run));
      const hist = mergeHistory(await api(`/runs/${enc(run)}/history?stride=${strideFor(d.step, d.num_layers)}&fields=rotation`));
      hists.push({ run, d, hist });
    }
    if (stopped) return;
    table.replaceChildren(
      ...hists.map(({ run, d }, i) =>
        h(
          "tr",
          { "data-run": run },
          h("td", {}, h("span", { style: `color:${RUN_COLORS[i % RUN_COLORS.length]}` }, "■ "), h("a", { href: "#/run/" + enc(run) }, run)),
          h("td", { class: "num", "data-col": "step" }, d.step),
          h("td", { class: "num", "data-col": "min_rotation" }, fmt(d.min_rotation)),
          h("td", { class: "num", "data-col": "mean_rotation" }, fmt(d.mean_rotation)),
          h("td", { class: "num", "data-col": "at_target" }, fmtShare(d.layers_at_target_ratio)),
        ),
      ),
    );
    const perRun = (f) => hists.map(({ hist }) => [hist.steps, hist.rotation.map(f)]);
    const mean = (row) => row.reduce((a, b) => a + b, 0) / row.length;
    const min = (row) => Math.min(...row);
    const series = (label) => [{ label }, ...hists.map(({ run }, i) => ({ label: run, stroke: RUN_COLORS[i % RUN_COLORS.length], width: 1.5, spanGaps: true, points: { show: false } }))];
    const opts = (el, yLabel, xLabel = "step") => ({
      width: chartWidth(el),
      height: 260,
      series: series(xLabel),
      scales: { x: { time: false }, y: { range: (u, lo, hi) => [0, Math.max(1.05, hi * 1.05)] } },
      axes: [{ label: xLabel }, { label: yLabel, size: 60 }],
    });
    charts.push(new uPlot(opts(meanEl, "cosine distance"), uPlot.join(perRun(mean)), meanEl));
    charts.push(new uPlot(opts(minEl, "cosine distance"), uPlot.join(perRun(min)), minEl));
    // Newest rotation of each layer against its relative depth l / (L - 1), so runs of different depths line up.
    const depth = hists.map(({ hist }) => {
      const L = hist.names.length;
      const last = hist.rotation[hist.rotation.length - 1] || [];
      return [[...Array(L).keys()].map((l) => (L > 1 ? l / (L - 1) : 0)), last.slice()];
    });
    const dopts = opts(depthEl, "cosine distance", "relative depth (input 0 → output 1)");
    for (const s of dopts.series.slice(1)) s.points = { show: true, size: 4 };
    charts.push(new uPlot(dopts, uPlot.join(depth), depthEl));
    root.dataset.ready = "1";
  })().catch((e) => {
    if (!(e instanceof AuthError)) setStatus(String(e.message || e), true);
  });
  return {
    stop() {
      stopped = true;
      for (const c of charts) c.destroy();
    },
  };
}

// ------------------------------------------------------------------ routing and sign-in
function route() {
  if (current) current.stop();
  const root = document.getElementById("view");
  delete root.dataset.ready;
  const hash = location.hash.replace(/^#\/?/, "");
  const [page, arg] = [hash.split("/")[0], hash.split("/").slice(1).join("/")];
  if (page === "run" && arg) current = runView(root, decodeURIComponent(arg));
  else if (page === "compare" && arg) current = compareView(root, arg.split(",").map(decodeURIComponent));
  else current = runsView(root);
}

function init() {
  document.getElementById("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value.trim());
    document.getElementById("token").value = "";
    showLogin(false);
    route();
  });
  document.getElementById("logout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin(false);
    route();
  });
  showLogin(false);
  window.addEventListener("hashchange", route);
  route();
}

init();
