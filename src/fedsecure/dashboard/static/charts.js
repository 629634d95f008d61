// The four charts, drawn with the vendored Chart.js (a global from its UMD build).
import { isNumber } from "./format.js";

const Chart = window.Chart;
const PHASES = [
  ["train_seconds", "training", "#2f6fde"],
  ["transfer_seconds", "transfer", "#7fa7ee"],
  ["aggregate_seconds", "aggregation", "#e8590c"],
  ["evaluate_seconds", "evaluation", "#2b9a66"],
];
const METRIC_COLORS = { central: "#2f6fde", federated: "#e8590c", train: "#7048e8", limit: "#d64545" };

function css(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

function baseOptions(yTitle, stacked = false) {
  const grid = css("--line"), text = css("--muted");
  return {
    responsive: true, maintainAspectRatio: false, animation: false, normalized: true,
    interaction: { mode: "nearest", axis: "x", intersect: false },
    plugins: { legend: { labels: stacked ? { color: text, boxWidth: 12, boxHeight: 12 }
      : { color: text, usePointStyle: true, pointStyle: "line", pointStyleWidth: 26 } },
      tooltip: { callbacks: {} } },
    scales: {
      x: { type: stacked ? "category" : "linear", stacked, title: { display: true, text: "round", color: text },
        ticks: { color: text, precision: 0 }, grid: { color: grid } },
      y: { stacked, beginAtZero: stacked, title: { display: true, text: yTitle, color: text },
        ticks: { color: text }, grid: { color: grid } },
    },
  };
}

export function createCharts() {
  const make = (id, type, options) => new Chart(document.getElementById(id), { type, data: { datasets: [] }, options });
  const accuracy = baseOptions("accuracy");
  accuracy.scales.y.ticks.callback = (v) => `${Math.round(v * 1000) / 10}%`;
  return {
    accuracy: make("chart-accuracy", "line", accuracy),
    loss: make("chart-loss", "line", baseOptions("loss")),
    time: make("chart-time", "bar", baseOptions("seconds", true)),
    privacy: make("chart-privacy", "line", baseOptions("ε")),
  };
}

function series(rows, key) {
  return rows.filter((r) => isNumber(r[key]) && isNumber(r.round)).map((r) => ({ x: r.round, y: r[key] }));
}

function line(label, data, color, dashed) {
  return { label, data, borderColor: color, backgroundColor: color, borderWidth: 2, pointRadius: data.length > 40 ? 0 : 2.5,
    borderDash: dashed ? [6, 4] : [], tension: 0.15, spanGaps: true };
}

// One line per (run, metric): with one run each metric has its colour, with several each run
// has its colour and the metric its dash.
function lines(runs, metrics) {
  const out = [];
  for (const run of runs) {
    metrics.forEach(([key, label, colorKey], i) => {
      const data = series(run.rounds || [], key);
      if (!data.length) return;
      const color = runs.length > 1 ? run.color : METRIC_COLORS[colorKey];
      out.push(line(runs.length > 1 ? `${run.name} · ${label}` : label, data, color, runs.length > 1 && i > 0));
    });
  }
  return out;
}

function timeBars(runs) {
  const rounds = [...new Set(runs.flatMap((r) => (r.rounds || []).map((row) => row.round)))].filter(isNumber).sort((a, b) => a - b);
  const datasets = [];
  for (const run of runs) {
    const byRound = new Map((run.rounds || []).map((row) => [row.round, row]));
    const split = (run.rounds || []).some((row) => isNumber(row.train_seconds));
    const phases = split ? PHASES : [["fit_seconds", "fit", "#2f6fde"], PHASES[3]];
    for (const [key, label, color] of phases) {
      const data = rounds.map((n) => (byRound.has(n) && isNumber(byRound.get(n)[key]) ? byRound.get(n)[key] : null));
      if (data.every((v) => v === null)) continue;
      // several runs: each in its colour, the phases in fading shades of it
      const shade = runs.length > 1 ? shaded(run.color, phases.findIndex((phase) => phase[0] === key)) : color;
      datasets.push({ label: runs.length > 1 ? `${run.name} · ${label}` : label, data, stack: run.id,
        backgroundColor: shade, borderWidth: 0 });
    }
  }
  return { labels: rounds, datasets };
}

function shaded(hex, step) {
  const alpha = [1, 0.68, 0.45, 0.26][step] ?? 0.2;
  return `${hex}${Math.round(alpha * 255).toString(16).padStart(2, "0")}`;
}

function privacyLines(runs) {
  const out = lines(runs, [["dp_epsilon", "ε (DP-FedAvg)", "central"], ["local_epsilon", "ε (local DP-SGD)", "federated"]]);
  for (const run of runs) {
    const limit = run.status && run.status.privacy && run.status.privacy.epsilon_limit;
    const rounds = (run.rounds || []).map((r) => r.round).filter(isNumber);
    if (!isNumber(limit)) continue;
    const last = Math.max(run.status.rounds || 0, ...rounds, 1);
    const color = runs.length > 1 ? run.color : METRIC_COLORS.limit;
    out.push({ ...line(runs.length > 1 ? `${run.name} · limit` : "limit", [{ x: 1, y: limit }, { x: last, y: limit }], color, true), pointRadius: 0, borderWidth: 1.5 });
  }
  return out;
}

export function updateCharts(charts, runs) {
  charts.accuracy.data.datasets = lines(runs, [["central_accuracy", "central", "central"], ["federated_accuracy", "federated", "federated"]]);
  charts.loss.data.datasets = lines(runs, [["central_loss", "central", "central"], ["federated_loss", "federated", "federated"], ["train_loss", "training", "train"]]);
  const bars = timeBars(runs);
  charts.time.data.labels = bars.labels;
  charts.time.data.datasets = bars.datasets;
  charts.privacy.data.datasets = privacyLines(runs);
  for (const chart of Object.values(charts)) chart.update("none");
  return charts.privacy.data.datasets.length > 0;
}
