// The contribute page: create an invite, copy its join command, follow one's own machines.
import {
  announce, api, connectionIndicator, followOverview, formatAgo, formatBytes, h,
  machineActions, machineShares, machineState, mayAct, redraw, showError, user, utilisationText,
} from "./dash.js";

const $ = (id) => document.getElementById(id);

async function createInvite() {
  const button = $("create-invite");
  button.disabled = true;
  try {
    const invite = await api("POST", "dash/api/invites", {});
    $("join-command").value = invite.command;
    $("invite-expiry").textContent =
      `Works once, until ${new Date(invite.expires).toLocaleString()}. Keep it private: it lets a machine join as yours.`;
    $("invite").hidden = false;
    $("join-command").focus();
    $("join-command").select();
    showError("");
    announce("Invite created: copy the command and run it on your machine.");
  } catch (err) {
    showError(`Could not create an invite: ${err.message}`);
  } finally {
    button.disabled = false;
    button.textContent = "Create another invite";
  }
}

async function copyCommand() {
  const field = $("join-command");
  field.select();
  try {
    await navigator.clipboard.writeText(field.value);
  } catch {
    // Without the asynchronous clipboard (an insecure origin), the selection is copied.
    if (!document.execCommand("copy")) {
      announce("Copy failed: select the command and copy it yourself.");
      return;
    }
  }
  announce("Command copied.");
}

function sharesText(machine) {
  const s = machineShares(machine);
  const parts = [`${s.cpus ?? "?"} CPU${s.cpus === 1 ? "" : "s"}`, formatBytes(s.memory)];
  for (const gpu of s.gpus) parts.push(`${gpu.name} (${formatBytes(gpu.vram)})`);
  return parts.join(" · ");
}

/** What finished on a machine's workers, by kind: "render ×12, session ×1 · last 2 min ago". */
function ranText(workers) {
  const kinds = new Map();
  for (const w of workers) {
    for (const r of w.ran || []) {
      const k = kinds.get(r.name) || { done: 0, erred: 0, last: 0 };
      k.done += r.done;
      k.erred += r.erred;
      k.last = Math.max(k.last, r.last);
      kinds.set(r.name, k);
    }
  }
  if (!kinds.size) return "nothing has run on it yet";
  const recent = [...kinds.entries()].sort((a, b) => b[1].last - a[1].last);
  const listed = recent.slice(0, 5).map(([name, k]) =>
    `${name} ×${k.done + k.erred}${k.erred ? ` (${k.erred} failed)` : ""}`);
  const last = new Date(recent[0][1].last * 1000).toISOString();
  return `Ran: ${listed.join(", ")} · last ${formatAgo(last)}`;
}

function activity(machine, sessions) {
  const workers = machine.workers || [];
  const mine = sessions.filter((s) => s.machine === machine.name);
  const lines = [`${machine.current_work ?? 0} task(s) running`];
  if (mine.length) lines.push(`${mine.length} session(s)`);
  return h("div", {},
    lines.join(" · "),
    h("span", { class: "sub ran" }, ranText(workers)),
    h("span", { class: "sub" }, workers.length
      ? workers.map((w) => `${w.name}: ${w.status ?? "?"}, ${w.processing} running`).join("; ")
      : "no workers connected"));
}

function machineRow(machine, sessions) {
  return h("tr", { dataset: { machine: machine.name } },
    h("th", { scope: "row" }, machine.name),
    h("td", {}, machineState(machine)),
    h("td", {}, sharesText(machine)),
    h("td", {}, utilisationText(machine)),
    h("td", {}, activity(machine, sessions)),
    h("td", {}, formatAgo(machine.last_heartbeat)),
    h("td", {}, mayAct(machine) ? machineActions(machine) : ""),
  );
}

let seen = null;

function render(overview) {
  const machines = (overview.workers || [])
    .filter((m) => !m.local && m.owner === user && m.state !== "removed");
  if (seen !== null) {
    for (const m of machines) if (!seen.has(m.name)) announce(`Machine ${m.name} joined.`);
  }
  seen = new Set(machines.map((m) => m.name));
  redraw($("machines").querySelector("tbody"),
    machines.map((m) => machineRow(m, overview.sessions || [])));
  $("machines").hidden = machines.length === 0;
  $("machines-empty").hidden = machines.length > 0;
}

$("create-invite").addEventListener("click", createInvite);
$("copy-command").addEventListener("click", copyCommand);
followOverview(render, connectionIndicator($("connection")));
