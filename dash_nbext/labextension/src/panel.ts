/** The side panel: the cluster, its workers, your sessions, work in progress and storage. */
import { Widget } from '@lumino/widgets';

import { DashModel, IOverview, IWorkerRow } from './api';
import { bytes, plural, resources } from './format';
import { PlacementTracker } from './placement';
import { UNREACHABLE } from './status';

export const PANEL_ID = 'dash-distributed-panel';

/** Make an element with a class and text (never HTML: every string here comes from the server). */
function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className = '',
  text = ''
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (className) {
    node.className = className;
  }
  if (text) {
    node.textContent = text;
  }
  return node;
}

/** A section with a heading (h3) that labels it. */
function section(id: string, title: string): HTMLElement {
  const node = el('section', 'dash-Panel-section');
  const heading = el('h3', 'dash-Panel-heading', title);
  heading.id = `${PANEL_ID}-${id}`;
  node.setAttribute('aria-labelledby', heading.id);
  node.appendChild(heading);
  return node;
}

/** A cell's content: text, or text with a second, quieter line under it. */
type Cell = string | [string, string];

function fill(cell: HTMLTableCellElement, content: Cell): HTMLTableCellElement {
  if (typeof content === 'string') {
    cell.textContent = content;
  } else {
    cell.append(content[0]);
    if (content[1]) {
      cell.appendChild(el('span', 'dash-Panel-sub', content[1]));
    }
  }
  return cell;
}

/** A table with a caption, column headers, and one row per item (its first cell a row header). */
function table(caption: string, columns: string[], rows: Cell[][]): HTMLTableElement {
  const node = el('table', 'dash-Panel-table');
  node.appendChild(el('caption', 'dash-Panel-caption', caption));
  const head = node.createTHead().insertRow();
  for (const column of columns) {
    const th = el('th', '', column);
    th.scope = 'col';
    head.appendChild(th);
  }
  const body = node.createTBody();
  for (const row of rows) {
    const tr = body.insertRow();
    row.forEach((content, i) => {
      if (i === 0) {
        const th = fill(el('th'), content);
        th.scope = 'row';
        tr.appendChild(th);
      } else {
        fill(tr.insertCell(), content);
      }
    });
  }
  return node;
}

function hardware(row: IWorkerRow): string {
  const parts: string[] = [];
  const hw = row.hardware;
  if (hw?.cpus) {
    parts.push(plural(hw.cpus, 'CPU'));
  }
  for (const gpu of hw?.gpus ?? []) {
    parts.push(gpu.name || gpu.model || 'GPU');
  }
  if (!parts.length && row.resources) {
    parts.push(resources(row.resources));
  }
  return parts.join(', ');
}

function liveWorkers(row: IWorkerRow): string {
  return (row.workers ?? []).map(w => w.name ?? '').filter(Boolean).join(', ');
}

/** The DASH side panel; it redraws whenever the overview or the placement changes. */
export class DashPanel extends Widget {
  constructor(model: DashModel, placements: PlacementTracker) {
    super();
    this._model = model;
    this._placements = placements;
    this.id = PANEL_ID;
    this.addClass('dash-Panel');
    this.node.setAttribute('role', 'region');
    this.node.setAttribute('aria-label', 'DASH distributed');
    this.node.tabIndex = 0;
    model.changed.connect(this._changed, this);
    placements.changed.connect(this._changed, this);
    this.update();
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this._model.changed.disconnect(this._changed, this);
    this._placements.changed.disconnect(this._changed, this);
    super.dispose();
  }

  protected onAfterShow(): void {
    this.update();
  }

  protected onUpdateRequest(): void {
    if (!this.isVisible) {
      return;
    }
    const model = this._model;
    const overview = model.overview;
    const children: HTMLElement[] = [el('h2', 'dash-Panel-title', 'DASH distributed')];
    const state = el('p', 'dash-Panel-connection');
    state.setAttribute('role', 'status');
    state.textContent = this._connectionText();
    children.push(state);
    children.push(this._notebook());
    if (overview?.error) {
      children.push(el('p', 'dash-Panel-empty', overview.error));
    }
    if (overview) {
      children.push(this._summary(overview), this._workers(overview));
      children.push(this._sessions(overview), this._work(overview), this._storage(overview));
    }
    this.node.replaceChildren(...children);
  }

  private _changed(): void {
    this.update();
  }

  private _connectionText(): string {
    const model = this._model;
    switch (model.connection) {
      case 'live':
        return 'Live: updates as the cluster changes.';
      case 'polling':
        return 'Updated every few seconds.';
      case 'unreachable':
        return `${UNREACHABLE}${model.error ? `: ${model.error}` : '.'}`;
      default:
        return 'Connecting to the DASH gateway…';
    }
  }

  private _notebook(): HTMLElement {
    const node = section('notebook', 'This notebook');
    const placement = this._placements.current;
    const text = placement
      ? `Its DASH session runs on ${placement.where || `worker ${placement.worker}`}.`
      : 'No DASH session: pick the "DASH distributed" kernel and run a cell.';
    const p = el('p', 'dash-Panel-placement', text);
    if (placement) {
      p.dataset.worker = placement.worker;
    }
    node.appendChild(p);
    return node;
  }

  private _summary(overview: IOverview): HTMLElement {
    const node = section('cluster', 'Cluster');
    const totals = overview.totals;
    const items: [string, string][] = [
      ['Workers', String(totals.workers ?? 0)],
      [
        'GPUs',
        totals.gpus_free === undefined
          ? String(totals.gpus ?? 0)
          : `${totals.gpus ?? 0} (${totals.gpus_free} free)`
      ]
    ];
    if (totals.machines !== undefined) {
      items.unshift(['Machines', String(totals.machines)]);
    }
    if (totals.cpus) {
      items.push(['CPUs', String(totals.cpus)]);
    }
    if (overview.cluster.state) {
      items.push(['Scheduler', overview.cluster.state]);
    }
    const list = el('dl', 'dash-Panel-totals');
    for (const [term, value] of items) {
      list.append(el('dt', '', term), el('dd', '', value));
    }
    node.appendChild(list);
    return node;
  }

  private _workers(overview: IOverview): HTMLElement {
    const node = section('workers', 'Workers');
    if (!overview.workers.length) {
      node.appendChild(el('p', 'dash-Panel-empty', 'No workers are connected.'));
      return node;
    }
    const rows: Cell[][] = overview.workers.map(w => [
      [w.name, liveWorkers(w)],
      w.state ?? w.status ?? '',
      w.owner ?? '',
      hardware(w)
    ]);
    node.appendChild(
      table('Machines, with their live workers', ['Name', 'State', 'Owner', 'Hardware'], rows)
    );
    return node;
  }

  private _sessions(overview: IOverview): HTMLElement {
    const node = section('sessions', overview.operator ? 'Sessions' : 'Your sessions');
    if (!overview.sessions.length) {
      node.appendChild(el('p', 'dash-Panel-empty', 'No notebook sessions are running.'));
      return node;
    }
    const mine = this._placements.current?.session;
    const everyone = Boolean(overview.operator);
    const rows: Cell[][] = overview.sessions.map(s => {
      const where = s.worker ?? s.machine ?? 'waiting';
      const notes = [resources(s.resources), mine && s.id === mine ? 'this notebook' : ''];
      const row: Cell[] = [[where, notes.filter(Boolean).join(' · ')]];
      if (everyone) {
        row.push(s.user ?? '');
      }
      row.push(s.state ?? '');
      row.push(s.started ? new Date(s.started).toLocaleTimeString([], { timeStyle: 'short' }) : '');
      return row;
    });
    const columns = ['Worker', ...(everyone ? ['User'] : []), 'State', 'Since'];
    node.appendChild(table('Notebook sessions', columns, rows));
    return node;
  }

  private _work(overview: IOverview): HTMLElement {
    const node = section('work', 'Work');
    if (!overview.work.length) {
      node.appendChild(el('p', 'dash-Panel-empty', 'No work in progress.'));
      return node;
    }
    const list = el('ul', 'dash-Panel-work');
    for (const work of overview.work) {
      const item = el('li', 'dash-Panel-workItem');
      const label = el('span', 'dash-Panel-workName', work.name);
      const bar = el('progress', 'dash-Panel-progress');
      bar.max = Math.max(work.total, 1);
      bar.value = work.done;
      const detail =
        `${work.done} of ${work.total} done, ${work.running} running, ` +
        `${work.queued} queued, ${work.erred} failed`;
      bar.setAttribute('aria-label', `${work.name}: ${detail}`);
      item.append(label, bar, el('span', 'dash-Panel-workDetail', detail));
      list.appendChild(item);
    }
    node.appendChild(list);
    return node;
  }

  private _storage(overview: IOverview): HTMLElement {
    const node = section('storage', 'Storage');
    const storage = overview.storage;
    if (!storage) {
      node.appendChild(el('p', 'dash-Panel-empty', 'No storage information.'));
      return node;
    }
    const list = el('dl', 'dash-Panel-totals');
    if (storage.objects !== undefined && storage.objects !== null) {
      list.append(el('dt', '', 'Objects'), el('dd', '', String(storage.objects)));
    }
    if (storage.bytes !== undefined && storage.bytes !== null) {
      list.append(el('dt', '', 'Size'), el('dd', '', bytes(storage.bytes)));
    }
    const backend = storage.backend ?? {};
    if (backend.backend || backend.location) {
      const where = [backend.backend, backend.location].filter(Boolean).join(': ');
      list.append(el('dt', '', 'Backend'), el('dd', '', String(where)));
    }
    node.appendChild(list);
    return node;
  }

  private _model: DashModel;
  private _placements: PlacementTracker;
}
