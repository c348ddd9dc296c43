import { ISessionContext } from '@jupyterlab/apputils';
import { Signal } from '@lumino/signaling';

import { COMM_TARGET, KernelLink } from '../connection';
import { IEngineSnapshot } from '../model';
import { snapshot } from './fixtures';

/** A comm that records what the link does with it. */
class FakeComm {
  constructor(readonly targetName: string) {}
  opened: unknown[] = [];
  sent: unknown[] = [];
  closed = false;
  isDisposed = false;
  onMsg: (msg: any) => void = () => undefined;
  onClose: (msg: any) => void = () => undefined;

  open(data: unknown): void {
    this.opened.push(data);
  }
  send(data: unknown): void {
    this.sent.push(data);
  }
  close(): void {
    this.closed = true;
    this.isDisposed = true;
    this.onClose({});
  }

  // the kernel's side
  receive(data: unknown): void {
    this.onMsg({ content: { comm_id: 'x', data } });
  }
  closeFromKernel(): void {
    this.isDisposed = true;
    this.onClose({});
  }
}

class FakeKernel {
  comms: FakeComm[] = [];
  targets = new Map<string, (comm: any, msg: any) => void>();
  isDisposed = false;

  createComm(targetName: string): FakeComm {
    const comm = new FakeComm(targetName);
    this.comms.push(comm);
    return comm;
  }
  registerCommTarget(name: string, cb: (comm: any, msg: any) => void): void {
    this.targets.set(name, cb);
  }
  removeCommTarget(name: string, cb: (comm: any, msg: any) => void): void {
    if (this.targets.get(name) === cb) {
      this.targets.delete(name);
    }
  }
  get lastComm(): FakeComm {
    return this.comms[this.comms.length - 1];
  }
  /** The kernel opens a comm to the frontend, as `register()` announces itself. */
  announce(): FakeComm {
    const comm = new FakeComm(COMM_TARGET);
    this.targets.get(COMM_TARGET)?.(comm, { content: { data: { v: 1, type: 'hello' } } });
    return comm;
  }
}

class FakeSession {
  kernelChanged = new Signal<this, { newValue: FakeKernel | null }>(this);
  statusChanged = new Signal<this, string>(this);
  session: { kernel: FakeKernel | null };

  constructor(kernel: FakeKernel | null) {
    this.session = { kernel };
  }
  changeKernel(kernel: FakeKernel | null): void {
    this.session = { kernel };
    this.kernelChanged.emit({ newValue: kernel });
  }
  asContext(): ISessionContext {
    return this as unknown as ISessionContext;
  }
}

function engine(seq: number, time: number, throughput = 10): IEngineSnapshot {
  return snapshot({ seq, time, throughput });
}

function snapshotMsg(snap: IEngineSnapshot | null): unknown {
  return { v: 1, type: 'snapshot', engine: snap };
}

describe('KernelLink', () => {
  it('says why it has nothing to show', () => {
    const link = new KernelLink();
    expect(link.state.phase).toBe('no-notebook');
    const session = new FakeSession(null);
    link.setSession(session.asContext());
    expect(link.state.phase).toBe('no-kernel');
    link.setSession(null);
    expect(link.state.phase).toBe('no-notebook');
  });

  it('opens a comm on the kernel and goes live on the first snapshot', () => {
    const kernel = new FakeKernel();
    const link = new KernelLink();
    let changes = 0;
    link.changed.connect(() => (changes += 1));
    link.setSession(new FakeSession(kernel).asContext());

    expect(kernel.comms).toHaveLength(1);
    expect(kernel.lastComm.targetName).toBe('nbollama');
    expect(kernel.lastComm.opened).toEqual([{ v: 1, client: 'jupyterlab' }]);
    expect(kernel.targets.has('nbollama')).toBe(true);
    expect(link.state.phase).toBe('connecting');

    kernel.lastComm.receive(snapshotMsg(null));
    expect(link.state.phase).toBe('connected');
    expect(link.state.snapshot).toBeNull();

    kernel.lastComm.receive(snapshotMsg(engine(1, 100)));
    expect(link.state.snapshot?.seq).toBe(1);
    expect(link.state.history).toEqual([10]);
    expect(changes).toBeGreaterThanOrEqual(3);
  });

  it('keeps one sparkline sample per snapshot time and restarts it for a new engine', () => {
    const kernel = new FakeKernel();
    const link = new KernelLink();
    link.setSession(new FakeSession(kernel).asContext());
    const comm = kernel.lastComm;
    comm.receive(snapshotMsg(engine(1, 100, 5)));
    comm.receive(snapshotMsg(engine(2, 101, 7)));
    comm.receive(snapshotMsg(engine(3, 101, 7)));
    expect(link.state.history).toEqual([5, 7]);
    comm.receive(snapshotMsg(engine(1, 102, 3))); // seq went back: another engine
    expect(link.state.history).toEqual([3]);
    comm.receive(snapshotMsg(null));
    expect(link.state.history).toEqual([]);
  });

  it('shows "not loaded" when the kernel closes the comm, and reconnects on the announcement', () => {
    const kernel = new FakeKernel();
    const link = new KernelLink();
    link.setSession(new FakeSession(kernel).asContext());
    const first = kernel.lastComm;
    first.closeFromKernel();
    expect(link.state.phase).toBe('not-loaded');

    const hello = kernel.announce();
    expect(hello.closed).toBe(true);
    expect(kernel.comms).toHaveLength(2);
    expect(link.state.phase).toBe('connecting');

    // the first comm's late messages are ignored
    first.receive(snapshotMsg(engine(9, 1)));
    expect(link.state.phase).toBe('connecting');
    kernel.lastComm.receive(snapshotMsg(null));
    expect(link.state.phase).toBe('connected');

    // announcing again while connected does not reconnect
    kernel.announce();
    expect(kernel.comms).toHaveLength(2);
  });

  it('sends cancel and refresh only while connected, and reports the answers', () => {
    const kernel = new FakeKernel();
    const link = new KernelLink();
    link.setSession(new FakeSession(kernel).asContext());
    const comm = kernel.lastComm;
    link.cancel(0);
    expect(comm.sent).toEqual([]);

    comm.receive(snapshotMsg(engine(1, 1)));
    link.cancel(1);
    link.refresh();
    expect(comm.sent).toEqual([{ type: 'cancel', slot: 1 }, { type: 'refresh' }]);

    comm.receive({ v: 1, type: 'cancelled', slot: 1, request_id: 42 });
    expect(link.state.notice).toEqual({
      text: 'Cancelled request 42 on slot 1.',
      isError: false
    });
    comm.receive({ v: 1, type: 'error', message: 'slot 7 does not exist' });
    expect(link.state.notice).toEqual({
      text: 'nbollama: slot 7 does not exist',
      isError: true
    });
    comm.receive({ v: 3, type: 'snapshot', engine: null });
    expect(link.state.notice?.isError).toBe(true);
    expect(link.state.snapshot?.seq).toBe(1);
  });

  it('keeps the engines of the kernel and asks for the one to show', () => {
    const kernel = new FakeKernel();
    const link = new KernelLink();
    link.setSession(new FakeSession(kernel).asContext());
    const comm = kernel.lastComm;
    comm.receive(snapshotMsg(engine(1, 1)));
    const engines = [
      { name: 'small', kind: 'local', model: 'Gemma 3 270m', parallel: 2, kv_type: 'f16' },
      { name: 'wide', kind: 'local', model: 'Gemma 3 270m', parallel: 8, kv_type: 'q8_0' }
    ];
    comm.receive({ v: 1, type: 'engines', engines, default: 'small', shown: 'small' });
    expect(link.state.engines).toEqual(engines);
    expect(link.state.defaultName).toBe('small');
    expect(link.state.shown).toBe('small');
    expect(link.state.pinned).toBeNull();
    link.select('wide');
    expect(comm.sent).toEqual([{ type: 'select', name: 'wide' }]);
    comm.receive({ v: 1, type: 'engines', engines, default: 'small', shown: 'wide', pinned: 'wide' });
    expect(link.state.pinned).toBe('wide');
    link.followDefault(); // the panel's "follow the default"
    expect(comm.sent[1]).toEqual({ type: 'select', name: null });
    comm.receive({ v: 1, type: 'engines', engines, default: 'small', shown: 'small', pinned: null });
    expect(link.state.pinned).toBeNull();
    comm.receive({ v: 1, type: 'engines', engines: [{ name: 'oops' }, 3], default: null, shown: null });
    expect(link.state.notice?.isError).toBe(true);
    expect(link.state.engines).toEqual(engines);
  });

  it('reconnects after a kernel restart', () => {
    const kernel = new FakeKernel();
    const session = new FakeSession(kernel);
    const link = new KernelLink();
    link.setSession(session.asContext());
    kernel.lastComm.receive(snapshotMsg(engine(1, 1)));

    session.statusChanged.emit('restarting');
    expect(link.state.phase).toBe('connecting');
    expect(link.state.snapshot).toBeNull();
    session.statusChanged.emit('starting');
    expect(kernel.comms).toHaveLength(1);
    session.statusChanged.emit('idle');
    expect(kernel.comms).toHaveLength(2);
    session.statusChanged.emit('idle');
    expect(kernel.comms).toHaveLength(2);
    kernel.lastComm.closeFromKernel();
    expect(link.state.phase).toBe('not-loaded');

    session.statusChanged.emit('dead');
    expect(link.state.phase).toBe('no-kernel');
  });

  it('follows a kernel change and a notebook switch', () => {
    const first = new FakeKernel();
    const second = new FakeKernel();
    const session = new FakeSession(first);
    const link = new KernelLink();
    link.setSession(session.asContext());
    const comm = first.lastComm;

    session.changeKernel(second);
    expect(comm.closed).toBe(true);
    expect(first.targets.has('nbollama')).toBe(false);
    expect(second.comms).toHaveLength(1);
    expect(second.targets.has('nbollama')).toBe(true);

    const other = new FakeSession(new FakeKernel());
    link.setSession(other.asContext());
    expect(second.lastComm.closed).toBe(true);
    // the old session's signals no longer reach the link
    const ignored = new FakeKernel();
    session.changeKernel(ignored);
    expect(ignored.comms).toHaveLength(0);
    expect(other.session.kernel?.comms).toHaveLength(1);
    link.dispose();
    expect(link.isDisposed).toBe(true);
  });
});
