// The operations console page: reads only the JSON API (see /openapi.json) and polls it for live updates.
"use strict";

const POLL_MS = Number(document.body.dataset.pollS || 5) * 1000;
const OVERVIEW_MINUTES = Number(document.body.dataset.overviewMinutes || 15);
const $ = (id) => document.getElementById(id);
const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const utc = (ms) => (ms ? new Date(ms).toISOString().replace("T", " ").slice(0, 19) : "-");
const hhmm = (ms) => new Date(ms).toISOString().slice(11, 16);

function fmt(value, unit) {
  if (value === null || value === undefined) return "-";
  if (unit === "ratio") return (value * 100).toFixed(1) + " %";
  if (unit === "ms") return value >= 10000 ? (value / 1000).toFixed(1) + " s" : value.toFixed(0) + " ms";
  if (unit === "points") return value.toFixed(0);
  return value.toFixed(2);
}

function setStatus(text) { $("status").textContent = text; }

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.detail ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)) : response.statusText);
  return body;
}

function authHeaders() {
  return {"Content-Type": "application/json", "Authorization": "Bearer " + ($("token").value || "")};
}

// --- overview ----------------------------------------------------------------------------------------------
const UNITS = {};

async function loadOverview() {
  const data = await api("/api/overview?minutes=" + OVERVIEW_MINUTES);
  for (const a of data.ux_axis.concat(data.cx_axis)) UNITS[a.indicator] = a.unit;
  $("overview-note").textContent = "Closed 1-minute windows of the last " + data.minutes + " min. UX axis: " +
    data.ux_axis.map((a) => a.indicator).join(", ") + ". CX axis: " + data.cx_axis.map((a) => a.indicator).join(", ") +
    ". Each indicator scores 0 (at its bad level) to 1 (at its good level); an axis is their mean; the split is at " + data.split + ".";
  drawQuadrant(data);
  const rows = data.tenants.map((t) => {
    const parts = (list) => list.map((p) => `<span class="${p.health >= 0.5 ? "good" : "bad"}" title="bad ${p.bad}, good ${p.good}, n ${p.count}">${esc(p.indicator)} ${fmt(p.value, UNITS[p.indicator])}</span>`).join("<br>");
    return `<tr data-tenant="${esc(t.tenant)}"><td>${esc(t.tenant)}</td><td class="quadrant-name">${esc(t.quadrant)}</td>` +
      `<td>${t.ux === null ? "-" : t.ux.toFixed(2)}<br>${parts(t.ux_indicators)}</td>` +
      `<td>${t.cx === null ? "-" : t.cx.toFixed(2)}<br>${parts(t.cx_indicators)}</td></tr>`;
  }).join("");
  $("overview-table").innerHTML = `<table><tr><th>tenant</th><th>quadrant</th><th>UX (indicators)</th><th>CX (indicators)</th></tr>${rows || '<tr><td colspan="4">no closed windows yet</td></tr>'}</table>`;
}

function drawQuadrant(data) {
  const size = 420, pad = 40, inner = size - 2 * pad;
  const x = (v) => pad + v * inner, y = (v) => pad + (1 - v) * inner;
  let svg = `<rect x="${pad}" y="${pad}" width="${inner}" height="${inner}" fill="#fafbfc" stroke="#c9ced6"/>`;
  svg += `<rect x="${x(0.5)}" y="${y(1)}" width="${inner / 2}" height="${inner / 2}" fill="#e8f5e9"/>`;
  svg += `<rect x="${x(0)}" y="${y(0.5)}" width="${inner / 2}" height="${inner / 2}" fill="#ffebee"/>`;
  svg += `<line x1="${x(0.5)}" y1="${pad}" x2="${x(0.5)}" y2="${size - pad}" stroke="#9aa3b0" stroke-dasharray="4"/>`;
  svg += `<line x1="${pad}" y1="${y(0.5)}" x2="${size - pad}" y2="${y(0.5)}" stroke="#9aa3b0" stroke-dasharray="4"/>`;
  const label = (tx, ty, text, anchor = "middle") => `<text x="${tx}" y="${ty}" text-anchor="${anchor}" fill="#5b6475">${text}</text>`;
  svg += label(x(0.25), y(0.97), "bad UX, good CX") + label(x(0.75), y(0.97), "good UX, good CX");
  svg += label(x(0.25), y(0.03), "bad UX, bad CX") + label(x(0.75), y(0.03), "good UX, bad CX");
  svg += label(size / 2, size - 8, "UX (product) →") + `<text x="14" y="${size / 2}" transform="rotate(-90 14 ${size / 2})" text-anchor="middle" fill="#5b6475">CX (journey) →</text>`;
  const colours = ["#1565c0", "#6a1b9a", "#00838f", "#ef6c00", "#5d4037", "#ad1457"];
  data.tenants.forEach((t, i) => {
    if (t.ux === null || t.cx === null) return;
    const c = colours[i % colours.length];
    svg += `<g class="tenant-dot" data-tenant="${esc(t.tenant)}" data-ux="${t.ux}" data-cx="${t.cx}" data-quadrant="${esc(t.quadrant)}">` +
      `<circle cx="${x(t.ux)}" cy="${y(t.cx)}" r="9" fill="${c}" opacity="0.85"/>` +
      `<text x="${x(t.ux) + 12}" y="${y(t.cx) + 4}" fill="${c}" font-weight="600">${esc(t.tenant)}</text></g>`;
  });
  $("quadrant").innerHTML = svg;
}

// --- indicator series --------------------------------------------------------------------------------------
let channelList = [];
let chart = null;
let chartKey = "";

async function loadChannels() {
  channelList = await api("/api/channels?minutes=" + $("s-minutes").value);
  const tenants = [...new Set(channelList.map((c) => c.tenant))];
  fillSelect($("s-tenant"), tenants);
  fillChannels();
}

function fillSelect(select, values) {
  const keep = select.value;
  select.innerHTML = values.map((v) => `<option>${esc(v)}</option>`).join("");
  if (values.includes(keep)) select.value = keep;
}

function fillChannels() {
  const channels = channelList.filter((c) => c.tenant === $("s-tenant").value).map((c) => c.channel);
  fillSelect($("s-channel"), channels);
  const entry = channelList.find((c) => c.tenant === $("s-tenant").value && c.channel === $("s-channel").value);
  for (const option of $("s-indicator").options) option.disabled = !!entry && !entry.indicators.includes(option.value);
  if ($("s-indicator").selectedOptions[0]?.disabled) {
    const first = [...$("s-indicator").options].find((o) => !o.disabled);
    if (first) $("s-indicator").value = first.value;
  }
}

async function loadSeries() {
  if (!$("s-tenant").value || !$("s-channel").value) return;
  const q = new URLSearchParams({tenant: $("s-tenant").value, channel: $("s-channel").value,
    indicator: $("s-indicator").value, window_kind: $("s-kind").value, minutes: $("s-minutes").value});
  const s = await api("/api/series?" + q);
  const pts = s.points.filter((p) => p.value !== null);
  const xs = pts.map((p) => p.window_end_ms / 1000);
  const data = [xs, pts.map((p) => p.value), pts.map((p) => p.low), pts.map((p) => p.high),
    pts.map((p) => (p.complete ? null : p.value))];
  const el = $("chart");
  el.dataset.points = String(pts.length);
  el.dataset.indicator = s.indicator;
  const width = Math.max(400, el.clientWidth || 800);
  const opts = {
    title: `${s.name} (${s.indicator}, ${s.family}) — ${s.tenant} ${s.channel}, ${s.window_kind === "1m" ? "1-minute" : "15-minute hopping"} windows`,
    width, height: 280,
    scales: {x: {time: true}},
    axes: [{}, {label: s.unit, values: (u, vals) => vals.map((v) => fmt(v, s.unit)), size: 70}],
    series: [{label: "window end (UTC)"},
      {label: s.indicator, stroke: "#1565c0", width: 2, points: {show: true, size: 5}, value: (u, v) => fmt(v, s.unit)},
      {label: "95 % low", stroke: "#90caf9", dash: [4, 4], value: (u, v) => fmt(v, s.unit)},
      {label: "95 % high", stroke: "#90caf9", dash: [4, 4], value: (u, v) => fmt(v, s.unit)},
      {label: "incomplete", stroke: "transparent", points: {show: true, size: 9, stroke: "#ef6c00", fill: "#fff"}}],
    bands: [{series: [3, 2], fill: "rgba(144,202,249,0.25)"}],
  };
  const key = [s.tenant, s.channel, s.indicator, s.window_kind, width].join("|");
  if (chart && key === chartKey) {
    chart.setData(data);  // a poll with the same choice: new points, no rebuilt chart
  } else {
    if (chart) chart.destroy();
    chart = new uPlot(opts, data, el);
    chartKey = key;
  }
  const newest = s.points.slice(-15).reverse().map((p) =>
    `<tr><td>${utc(p.window_start_ms)}</td><td>${hhmm(p.window_end_ms)}</td><td>${fmt(p.value, s.unit)}</td><td>${p.n}</td>` +
    `<td>${p.low === null ? "-" : fmt(p.low, s.unit) + " to " + fmt(p.high, s.unit)}</td><td>${p.late || ""}</td><td>${p.complete ? "" : "incomplete"}</td></tr>`).join("");
  $("series-table").innerHTML = `<table><tr><th>window start</th><th>end</th><th>value</th><th>n</th><th>95 % interval</th><th>late arrivals</th><th></th></tr>${newest}</table>`;
}

// --- alerts ------------------------------------------------------------------------------------------------
async function loadAlerts() {
  // One row per alert series (rule, tenant, channel): its lifecycle state from `touchpoint alerter`.
  const alerts = await api("/api/alerts");
  const rows = alerts.map((a) => {
    const note = a.state === "silenced" ? `silenced until ${hhmm(a.silenced_until_ms)}` :
      a.acked_by ? `acknowledged by ${esc(a.acked_by)}` : "";
    return `<tr data-alert-id="${esc(a.alert_id)}" data-state="${esc(a.state)}"><td><span class="badge state-${esc(a.state)}">${esc(a.state)}</span></td>` +
      `<td>${utc(a.since_ms)}</td><td>${a.window_end_ms ? utc(a.window_end_ms) : ""}</td><td>${esc(a.severity || "")}</td><td>${esc(a.rule)}</td><td>${esc(a.tenant)}</td><td>${esc(a.channel)}</td>` +
      `<td>${esc(a.message || "")}</td><td>${note}</td><td>` +
      `<button data-action="acknowledge">Acknowledge</button> <button data-action="silence">Silence 1 h</button> <button data-action="resolve">Resolve</button></td></tr>`;
  }).join("");
  $("alerts-table").innerHTML = `<table><tr><th>state</th><th>since</th><th>newest window end</th><th>severity</th><th>rule</th><th>tenant</th><th>channel</th><th>message</th><th>operator</th><th>actions</th></tr>${rows || '<tr><td colspan="10">no alerts active or changed in the last day</td></tr>'}</table>`;
}

async function alertAction(alertId, action) {
  try {
    await api(`/api/alerts/${encodeURIComponent(alertId)}/${action}`, {method: "POST", headers: authHeaders(),
      body: JSON.stringify({actor: "console", minutes: 60})});
    setStatus(`${action}: done`);
    await loadAlerts();
  } catch (error) {
    setStatus(`${action} refused: ${error.message}`);
  }
}

// --- cases -------------------------------------------------------------------------------------------------
function countdown(ms) {
  const sign = ms < 0 ? "overdue by " : "";
  const minutes = Math.floor(Math.abs(ms) / 60000);
  return `${sign}${Math.floor(minutes / 60)} h ${String(minutes % 60).padStart(2, "0")} min`;
}

async function loadCases() {
  const cases = await api("/api/cases");
  $("cases-note").textContent = cases.note;
  const rows = cases.cases.map((c) => `<tr data-case-id="${esc(c.case_id)}" data-status="${esc(c.status)}"><td><span class="badge case-${esc(c.status)}">${esc(c.status)}</span></td>` +
    `<td class="sla ${c.sla_remaining_ms < 0 ? "overdue" : ""}">${c.status === "closed" ? "" : countdown(c.sla_remaining_ms)}</td><td>${esc(c.tenant)}</td><td>${esc(c.reason)}</td><td>${esc(c.queue)}</td>` +
    `<td>${esc(c.person_id)}</td><td>${esc(c.source_channel)}</td><td>${c.score === null ? "" : c.score}</td><td>${utc(c.opened_at_ms)}</td></tr>`).join("");
  $("cases-table").innerHTML = `<table><tr><th>status</th><th>SLA</th><th>tenant</th><th>reason</th><th>queue</th><th>person</th><th>channel</th><th>score</th><th>opened</th></tr>${rows || '<tr><td colspan="9">no open cases</td></tr>'}</table>`;
}

// --- journey -----------------------------------------------------------------------------------------------
async function loadJourney(event) {
  if (event) event.preventDefault();
  const identifier = $("j-identifier").value.trim();
  if (!identifier) return;
  const j = await api("/api/journey?identifier=" + encodeURIComponent(identifier));
  $("j-erase").disabled = j.touchpoints.length === 0;
  const rows = j.touchpoints.map((t) => `<tr class="touchpoint" data-role="${esc(t.role)}"><td>${utc(t.event_time_ms)}</td><td>${esc(t.channel)}</td>` +
    `<td>${esc(t.event_type)}</td><td><span class="role">${esc(t.role)}</span></td><td>${esc(t.flow || "")}</td><td>${esc(t.outcome || "")}${t.error_code ? " " + esc(t.error_code) : ""}</td>` +
    `<td>${t.survey_kind ? esc(t.survey_kind) + " " + t.survey_score : ""}${t.amount_minor !== null ? " " + (t.amount_minor / 100).toFixed(2) + " " + esc(t.currency || "") : ""}</td><td>${t.counted ? "" : "late"}</td></tr>`).join("");
  const merges = j.merges.map((m) => `<tr><td>${utc(m.at_ms)}</td><td>${esc(m.action)}</td><td>${esc(m.identifier_a)}</td><td>${esc(m.identifier_b)}</td><td>${esc(m.from_person_id)} → ${esc(m.into_person_id)}</td><td>${esc(m.reason)}</td></tr>`).join("");
  const transitions = j.transitions.map((t) => `<li>${utc(t.at_ms)}: ${esc(t.from_role)} → <b>${esc(t.to_role)}</b> (${esc(t.cause)})</li>`).join("");
  $("journey-result").innerHTML = j.touchpoints.length === 0 ? `<p>No touchpoints for ${esc(identifier)}.</p>` :
    `<p>${j.touchpoints.length} touchpoints of person ${j.person_ids.map(esc).join(", ")}; identifiers ${j.identifiers.map(esc).join(", ")}.</p>` +
    `<h3>Role changes</h3><ul id="transitions">${transitions || "<li>none recorded</li>"}</ul>` +
    `<h3>Touchpoints in time order</h3><table id="journey-touchpoints"><tr><th>time</th><th>channel</th><th>event</th><th>role</th><th>flow</th><th>outcome</th><th>survey / amount</th><th></th></tr>${rows}</table>` +
    `<h3>Merges that built the person</h3><table><tr><th>time</th><th>action</th><th>identifier</th><th>identifier</th><th>person</th><th>reason</th></tr>${merges || '<tr><td colspan="6">none</td></tr>'}</table>`;
}

async function erasePerson() {
  const identifier = $("j-identifier").value.trim();
  if (!identifier || !window.confirm(`Erase every touchpoint and identity record of ${identifier}? This cannot be undone.`)) return;
  try {
    const r = await api("/api/persons/erase", {method: "POST", headers: authHeaders(), body: JSON.stringify({identifier})});
    setStatus(`erased ${r.identifiers.length} identifiers, ${r.touchpoints_deleted} touchpoints`);
    await loadJourney();
  } catch (error) {
    setStatus(`erasure refused: ${error.message}`);
  }
}

// --- health ------------------------------------------------------------------------------------------------
async function loadHealth() {
  const h = await api("/api/health");
  $("health-summary").innerHTML = `<p>group <b>${esc(h.consumer_group)}</b> on topic <b>${esc(h.topic)}</b>; last checkpoint ${utc(h.last_checkpoint_ms)}; ` +
    `last rows written ${utc(h.last_rows_written_ms)}; ClickHouse insert failures: ${h.insert_failures === null ? "unknown" : h.insert_failures} (${esc(h.insert_failures_note)})` +
    `${h.errors.length ? "<br><span class=bad>" + h.errors.map(esc).join("<br>") + "</span>" : ""}</p>`;
  const rows = h.partitions.map((p) => `<tr><td>${p.partition}</td><td>${p.end_offset ?? "-"}</td><td>${p.read_offset ?? "-"}</td><td>${p.lag_events ?? "-"}</td>` +
    `<td>${utc(p.watermark_ms)}</td><td>${p.watermark_lag_s === null ? "-" : p.watermark_lag_s.toFixed(0) + " s"}</td><td>${utc(p.closed_before_ms)}</td><td>${utc(p.checkpoint_at_ms)}</td></tr>`).join("");
  $("health-partitions").innerHTML = `<table><tr><th>partition</th><th>end offset</th><th>read offset</th><th>lag (events)</th><th>watermark</th><th>watermark lag</th><th>closed before</th><th>checkpoint</th></tr>${rows || '<tr><td colspan="8">no checkpoints yet</td></tr>'}</table>`;
  $("health-partitions").insertAdjacentHTML("beforeend", '<p class="note">Lag = end offset (as the broker reports it; the local Tansu broker reports a batch\'s first offset + 1, so lag reads low there) - the checkpoint\'s read offset. Watermark lag = now - the partition\'s event-time watermark.</p>');
  const dead = h.dead_letters;
  const reasons = Object.entries(dead.by_reason).map(([reason, n]) => {
    const examples = (dead.examples[reason] || []).map((d) => `<div class="dead-letter" data-decoded="${d.event ? 1 : 0}">` +
      `<small>${utc(d.timestamp_ms)} · ${esc(d.partition)}:${esc(d.offset)} · ${esc(d.detail)}${d.replayed ? " · replayed" : ""}</small>` +
      `<pre>${d.event ? esc(JSON.stringify(d.event, null, 1)) : "hex " + esc(d.hex)}</pre></div>`).join("");
    return `<tr><td>${esc(reason)}</td><td>${n}</td><td>${examples}</td></tr>`;
  }).join("");
  $("health-dead").innerHTML = `<p class="note">The newest ${dead.scanned} records of the dead-letter topic; replay with <code>touchpoint deadletters replay</code>.</p>` +
    `<table><tr><th>reason</th><th>count</th><th>examples (decoded where they decode, hex where not)</th></tr>${reasons || '<tr><td colspan="3">none</td></tr>'}</table>`;
}

// --- wiring ------------------------------------------------------------------------------------------------
async function refresh() {
  const tasks = [loadOverview(), loadAlerts(), loadCases(), loadHealth(), loadChannels().then(loadSeries)];
  const results = await Promise.allSettled(tasks);
  const failed = results.filter((r) => r.status === "rejected").map((r) => r.reason.message);
  setStatus(failed.length ? "update failed: " + failed.join("; ") : "updated " + new Date().toISOString().slice(11, 19) + " UTC");
}

$("token").value = sessionStorage.getItem("touchpoint-token") || "";
$("token").addEventListener("change", () => sessionStorage.setItem("touchpoint-token", $("token").value));
$("s-tenant").addEventListener("change", () => { fillChannels(); loadSeries(); });
$("s-channel").addEventListener("change", () => { fillChannels(); loadSeries(); });
for (const id of ["s-indicator", "s-kind"]) $(id).addEventListener("change", () => loadSeries());
$("s-minutes").addEventListener("change", () => loadChannels().then(loadSeries));
$("alerts-table").addEventListener("click", (event) => {
  const button = event.target.closest("button[data-action]");
  if (button) alertAction(button.closest("tr").dataset.alertId, button.dataset.action);
});
$("journey-form").addEventListener("submit", loadJourney);
$("j-erase").addEventListener("click", erasePerson);
refresh();
setInterval(refresh, POLL_MS);
