// The status page's logic: reads /health, /doctor and /metrics from the admin server that served
// the page (relative URLs, so the page also works behind a path prefix), and keeps the last five
// minutes of /metrics samples in memory to compute rates and latency quantiles itself.
"use strict";

(function () {
  const SCRAPE_MS = 2000;
  const DOCTOR_MS = 60000;
  const WINDOW_S = 300;
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
    "#17becf", "#7f7f7f", "#bcbd22", "#393b79", "#637939"];

  const samples = []; // {t: unix seconds, rows: [{name, labels, value}]}
  const charts = {}; // id -> {plot, key}
  let health = null;
  let doctor = null; // the last answer, or {unavailable: text}

  // ------------------------------------------------------------------ small DOM helpers

  function $(id) { return document.getElementById(id); }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== undefined && value !== null) node.setAttribute(name, value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function bytes(n) {
    if (typeof n !== "number") return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
  }

  async function getJson(path) {
    const response = await fetch(path, { cache: "no-store" });
    const text = await response.text();
    let body = null;
    try { body = JSON.parse(text); } catch (_) { /* not JSON: the caller looks at the status */ }
    return { status: response.status, body, text };
  }

  // ------------------------------------------------------------------ Prometheus text

  const LINE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
  const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

  function parseMetrics(text) {
    const rows = [];
    for (const line of text.split("\n")) {
      if (line === "" || line[0] === "#") continue;
      const m = LINE.exec(line);
      if (!m) continue;
      const labels = {};
      if (m[2]) {
        for (const l of m[2].matchAll(LABEL)) labels[l[1]] = l[2].replace(/\\(.)/g, "$1");
      }
      const value = m[3] === "+Inf" ? Infinity : Number(m[3]);
      if (!Number.isNaN(value)) rows.push({ name: m[1], labels, value });
    }
    return rows;
  }

  // Sums the rows named `name` that pass `keep`, by `group(labels)`.
  function sumBy(sample, name, group, keep) {
    const out = new Map();
    for (const row of sample.rows) {
      if (row.name !== name || (keep && !keep(row.labels))) continue;
      const g = group(row.labels);
      out.set(g, (out.get(g) || 0) + row.value);
    }
    return out;
  }

  const byMethod = (labels) => labels.grpc_method || "unknown";
  const all = () => "all";

  // Per-second increase of counter groups between consecutive samples. `fixed` groups are always
  // shown (as zero when absent), so that a chart of rare events still says "none".
  function rateSeries(name, group, keep, fixed) {
    const sums = samples.map((s) => sumBy(s, name, group, keep));
    const groups = new Set(fixed || []);
    for (const m of sums) for (const g of m.keys()) groups.add(g);
    const names = [...groups].sort();
    const xs = [];
    const ys = names.map(() => []);
    for (let i = 1; i < samples.length; i++) {
      const dt = samples[i].t - samples[i - 1].t;
      if (dt <= 0) continue;
      xs.push(samples[i].t);
      names.forEach((g, j) => {
        const now = sums[i].get(g) || 0;
        const before = sums[i - 1].get(g) || 0;
        // A lower value means the proxy restarted: everything counted since is new.
        ys[j].push((now >= before ? now - before : now) / dt);
      });
    }
    return { xs, names, ys };
  }

  // Gauges as they were at each sample; a gauge the proxy does not export is left out.
  function gaugeSeries(names) {
    const present = names.filter(([name]) => samples.some((s) => s.rows.some((r) => r.name === name)));
    const xs = samples.map((s) => s.t);
    const ys = present.map(([name]) => samples.map((s) => {
      const rows = s.rows.filter((r) => r.name === name);
      return rows.length ? rows.reduce((a, r) => a + r.value, 0) : null;
    }));
    return { xs, names: present.map(([, label]) => label), ys };
  }

  // The 99th percentile of the calls observed between consecutive samples, per method, from the
  // histogram buckets' increase (linear within a bucket, as Prometheus' histogram_quantile).
  function latencySeries() {
    const buckets = samples.map((s) => {
      const out = new Map();
      for (const row of s.rows) {
        if (row.name !== "grpc_server_handling_seconds_bucket") continue;
        const method = byMethod(row.labels);
        if (!out.has(method)) out.set(method, new Map());
        out.get(method).set(row.labels.le === "+Inf" ? Infinity : Number(row.labels.le), row.value);
      }
      return out;
    });
    const methods = new Set();
    for (const b of buckets) for (const m of b.keys()) methods.add(m);
    const names = [...methods].sort();
    const xs = [];
    const ys = names.map(() => []);
    for (let i = 1; i < samples.length; i++) {
      if (samples[i].t <= samples[i - 1].t) continue;
      xs.push(samples[i].t);
      names.forEach((method, j) => {
        const now = buckets[i].get(method);
        const before = buckets[i - 1].get(method) || new Map();
        ys[j].push(now ? quantile(0.99, now, before) : null);
      });
    }
    return { xs, names, ys };
  }

  function quantile(q, now, before) {
    const bounds = [...now.keys()].sort((a, b) => a - b);
    const counts = bounds.map((b) => now.get(b) - (before.get(b) || 0));
    const total = counts[counts.length - 1];
    if (!(total > 0)) return null;
    const rank = q * total;
    for (let k = 0; k < bounds.length; k++) {
      if (counts[k] < rank) continue;
      const lower = k > 0 ? bounds[k - 1] : 0;
      if (bounds[k] === Infinity) return lower * 1000;
      const below = k > 0 ? counts[k - 1] : 0;
      const within = counts[k] - below;
      const fraction = within > 0 ? (rank - below) / within : 1;
      return (lower + (bounds[k] - lower) * fraction) * 1000;
    }
    return null;
  }

  // ------------------------------------------------------------------ charts

  function chartWidth(container) {
    return Math.max(240, Math.floor(container.clientWidth || 320));
  }

  function draw(id, data, unit) {
    const container = $(id);
    if (!data.names.length || !data.xs.length) {
      if (!container.querySelector(".empty")) container.append(el("p", { class: "empty muted" }, "waiting for data…"));
      return;
    }
    const empty = container.querySelector(".empty");
    if (empty) empty.remove();
    const key = data.names.join("\u0000");
    const rows = [data.xs, ...data.ys];
    let chart = charts[id];
    // uPlot's series are fixed when it is made: a new method or label value needs a new chart.
    if (!chart || chart.key !== key) {
      if (chart) chart.plot.destroy();
      // Without a cursor on the chart (a phone, a screenshot) the legend shows the latest values.
      const time = { value: (_, v, __, idx) => (idx === null ? "latest" : new Date(v * 1000).toLocaleTimeString()) };
      const series = [time].concat(data.names.map((name, i) => ({
        label: name,
        stroke: COLORS[i % COLORS.length],
        width: 1.5,
        spanGaps: false,
        value: (u, v, si, idx) => {
          if (idx === null) v = latest(u.data[si]);
          return v === null || v === undefined ? "–" : formatValue(v) + (unit ? " " + unit : "");
        },
      })));
      const options = {
        width: chartWidth(container),
        height: 200,
        series,
        scales: { y: { range: (_, min, max) => [0, Math.max(max * 1.1, unit === "ms" ? 1 : 0.5)] } },
        axes: [{}, { size: 50, values: (_, ticks) => ticks.map(formatValue) }],
        legend: { live: true },
        cursor: { drag: { x: false, y: false } },
      };
      chart = { plot: new uPlot(options, rows, container), key };
      charts[id] = chart;
    } else {
      chart.plot.setData(rows);
    }
    container.setAttribute("data-points", String(data.xs.length));
  }

  function latest(values) {
    for (let i = values.length - 1; i >= 0; i--) if (values[i] !== null && values[i] !== undefined) return values[i];
    return null;
  }

  function formatValue(v) {
    if (v === null || v === undefined) return "–";
    if (v === 0) return "0";
    if (Math.abs(v) >= 100) return v.toFixed(0);
    if (Math.abs(v) >= 1) return v.toFixed(1);
    return v.toPrecision(2);
  }

  function drawCharts() {
    const failed = (labels) => labels.grpc_code !== "OK";
    draw("chart-requests", rateSeries("grpc_server_started_total", byMethod), "/s");
    // Every method seen is drawn, so that no errors shows as a line at zero.
    const methods = [...new Set(samples.flatMap((s) => s.rows.filter((r) => r.name === "grpc_server_started_total")
      .map((r) => byMethod(r.labels))))];
    draw("chart-errors", rateSeries("grpc_server_handled_total", byMethod, failed, methods), "/s");
    draw("chart-latency", latencySeries(), "ms");
    draw("chart-streams", gaugeSeries([
      ["etcd_compat_proxy_watch_client_watches", "client watches"],
      ["etcd_compat_proxy_watch_upstream_watches", "upstream watches"],
      ["etcd_compat_proxy_client_connections", "client connections"],
      ["etcd_compat_proxy_auth_sessions", "auth sessions"],
    ]), "");
    draw("chart-budget", rateSeries("etcd_compat_proxy_limited_responses_total", (l) => l.outcome || "unknown", null,
      ["whole", "paged", "truncated", "refused"]), "/s");
    drawFailovers();
  }

  function drawFailovers() {
    const kinds = [
      ["etcd_compat_proxy_retries_total", "requests retried on another member"],
      ["etcd_compat_proxy_watch_recreations_total", "watches re-created"],
      ["etcd_compat_proxy_streams_broken_total", "streams ended (member lost)"],
      ["etcd_compat_proxy_upstream_redials_total", "member connections redialled"],
    ];
    const parts = kinds.map(([name]) => rateSeries(name, all, null, ["all"]));
    draw("chart-failovers", {
      xs: parts[0].xs,
      names: kinds.map(([, label]) => label),
      ys: parts.map((p) => p.ys[0]),
    }, "/s");
  }

  window.addEventListener("resize", () => {
    for (const [id, chart] of Object.entries(charts)) {
      chart.plot.setSize({ width: chartWidth($(id)), height: 200 });
    }
  });

  // ------------------------------------------------------------------ members, diagnosis, certificates

  function renderMembers() {
    const body = $("members").querySelector("tbody");
    const diagnosed = doctor && doctor.members ? doctor.members : [];
    const listed = health && health.members ? health.members : [];
    const rows = [];
    const seen = new Set();
    for (const h of listed) {
      const d = diagnosed.find((m) => m.endpoint === h.endpoint || (h.id && m.id === h.id)) || null;
      rows.push({ h, d });
      if (d) seen.add(d);
    }
    for (const d of diagnosed) if (!seen.has(d)) rows.push({ h: null, d });
    body.replaceChildren(...rows.map(({ h, d }) => {
      const name = (h && h.name) || (d && d.name) || "(not answered yet)";
      let role = d && d.role;
      if (!role && h) role = h.leader ? "leader" : h.learner ? "learner" : h.id ? "follower" : "unknown";
      const healthy = h ? h.healthy : d && d.reachable;
      const error = (h && h.error) || (d && d.error);
      const alarms = d && d.alarms && d.alarms.length ? d.alarms.join(", ") : d ? "none" : "–";
      const size = d && typeof d.db_size === "number"
        ? bytes(d.db_size) + (typeof d.quota === "number" ? " / " + bytes(d.quota) : "") : "–";
      return el("tr", { "data-member": name },
        el("td", {}, name),
        el("td", { class: "role-" + role }, role),
        el("td", { class: healthy ? "ok" : "critical", title: error || null }, healthy ? "healthy" : "unhealthy"
          + (error ? ": " + error : "")),
        el("td", {}, (h && h.version) || (d && d.version) || "–"),
        el("td", {}, size),
        el("td", { class: d && d.alarms && d.alarms.length ? "critical" : null }, alarms),
        el("td", { class: "mono" }, (h && h.endpoint) || (d && d.endpoint) || ""),
        el("td", { class: "mono" }, (h && h.id) || (d && d.id) || "–"));
    }));
    const inactive = listed.filter((m) => m.in_cluster === false).length;
    $("members-note").textContent = !health ? "/health did not answer."
      : (inactive ? inactive + " endpoint(s) no longer in the cluster. " : "")
        + (doctor && doctor.members ? "" : "Role, db size and alarms come with the diagnosis.");
  }

  function renderVerdict() {
    const banner = $("verdict");
    const title = $("verdict-title");
    const detail = $("verdict-detail");
    if (doctor && doctor.verdict) {
      banner.setAttribute("data-verdict", doctor.verdict);
      title.textContent = { ok: "All checks pass", warning: "Warnings", critical: "Critical problems" }[doctor.verdict]
        || doctor.verdict;
      const counts = { ok: 0, warning: 0, critical: 0 };
      for (const c of doctor.checks || []) counts[c.verdict] = (counts[c.verdict] || 0) + 1;
      const cluster = doctor.cluster || {};
      detail.textContent = ` ${counts.critical} critical, ${counts.warning} warning, ${counts.ok} ok`
        + (cluster.revision !== undefined ? ` · revision ${cluster.revision}` : "")
        + (doctor.checked_at ? ` · checked ${doctor.checked_at}` : "");
    } else {
      banner.setAttribute("data-verdict", "unavailable");
      title.textContent = "Diagnosis unavailable";
      const healthy = health ? (health.health === "true" ? "a voting member is healthy" : "no member is healthy") : "";
      detail.textContent = " " + ((doctor && doctor.unavailable) || "") + (healthy ? " · /health: " + healthy : "");
    }
  }

  function renderChecks() {
    const list = $("checks");
    const note = $("checks-note");
    if (!doctor || !doctor.checks) {
      list.replaceChildren();
      note.textContent = doctor && doctor.unavailable ? doctor.unavailable : "Waiting for the diagnosis…";
      return;
    }
    note.textContent = "";
    const order = { critical: 0, warning: 1, ok: 2 };
    const checks = [...doctor.checks].sort((a, b) => (order[a.verdict] ?? 3) - (order[b.verdict] ?? 3));
    list.replaceChildren(...checks.map((c) => {
      const item = el("li", { class: "check", "data-verdict": c.verdict, "data-check": `${c.group}/${c.name}` },
        el("span", { class: "badge " + c.verdict }, c.verdict),
        el("span", { class: "check-name" }, `${c.group} · ${c.name}`),
        el("div", { class: "summary" }, c.summary || ""));
      if (c.fix) item.append(el("div", { class: "fix" }, el("strong", {}, "fix: "), c.fix));
      if (c.evidence && c.evidence.length) {
        item.append(el("details", {}, el("summary", {}, "evidence"),
          el("ul", {}, ...c.evidence.map((e) => el("li", { class: "mono" }, e)))));
      }
      return item;
    }));
  }

  function renderCertificates() {
    const body = $("certificates").querySelector("tbody");
    const note = $("certificates-note");
    let certs = doctor && doctor.certificates;
    if (!certs) {
      // Without the diagnosis, /health still names the certificates close to expiry.
      certs = (health && health.expiring_certificates || []).map((c) => ({
        source: c.role, path: c.path, subject: c.subject, not_after: c.not_after, days_left: c.days_left,
      }));
      note.textContent = "Only certificates close to expiry (from /health) are listed without the diagnosis.";
    } else {
      note.textContent = certs.length ? "" : "No certificates: TLS is off on both sides.";
    }
    const sorted = [...certs].sort((a, b) => a.days_left - b.days_left);
    body.replaceChildren(...sorted.map((c) => el("tr", {},
      el("td", { class: c.days_left < 7 ? "critical" : c.days_left < 30 ? "warning" : "ok" }, c.days_left),
      el("td", {}, c.not_after),
      el("td", { class: "mono" }, c.subject),
      el("td", {}, c.source),
      el("td", { class: "mono" }, c.path))));
  }

  function renderAll() {
    renderVerdict();
    renderMembers();
    renderChecks();
    renderCertificates();
  }

  // ------------------------------------------------------------------ polling

  async function scrape() {
    const started = Date.now();
    try {
      const [metrics, h] = await Promise.all([
        fetch("metrics", { cache: "no-store" }).then((r) => {
          if (!r.ok) throw new Error("/metrics answered " + r.status);
          return r.text();
        }),
        getJson("health"),
      ]);
      samples.push({ t: started / 1000, rows: parseMetrics(metrics) });
      while (samples.length && samples[0].t < started / 1000 - WINDOW_S) samples.shift();
      health = h.body;
      $("updated").textContent = "updated " + new Date(started).toLocaleTimeString();
      $("updated").className = "muted";
    } catch (error) {
      $("updated").textContent = "the proxy does not answer: " + error.message;
      $("updated").className = "critical";
    }
    renderAll();
    drawCharts();
  }

  async function diagnose() {
    try {
      const answer = await getJson("doctor");
      if (answer.status === 404) {
        doctor = { unavailable: "This proxy has no /doctor; members are shown from /health." };
      } else if (answer.body && answer.body.verdict) {
        doctor = answer.body;
      } else {
        doctor = { unavailable: `/doctor answered ${answer.status}: ${answer.text.slice(0, 200)}` };
      }
    } catch (error) {
      doctor = { unavailable: "/doctor did not answer: " + error.message };
    }
    renderAll();
  }

  // Two samples a second apart at load, so that rates are drawn without waiting a full period.
  diagnose();
  scrape().then(() => setTimeout(() => {
    scrape();
    setInterval(scrape, SCRAPE_MS);
  }, 1000));
  setInterval(diagnose, DOCTOR_MS);
})();
