// canhazgpu dashboard. Every value from the server is written with textContent:
// user names, notes, process and model names are data, never markup.
"use strict";

const STATUS_REFRESH_MS = 30000;
const QUEUE_REFRESH_MS = 5000;
const REPORT_REFRESH_MS = 300000;

const BADGES = {
  AVAILABLE: "available",
  IN_USE: "in-use",
  UNRESERVED: "unreserved",
  ERROR: "error",
};

const $ = (id) => document.getElementById(id);

// The fleet, while the server knows more than one host: every host's status (as
// /api/hosts/status gives it) and the one shown below the overview. While it is
// null the page is the single-host dashboard, reading /api/status and friends.
let fleet = null;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

async function fetchJson(url) {
  const response = await fetch(url, { cache: "no-store" });
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (!response.ok) {
    const reason = body && body.error ? body.error : `HTTP ${response.status}`;
    throw new Error(reason);
  }
  return body;
}

// One message per failing source; the banner shows while any is failing.
const problems = new Map();

function setProblem(source, message) {
  if (message) problems.set(source, message);
  else problems.delete(source);
  const banner = $("banner");
  if (problems.size === 0) {
    banner.hidden = true;
    banner.textContent = "";
    return;
  }
  banner.hidden = false;
  banner.replaceChildren(...[...problems.values()].map((message) => el("div", null, message)));
}

// Keeps what was shown before a failed refresh (the banner says it is stale);
// replaces the loading note when there is nothing to show.
function showUnavailable(container, text) {
  if (!container.querySelector(".card, .report-period, .queue-table, .hosts-table")) {
    container.replaceChildren(el("p", "muted", text));
  }
}

function field(list, label, value, mono) {
  if (value === undefined || value === null || value === "") return;
  list.append(el("dt", null, label));
  list.append(el("dd", mono ? "mono" : null, value));
}

function gpuCard(gpu) {
  const kind = BADGES[gpu.status] || "error";
  const card = el("article", `card ${kind}`);
  card.dataset.gpu = String(gpu.gpu_id);
  card.dataset.status = String(gpu.status);

  const head = el("div", "card-head");
  head.append(el("span", "gpu-id", `GPU ${gpu.gpu_id}`));
  head.append(el("span", `badge ${kind}`, String(gpu.status).replace("_", " ")));
  card.append(head);
  card.append(el("div", "gpu-model", gpu.gpu_model || "\u00a0"));

  const fields = el("dl", "fields");
  const unreserved = gpu.status === "UNRESERVED";
  field(fields, "User", gpu.user ?? gpu.unreserved_users?.join(", "));
  field(fields, "Duration", gpu.duration);
  field(fields, "Type", gpu.type);
  if (gpu.model && gpu.model.model) field(fields, "Model", gpu.model.model, true);
  field(fields, "Details", unreserved ? gpu.process_info || gpu.details : gpu.details);
  if (typeof gpu.expiry_time === "number") {
    field(fields, "Ends", new Date(gpu.expiry_time * 1000).toLocaleString());
  }
  if (typeof gpu.pid === "number") field(fields, "Adopted PID", String(gpu.pid), true);
  field(fields, "Validation", gpu.validation);
  if (typeof gpu.utilization_percent === "number") {
    field(fields, "Utilization", `${gpu.utilization_percent}%`);
  }
  if (typeof gpu.idle_seconds === "number" && gpu.status === "IN_USE") {
    field(fields, "Idle", idleText(gpu.idle_seconds));
  }
  field(fields, "Also used by", gpu.foreign_users?.join(", "));
  if (gpu.status !== "AVAILABLE" && typeof gpu.memory_used_mb === "number") {
    field(fields, "Memory", `${gpu.memory_used_mb} MB used`);
  }
  field(fields, "Note", gpu.note);
  field(fields, "Error", gpu.error);
  card.append(fields);
  return card;
}

// `1h 20m`, as `status` writes idle times.
function idleText(seconds) {
  const minutes = Math.floor(Math.max(0, seconds) / 60);
  return `${Math.floor(minutes / 60)}h ${minutes % 60}m`;
}

// The reserved GPUs idle the longest (as the agent measured them), idlest first.
function renderIdlest(gpus) {
  const idle = gpus
    .filter((gpu) => gpu.status === "IN_USE" && typeof gpu.idle_seconds === "number")
    .sort((a, b) => b.idle_seconds - a.idle_seconds)
    .slice(0, 5);
  const box = $("idlest");
  box.hidden = idle.length === 0;
  const list = el("ol", "idlest-list");
  for (const gpu of idle) {
    const mean = typeof gpu.mean_utilization_percent === "number" ? `, mean ${gpu.mean_utilization_percent}%` : "";
    const item = el("li", null, `${gpu.user} — GPU ${gpu.gpu_id}: idle ${idleText(gpu.idle_seconds)}${mean}`);
    item.dataset.gpu = String(gpu.gpu_id);
    list.append(item);
  }
  box.replaceChildren(el("h3", null, "Idlest holders"), list);
}

function chip(label, count) {
  const node = el("span", "chip");
  node.append(el("b", null, count), ` ${label}`);
  return node;
}

function renderStatus(gpus) {
  const counts = { AVAILABLE: 0, IN_USE: 0, UNRESERVED: 0, ERROR: 0 };
  for (const gpu of gpus) counts[gpu.status] = (counts[gpu.status] || 0) + 1;
  const summary = [chip(gpus.length === 1 ? "GPU" : "GPUs", gpus.length), chip("available", counts.AVAILABLE), chip("in use", counts.IN_USE)];
  if (counts.UNRESERVED) summary.push(chip("unreserved", counts.UNRESERVED));
  if (counts.ERROR) summary.push(chip("error", counts.ERROR));
  $("summary").replaceChildren(...summary);
  const cards = gpus.map(gpuCard);
  $("gpus").replaceChildren(...(cards.length ? cards : [el("p", "muted", "No GPUs in the pool.")]));
  renderIdlest(gpus);
  $("updated").textContent = `Updated ${new Date().toLocaleTimeString()}`;
}

// The URL of one of the per-host APIs, for the host shown.
function scoped(path, params) {
  const query = new URLSearchParams(params);
  if (fleet) query.set("host", fleet.selected);
  const text = query.toString();
  return text ? `${path}?${text}` : path;
}

async function fetchStatus() {
  if (!fleet) return fetchJson("/api/status");
  const [host] = await fetchJson(scoped("/api/hosts/status"));
  if (host.error) throw new Error(`${host.host}: ${host.error}`);
  return host.statuses;
}

async function refreshStatus() {
  try {
    renderStatus(await fetchStatus());
    setProblem("status", null);
  } catch (err) {
    setProblem("status", `GPU status unavailable: ${err.message}`);
    showUnavailable($("gpus"), "GPU status unavailable.");
  }
}

// The requests waiting for GPUs, in the order they will be served.
function renderQueue(queue) {
  const entries = queue.entries || [];
  $("queue-summary").replaceChildren(
    chip("waiting", entries.length),
    chip("GPUs requested", queue.total_gpus_requested),
    chip("collected", queue.total_gpus_allocated),
  );
  if (entries.length === 0) {
    $("queue").replaceChildren(el("p", "muted", "Nobody is waiting for GPUs."));
    return;
  }
  const table = el("table", "queue-table");
  const head = el("tr");
  for (const title of ["#", "User", "Requested", "Collected", "Waiting", "Note"]) {
    head.append(el("th", null, title));
  }
  table.append(el("thead"), el("tbody"));
  table.tHead.append(head);
  for (const entry of entries) {
    const row = el("tr");
    row.dataset.position = String(entry.position);
    const user = entry.actual_user && entry.actual_user !== entry.user
      ? `${entry.actual_user} (${entry.user})`
      : entry.user;
    const requested = entry.requested_ids
      ? `IDs ${entry.requested_ids.join(", ")}`
      : `${entry.requested_count} GPU${entry.requested_count === 1 ? "" : "s"}`;
    let collected = `${entry.allocated_count}/${entry.requested_count}`;
    const held = entry.allocated_gpus;
    if (held.length) collected += ` (GPU${held.length === 1 ? "" : "s"} ${held.join(", ")})`;
    row.append(
      el("td", "num", entry.position),
      el("td", null, user),
      el("td", null, requested),
      el("td", null, collected),
      el("td", "num", entry.wait_time),
      el("td", "note", entry.note || "-"),
    );
    table.tBodies[0].append(row);
  }
  $("queue").replaceChildren(table);
}

async function refreshQueue() {
  try {
    renderQueue(await fetchJson(scoped("/api/queue")));
    setProblem("queue", null);
  } catch (err) {
    setProblem("queue", `Queue unavailable: ${err.message}`);
    showUnavailable($("queue"), "Queue unavailable.");
  }
}

function renderReport(report, panel) {
  const unit = report.days === 1 ? "day" : "days";
  const parts = [el("p", "report-period", `${report.start_date} to ${report.end_date} (${report.days} ${unit})`)];
  if (report.hosts) parts.push(reportHosts(report.hosts));
  if (!report.users || report.users.length === 0) {
    parts.push(el("p", "muted", "No GPU reservations in this period."));
    panel.replaceChildren(...parts);
    return;
  }
  const widest = Math.max(...report.users.map((u) => u.gpu_hours), 0);
  for (const user of report.users) {
    const row = el("div", "report-row");
    row.dataset.user = user.name;
    row.append(el("span", "report-name", user.name));
    const bar = el("div", "bar");
    const fill = el("span");
    fill.style.width = `${widest > 0 ? (100 * user.gpu_hours) / widest : 0}%`;
    bar.append(fill);
    row.append(bar);
    const figures = el("span", "report-figures");
    figures.append(el("b", null, `${user.gpu_hours.toFixed(2)} h`), ` · ${user.percentage.toFixed(1)}% · ${user.run_count} run · ${user.manual_count} manual`);
    row.append(figures);
    parts.push(row);
  }
  const totals = el("div", "totals");
  const total = (label, value) => {
    const node = el("span", null, `${label} `);
    node.append(el("b", null, value));
    return node;
  };
  totals.append(
    total("Total GPU hours", report.total_gpu_hours.toFixed(2)),
    total("Reservations", report.total_reservations),
    total("Users", report.unique_users),
  );
  parts.push(totals);
  panel.replaceChildren(...parts);
}

// The fleet report's share of each host.
function reportHosts(hosts) {
  const table = el("table", "hosts-table");
  const head = el("tr");
  for (const title of ["Host", "GPUs", "GPU hours", "Capacity used"]) head.append(el("th", null, title));
  table.append(el("thead"), el("tbody"));
  table.tHead.append(head);
  for (const host of hosts) {
    const row = el("tr");
    row.dataset.reportHost = host.name;
    row.append(
      el("td", null, host.name),
      el("td", "num", host.gpus),
      el("td", "num", host.gpu_hours.toFixed(2)),
      el("td", "num", `${host.capacity_percent.toFixed(1)}%`),
    );
    table.tBodies[0].append(row);
  }
  return table;
}

async function refreshReport() {
  const days = $("days").value;
  try {
    renderReport(await fetchJson(scoped("/api/report", { days })), $("report"));
    setProblem("report", null);
  } catch (err) {
    setProblem("report", `Report unavailable: ${err.message}`);
    showUnavailable($("report"), "Report unavailable.");
  }
  if (!fleet) return;
  try {
    renderReport(await fetchJson(`/api/report?days=${encodeURIComponent(days)}&host=all`), $("fleet-report"));
    setProblem("fleet-report", null);
  } catch (err) {
    setProblem("fleet-report", `Fleet report unavailable: ${err.message}`);
    showUnavailable($("fleet-report"), "Fleet report unavailable.");
  }
}

// The host named by the URL (#host=NAME), if the fleet has it; else this host.
function chooseHost(hosts) {
  const match = /^#host=(.+)$/.exec(location.hash);
  const wanted = match ? decodeURIComponent(match[1]) : null;
  const named = hosts.find((host) => host.host === wanted);
  return (named || hosts.find((host) => host.is_local) || hosts[0]).host;
}

function renderHosts() {
  const hosts = fleet.hosts;
  const total = hosts.reduce((sum, host) => sum + host.summary.total, 0);
  const available = hosts.reduce((sum, host) => sum + host.summary.available, 0);
  $("hosts-summary").replaceChildren(
    chip("hosts", hosts.length),
    chip(total === 1 ? "GPU" : "GPUs", total),
    chip("available", available),
  );
  const table = el("table", "hosts-table");
  const head = el("tr");
  for (const title of ["Host", "Total", "Available", "In Use", "GPU Models"]) head.append(el("th", null, title));
  table.append(el("thead"), el("tbody"));
  table.tHead.append(head);
  for (const host of hosts) {
    const row = el("tr", host.host === fleet.selected ? "selected" : null);
    row.dataset.host = host.host;
    const name = el("td", "host-cell");
    const link = el("a", null, host.host);
    link.href = `#host=${encodeURIComponent(host.host)}`;
    name.append(link);
    if (host.is_local) name.append(" ", el("span", "chip", "this host"));
    if (host.stale) name.append(" ", el("span", "badge stale", "NOT REPORTING"));
    if (host.error) {
      const badge = el("span", "badge error", "ERROR");
      badge.title = host.error;
      name.append(" ", badge);
    }
    row.append(
      name,
      el("td", "num", host.summary.total),
      el("td", `num ${host.summary.available > 0 ? "free" : "none"}`, host.summary.available),
      el("td", "num", host.summary.in_use),
      el("td", null, host.error || host.summary.gpu_models),
    );
    table.tBodies[0].append(row);
  }
  $("hosts").replaceChildren(table);
  for (const scope of document.querySelectorAll("[data-scope]")) scope.textContent = ` · ${fleet.selected}`;
}

// Reads every host; shows the overview while there are several. Answers whether
// the host shown below changed (or the page switched between one and many hosts).
async function refreshHosts() {
  let hosts;
  try {
    hosts = await fetchJson("/api/hosts/status");
    setProblem("hosts", null);
  } catch (err) {
    // One host: nothing to say beyond what the status says.
    if (fleet) {
      setProblem("hosts", `Hosts unavailable: ${err.message}`);
      showUnavailable($("hosts"), "Hosts unavailable.");
    }
    return false;
  }
  const before = fleet ? fleet.selected : null;
  fleet = hosts.length > 1 ? { hosts, selected: chooseHost(hosts) } : null;
  $("hosts-section").hidden = !fleet;
  $("fleet-report-section").hidden = !fleet;
  if (fleet) renderHosts();
  else for (const scope of document.querySelectorAll("[data-scope]")) scope.textContent = "";
  return before !== (fleet ? fleet.selected : null);
}

function refreshAll() {
  refreshStatus();
  refreshQueue();
  refreshReport();
}

async function loadInfo() {
  try {
    const info = await fetchJson("/api/info");
    $("hostname").textContent = info.hostname;
    document.title = `canhazgpu · ${info.hostname}`;
    $("version").textContent = `canhazgpu ${info.version}`;
    if (/^https:\/\//.test(info.repository)) {
      $("repo-link").href = info.repository;
      $("repo-link").textContent = info.repository_is_upstream ? "Upstream repository" : "Repository";
    }
  } catch (err) {
    $("hostname").textContent = "unknown host";
  }
}

document.addEventListener("DOMContentLoaded", async () => {
  $("days").addEventListener("change", refreshReport);
  $("refresh").addEventListener("click", async () => {
    await refreshHosts();
    refreshAll();
  });
  window.addEventListener("hashchange", async () => {
    if (await refreshHosts()) refreshAll();
  });
  loadInfo();
  await refreshHosts();
  refreshAll();
  setInterval(async () => {
    // Another host shown (one joined, or the one shown left): its queue and report too.
    if (await refreshHosts()) {
      refreshQueue();
      refreshReport();
    }
    refreshStatus();
    // A failed report is retried with the status, not only every 5 minutes.
    if (problems.has("report")) refreshReport();
  }, STATUS_REFRESH_MS);
  setInterval(refreshQueue, QUEUE_REFRESH_MS);
  setInterval(refreshReport, REPORT_REFRESH_MS);
});
