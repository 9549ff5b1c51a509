// The dashboard: workers, the user's sessions and work, storage use; live from /dash/api/events.
import {
  connectionIndicator, followOverview, formatAgo, formatBytes, h, machineActions,
  machineShares, machineState, mayAct, redraw, showError, stateBadge, utilisationText,
} from "./dash.js";

const $ = (id) => document.getElementById(id);

function replaceRows(table, rows) {
  redraw(table.querySelector("tbody"), rows);
}

function workerRow(machine) {
  const shares = machineShares(machine);
  const workers = machine.workers || [];
  const names = workers.map((w) => w.name).join(", ");
  return h("tr", { dataset: { machine: machine.name } },
    h("th", { scope: "row" }, machine.name,
      h("span", { class: "sub" }, workers.length
        ? `${workers.length} worker${workers.length === 1 ? "" : "s"}: ${names}` : "no workers connected")),
    h("td", {}, machine.owner ?? "–"),
    h("td", { class: "num" }, shares.cpus ?? "–"),
    h("td", { class: "num" }, formatBytes(shares.memory)),
    h("td", {}, shares.gpuModels || "–"),
    h("td", { class: "num" }, shares.vram ? formatBytes(shares.vram) : "–"),
    h("td", {}, utilisationText(machine)),
    h("td", {}, machineState(machine)),
    h("td", { class: "num" }, machine.current_work ?? 0),
    h("td", {}, mayAct(machine) ? machineActions(machine) : ""),
  );
}

function resourcesText(resources) {
  return Object.entries(resources || {})
    .filter(([key]) => !key.startsWith("pool:"))
    .map(([key, value]) => (["MEMORY", "VRAM"].includes(key) ? `${key}=${formatBytes(value)}` : `${key}=${value}`))
    .join(", ") || "–";
}

function sessionRow(session) {
  return h("tr", { dataset: { session: session.id } },
    h("th", { scope: "row", title: `session ${session.id}` },
      session.notebook ? session.notebook : h("code", {}, session.id.slice(0, 12))),
    h("td", {}, session.user ?? "–"),
    h("td", {}, session.worker ?? "–", session.machine ? h("span", { class: "sub" }, `on ${session.machine}`) : null),
    h("td", {}, resourcesText(session.resources)),
    h("td", {}, stateBadge(session.state)),
    h("td", {}, session.started ? formatAgo(session.started) : "–"),
  );
}

function workItem(work) {
  const label = `${work.name}: ${work.done} of ${work.total} done`;
  return h("li", { dataset: { work: work.name } },
    h("strong", {}, work.name), work.user ? h("span", { class: "sub" }, `by ${work.user}`) : null,
    h("progress", { max: work.total || 1, value: work.done, "aria-label": label }),
    h("span", { class: "counts" },
      `${work.done}/${work.total} done · ${work.running} running · ${work.queued} queued` +
      (work.erred ? ` · ${work.erred} failed` : "")),
  );
}

function render(overview) {
  const t = overview.totals || {};
  const totals = {
    machines: t.machines, workers: t.workers, cpus: t.cpus,
    gpus: `${t.gpus_free ?? 0} / ${t.gpus ?? 0}`, state: overview.cluster?.state,
  };
  for (const [key, value] of Object.entries(totals)) {
    document.querySelector(`[data-total="${key}"]`).textContent = value ?? "–";
  }
  const machines = (overview.workers || []).filter((m) => m.state !== "removed");
  replaceRows($("workers"), machines.map(workerRow));
  $("workers-empty").hidden = machines.length > 0;
  const sessions = overview.sessions || [];
  replaceRows($("sessions"), sessions.map(sessionRow));
  $("sessions").hidden = sessions.length === 0;
  $("sessions-empty").hidden = sessions.length > 0;
  // Finished groups whose results are still held stay in the API; the page shows live work.
  const work = (overview.work || []).filter((w) => w.running + w.queued > 0);
  $("work").replaceChildren(...work.map(workItem));
  $("work-empty").hidden = work.length > 0;
  const storage = overview.storage || {};
  document.querySelector('[data-storage="objects"]').textContent = storage.objects ?? "–";
  document.querySelector('[data-storage="bytes"]').textContent = formatBytes(storage.bytes);
  const backend = storage.backend || {};
  document.querySelector('[data-storage="backend"]').textContent =
    [backend.backend, backend.location].filter(Boolean).join(": ") || "–";
  showError(overview.error || "");
}

followOverview(render, connectionIndicator($("connection")));
