/** Where the current notebook's DASH session runs, from its kernel's execute_reply metadata. */
import { JupyterFrontEnd } from '@jupyterlab/application';
import { ISessionContext } from '@jupyterlab/apputils';
import { Kernel, KernelMessage } from '@jupyterlab/services';
import { ISignal, Signal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';

/** What the "DASH distributed" kernel puts under `metadata.dash` of every execute_reply. */
export interface IPlacement {
  session: string;
  worker: string;
  where: string;
  gpus: string;
}

/** A placement from what a kernel sent (execute_reply metadata or kernel_info). */
function toPlacement(dash: Partial<IPlacement>): IPlacement {
  return {
    session: String(dash.session ?? ''),
    worker: String(dash.worker),
    where: String(dash.where ?? ''),
    gpus: String(dash.gpus ?? '')
  };
}

/** A widget with a kernel session (a notebook, a console), found without importing them. */
function sessionContextOf(widget: Widget | null): ISessionContext | null {
  const context = (widget as { sessionContext?: ISessionContext } | null)?.sessionContext;
  return context && typeof context === 'object' && 'kernelChanged' in context ? context : null;
}

/**
 * Follows the shell's current widget and the kernels of every session it has shown,
 * remembering the last placement each kernel reported.
 */
export class PlacementTracker {
  constructor(shell: JupyterFrontEnd.IShell) {
    this._shell = shell;
    shell.currentChanged?.connect(this._onCurrentChanged, this);
    this._onCurrentChanged();
  }

  /** The current widget's placement (null: not a DASH session, or none reported yet). */
  get current(): IPlacement | null {
    const context = sessionContextOf(this._shell.currentWidget);
    return (context && this._placements.get(context)) || null;
  }

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  dispose(): void {
    this._shell.currentChanged?.disconnect(this._onCurrentChanged, this);
    for (const [context, kernel] of this._watched) {
      context.kernelChanged.disconnect(this._onKernelChanged, this);
      context.statusChanged.disconnect(this._onStatusChanged, this);
      kernel?.anyMessage.disconnect(this._onMessage, this);
    }
    this._watched.clear();
    Signal.clearData(this);
  }

  private _onCurrentChanged(): void {
    const context = sessionContextOf(this._shell.currentWidget);
    if (context && !this._watched.has(context)) {
      this._watched.set(context, null);
      context.kernelChanged.connect(this._onKernelChanged, this);
      context.statusChanged.connect(this._onStatusChanged, this);
      context.disposed.connect(() => this._forget(context));
      this._watchKernel(context, context.session?.kernel ?? null);
    }
    this._changed.emit();
  }

  private _onKernelChanged(context: ISessionContext): void {
    this._watchKernel(context, context.session?.kernel ?? null);
    // A new kernel has no session yet: its first cell will say where it runs.
    this._placements.delete(context);
    this._changed.emit();
  }

  private _onStatusChanged(context: ISessionContext, status: Kernel.Status): void {
    // A restarted (or dead) kernel's remote session is gone with it.
    const gone = status === 'restarting' || status === 'autorestarting' || status === 'dead';
    if (gone && this._placements.has(context)) {
      this._placements.delete(context);
      this._changed.emit();
    }
  }

  private _watchKernel(context: ISessionContext, kernel: Kernel.IKernelConnection | null): void {
    this._watched.get(context)?.anyMessage.disconnect(this._onMessage, this);
    this._watched.set(context, kernel);
    if (kernel) {
      this._owners.set(kernel, context);
      kernel.anyMessage.connect(this._onMessage, this);
      // A page reloaded while the session lives has seen no execute_reply yet: the
      // kernel_info reply (asked for on every connection) says where it runs.
      void kernel.info.then(
        info => this._placeFromInfo(context, kernel, info),
        () => undefined
      );
    }
  }

  private _placeFromInfo(
    context: ISessionContext,
    kernel: Kernel.IKernelConnection,
    info: KernelMessage.IInfoReply
  ): void {
    const dash = (info as { dash?: Partial<IPlacement> }).dash;
    // An execute_reply seen since is newer than the kernel_info reply.
    if (this._watched.get(context) !== kernel || this._placements.has(context)) {
      return;
    }
    if (dash && typeof dash === 'object' && dash.worker) {
      this._placements.set(context, toPlacement(dash));
      this._changed.emit();
    }
  }

  private _onMessage(kernel: Kernel.IKernelConnection, args: Kernel.IAnyMessageArgs): void {
    const msg = args.msg;
    if (args.direction !== 'recv' || msg.header.msg_type !== 'execute_reply') {
      return;
    }
    const context = this._owners.get(kernel);
    if (!context) {
      return;
    }
    const dash = (msg as KernelMessage.IExecuteReplyMsg).metadata?.dash as
      | Partial<IPlacement>
      | undefined;
    const before = this._placements.get(context);
    if (dash && typeof dash === 'object' && dash.worker) {
      this._placements.set(context, toPlacement(dash));
    } else {
      // No placement in the reply: this kernel has no live DASH session (any more).
      this._placements.delete(context);
    }
    if (before !== this._placements.get(context)) {
      this._changed.emit();
    }
  }

  private _forget(context: ISessionContext): void {
    const kernel = this._watched.get(context);
    kernel?.anyMessage.disconnect(this._onMessage, this);
    this._watched.delete(context);
    this._placements.delete(context);
  }

  private _shell: JupyterFrontEnd.IShell;
  private _watched = new Map<ISessionContext, Kernel.IKernelConnection | null>();
  private _owners = new WeakMap<Kernel.IKernelConnection, ISessionContext>();
  private _placements = new Map<ISessionContext, IPlacement>();
  private _changed = new Signal<this, void>(this);
}
