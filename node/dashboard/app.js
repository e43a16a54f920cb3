// The dashboard: reads /api/v1/*, listens to /api/v1/events, redraws panels. Text from the node
// (client keys, refusal messages) is always set with textContent, never parsed as HTML.
"use strict";

const API = "/api/v1";
const $ = id => document.getElementById(id);
// failures: panel name -> why its last load failed; a panel that loads again clears only its own.
// unreachableSince: when a request to the node last found nothing listening (null while it answers).
const state = { series: null, status: null, failures: new Map(), unreachableSince: null };
const FEED_RETRY_MS = 5000;
const SHOWN_CLIENTS = 6;
const EVENT_RELOAD_MS = 500;
const SOURCE_NAMES = { own: "lookup, own text", corpus: "lookup, other requests", drafter: "model drafter" };
// The drafter tags of the config and the logs ("dspark+lookup"), in words; the tag stays in a tooltip.
const DRAFTER_NAMES = { ngram: "prompt lookup", lookup: "prompt lookup", dspark: "DSpark drafter",
                        dflash: "DFlash drafter", eagle3: "EAGLE-3 drafter" };

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

// cells: [text, class, title]; the title (a tooltip) for what the cell shortens
function row(cells) {
  const tr = document.createElement("tr");
  for (const [text, cls, title] of cells) {
    const td = tr.appendChild(el("td", text, cls));
    if (title) td.title = title;
  }
  return tr;
}

function fill(tbody, rows, emptyText, columns) {
  tbody.replaceChildren(...rows);
  if (!rows.length) {
    const td = el("td", emptyText, "muted");
    td.colSpan = columns;
    const tr = document.createElement("tr");
    tr.appendChild(td);
    tbody.appendChild(tr);
  }
}

const fmt = {
  short: hex => hex ? (hex.length > 14 ? hex.slice(0, 8) + "…" + hex.slice(-4) : hex) : "-",
  money: micros => (micros / 1e6).toFixed(6),
  num: (v, digits = 1) => (v === null || v === undefined) ? "-" : Number(v).toFixed(digits),
  bytes: b => {
    if (b === null || b === undefined) return "-";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (b >= 1024 && i < units.length - 1) { b /= 1024; i++; }
    return `${b.toFixed(i ? 1 : 0)} ${units[i]}`;
  },
  duration: s => {
    s = Math.floor(s);
    const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
    return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : `${m}m ${s % 60}s`;
  },
  // the time of day, with the date for another day (a node runs for weeks; "10:04 PM" alone was any day)
  time: t => {
    const d = new Date(t * 1000);
    return d.toDateString() === new Date().toDateString() ? d.toLocaleTimeString() : d.toLocaleString();
  },
  // the same on a 24-hour clock, which is shorter in a table column ("14:03:27", "1 Dec 14:03:27")
  clock: t => {
    const d = new Date(t * 1000);
    const hms = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" });
    return d.toDateString() === new Date().toDateString() ? hms
      : `${d.toLocaleDateString([], { day: "numeric", month: "short" })} ${hms}`;
  },
};

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

class Unreachable extends Error {}

async function api(path) {
  let response;
  try {
    response = await fetch(API + path, { credentials: "same-origin", cache: "no-store" });
  } catch (e) {
    throw new Unreachable(e.message);   // nothing answered: the node is stopped or the network is down
  }
  if (!response.ok) throw new Error(`HTTP ${response.status} ${await response.text()}`);
  return response.json();
}

// Each panel's loader; a failing one shows its error without stopping the others.
const panels = {
  async status() {
    const s = state.status = await api("/status");
    const e = s.engine;
    $("peer-id").textContent = s.peer_id;
    const digest = el("span", `weights sha256 ${e.model_digest.slice(0, 12)}…`, "mono");
    digest.title = `sha256 of the model's weights, as receipts name it: ${e.model_digest}`;
    $("model").replaceChildren(`${e.model_id} (${e.dtype}, `, digest, ")");
    $("drafter").textContent = e.drafter_id
      ? e.drafter_id.split("+").map(tag => DRAFTER_NAMES[tag] || tag).join(" + ") : "none: plain decoding";
    $("drafter").title = `method ${e.method}, drafter ${e.drafter_id || "none"}`;
    const gpu = s.gpu || {};
    $("device").textContent = gpu.name && gpu.name !== "cpu"
      ? `${e.device} · ${gpu.count || 1}× ${gpu.name}${gpu.compute_capability ? " (sm " + gpu.compute_capability + ")" : ""}`
      : e.device;
    const gpuMem = Number(gpu.memory_bytes || 0);
    $("memory").textContent = (gpuMem ? `${fmt.bytes(gpuMem)} per GPU · ` : "") +
      `process ${fmt.bytes(s.process_rss_bytes)}`;
    const held = s.gpu_memory.devices;
    $("gpu-memory").textContent = !held.length ? `none: ${s.gpu_memory.reason}` : held.map(d =>
      (held.length > 1 ? `GPU ${d.index}: ` : "") + `${fmt.bytes(d.reserved_bytes)} reserved of ` +
      `${fmt.bytes(d.total_bytes)} (${fmt.bytes(d.allocated_bytes)} in tensors)`).join(" · ");
    showAdmission(s.draining, s.admission);
    $("slots").textContent = `${s.load.active} active · ${s.load.free_slots} free of ${e.max_batch}`;
    $("queue").textContent = String(s.load.queue_depth);
    $("context").textContent = `${e.max_context} tokens`;
    // A node that also prices time bills both (docs/receipts.md): the token price alone understated it.
    const perGpuSecond = Number(s.price_per_gpu_second_micros);
    $("price").textContent = `${fmt.money(Number(s.price_per_mtok_micros))} per Mtok` +
      (perGpuSecond ? ` + ${fmt.money(perGpuSecond)} per GPU-second` : "");
    $("uptime").textContent = fmt.duration(s.uptime_seconds);
  },

  async jobs() {
    const j = await api("/jobs");
    const c = j.counts;
    // since this start, unlike the earnings beside them, which the ledger keeps across restarts
    $("job-counts").textContent =
      `since start: ${c.admitted} admitted · ${c.completed} completed · ${c.cancelled} cancelled · ${c.failed} failed · ${c.refused} refused`;
    fill($("active-jobs").tBodies[0], j.active.map(a => row([
      [fmt.short(a.job_id), "id"], [fmt.short(a.client), "id"], [String(a.output_tokens), "num"],
      [fmt.num(a.tokens_per_second), "num tps"], [fmt.num(a.age_seconds) + " s", "num"],
      // No token yet: in line for a slot, or its prompt still prefilling.
      [a.first_token_seconds === null ? "waiting" : "running", "state"]])), "no active job", 6);
    // every job the node keeps (its list scrolls): the one a client asks about is rarely among the last few
    fill($("recent-jobs").tBodies[0], j.recent.map(r => row([
      [fmt.clock(r.finished_at), "time", new Date(r.finished_at * 1000).toISOString()],
      [fmt.short(r.job_id), "id", r.job_id], [fmt.short(r.client), "id", r.client],
      [r.outcome, "outcome-" + r.outcome], [String(r.output_tokens), "num"],
      [fmt.num(r.tokens_per_second), "num"], [fmt.num(r.tau, 2), "num"],
      [r.time_to_first_token === null ? "-" : fmt.num(r.time_to_first_token, 2) + " s", "num"],
      [fmt.money(r.amount_micros), "num"]])), "no finished job yet", 9);
  },

  async series() {
    state.series = await api("/series");
    drawSeries();
  },

  async acceptance() {
    const a = await api("/acceptance");
    Charts.barsAndLine($("chart-acceptance"), a.positions, "position", "acceptance", "survival",
                       { barMax: 1, lineMax: 1, emptyText: "no speculative rounds yet" });
  },

  async budget() {
    const b = await api("/budget");
    Charts.barsAndLine($("chart-budget"), b.rows, "batch_size", "mean_budget", "tau",
                       { emptyText: "no rounds yet", lineMax: 1 });
    fill($("budget-table").tBodies[0], b.rows.map(r => row([
      [String(r.batch_size), "num"], [String(r.rounds), "num"], [fmt.num(100 * r.drafted_share, 0) + "%", "num"],
      [fmt.num(r.mean_budget, 2), "num"], [fmt.num(r.tau, 2), "num"]])), "no rounds yet", 5);
  },

  async drafts() {
    const d = await api("/drafts");
    $("draft-sources").tBodies[0].replaceChildren(...d.sources.map(s => row([
      [SOURCE_NAMES[s.source] || s.source, "", `source ${s.source}`], [String(s.drafted), "num"],
      [String(s.verified), "num"],
      [String(s.accepted), "num"],
      [s.acceptance === null ? "-" : fmt.num(100 * s.acceptance, 0) + "%", "num"]])));
    const c = d.corpus;
    $("corpus-fill").textContent = c
      ? `corpus: ${c.tokens} tokens of ${c.documents} requests, ` +
        `${fmt.num(100 * c.tokens / c.capacity, 0)}% of its ${c.capacity}-token capacity`
      : "no corpus (lookup across requests is off)";
  },

  async earnings() {
    const e = await api("/earnings");
    $("earned").textContent = fmt.money(e.amount_micros);
    $("receipts").textContent = String(e.receipts);
    $("billed-tokens").textContent = String(e.output_tokens);
    const clients = Object.entries(e.per_client_micros).sort((x, y) => y[1] - x[1]);
    const rows = clients.slice(0, SHOWN_CLIENTS).map(([k, v]) => row([[fmt.short(k), "id"], [fmt.money(v), "num"]]));
    const rest = clients.slice(SHOWN_CLIENTS);
    const more = rest.length + e.other_clients.clients;   // the API names only the clients billed most
    if (more) {  // the rest in one row, so the rows add up to the total earned above
      rows.push(row([[`${more} more client${more > 1 ? "s" : ""}`, "muted"],
                     [fmt.money(rest.reduce((sum, [, v]) => sum + v, e.other_clients.amount_micros)), "num muted"]]));
    }
    fill($("per-client").tBodies[0], rows, "no receipts yet", 2);
    $("export-jsonl").href = e.export.jsonl;
    $("export-csv").href = e.export.csv;
  },

  async peers() {
    const p = await api("/peers");
    $("peers-connected").textContent = String(p.connected);
    $("adverts-published").textContent = String(p.adverts_published);
    $("adverts-seen").textContent = `${p.adverts_seen.accepted}` +
      (p.adverts_seen.dropped ? ` (+${p.adverts_seen.dropped} dropped)` : "");
    const last = p.recent_adverts[0];
    $("last-advert").textContent = last
      // Without its sequence, a millisecond clock (docs/api.md): "#1796172726478" read as a count.
      ? `last advert at ${fmt.time(last.at)}: ${last.free_slots} free slots, queue ${last.queue_depth}, ${last.size_bytes} B`
      : (p.listen.length ? "no advert published yet" : "peer network off (no p2p.listen)");
    // 0 peers reads as a fault; without bootstrap peers it is what the operator asked for.
    $("peers-hint").textContent = !p.listen.length || p.connected ? ""
      : p.bootstrap.length ? `dialing ${p.bootstrap.length} bootstrap peer(s) (p2p.bootstrap)`
      : "no bootstrap peers set (p2p.bootstrap): other nodes see this one only if they join through it";
    $("peers-seen").replaceChildren(...p.peers_seen.slice(0, 8).map(s =>
      el("li", `${fmt.short(s.peer_id)} · ${s.adverts} adverts, last at ${fmt.time(s.at)}` +
               (s.accepted ? "" : " · dropped: " + s.reason))));
  },

  async problems() {
    const { problems: p, refused_by_reason: byReason } = await api("/problems");
    const reasons = Object.entries(byReason);
    $("refusal-counts").textContent = reasons.length
      ? "refused since start: " + reasons.map(([reason, n]) => `${reason} ${n}`).join(" · ") : "";
    const list = $("problem-list");
    if (!p.length) return list.replaceChildren(el("li", "none", "muted"));
    list.replaceChildren(...p.slice(0, 30).map(x => {
      const li = el("li");
      // Who is refused matters as much as why: a client over its rate, or one the operator priced out.
      li.append(el("span", fmt.time(x.at) + " ", "muted"), el("b", x.reason),
                x.client ? el("span", ` client ${fmt.short(x.client)}`, "mono") : "", " " + x.message);
      return li;
    }));
  },
};

function drawSeries() {
  if (!state.series) return;
  const now = Date.now() / 1000, { points, bucket_seconds: bucket, span_seconds: span } = state.series;
  Charts.timeLine($("chart-tps"), points, "tokens_per_second", { now, span, bucket, color: "a" });
  Charts.timeLine($("chart-tau"), points, "tau", { now, span, bucket, color: "b", minMax: 1,
                                                   emptyText: "no rounds yet" });
}

async function refresh(...names) {
  const results = await Promise.allSettled(names.map(n => panels[n]()));
  results.forEach((r, i) => r.status === "rejected"
    ? state.failures.set(names[i], r.reason) : state.failures.delete(names[i]));
  if (results.some(r => r.reason instanceof Unreachable)) {
    state.unreachableSince ??= Date.now() / 1000;
  } else if (state.unreachableSince !== null && results.some(r => r.status === "fulfilled")) {
    // The node answers again (perhaps restarted): reload every panel, those redrawn only on events too.
    state.unreachableSince = null;
    for (const [name, f] of state.failures) if (f instanceof Unreachable) state.failures.delete(name);
    refresh(...Object.keys(panels));
  }
  // While the node does not answer, every figure on the page is as it was when it last did: say so
  // and grey them out, rather than leave them looking live.
  document.body.classList.toggle("stale", state.unreachableSince !== null);
  if (state.unreachableSince !== null) {
    showError(`The node is not reachable (since ${fmt.time(state.unreachableSince)}): ` +
              "the figures shown are from before then, not live. Retrying…");
  } else {
    showError([...state.failures].map(([name, f]) => `${name}: ${f.message}`).join(" · "));
  }
}

// Events can come hundreds a second under load: the panels they touch are reloaded together, at most
// every EVENT_RELOAD_MS, rather than once per event by every open dashboard.
const stalePanels = new Set();
let reloadTimer = null;

function reloadSoon(...names) {
  names.forEach(n => stalePanels.add(n));
  reloadTimer ??= setTimeout(() => {
    reloadTimer = null;
    const due = [...stalePanels];
    stalePanels.clear();
    refresh(...due);
  }, EVENT_RELOAD_MS);
}

function onTick(live) {
  $("uptime").textContent = fmt.duration(live.uptime_seconds);
  $("tps-now").textContent = live.active.length ? `now ${fmt.num(live.tokens_per_second)} tok/s` : "idle";
  // live.tau is that of the last 10 to 20 s of rounds: once no job runs it is no longer "now"
  $("tau-now").textContent = live.tau === null || !live.active.length ? "" : `now ${fmt.num(live.tau, 2)}`;
  // Live speeds of active jobs without refetching the table.
  const speeds = new Map(live.active.map(a => [fmt.short(a.job_id), a]));
  for (const tr of $("active-jobs").tBodies[0].rows) {
    const a = speeds.get(tr.cells[0].textContent);
    if (a && tr.cells.length === 6) {
      tr.cells[2].textContent = String(a.output_tokens);
      tr.cells[3].textContent = fmt.num(a.tokens_per_second);
    }
  }
}

// A stopping node admits nothing and gives its running jobs `grace_seconds`: say so where the
// operator looks first, not only in the log. Otherwise the limits a refused client met, beside the
// refusals they cause.
function showAdmission(draining, a) {
  $("draining").hidden = !draining;
  const limit = (n, unit) => n ? `${n} ${unit}` : `no limit ${unit}`;
  $("admission").textContent = draining
    ? `draining since ${fmt.time(draining.since)}: no new jobs; running ones get ${fmt.num(draining.grace_seconds, 0)} s`
    : `${a.mode} · per client ${limit(a.max_concurrent_per_client, "at once")}, ` +
      `${limit(a.rate_per_minute, "a minute")} · per address ${limit(a.max_concurrent_per_address, "at once")}, ` +
      `${limit(a.address_rate_per_minute, "a minute")} · ${a.max_queue} may wait for a slot`;
  $("admission").title = draining ? "" : "[admission] settings; an address is an IPv4 address or an IPv6 /64";
}

function connect() {
  const source = new EventSource(API + "/events");
  const live = $("live");
  source.onopen = () => { live.textContent = "live"; live.className = "badge"; };
  source.onerror = () => {
    live.textContent = "reconnecting";
    live.className = "badge off";
    // The browser retries a dropped stream by itself, but not a refused one (503 while too many
    // dashboards are connected): that one is closed for good, so open a new one later.
    if (source.readyState === EventSource.CLOSED) setTimeout(connect, FEED_RETRY_MS);
  };
  source.addEventListener("tick", e => onTick(JSON.parse(e.data)));
  source.addEventListener("admitted", () => reloadSoon("jobs", "status"));
  source.addEventListener("finished",
    () => reloadSoon("jobs", "status", "earnings", "acceptance", "budget", "drafts", "series"));
  source.addEventListener("refused", () => reloadSoon("problems", "jobs"));
  // The event's body is the bus event (`at`, not status's `since`): status is the one shape shown.
  source.addEventListener("draining", () => reloadSoon("status"));
  for (const name of ["peers", "advert_published", "advert_seen"]) {
    source.addEventListener(name, () => reloadSoon("peers"));
  }
}

refresh(...Object.keys(panels));
connect();
setInterval(() => refresh("jobs", "status"), 2000);
setInterval(() => refresh("series", "budget", "acceptance", "drafts", "peers"), 3000);
setInterval(drawSeries, 1000);
