// arrl dashboard: polls /api/state every second and draws on <canvas>; no libraries, works offline.
// The charts set data-points (vertices drawn) on their legends, so a test can watch curves advance.
"use strict";

const POLL_MS = 1000;
const OUTCOME_COLORS = {
  keep: "#16a34a", discard: "#94a3b8", aborted: "#f59e0b", crashed: "#dc2626", timed_out: "#9333ea",
  diverged: "#e11d48", invalid: "#92400e", refused: "#0891b2", duplicate: "#64748b",
  running: "#2563eb", finishing: "#2563eb",
};
const RUNNING_COLORS = ["#2563eb", "#db2777", "#0d9488", "#7c3aed", "#ea580c", "#0284c7"];
const COLUMNS = [
  { key: "index", label: "#", cls: "id", fmt: (r) => r.id },
  { key: "outcome", label: "outcome", fmt: (r) => badge(r.outcome) },
  { key: "val_bpb", label: "val_bpb", cls: "num", fmt: (r) => num(r.val_bpb, 4) },
  { key: "delta", label: "Δ parent", cls: "num", fmt: (r) => signed(r.delta) },
  { key: "forecast_val_bpb", label: "forecast", cls: "num", fmt: (r) => num(r.forecast_val_bpb, 4) },
  { key: "reward", label: "reward", cls: "num", fmt: (r) => num(r.reward, 2) },
  { key: "training_seconds", label: "train s", cls: "num", fmt: (r) => num(r.training_seconds, 1) },
  { key: "steps", label: "steps", cls: "num", fmt: (r) => num(r.steps, 0) },
  { key: "worker", label: "worker", fmt: (r) => esc(r.worker || "") },
  { key: "description", label: "description", cls: "desc", fmt: (r) => esc(r.description || "") },
];

const $ = (id) => document.getElementById(id);
const view = { state: null, sort: { key: "index", dir: 1 }, open: new Set(), details: new Map(), tableKey: "", lastOk: 0 };

// -- formatting ---------------------------------------------------------------------------------
function esc(s) { return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c])); }
function num(v, digits) { return v === null || v === undefined ? "–" : Number(v).toFixed(digits); }
function signed(v) {
  if (v === null || v === undefined) return "–";
  return `<span class="${v < 0 ? "neg" : v > 0 ? "pos" : ""}">${v > 0 ? "+" : ""}${v.toFixed(4)}</span>`;
}
function color(outcome) { return OUTCOME_COLORS[outcome] || "#475569"; }
function badge(outcome) { return `<span class="badge" style="background:${color(outcome)}">${esc(outcome)}</span>`; }
function ago(seconds) {
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

// -- a minimal chart: axes, nice ticks, hover targets ---------------------------------------------
function niceTicks(lo, hi, count, integer) {
  // Steps of 1, 2, 2.5 or 5 times a power of ten; `digits` is what the labels need to differ.
  const span = hi - lo || 1, raw = span / count, mag = 10 ** Math.floor(Math.log10(raw));
  let step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => span / s <= count) || 10 * mag;
  if (integer) step = Math.max(1, Math.round(step));  // experiment numbers: no e00001.5
  const values = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) values.push(+v.toFixed(10));
  const exp10 = Math.floor(Math.log10(step) + 1e-9), mantissa = step / 10 ** exp10;
  const digits = Math.max(0, -exp10 + (Math.abs(mantissa - 2.5) < 1e-6 ? 1 : 0));
  return { values, digits };
}

function frame(canvas, xRange, yRange, labels) {
  // Sized from CSS each draw and scaled by devicePixelRatio, so lines stay sharp on any screen.
  const dpr = window.devicePixelRatio || 1, w = canvas.clientWidth, h = canvas.clientHeight;
  canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  const box = { l: 58, r: w - 14, t: 14, b: h - 34 };
  const [x0, x1] = xRange, [y0, y1] = yRange;
  const f = {
    ctx, box, targets: [],
    x: (v) => box.l + ((v - x0) / (x1 - x0 || 1)) * (box.r - box.l),
    y: (v) => box.b - ((v - y0) / (y1 - y0 || 1)) * (box.b - box.t),
  };
  ctx.font = "11px system-ui, sans-serif"; ctx.lineWidth = 1;
  ctx.fillStyle = "#6b7685"; ctx.strokeStyle = "#eef1f5"; ctx.textAlign = "right"; ctx.textBaseline = "middle";
  const yTicks = niceTicks(y0, y1, 6), xTicks = niceTicks(x0, x1, 8, labels[0] === "experiment");
  for (const v of yTicks.values) {
    const y = f.y(v);
    ctx.beginPath(); ctx.moveTo(box.l, y); ctx.lineTo(box.r, y); ctx.stroke();
    ctx.fillText(v.toFixed(yTicks.digits), box.l - 6, y);
  }
  ctx.textAlign = "center"; ctx.textBaseline = "top";
  for (const v of xTicks.values) ctx.fillText(v.toFixed(xTicks.digits), f.x(v), box.b + 6);
  ctx.strokeStyle = "#c5ccd6";
  ctx.beginPath(); ctx.moveTo(box.l, box.t); ctx.lineTo(box.l, box.b); ctx.lineTo(box.r, box.b); ctx.stroke();
  ctx.fillStyle = "#8a94a3"; ctx.fillText(labels[0], (box.l + box.r) / 2, box.b + 20);
  ctx.save(); ctx.translate(14, (box.t + box.b) / 2); ctx.rotate(-Math.PI / 2); ctx.fillText(labels[1], 0, -6); ctx.restore();
  canvas._targets = f.targets;
  return f;
}

function clip(f) { f.ctx.save(); f.ctx.beginPath(); f.ctx.rect(f.box.l, f.box.t - 6, f.box.r - f.box.l + 6, f.box.b - f.box.t + 6); f.ctx.clip(); }

function dot(f, x, y, r, fill, stroke, hollow) {
  const c = f.ctx;
  c.beginPath(); c.arc(x, y, r, 0, 2 * Math.PI);
  if (hollow) { c.lineWidth = 1.6; c.strokeStyle = fill; c.fillStyle = "#fff"; c.fill(); c.stroke(); return; }
  c.fillStyle = fill; c.fill();
  if (stroke) { c.lineWidth = 1.5; c.strokeStyle = stroke; c.stroke(); }
}

function hline(f, v, colour, label, dash, right) {
  const c = f.ctx, y = f.y(v);
  if (y < f.box.t || y > f.box.b) return;
  c.save(); c.setLineDash(dash); c.strokeStyle = colour; c.lineWidth = 1.2;
  c.beginPath(); c.moveTo(f.box.l, y); c.lineTo(f.box.r, y); c.stroke();
  c.textAlign = right ? "right" : "left"; c.textBaseline = "bottom"; c.font = "11px system-ui, sans-serif";
  const x = right ? f.box.r - 16 : f.box.l + 6, width = c.measureText(label).width;
  c.fillStyle = "rgba(255,255,255,.85)";  // readable over the curves it crosses
  c.fillRect(right ? x - width - 3 : x - 3, y - 15, width + 6, 13);
  c.fillStyle = colour; c.fillText(label, x, y - 2); c.restore();
}

function emptyChart(canvas, message) {
  const dpr = window.devicePixelRatio || 1, w = canvas.clientWidth, h = canvas.clientHeight;
  canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr); canvas._targets = [];
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.fillStyle = "#9aa3b0"; ctx.textAlign = "center"; ctx.textBaseline = "middle"; ctx.font = "13px system-ui, sans-serif";
  ctx.fillText(message, w / 2, h / 2);
}

function padded(lo, hi, frac) { const pad = (hi - lo || Math.abs(hi) || 1) * frac; return [lo - pad, hi + pad]; }

// -- the charts -----------------------------------------------------------------------------------
function xMax(s) {
  const last = s.experiments.length ? s.experiments[s.experiments.length - 1].index : 1;
  return Math.max(last, ...s.curves.filter((c) => c.role === "running").map((c) => parseInt(c.id.replace(/\D/g, ""), 10) || 0), 2);
}

function stepPath(f, steps, xEnd) {
  // The running best is a step function: it changes only when an edit is kept.
  const c = f.ctx;
  c.beginPath();
  steps.forEach(([x, y], i) => {
    if (i === 0) c.moveTo(f.x(x), f.y(y));
    else { c.lineTo(f.x(x), f.y(steps[i - 1][1])); c.lineTo(f.x(x), f.y(y)); }
  });
  if (steps.length) c.lineTo(f.x(xEnd), f.y(steps[steps.length - 1][1]));
}

function drawBest(s) {
  const canvas = $("chart-best"), { steps, kept } = s.best;
  canvas.dataset.points = String(steps.length);
  if (!steps.length) return emptyChart(canvas, "no kept experiment yet");
  const ys = steps.map((p) => p[1]);
  const f = frame(canvas, [0, xMax(s) + 1], padded(Math.min(...ys), Math.max(...ys), 0.12), ["experiment", "best val_bpb"]);
  const c = f.ctx;
  clip(f);
  stepPath(f, steps, xMax(s));
  c.lineTo(f.x(xMax(s)), f.box.b); c.lineTo(f.x(steps[0][0]), f.box.b); c.closePath();
  c.fillStyle = "rgba(22,163,74,.08)"; c.fill();
  stepPath(f, steps, xMax(s));
  c.strokeStyle = "#16a34a"; c.lineWidth = 2.2; c.stroke();
  for (const k of kept) {
    dot(f, f.x(k.index), f.y(k.val_bpb), 5, "#16a34a", "#fff");
    f.targets.push({ x: f.x(k.index), y: f.y(k.val_bpb), html: `<b>${k.id}</b> kept · ${k.val_bpb.toFixed(4)}<br>${esc(k.description || k.role || "")}` });
  }
  const top = kept[kept.length - 1];
  if (top) {
    c.fillStyle = "#166534"; c.font = "600 12px system-ui, sans-serif"; c.textBaseline = "bottom";
    const x = f.x(top.index), label = `${top.val_bpb.toFixed(4)} ${top.id}`;
    c.textAlign = x > (f.box.l + f.box.r) / 2 ? "right" : "left";
    c.fillText(label, x + (c.textAlign === "left" ? 8 : -8), f.y(top.val_bpb) - 6);
  }
  c.restore();
}

function drawAll(s) {
  const canvas = $("chart-all"), rows = s.experiments;
  const counts = {};
  rows.forEach((r) => { counts[r.outcome] = (counts[r.outcome] || 0) + 1; });
  $("legend-all").innerHTML = Object.keys(counts).sort().map((o) =>
    `<span><i class="dot" style="background:${color(o)}"></i>${esc(o)} ${counts[o]}</span>`).join("");
  const valued = rows.map((r) => ({ r, v: r.val_bpb ?? r.forecast_val_bpb })).filter((p) => p.v !== null && p.v !== undefined);
  canvas.dataset.points = String(rows.length);
  if (!rows.length) return emptyChart(canvas, "no experiment recorded yet");
  // Robust y range once there are enough runs: one that blew up must not flatten everyone else;
  // it is drawn as a triangle pinned to the top edge instead.
  const vs = valued.map((p) => p.v).sort((a, b) => a - b);
  const lo = vs.length ? vs[0] : 0, top = vs.length ? vs[vs.length - 1] : 1;
  const q = vs.length >= 10 ? vs[Math.floor(0.85 * (vs.length - 1))] : top;
  const hi = Math.min(top, q + Math.max(q - lo, 0.02) * 1.5);
  const f = frame(canvas, [0, xMax(s) + 1], padded(lo, hi, 0.08), ["experiment", "val_bpb"]);
  const c = f.ctx;
  clip(f);
  c.setLineDash([4, 4]); c.strokeStyle = "rgba(22,163,74,.55)"; c.lineWidth = 1.4;
  stepPath(f, s.best.steps, xMax(s)); c.stroke(); c.setLineDash([]);
  for (const r of rows) {
    const v = r.val_bpb ?? r.forecast_val_bpb, x = f.x(r.index);
    const tip = `<b>${r.id}</b> ${esc(r.outcome)} · ${v === null || v === undefined ? "no val_bpb" : (r.val_bpb === null ? "forecast " : "") + v.toFixed(4)}<br>${esc(r.description || "")}`;
    if (v === null || v === undefined) {  // crashed, refused...: a cross on the top edge
      const y = f.box.t + 2;
      c.strokeStyle = color(r.outcome); c.lineWidth = 2; c.beginPath();
      c.moveTo(x - 4, y - 4); c.lineTo(x + 4, y + 4); c.moveTo(x + 4, y - 4); c.lineTo(x - 4, y + 4); c.stroke();
      f.targets.push({ x, y, html: tip });
      continue;
    }
    const y = Math.max(f.y(v), f.box.t + 2);
    if (f.y(v) < f.box.t - 4) {  // beyond the range: a triangle pointing up
      c.fillStyle = color(r.outcome); c.beginPath();
      c.moveTo(x, f.box.t - 3); c.lineTo(x + 5, f.box.t + 5); c.lineTo(x - 5, f.box.t + 5); c.closePath(); c.fill();
    } else {
      dot(f, x, y, r.outcome === "keep" ? 5 : 4, color(r.outcome), r.outcome === "keep" ? "#fff" : null, r.val_bpb === null);
    }
    f.targets.push({ x, y, html: tip });
  }
  c.restore();
}

function curveColour(curve, i) {
  if (curve.role === "running") return RUNNING_COLORS[i % RUNNING_COLORS.length];
  if (curve.role === "best") return "#1f2937";
  return color(curve.status);
}

function drawCurves(s) {
  const canvas = $("chart-curves"), curves = s.curves, budget = s.budget_s || 1;
  const running = curves.filter((c) => c.role === "running");
  const pts = curves.flatMap((c) => c.curve);
  if (!pts.length) {
    $("legend-curves").innerHTML = "";
    canvas.dataset.points = "0";
    return emptyChart(canvas, "no loss curve yet");
  }
  // The first seconds fall from ~8 bits (uniform bytes): start the y axis after that drop, but
  // always keep where each running experiment is now in view, however early it is.
  const late = pts.filter((p) => p[0] >= 0.1 * budget).map((p) => p[1]);
  const now = running.filter((cv) => cv.curve.length).map((cv) => cv.curve[cv.curve.length - 1][1]);
  const ys = late.length || now.length ? [...late, ...now] : pts.map((p) => p[1]);
  const extra = [s.summary.best_val_bpb, ...running.map((c) => c.forecast && c.forecast.val_bpb)].filter((v) => v !== null && v !== undefined);
  // At least half a bit of range: the first two points of a run would otherwise fill the chart.
  const lo = Math.min(...ys, ...extra), hi = Math.max(...ys, ...extra, lo + 0.5);
  const f = frame(canvas, [0, budget], padded(lo, hi, 0.08), ["training seconds", "loss (bits per byte)"]);
  const c = f.ctx;
  clip(f);
  if (s.summary.best_val_bpb) hline(f, s.summary.best_val_bpb, "#16a34a", `best val_bpb ${s.summary.best_val_bpb.toFixed(4)}`, [6, 4]);
  const tau = running.map((r) => r.forecast && r.forecast.tau).find((v) => v !== null && v !== undefined);
  if (tau) hline(f, tau, "#d97706", `the self-evaluator aborts above ${tau.toFixed(4)}`, [2, 3], true);
  let drawn = 0, runIndex = 0;
  const legend = [];
  // Reference curves first (thin), the running ones on top of them.
  const ordered = [...curves.filter((cv) => cv.role !== "running"), ...running];
  for (const cv of ordered) {
    const colour = curveColour(cv, cv.role === "running" ? runIndex++ : 0), live = cv.role === "running";
    c.strokeStyle = colour; c.lineWidth = live ? 2.2 : cv.role === "best" ? 1.6 : 1.2;
    c.globalAlpha = live || cv.role === "best" ? 1 : 0.55;
    c.setLineDash(cv.role === "best" ? [5, 3] : []);
    c.beginPath();
    cv.curve.forEach(([t, y], i) => (i ? c.lineTo(f.x(t), f.y(y)) : c.moveTo(f.x(t), f.y(y))));
    c.stroke(); c.setLineDash([]); c.globalAlpha = 1;
    drawn += cv.curve.length;
    const end = cv.curve[cv.curve.length - 1];
    if (end) f.targets.push({ x: f.x(end[0]), y: f.y(end[1]), html: `<b>${cv.id}</b> ${esc(cv.status)} · ${end[1].toFixed(3)} bpb at ${end[0].toFixed(1)} s<br>${esc(cv.description)}` });
    if (live && end) {
      dot(f, f.x(end[0]), f.y(end[1]), 3.5, colour, "#fff");
      const fc = cv.forecast;
      if (fc && fc.val_bpb !== null && fc.val_bpb !== undefined) drawForecast(f, end, budget, fc, colour, cv.id);
    }
    legend.push(`<span data-exp="${esc(cv.id)}" data-role="${cv.role}" data-points="${cv.curve.length}">` +
      `<i class="swatch" style="background:${colour}"></i>${esc(cv.id)} ${cv.role === "running" ? "running" : cv.role === "best" ? "best" : esc(cv.status)}</span>`);
  }
  c.restore();
  canvas.dataset.points = String(drawn);
  $("legend-curves").innerHTML = legend.join("");
}

function drawForecast(f, end, budget, fc, colour, id) {
  // The forecast is of the final val_bpb: a diamond at the end of the budget with its ±1 sd bar.
  const c = f.ctx, x = f.x(budget) - 6, y = f.y(fc.val_bpb);
  c.save(); c.strokeStyle = colour; c.globalAlpha = 0.7; c.setLineDash([3, 3]); c.lineWidth = 1.2;
  c.beginPath(); c.moveTo(f.x(end[0]), f.y(end[1])); c.lineTo(x, y); c.stroke(); c.restore();
  if (fc.std) {
    c.strokeStyle = colour; c.lineWidth = 1.5; c.beginPath();
    c.moveTo(x, f.y(fc.val_bpb - fc.std)); c.lineTo(x, f.y(fc.val_bpb + fc.std));
    c.moveTo(x - 4, f.y(fc.val_bpb - fc.std)); c.lineTo(x + 4, f.y(fc.val_bpb - fc.std));
    c.moveTo(x - 4, f.y(fc.val_bpb + fc.std)); c.lineTo(x + 4, f.y(fc.val_bpb + fc.std)); c.stroke();
  }
  c.fillStyle = colour; c.beginPath();
  c.moveTo(x, y - 6); c.lineTo(x + 6, y); c.lineTo(x, y + 6); c.lineTo(x - 6, y); c.closePath(); c.fill();
  c.strokeStyle = "#fff"; c.lineWidth = 1.2; c.stroke();
  f.targets.push({ x, y, html: `<b>${id}</b> forecast ${fc.val_bpb.toFixed(4)} ± ${(fc.std || 0).toFixed(4)}<br>${esc(fc.reason || "")}` });
}

// -- the side list, the cards, the ledger ------------------------------------------------------------
function renderRunning(s) {
  const running = s.curves.filter((c) => c.role === "running"), budget = s.budget_s || 1;
  $("running-list").innerHTML = running.length ? running.map((cv, i) => {
    const end = cv.curve[cv.curve.length - 1], fc = cv.forecast, colour = RUNNING_COLORS[i % RUNNING_COLORS.length];
    const frac = end ? Math.min(1, end[0] / budget) : 0;
    const forecast = fc && fc.val_bpb !== null && fc.val_bpb !== undefined
      ? `forecast <b>${fc.val_bpb.toFixed(4)}</b> ± ${(fc.std || 0).toFixed(4)}${fc.p_worse !== null && fc.p_worse !== undefined ? ` · P(worse) ${fc.p_worse.toFixed(2)}` : ""}`
      : `forecast: ${esc(fc ? fc.reason || "none yet" : "none yet")}`;
    return `<div class="run" style="border-left-color:${colour}" data-exp="${esc(cv.id)}" data-points="${cv.points}">
      <div class="top"><span class="id">${esc(cv.id)}</span><span class="nums">${Math.round(frac * 100)}% of budget</span>
      ${fc && fc.decision ? `<span class="decision ${esc(fc.decision)}">${esc(fc.decision)}</span>` : ""}</div>
      <div class="desc">${esc(cv.description || "")}</div>
      <div class="bar"><div style="width:${(frac * 100).toFixed(1)}%;background:${colour}"></div></div>
      <div class="nums">loss now <b>${end ? end[1].toFixed(3) : "–"}</b> bpb · ${cv.points} steps</div>
      <div class="nums">${forecast}</div></div>`;
  }).join("") : `<div class="empty">No experiment is running${s.source === "live" ? "" : " (from the run directory)"}.</div>`;
  const q = s.queue || [];
  $("queue-list").innerHTML = q.length
    ? q.map((e) => `<div class="queued" title="${esc(e.description)}"><span class="id">${esc(e.id)}</span>${esc(e.description)}</div>`).join("")
    : `<div class="empty">${s.summary.queued === undefined ? "queue depths need the campaign's Redis" : "empty"}</div>`;
}

function card(label, value, sub, subClass) {
  return `<div class="card"><div class="label">${label}</div><div class="value">${value}</div>${sub ? `<div class="sub ${subClass || ""}">${sub}</div>` : ""}</div>`;
}

function renderCards(s) {
  const m = s.summary, dash = (v) => (v === undefined || v === null ? "–" : v);
  const baseline = s.best.kept.length ? s.best.kept[0].val_bpb : null;
  const gain = baseline && m.best_val_bpb ? m.best_val_bpb - baseline : null;
  const chips = Object.entries(m.statuses || {}).sort().map(([k, v]) =>
    `<span class="chip"><i class="dot" style="background:${color(k === "ok" ? "keep" : k)}"></i>${esc(k)} ${v}</span>`).join("");
  $("cards").innerHTML = [
    card("Experiments", `${m.recorded}<small>${m.max_experiments ? ` / ${m.max_experiments}` : ""} recorded</small>`, `${m.proposed} proposed`),
    card("Best val_bpb", m.best_val_bpb ? `${m.best_val_bpb.toFixed(4)}<small> ${esc(m.best_experiment || "")}</small>` : "–",
      gain !== null && gain < 0 ? `${((gain / baseline) * 100).toFixed(1)}% vs baseline` : esc(m.best_description || ""),
      gain !== null && gain < 0 ? "good" : ""),
    card("Queue", `${dash(m.queued)}<small> queued · ${dash(m.running)} running</small>`, m.failed_jobs !== undefined ? `${m.failed_jobs} failed jobs in rq` : "run directory: no queue"),
    card("Workers", dash(m.workers), m.workers !== undefined ? "live rq workers" : "Redis not reachable"),
    card("Throughput", `${(m.experiments_per_hour || 0).toFixed(0)}<small> / h</small>`, `${(m.executor_hours || 0).toFixed(2)} executor hours`),
    card("Since improvement", dash(m.since_improvement), "experiments, none kept"),
    `<div class="card"><div class="label">Statuses</div><div class="chips">${chips || "–"}</div></div>`,
  ].join("");
}

function sortedRows(rows) {
  const { key, dir } = view.sort, text = $("filter").value.trim().toLowerCase();
  const shown = text ? rows.filter((r) => `${r.id} ${r.outcome} ${r.description || ""} ${r.worker || ""}`.toLowerCase().includes(text)) : rows;
  return [...shown].sort((a, b) => {
    const x = a[key], y = b[key];
    if (x === y) return a.index - b.index;
    if (x === null || x === undefined) return 1;  // blanks last in either direction
    if (y === null || y === undefined) return -1;
    return (x < y ? -1 : 1) * dir;
  });
}

function renderLedger(s, force) {
  const rows = s.experiments, filter = $("filter").value;
  const key = `${rows.length}|${rows.length ? rows[rows.length - 1].recorded_at : 0}|${view.sort.key}|${view.sort.dir}|${filter}`;
  if (key === view.tableKey && !force) return;  // rebuilt only when something changed: open rows stay open
  view.tableKey = key;
  $("ledger").querySelector("thead tr").innerHTML = COLUMNS.map((col) =>
    `<th data-key="${col.key}" class="${col.cls === "num" ? "num" : ""}">${col.label}${view.sort.key === col.key ? `<span class="arrow">${view.sort.dir > 0 ? "▲" : "▼"}</span>` : ""}</th>`).join("");
  const shown = sortedRows(rows);
  if (!shown.length) {
    $("ledger").querySelector("tbody").innerHTML = `<tr><td colspan="${COLUMNS.length}" class="empty">${rows.length ? "no experiment matches the filter" : "no experiment recorded yet"}</td></tr>`;
    return;
  }
  $("ledger").querySelector("tbody").innerHTML = shown.map((r) => {
    const open = view.open.has(r.id);
    const cells = COLUMNS.map((col) => `<td class="${col.cls || ""}">${col.fmt(r)}</td>`).join("");
    return `<tr class="row${open ? " open" : ""}" data-id="${esc(r.id)}">${cells}</tr>` +
      (open ? `<tr class="detail" data-for="${esc(r.id)}"><td colspan="${COLUMNS.length}">${detailHtml(r.id)}</td></tr>` : "");
  }).join("");
}

function diffHtml(diff) {
  if (!diff) return `<span class="file">(no diff: the unmodified script)</span>`;
  return diff.split("\n").map((line) => {
    const cls = line.startsWith("+++") || line.startsWith("---") ? "file" : line.startsWith("@@") ? "hunk"
      : line.startsWith("+") ? "add" : line.startsWith("-") ? "del" : "";
    return cls ? `<span class="${cls}">${esc(line)}</span>` : esc(line) + "\n";
  }).join("");
}

function detailHtml(id) {
  const d = view.details.get(id);
  if (!d) return `<div class="empty">loading ${esc(id)}…</div>`;
  if (d.error) return `<div class="empty">${esc(d.error)}</div>`;
  const r = d.record, sv = r.selfeval || {};
  const meta = [
    ["status", r.status], ["reason", r.reason || "–"], ["val_bpb", num(r.val_bpb, 5)], ["parent", num(r.parent_bpb, 5)],
    ["incumbent then", num(r.incumbent_bpb, 5)], ["reward", num(r.reward, 3)], ["self-evaluator", sv.decision ? `${sv.decision}: ${sv.reason}` : "–"],
    ["training / wall", `${num(r.training_seconds, 1)} s / ${num(r.wall_seconds, 1)} s`], ["steps", num(r.steps, 0)],
    ["peak memory", r.peak_memory_mb ? `${r.peak_memory_mb.toFixed(0)} MB` : "–"], ["worker", r.worker || "–"],
    ["strategy", `${r.strategy || "–"}${r.policy_version !== undefined && r.policy_version !== null ? ` (policy v${r.policy_version})` : ""}`],
    ["commit", r.commit || "–"],
  ];
  return `<div class="detail-grid"><pre class="diff">${diffHtml(d.diff)}</pre><div class="detail-meta">` +
    meta.map(([k, v]) => `<div>${k}: <b>${esc(v)}</b></div>`).join("") +
    `<div><a href="diff/${encodeURIComponent(id)}" target="_blank">open the diff as text</a></div></div></div>`;
}

async function toggle(id) {
  if (view.open.has(id)) view.open.delete(id); else view.open.add(id);
  renderLedger(view.state, true);
  if (view.open.has(id) && !view.details.has(id)) {
    try {
      const res = await fetch(`api/experiment/${encodeURIComponent(id)}`);
      view.details.set(id, res.ok ? await res.json() : { error: `no record of ${id} (${res.status})` });
    } catch (err) {
      view.details.set(id, { error: String(err) });
    }
    renderLedger(view.state, true);
  }
}

// -- polling and events ------------------------------------------------------------------------------
function renderHeader(s) {
  const m = s.summary || {};
  $("campaign").textContent = `${m.campaign || "?"} · ${m.profile || "?"} profile · ${m.strategy || "?"}`;
  const pill = $("state");
  pill.textContent = m.state || "?"; pill.className = `pill ${m.state || ""}`;
  $("source").textContent = `source: ${s.source}${s.live_error ? ` (${s.live_error})` : ""}`;
  document.title = `arrl · ${m.best_val_bpb ? m.best_val_bpb.toFixed(4) : "–"} · ${m.state || ""}`;
}

function render() {
  const s = view.state;
  if (!s) return;
  if (!s.summary) {  // --redis-url with nothing reachable yet: say why the page is empty
    $("campaign").textContent = `waiting for the campaign${s.live_error ? `: ${s.live_error}` : ""}`;
    return;
  }
  renderHeader(s); renderCards(s); drawBest(s); drawAll(s); drawCurves(s); renderRunning(s); renderLedger(s, false);
}

async function poll() {
  try {
    const res = await fetch("api/state", { cache: "no-store" });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const s = await res.json();
    view.lastOk = Date.now();
    if (!view.state || s.generated_at !== view.state.generated_at) { view.state = s; render(); }
  } catch (err) {
    const pill = $("state");
    pill.textContent = "disconnected"; pill.className = "pill disconnected";
  } finally {
    $("updated").textContent = view.lastOk ? `updated ${ago((Date.now() - view.lastOk) / 1000)} ago` : "";
    setTimeout(poll, POLL_MS);
  }
}

document.querySelector("#ledger thead").addEventListener("click", (e) => {
  const th = e.target.closest("th");
  if (!th) return;
  const key = th.dataset.key;
  view.sort = { key, dir: view.sort.key === key ? -view.sort.dir : 1 };
  renderLedger(view.state, true);
});
document.querySelector("#ledger tbody").addEventListener("click", (e) => {
  const tr = e.target.closest("tr.row");
  if (tr && !e.target.closest("a")) toggle(tr.dataset.id);
});
$("filter").addEventListener("input", () => view.state && renderLedger(view.state, true));
window.addEventListener("resize", () => view.state && render());

// One tooltip for every chart: the nearest hover target within 10 px.
document.querySelectorAll("canvas.chart").forEach((canvas) => {
  canvas.addEventListener("mousemove", (e) => {
    const rect = canvas.getBoundingClientRect(), x = e.clientX - rect.left, y = e.clientY - rect.top, tip = $("tooltip");
    let best = null, bestD = 100;
    for (const t of canvas._targets || []) {
      const d = (t.x - x) ** 2 + (t.y - y) ** 2;
      if (d < bestD) { best = t; bestD = d; }
    }
    if (!best) { tip.style.display = "none"; return; }
    tip.innerHTML = best.html; tip.style.display = "block";
    tip.style.left = `${Math.min(e.clientX + 14, window.innerWidth - tip.offsetWidth - 8)}px`;
    tip.style.top = `${e.clientY + 14}px`;
  });
  canvas.addEventListener("mouseleave", () => { $("tooltip").style.display = "none"; });
});

poll();
