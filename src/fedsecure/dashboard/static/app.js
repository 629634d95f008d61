// The page's state and its one connection to the server: an EventSource that receives the run
// list ("runs") and each selected run whenever its files change ("run"). No other requests.
import { createCharts, updateCharts } from "./charts.js";
import { el, PALETTE } from "./format.js";
import { renderCard, renderRunList, renderWorkers } from "./views.js";

const state = { runs: [], data: new Map(), selected: [], focus: null, colors: new Map(), source: null, chosen: false };
const $ = (selector) => document.querySelector(selector);
let charts = null;

function readHash() {
  return new URLSearchParams(location.hash.slice(1)).getAll("run");
}

function writeHash() {
  const params = new URLSearchParams();
  state.selected.forEach((id) => params.append("run", id));
  history.replaceState(null, "", `#${params}`);
}

function colorOf(id) {
  if (!state.colors.has(id)) state.colors.set(id, PALETTE[state.colors.size % PALETTE.length]);
  return state.colors.get(id);
}

function select(ids) {
  state.selected = ids;
  if (!ids.includes(state.focus)) state.focus = ids[0] ?? null;
  writeHash();
  connect();
  render();
}

const handlers = {
  open: (id) => { state.chosen = true; select([id]); },
  toggle: (id) => {
    state.chosen = true;
    select(state.selected.includes(id) ? state.selected.filter((x) => x !== id) : [...state.selected, id]);
  },
};

function setLive(on, text) {
  const box = $("[data-testid=connection]");
  box.className = `live ${on ? "on" : "off"}`;
  box.querySelector(".label").textContent = text;
}

function connect() {
  if (state.source) state.source.close();
  const params = new URLSearchParams();
  state.selected.forEach((id) => params.append("run", id));
  const source = new EventSource(`/api/events?${params}`);
  state.source = source;
  source.onopen = () => setLive(true, "live");
  source.onerror = () => setLive(false, "reconnecting");
  source.addEventListener("runs", (event) => {
    const message = JSON.parse(event.data);
    state.runs = message.runs;
    $("[data-testid=root]").textContent = message.root;
    state.runs.forEach((run) => colorOf(run.id));
    // one run and no choice made yet (a dashboard beside a single run): open it
    if (!state.chosen && !state.selected.length && state.runs.length === 1) return select([state.runs[0].id]);
    renderList();
  });
  source.addEventListener("run", (event) => {
    const run = JSON.parse(event.data);
    if (!state.selected.includes(run.id)) return;
    state.data.set(run.id, run);
    render();
  });
}

function renderList() {
  $("[data-testid=run-count]").textContent = `(${state.runs.length})`;
  const list = $("[data-testid=runs]");
  if (!state.runs.length) {
    list.replaceChildren(el("li", { class: "hint", style: "padding: 8px 16px" },
      "No runs here yet: a directory with history.json or status.json, up to three levels down."));
    return;
  }
  renderRunList(list, state.runs, state.selected, state.colors, handlers);
}

function render() {
  renderList();
  const runs = state.selected.map((id) => state.data.get(id)).filter((run) => run && !run.error)
    .map((run) => ({ ...run, color: colorOf(run.id) }));
  const some = runs.length > 0;
  $("[data-testid=empty]").hidden = some;
  $(".charts").hidden = !some;
  $(".workers").hidden = !some;
  $("[data-testid=cards]").replaceChildren(...runs.map((run) => renderCard(run, run.color)));
  if (!some) return;
  charts = charts || createCharts();
  const privacy = updateCharts(charts, runs);
  $("[data-testid=privacy-panel] .chart").hidden = !privacy;
  $("[data-testid=privacy-panel] .none").hidden = privacy;
  const focus = runs.find((run) => run.id === state.focus) || runs[0];
  $("[data-testid=worker-tabs]").replaceChildren(...(runs.length > 1 ? runs.map((run) => el("button", {
    class: run.id === focus.id ? "active" : "", style: `--swatch: ${run.color}`,
    onclick: () => { state.focus = run.id; render(); } }, run.name)) : []));
  renderWorkers($("[data-testid=workers-table]"), focus);
}

function start() {
  state.selected = readHash();
  state.chosen = state.selected.length > 0;
  state.focus = state.selected[0] ?? null;
  connect();
}

start();
