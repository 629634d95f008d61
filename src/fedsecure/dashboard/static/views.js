// The run list, one card per selected run, and the workers table, built from the run files' data.
import { ago, decimal, duration, el, isNumber, percent } from "./format.js";

function pill(state) {
  return el("span", { class: `pill ${state}`, "data-testid": "state" }, state);
}

export function renderRunList(list, runs, selected, colors, handlers) {
  list.replaceChildren(...runs.map((run) => {
    const on = selected.includes(run.id);
    const total = isNumber(run.rounds_total) ? `/${run.rounds_total}` : "";
    const acc = run.last && isNumber(run.last.central_accuracy) ? percent(run.last.central_accuracy) : null;
    const box = el("input", { type: "checkbox", checked: on, title: "compare", "aria-label": `compare ${run.name}`,
      onclick: (e) => { e.stopPropagation(); handlers.toggle(run.id); } });
    return el("li", { class: `run${on ? " selected" : ""}`, "data-testid": "run-item", "data-run-id": run.id,
      style: `--swatch: ${colors.get(run.id)}`, onclick: () => handlers.open(run.id) },
    box, el("span", { class: "name", title: run.name }, run.name), pill(run.state),
    el("div", { class: "meta" }, el("span", { class: "num" }, `round ${run.completed ?? 0}${total}`),
      acc && el("span", { class: "num" }, acc), el("span", { class: "path", title: run.id }, run.id)));
  }));
}

function stat(label, value, testid, sub) {
  return el("div", { class: "stat" }, el("div", { class: "label" }, label),
    el("div", { class: "value", "data-testid": testid }, value), sub ? el("div", { class: "sub" }, sub) : null);
}

function progressLine(run) {
  const s = run.status || {};
  const rows = run.rounds || [];
  const done = isNumber(s.completed) ? s.completed : rows.length;
  const total = isNumber(s.rounds) ? s.rounds : null;
  let left = total ? `${done} of ${total} rounds done` : `${done} rounds`;
  let right = "";
  if (run.state === "running") {
    if (isNumber(s.round)) left = `round ${s.round}${total ? ` of ${total}` : ""}`;
    if (s.phase) left += ` · ${s.phase}`;
    if (isNumber(s.workers_total) && s.workers_total > 0) left += ` · ${s.workers_done ?? 0}/${s.workers_total} workers`;
    right = isNumber(s.eta_seconds) ? `ETA ${duration(s.eta_seconds)}` : "ETA –";
  } else if (isNumber(s.started) && isNumber(s.updated)) {
    right = `ran ${duration(s.updated - s.started)} · ${ago(s.updated)}`;
  } else if (isNumber(run.updated)) {
    right = `updated ${ago(run.updated)}`;
  }
  const fraction = total ? Math.min(1, done / total) : (run.state === "finished" ? 1 : 0);
  return { left, right, fraction };
}

function privacyStat(run, last) {
  const limit = run.status && run.status.privacy ? run.status.privacy.epsilon_limit : null;
  const spent = isNumber(last.dp_epsilon) ? last.dp_epsilon : last.local_epsilon;
  if (!isNumber(spent)) return stat("DP epsilon spent", "–", "epsilon", "no DP in this run");
  const delta = run.status && run.status.privacy && isNumber(run.status.privacy.delta) ? ` · δ ${run.status.privacy.delta}` : "";
  if (!isNumber(limit)) return stat("DP epsilon spent", decimal(spent, 3), "epsilon", `no limit${delta}`);
  const bar = el("div", { class: "budget" }, el("div", { style: `width: ${Math.min(100, (100 * spent) / limit)}%` }));
  return stat("DP epsilon spent", decimal(spent, 3), "epsilon", [`of ${decimal(limit, 2)}${delta}`, bar]);
}

export function renderCard(run, color) {
  const rows = run.rounds || [];
  const last = rows.length ? rows[rows.length - 1] : {};
  const p = progressLine(run);
  const message = (run.status && run.status.message) || (run.errors && run.errors.length ? run.errors.join("; ") : "");
  const aggregated = isNumber(last.workers) ? `${last.workers} updates aggregated` : null;
  return el("article", { class: "panel card", "data-testid": "run-card", "data-run-id": run.id, style: `--swatch: ${color}` },
    el("div", { class: "card-head" }, el("h2", { title: run.name }, run.name), pill(run.state), el("span", { class: "path" }, run.id)),
    el("div", { class: "progress", "data-testid": "progress" }, el("div", { style: `width: ${(100 * p.fraction).toFixed(1)}%` })),
    el("div", { class: "progress-text" }, el("span", { "data-testid": "progress-text" }, p.left), el("span", { "data-testid": "eta" }, p.right)),
    message ? el("div", { class: "message", "data-testid": "message" }, message) : null,
    el("div", { class: "stats" },
      stat("Central accuracy", percent(last.central_accuracy), "central-accuracy"),
      stat("Federated accuracy", percent(last.federated_accuracy), "federated-accuracy"),
      stat("Last round", isNumber(last.round) ? String(last.round) : "–", "last-round",
        [isNumber(last.round_seconds) ? `${last.round_seconds.toFixed(2)} s` : null, aggregated].filter(Boolean).join(" · ")),
      stat("Central loss", decimal(last.central_loss), "central-loss"),
      stat("Training loss", decimal(last.train_loss), "train-loss"),
      privacyStat(run, last)));
}

function chips(names, cls) {
  return (names || []).map((n) => el("span", { class: `chip ${cls}` }, n));
}

export function renderWorkers(table, run) {
  const rows = (run.rounds || []).slice(-200).reverse();
  const secure = rows.some((r) => "secure_survivors" in r || "secure_dropouts" in r);
  const head = ["Round", "Chosen", "Aggregated", "Failed"].concat(secure ? ["Secure survivors", "Dropouts"] : []);
  table.tHead.replaceChildren(el("tr", {}, head.map((h) => el("th", {}, h))));
  table.tBodies[0].replaceChildren(...rows.map((r) => {
    const finished = new Set(r.finished || []);
    const chosen = (r.chosen || []).map((n) => el("span", { class: `chip${finished.has(n) || !r.finished ? "" : " lost"}` }, n));
    const done = r.finished ? chips(r.finished, "ok") : isNumber(r.workers) ? el("span", { class: "muted" }, `${r.workers} updates`) : "–";
    const failed = (r.failures || []).length ? (r.failures || []).map((f) => el("div", { class: "failure" }, f)) : el("span", { class: "muted" }, "none");
    const cells = [el("td", { class: "round" }, r.round), el("td", {}, chosen.length ? chosen : "–"), el("td", {}, done),
      el("td", { "data-testid": "failures" }, failed)];
    if (secure) {
      cells.push(el("td", { class: "num" }, isNumber(r.secure_survivors) ? r.secure_survivors : "–"),
        el("td", {}, (r.secure_dropouts || []).length ? chips(r.secure_dropouts, "lost") : el("span", { class: "muted" }, "none")));
    }
    return el("tr", { "data-round": r.round }, cells);
  }));
}
