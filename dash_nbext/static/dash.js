// Shared by the DASH pages: the REST API (with Jupyter's XSRF cookie), the live overview
// stream, DOM building without innerHTML, and formatting.

const meta = (name) => document.querySelector(`meta[name="${name}"]`)?.content ?? "";

export const baseUrl = meta("dash-base-url") || "/";
export const user = meta("dash-user");
export const isOperator = meta("dash-role") === "operator";

function cookie(name) {
  const found = document.cookie.split("; ").find((c) => c.startsWith(name + "="));
  return found ? decodeURIComponent(found.slice(name.length + 1)) : "";
}

/** Call the DASH REST API; resolves to the JSON reply, rejects with the server's message. */
export async function api(method, path, body) {
  const headers = { "X-XSRFToken": cookie("_xsrf") };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const reply = await fetch(baseUrl + path, {
    method,
    headers,
    credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await reply.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!reply.ok) {
    throw new Error(data?.message || `${method} ${path} failed: ${reply.status} ${reply.statusText}`);
  }
  return data;
}

/**
 * Follow the overview: GET /dash/api/overview once, then every update from the
 * /dash/api/events WebSocket, reconnecting (with backoff) when it drops.
 * onState("connecting" | "live" | "offline") drives the connection indicator.
 */
export function followOverview(onOverview, onState) {
  let delay = 500;
  let socket = null;
  const connect = () => {
    onState("connecting");
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    socket = new WebSocket(`${scheme}//${location.host}${baseUrl}dash/api/events`);
    socket.addEventListener("open", () => {
      delay = 500;
      onState("live");
    });
    socket.addEventListener("message", (event) => {
      const message = JSON.parse(event.data);
      if (message.type === "overview") onOverview(message.data);
    });
    socket.addEventListener("close", () => {
      onState("offline");
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 10000);
    });
  };
  api("GET", "dash/api/overview").then(onOverview, (err) => showError(err.message));
  connect();
  return () => socket?.close();
}

/** The header's connection indicator. */
export function connectionIndicator(element) {
  const words = { connecting: "Connecting…", live: "Live", offline: "Disconnected; retrying…" };
  return (state) => {
    if (element.dataset.state === state) return;
    element.dataset.state = state;
    element.textContent = words[state];
  };
}

export function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message || "";
  box.hidden = !message;
}

export function announce(message) {
  document.getElementById("status").textContent = message;
}

/** h("td", {class: "num"}, "3"): an element; strings become text nodes, never HTML. */
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function formatBytes(n) {
  if (n === null || n === undefined || Number.isNaN(Number(n))) return "–";
  const units = ["B", "kB", "MB", "GB", "TB", "PB"];
  let value = Number(n);
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${value >= 100 || unit === 0 ? value.toFixed(0) : value.toFixed(1)} ${units[unit]}`;
}

export function formatPercent(x) {
  return typeof x === "number" ? `${Math.round(x)}%` : "–";
}

export function formatAgo(iso) {
  if (!iso) return "never";
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 5) return "just now";
  if (seconds < 90) return `${Math.round(seconds)} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  return new Date(iso).toLocaleString();
}

export function stateBadge(state) {
  return h("span", { class: "state", dataset: { state: state ?? "unknown" } }, state ?? "unknown");
}

/** A machine's state badge; while it drains, what the drain waits for, under it. */
export function machineState(machine) {
  const waiting = machine.drain?.message;
  if (!waiting) return stateBadge(machine.state);
  return h("div", {}, stateBadge(machine.state), h("span", { class: "sub drain" }, waiting));
}

/** What a machine shares: CPUs, RAM, and its shared GPUs with their models and VRAM. */
export function machineShares(machine) {
  const caps = machine.caps || {};
  const hardware = machine.hardware || {};
  const byIndex = new Map((hardware.gpus || []).map((g) => [Number(g.index), g]));
  const gpus = (caps.gpus || []).map((i) => byIndex.get(Number(i))).filter(Boolean);
  return {
    cpus: caps.cpus ?? hardware.cpus ?? null,
    memory: caps.memory ?? hardware.memory ?? null,
    gpus,
    gpuModels: [...new Set(gpus.map((g) => g.name))].join(", "),
    vram: gpus.reduce((sum, g) => sum + Number(g.vram || 0), 0),
  };
}

/** "CPU 12% · RAM 40% · GPU0 80%" from a machine's last heartbeat. */
export function utilisationText(machine) {
  const u = machine.utilisation;
  if (!u) return "–";
  const parts = [];
  if (typeof u.cpu_percent === "number") parts.push(`CPU ${formatPercent(u.cpu_percent)}`);
  if (u.memory_total) parts.push(`RAM ${formatPercent((100 * (u.memory_used || 0)) / u.memory_total)}`);
  for (const gpu of u.gpus || []) {
    if (typeof gpu.utilisation === "number") parts.push(`GPU${gpu.index} ${formatPercent(gpu.utilisation)}`);
  }
  return parts.length ? parts.join(" · ") : "–";
}

/** May this user pause, resume, drain or remove the machine? (The server checks too.) */
export function mayAct(machine) {
  if (machine.local) return false;
  if (["removed", "revoked"].includes(machine.state)) return false;
  return isOperator || machine.owner === user;
}

/** Pause / Resume / Drain / Remove buttons for a machine, each naming it for screen readers. */
export function machineActions(machine, onDone) {
  const act = async (label, method, path, past) => {
    try {
      await api(method, path);
      announce(`${machine.name} ${past}.`);
      showError("");
      onDone?.();
    } catch (err) {
      showError(`${label} ${machine.name}: ${err.message}`);
    }
  };
  const name = encodeURIComponent(machine.name);
  const paused = machine.state === "paused";
  const draining = machine.state === "draining";
  const buttons = [
    paused || draining
      ? h("button", { type: "button", "aria-label": `Resume ${machine.name}`,
          onclick: () => act("Resume", "POST", `dash/api/workers/${name}/resume`, "resumed") }, "Resume")
      : h("button", { type: "button", "aria-label": `Pause ${machine.name}`,
          onclick: () => act("Pause", "POST", `dash/api/workers/${name}/pause`, "paused") }, "Pause"),
    h("button", { type: "button", "aria-label": `Drain ${machine.name}`, disabled: draining,
      onclick: () => act("Drain", "POST", `dash/api/workers/${name}/drain`, "is draining") }, "Drain"),
    h("button", { type: "button", "aria-label": `Remove ${machine.name}`,
      onclick: () => {
        if (window.confirm(`Remove ${machine.name}? Its workers leave at once and it needs a new invite to come back.`)) {
          act("Remove", "DELETE", `dash/api/workers/${name}`, "removed");
        }
      } }, "Remove"),
  ];
  return h("div", { class: "actions" }, buttons);
}

/** Rebuild ``container``'s children without losing keyboard focus on a button that is
 * rebuilt with the same label (the page redraws on every change). */
export function redraw(container, children) {
  const active = document.activeElement;
  const label = active && container.contains(active) ? active.getAttribute("aria-label") : null;
  container.replaceChildren(...children);
  if (label) {
    const again = [...container.querySelectorAll("[aria-label]")].find(
      (el) => el.getAttribute("aria-label") === label);
    again?.focus();
  }
}
