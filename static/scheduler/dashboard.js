// The dashboard and queue pages refresh themselves: every panel ([data-panel]) is fetched
// again as an HTML fragment (?panel=NAME) and the charts read GET /api/tasks/series/ for the
// range the operator picked (kept in the page's ?range=, so a reload keeps it). uPlot draws
// the charts (static/vendor/uplot, no CDN).
(function () {
  "use strict";
  const body = document.body;
  const every = Number(body.dataset.refreshSeconds || 15) * 1000;
  const charts = {};
  const section = document.getElementById("charts");
  let range = new URLSearchParams(window.location.search).get("range") || "1h";

  async function refreshPanels() {
    for (const panel of document.querySelectorAll("[data-panel]")) {
      const url = new URL(window.location.href);
      url.searchParams.set("panel", panel.dataset.panel);
      try {
        const response = await fetch(url, { credentials: "same-origin" });
        if (response.ok) panel.innerHTML = await response.text();
      } catch (error) {
        // The server is away for a moment: keep what is shown, try again next round.
      }
    }
    const stamp = document.getElementById("updated");
    if (stamp) stamp.textContent = new Date().toISOString().slice(0, 19).replace("T", " ");
  }

  const COLORS = { started: "#6c8ebf", completed: "#82b366", failed_attempts: "#f0b27a",
    failed: "#e07b39", dead: "#b85450", wait_p50: "#264b5d", wait_p95: "#9673a6" };

  function options(names, width) {
    return {
      width: width, height: 220,
      scales: { x: { time: true } },
      series: [{}].concat(names.map(function (name) {
        return { label: name.replace("_", " "), stroke: COLORS[name], width: 2, spanGaps: false,
          points: { show: true, size: 4 } };
      })),
      axes: [{}, { size: 50 }],
    };
  }

  function draw(id, names, data) {
    const element = document.getElementById(id);
    const columns = [data.t].concat(names.map(function (name) { return data[name]; }));
    if (!charts[id]) {
      const width = Math.max(element.clientWidth, 320);
      charts[id] = new uPlot(options(names, width), columns, element);
    } else {
      charts[id].setData(columns);
    }
    element.dataset.range = data.range;
    element.dataset.points = String(data.t.length);
  }

  async function loadCharts() {
    if (!section || typeof uPlot === "undefined") return;
    const url = new URL(body.dataset.seriesUrl, window.location.href);
    url.searchParams.set("range", range);
    if (section.dataset.scheduler) url.searchParams.set("scheduler", section.dataset.scheduler);
    try {
      const response = await fetch(url, { credentials: "same-origin" });
      if (!response.ok) return;
      const data = await response.json();
      draw("throughput-chart", ["started", "completed", "failed_attempts", "failed", "dead"], data);
      draw("wait-chart", ["wait_p50", "wait_p95"], data);
      section.dataset.loaded = data.range;
    } catch (error) {
      // As for the panels: try again next round.
    }
  }

  function pick(name) {
    range = name;
    for (const button of section.querySelectorAll("button[data-range]")) {
      button.setAttribute("aria-pressed", String(button.dataset.range === name));
    }
    const url = new URL(window.location.href);
    url.searchParams.set("range", name);
    window.history.replaceState(null, "", url);
    loadCharts();
  }

  if (section) {
    for (const button of section.querySelectorAll("button[data-range]")) {
      button.addEventListener("click", function () { pick(button.dataset.range); });
    }
    pick(range);
  }
  window.setInterval(function () { refreshPanels(); loadCharts(); }, every);
})();
