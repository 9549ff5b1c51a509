/** The gateway's overview, live: the events socket, else polling, else a clear "not reachable". */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import { ISignal, Signal } from '@lumino/signaling';

/** A machine with its live workers, as GET /dash/api/workers lists them. */
export interface IWorkerRow {
  name: string;
  owner?: string;
  state?: string;
  status?: string;
  hardware?: {
    cpus?: number;
    memory?: number;
    gpus?: { name?: string; model?: string; memory?: number }[];
  };
  resources?: Record<string, number>;
  workers?: { name?: string; status?: string; processing?: number }[];
  current_work?: number;
  processing?: number;
}

export interface ISessionRow {
  id: string;
  user?: string;
  worker?: string;
  machine?: string;
  resources?: Record<string, unknown> | string;
  state?: string;
  started?: string;
}

export interface IWorkRow {
  name: string;
  user?: string;
  total: number;
  done: number;
  running: number;
  queued: number;
  erred: number;
}

export interface IOverview {
  time?: string;
  user?: string;
  operator?: boolean;
  cluster: { state?: string; version?: string; scheduler?: string };
  totals: { machines?: number; workers: number; gpus: number; gpus_free?: number; cpus?: number };
  workers: IWorkerRow[];
  sessions: ISessionRow[];
  work: IWorkRow[];
  storage: {
    backend?: Record<string, unknown> | null;
    objects?: number | null;
    bytes?: number | null;
  } | null;
  /** Set when part of the picture is missing, saying why. */
  error?: string;
}

/** How the data arrives: pushed (live), polled, or not at all. */
export type Connection = 'connecting' | 'live' | 'polling' | 'unreachable';

const EVENTS = 'dash/api/events';
const OVERVIEW = 'dash/api/overview';

/**
 * The overview, kept fresh: pushed by the events socket, polled while the socket is
 * down, and a reason instead when the server has no DASH API (a plain Jupyter server).
 */
export class DashModel {
  constructor(
    settings: ServerConnection.ISettings = ServerConnection.makeSettings(),
    pollInterval = 5000
  ) {
    this._settings = settings;
    this._pollInterval = pollInterval;
  }

  get overview(): IOverview | null {
    return this._overview;
  }

  get connection(): Connection {
    return this._connection;
  }

  /** Why the gateway is not reachable (empty when it is). */
  get error(): string {
    return this._error;
  }

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  get isDisposed(): boolean {
    return this._disposed;
  }

  start(): void {
    this._openSocket();
    // The first picture should not wait for a socket that may never open.
    void this._poll();
  }

  dispose(): void {
    if (this._disposed) {
      return;
    }
    this._disposed = true;
    window.clearTimeout(this._pollTimer);
    window.clearTimeout(this._socketTimer);
    this._socket?.close();
    this._socket = null;
    Signal.clearData(this);
  }

  private _openSocket(): void {
    if (this._disposed) {
      return;
    }
    const settings = this._settings;
    let url = URLExt.join(settings.wsUrl, EVENTS);
    if (settings.appendToken && settings.token) {
      url += `?token=${encodeURIComponent(settings.token)}`;
    }
    // Counts as working only once it has said something: a socket that is accepted and
    // then closed at once must back off like one that was refused.
    let spoke = false;
    let socket: WebSocket;
    try {
      socket = new settings.WebSocket(url);
    } catch {
      // A malformed URL or a blocked scheme: the same as a refused connection.
      this._socketClosed(false);
      return;
    }
    this._socket = socket;
    socket.onmessage = event => {
      let message: { type?: string; data?: IOverview };
      try {
        message = JSON.parse(String(event.data));
      } catch {
        return;
      }
      if (message.type === 'overview' && message.data) {
        spoke = true;
        window.clearTimeout(this._pollTimer);
        this._set(normalise(message.data), 'live', '');
      }
    };
    socket.onclose = () => {
      if (this._socket === socket) {
        this._socket = null;
        this._socketClosed(spoke);
      }
    };
  }

  private _socketClosed(spoke: boolean): void {
    if (this._disposed) {
      return;
    }
    // Poll meanwhile; retry the socket soon after a drop, ever more rarely when there is none.
    this._socketFailures = spoke ? 0 : this._socketFailures + 1;
    const delay = Math.min(2000 * 2 ** this._socketFailures, 60000);
    this._socketTimer = window.setTimeout(() => this._openSocket(), delay);
    if (this._connection === 'live') {
      this._connection = 'polling';
      this._changed.emit();
    }
    this._schedulePoll(0);
  }

  private _schedulePoll(delay: number): void {
    window.clearTimeout(this._pollTimer);
    if (this._disposed || this._connection === 'live') {
      return;
    }
    this._pollTimer = window.setTimeout(() => void this._poll(), delay);
  }

  private async _poll(): Promise<void> {
    try {
      const overview = await this._fetchOverview();
      if (this._connection !== 'live') {
        this._set(overview, 'polling', '');
      }
    } catch (reason) {
      if (this._connection !== 'live') {
        this._set(null, 'unreachable', (reason as Error).message || String(reason));
      }
    }
    this._schedulePoll(this._pollInterval);
  }

  private async _fetchOverview(): Promise<IOverview> {
    return normalise(await this._get<IOverview>(OVERVIEW));
  }

  private async _get<T>(path: string): Promise<T> {
    const url = URLExt.join(this._settings.baseUrl, path);
    let response: Response;
    try {
      response = await ServerConnection.makeRequest(url, {}, this._settings);
    } catch (reason) {
      throw new Error(`the server did not answer (${(reason as Error).message})`);
    }
    if (!response.ok) {
      let message = response.statusText;
      try {
        message = (await response.json()).message || message;
      } catch {
        // Not JSON: the status text says enough.
      }
      throw new Error(`${response.status} ${message}`.trim());
    }
    return (await response.json()) as T;
  }

  private _set(overview: IOverview | null, connection: Connection, error: string): void {
    if (this._disposed) {
      return;
    }
    this._overview = overview;
    this._connection = connection;
    this._error = error;
    this._changed.emit();
  }

  private _settings: ServerConnection.ISettings;
  private _pollInterval: number;
  private _overview: IOverview | null = null;
  private _connection: Connection = 'connecting';
  private _error = '';
  private _socket: WebSocket | null = null;
  private _socketFailures = 0;
  private _socketTimer = 0;
  private _pollTimer = 0;
  private _disposed = false;
  private _changed = new Signal<this, void>(this);
}

/** Fill what a partial overview leaves out, so the views need no checks of their own. */
function normalise(data: Partial<IOverview>): IOverview {
  const workers = Array.isArray(data.workers) ? data.workers : [];
  return {
    ...data,
    cluster: data.cluster ?? {},
    totals: { workers: workers.length, gpus: 0, ...(data.totals ?? {}) },
    workers,
    sessions: Array.isArray(data.sessions) ? data.sessions : [],
    work: Array.isArray(data.work) ? data.work : [],
    storage: data.storage ?? null
  };
}
