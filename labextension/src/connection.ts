/**
 * The panel's link to the current notebook's kernel over the `nbollama` comm.
 *
 * One link follows one session context at a time (the current notebook's):
 * it opens a comm on its kernel, keeps the latest engine snapshot and the
 * throughput history, and reconnects after a kernel change or restart and
 * when the kernel announces that `%load_ext nbollama` just ran.
 */

import { ISessionContext } from '@jupyterlab/apputils';
import { Kernel, KernelMessage } from '@jupyterlab/services';
import { ISignal, Signal } from '@lumino/signaling';

import {
  ConnectionPhase,
  IEngineEntry,
  IEngineSnapshot,
  PROTOCOL_VERSION,
  PanelMessage,
  cancelNotice,
  parseKernelMessage,
  pushHistory
} from './model';

/** The comm target name, registered in the kernel by `%load_ext nbollama`. */
export const COMM_TARGET = 'nbollama';

/** A message for the user about the last thing the kernel answered. */
export interface INotice {
  text: string;
  isError: boolean;
}

/** What the views read from the link. */
export interface ILinkState {
  phase: ConnectionPhase;
  snapshot: IEngineSnapshot | null;
  history: number[];
  notice: INotice | null;
  /** the kernel's engines (several: the panel shows a selector) */
  engines: IEngineEntry[];
  defaultName: string | null;
  /** the engine the snapshots are of */
  shown: string | null;
  /** the engine picked in the selector (null: the view follows the default) */
  pinned: string | null;
}

/** Statuses after which the kernel's comms are gone and must be reopened. */
const RESTART_STATUSES: ReadonlySet<Kernel.Status> = new Set<Kernel.Status>([
  'restarting',
  'autorestarting'
]);

export class KernelLink {
  /** Emitted whenever `state` changed. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  get state(): ILinkState {
    return {
      phase: this._phase,
      snapshot: this._snapshot,
      history: this._history,
      notice: this._notice,
      engines: this._engines,
      defaultName: this._defaultName,
      shown: this._shown,
      pinned: this._pinned
    };
  }

  get isDisposed(): boolean {
    return this._isDisposed;
  }

  /** Follow `context` (the current notebook's), or nothing when null. */
  setSession(context: ISessionContext | null): void {
    if (context === this._session) {
      return;
    }
    if (this._session !== null) {
      this._session.kernelChanged.disconnect(this._onKernelChanged, this);
      this._session.statusChanged.disconnect(this._onStatusChanged, this);
    }
    this._session = context;
    if (context !== null) {
      context.kernelChanged.connect(this._onKernelChanged, this);
      context.statusChanged.connect(this._onStatusChanged, this);
    }
    this._setKernel(context?.session?.kernel ?? null);
  }

  /** Ask the kernel to cancel whatever slot `slot` is serving. */
  cancel(slot: number): void {
    this._send({ type: 'cancel', slot });
  }

  /** Show the engine called `name`, pinned to it (null: follow the kernel's default). */
  select(name: string | null): void {
    this._send({ type: 'select', name });
  }

  /** Unpin: show the kernel's default engine again, and follow `%nbollama use`. */
  followDefault(): void {
    this.select(null);
  }

  /** Ask the kernel for a snapshot now. */
  refresh(): void {
    this._send({ type: 'refresh' });
  }

  dispose(): void {
    if (this._isDisposed) {
      return;
    }
    this.setSession(null);
    this._isDisposed = true;
    Signal.clearData(this);
  }

  private _onKernelChanged(
    _context: ISessionContext,
    args: { newValue: Kernel.IKernelConnection | null }
  ): void {
    this._setKernel(args.newValue);
  }

  private _onStatusChanged(_context: ISessionContext, status: Kernel.Status): void {
    if (RESTART_STATUSES.has(status)) {
      // The kernel connection drops its comms without calling onClose.
      this._dropComm(false);
      this._awaitingRestart = true;
      this._reset('connecting');
    } else if (status === 'dead' || status === 'terminating') {
      this._dropComm(false);
      this._awaitingRestart = false;
      this._reset('no-kernel');
    } else if ((status === 'idle' || status === 'busy') && this._awaitingRestart) {
      this._awaitingRestart = false;
      this._connect();
    }
  }

  private _setKernel(kernel: Kernel.IKernelConnection | null): void {
    if (kernel === this._kernel && kernel !== null) {
      return;
    }
    this._dropComm(true);
    if (this._kernel !== null && !this._kernel.isDisposed) {
      this._kernel.removeCommTarget(COMM_TARGET, this._onAnnounce);
    }
    this._kernel = kernel;
    this._awaitingRestart = false;
    if (kernel === null) {
      this._reset(this._session === null ? 'no-notebook' : 'no-kernel');
      return;
    }
    kernel.registerCommTarget(COMM_TARGET, this._onAnnounce);
    this._connect();
  }

  /**
   * The kernel opened a comm to us: `%load_ext nbollama` just registered the
   * target. That comm only announces it; we close it and open our own.
   */
  private _onAnnounce = (
    comm: Kernel.IComm,
    _msg: KernelMessage.ICommOpenMsg
  ): void => {
    try {
      comm.close();
    } catch (reason) {
      // Already gone with its kernel connection: nothing to close.
    }
    if (this._phase !== 'connected') {
      this._connect();
    }
  };

  private _connect(): void {
    const kernel = this._kernel;
    this._dropComm(true);
    if (kernel === null || kernel.isDisposed) {
      this._reset(this._session === null ? 'no-notebook' : 'no-kernel');
      return;
    }
    const generation = ++this._generation;
    this._reset('connecting');
    let comm: Kernel.IComm;
    try {
      comm = kernel.createComm(COMM_TARGET);
    } catch (reason) {
      console.warn('nbollama: cannot create a comm', reason);
      this._reset('not-loaded');
      return;
    }
    this._comm = comm;
    comm.onMsg = (msg: KernelMessage.ICommMsgMsg): void => {
      if (generation === this._generation) {
        this._onMessage(msg.content.data);
      }
    };
    comm.onClose = (): void => {
      if (generation === this._generation) {
        // Closed by the kernel: no target (not loaded) or `%unload_ext`.
        this._comm = null;
        this._reset('not-loaded');
      }
    };
    try {
      comm.open({ v: PROTOCOL_VERSION, client: 'jupyterlab' });
    } catch (reason) {
      console.warn('nbollama: cannot open the comm', reason);
      this._comm = null;
      this._reset('not-loaded');
    }
  }

  /** Forget the current comm; close it on the kernel side when asked to. */
  private _dropComm(close: boolean): void {
    const comm = this._comm;
    this._comm = null;
    this._generation += 1;
    if (comm !== null && close && !comm.isDisposed) {
      try {
        comm.close();
      } catch (reason) {
        // The kernel connection is already gone; nothing left to close.
      }
    }
  }

  private _onMessage(data: unknown): void {
    const msg = parseKernelMessage(data);
    if ('invalid' in msg) {
      this._notice = { text: `Ignored a kernel message: ${msg.invalid}`, isError: true };
      this._changed.emit();
      return;
    }
    switch (msg.type) {
      case 'snapshot': {
        this._phase = 'connected';
        const engine = msg.engine;
        const previous = this._snapshot;
        if (engine === null) {
          this._history = [];
        } else {
          const replaced =
            previous === null ||
            engine.seq < previous.seq ||
            engine.model.path !== previous.model.path ||
            engine.parallel !== previous.parallel;
          if (replaced) {
            this._history = [];
          }
          if (replaced || engine.time !== previous?.time) {
            this._history = pushHistory(this._history, engine.throughput);
          }
        }
        this._snapshot = engine;
        break;
      }
      case 'engines':
        this._phase = 'connected';
        this._engines = msg.engines;
        this._defaultName = msg.default;
        this._shown = msg.shown;
        this._pinned = msg.pinned;
        break;
      case 'cancelled':
        this._notice = { text: cancelNotice(msg.slot, msg.request_id), isError: false };
        break;
      case 'error':
        this._notice = { text: `nbollama: ${msg.message}`, isError: true };
        break;
    }
    this._changed.emit();
  }

  private _send(message: PanelMessage): void {
    const comm = this._comm;
    if (comm === null || comm.isDisposed || this._phase !== 'connected') {
      return;
    }
    try {
      comm.send(message);
    } catch (reason) {
      console.warn('nbollama: cannot send to the kernel', reason);
    }
  }

  private _reset(phase: ConnectionPhase): void {
    this._phase = phase;
    this._snapshot = null;
    this._history = [];
    this._notice = null;
    this._engines = [];
    this._defaultName = null;
    this._shown = null;
    this._pinned = null;
    this._changed.emit();
  }

  private _session: ISessionContext | null = null;
  private _kernel: Kernel.IKernelConnection | null = null;
  private _comm: Kernel.IComm | null = null;
  private _generation = 0;
  private _awaitingRestart = false;
  private _phase: ConnectionPhase = 'no-notebook';
  private _snapshot: IEngineSnapshot | null = null;
  private _history: number[] = [];
  private _notice: INotice | null = null;
  private _engines: IEngineEntry[] = [];
  private _defaultName: string | null = null;
  private _shown: string | null = null;
  private _pinned: string | null = null;
  private _isDisposed = false;
  private _changed = new Signal<this, void>(this);
}
