import {
  HISTORY_LENGTH,
  adaptiveView,
  badgeColour,
  cacheTag,
  cancelNotice,
  engineOptionLabel,
  engineView,
  formatBytes,
  formatCount,
  formatRate,
  hintView,
  isEngineSnapshot,
  memoryView,
  parallelText,
  parseKernelMessage,
  pinView,
  prefixCacheText,
  pushHistory,
  remoteView,
  slotRows,
  sparklinePath,
  statusView
} from '../model';

import { GiB, MiB, adaptiveSnapshot, remoteSnapshot, slot, snapshot } from './fixtures';

describe('parseKernelMessage', () => {
  it('accepts a snapshot with an engine', () => {
    const snap = snapshot();
    const msg = parseKernelMessage({ v: 1, type: 'snapshot', engine: snap });
    expect(msg).toEqual({ v: 1, type: 'snapshot', engine: snap });
  });

  it('accepts a snapshot without an engine', () => {
    expect(parseKernelMessage({ v: 1, type: 'snapshot', engine: null })).toEqual({
      v: 1,
      type: 'snapshot',
      engine: null
    });
  });

  it('rejects a malformed engine snapshot', () => {
    const bad = { ...snapshot(), slots: [{ id: 'zero' }] };
    expect(parseKernelMessage({ v: 1, type: 'snapshot', engine: bad })).toEqual({
      invalid: 'malformed engine snapshot'
    });
    expect(isEngineSnapshot({ seq: 1 })).toBe(false);
    expect(isEngineSnapshot(snapshot())).toBe(true);
  });

  it('accepts the list of engines and labels them for the selector', () => {
    const msg = parseKernelMessage({
      v: 1,
      type: 'engines',
      engines: [{ name: 'lab', kind: 'vllm', model: 'm', parallel: 1, kv_type: '' }],
      default: 'lab',
      shown: 'lab'
    });
    expect(msg).toEqual({
      v: 1,
      type: 'engines',
      engines: [{ name: 'lab', kind: 'vllm', model: 'm', parallel: 1, kv_type: '' }],
      default: 'lab',
      shown: 'lab',
      pinned: null // an older kernel says nothing of pins: the view follows the default
    });
    expect(
      parseKernelMessage({ v: 1, type: 'engines', engines: [], default: 'a', shown: 'b', pinned: 'b' })
    ).toHaveProperty('pinned', 'b');
    expect(parseKernelMessage({ v: 1, type: 'engines', engines: 'no' })).toHaveProperty('invalid');
    expect(
      engineOptionLabel({ name: 'wide', kind: 'local', model: 'Gemma', parallel: 8, kv_type: 'q8_0' }, 'small')
    ).toBe('wide · Gemma · 8 slots · q8_0');
    expect(engineOptionLabel({ name: 'lab', kind: 'vllm', model: 'm', parallel: 1, kv_type: '' }, 'lab')).toBe(
      'lab · m · vllm · 1 slot (default)'
    );
  });

  it('says a pinned view is pinned, to what, and what the default is', () => {
    expect(pinView(null, 'wide')).toBeNull();
    const pinned = pinView('small', 'wide');
    expect(pinned?.text).toBe("pinned to 'small'");
    expect(pinned?.follow).toBe('follow the default');
    expect(pinned?.title).toContain("the default is 'wide'");
    expect(pinView('small', 'small')?.title).toContain("'small' is also the default now");
    expect(pinView('small', null)?.title).toContain('no default engine');
  });

  it('rejects other protocol versions, unknown types and non-objects', () => {
    expect(parseKernelMessage({ v: 2, type: 'snapshot', engine: null })).toHaveProperty(
      'invalid'
    );
    expect(parseKernelMessage({ v: 1, type: 'bogus' })).toEqual({
      invalid: 'unknown message type "bogus"'
    });
    expect(parseKernelMessage('snapshot')).toHaveProperty('invalid');
    expect(parseKernelMessage(null)).toHaveProperty('invalid');
    expect(parseKernelMessage([1, 2])).toHaveProperty('invalid');
  });

  it('reads cancelled and error messages', () => {
    expect(parseKernelMessage({ v: 1, type: 'cancelled', slot: 2, request_id: 9 })).toEqual(
      { v: 1, type: 'cancelled', slot: 2, request_id: 9 }
    );
    expect(
      parseKernelMessage({ v: 1, type: 'cancelled', slot: 1, request_id: null })
    ).toEqual({ v: 1, type: 'cancelled', slot: 1, request_id: null });
    expect(parseKernelMessage({ v: 1, type: 'cancelled' })).toHaveProperty('invalid');
    expect(parseKernelMessage({ v: 1, type: 'error', message: 'bad slot' })).toEqual({
      v: 1,
      type: 'error',
      message: 'bad slot'
    });
  });
});

describe('formatting', () => {
  it('formats bytes in binary units', () => {
    expect(formatBytes(0)).toBe('0 B');
    expect(formatBytes(-5)).toBe('0 B');
    expect(formatBytes(512)).toBe('512 B');
    expect(formatBytes(1536)).toBe('1.50 KiB');
    expect(formatBytes(144 * MiB)).toBe('144 MiB');
    expect(formatBytes(1.5 * GiB)).toBe('1.50 GiB');
    expect(formatBytes(80 * GiB)).toBe('80.0 GiB');
  });

  it('formats rates and counts', () => {
    expect(formatRate(0)).toBe('0 tok/s');
    expect(formatRate(Number.NaN)).toBe('0 tok/s');
    expect(formatRate(3.44)).toBe('3.4 tok/s');
    expect(formatRate(95.4)).toBe('95 tok/s');
    expect(formatCount(1234567)).toBe('1,234,567');
    expect(formatCount(12)).toBe('12');
  });
});

describe('slotRows', () => {
  it('makes one row per slot in slot order with state colours', () => {
    const snap = snapshot({
      slots: [
        slot(2, {
          state: 'generating',
          badge: 'generating',
          request_id: 5,
          prompt_preview: 'Write a haiku',
          prompt_tokens: 10,
          prefilled_tokens: 10,
          decoded_tokens: 12,
          max_tokens: 48,
          tps: 31.2
        }),
        slot(0, {
          state: 'prefill',
          badge: 'prefill',
          request_id: 6,
          prompt_preview: 'Tell me',
          prompt_tokens: 40,
          prefilled_tokens: 10,
          max_tokens: 48
        }),
        slot(1, {
          badge: 'cancelled',
          request_id: 3,
          prompt_preview: 'old prompt',
          decoded_tokens: 7,
          max_tokens: 400,
          tps: 20
        }),
        slot(3)
      ]
    });
    const rows = slotRows(snap);
    expect(rows.map(r => r.slot)).toEqual([0, 1, 2, 3]);

    expect(rows[0].progressText).toBe('prefill 10/40');
    expect(rows[0].progress).toBeCloseTo(0.25);
    expect(rows[0].badgeColour).toBe(badgeColour('prefill'));
    expect(rows[0].cancellable).toBe(true);

    expect(rows[1].badge).toBe('cancelled');
    expect(rows[1].state).toBe('idle');
    expect(rows[1].cancellable).toBe(false);
    expect(rows[1].preview).toBe('old prompt');
    expect(rows[1].progressText).toBe('7/400');

    expect(rows[2].progressText).toBe('12/48');
    expect(rows[2].progress).toBeCloseTo(0.25);
    expect(rows[2].tpsText).toBe('31 tok/s');
    expect(rows[2].badgeColour).toContain('--jp-brand-color1');

    expect(rows[3]).toMatchObject({
      preview: '',
      progressText: '',
      progress: 0,
      tpsText: '',
      cancellable: false
    });
  });

  it('gives every badge its own colour', () => {
    const badges = ['idle', 'prefill', 'generating', 'done', 'cancelled', 'error'];
    const colours = new Set(badges.map(badgeColour));
    expect(colours.size).toBe(badges.length);
    expect(badgeColour('error')).toContain('--jp-error-color1');
  });
});

describe('memoryView', () => {
  it('shows process RSS against host RAM without NVML', () => {
    const view = memoryView(snapshot());
    expect(view.source).toBe('host');
    expect(view.fraction).toBeCloseTo(2 / 16);
    expect(view.kvFraction).toBeCloseTo(144 / (16 * 1024));
    expect(view.text).toBe('2.00 GiB / 16.0 GiB');
    expect(view.kvText).toBe('KV cache 144 MiB');
  });

  it('names the KV cache type when the kernel says it', () => {
    const base = snapshot();
    const view = memoryView({ ...base, memory: { ...base.memory, kv_type: 'q8_0' } });
    expect(view.kvText).toBe('KV cache 144 MiB · q8_0');
  });

  it('shows GPU 0 VRAM when the source is nvml', () => {
    const base = snapshot();
    const view = memoryView({
      ...base,
      memory: {
        ...base.memory,
        source: 'nvml',
        gpus: [
          {
            index: 1,
            name: 'other',
            total: 40 * GiB,
            used: 1 * GiB,
            free: 39 * GiB,
            process_used: null
          },
          {
            index: 0,
            name: 'NVIDIA H100',
            total: 80 * GiB,
            used: 20 * GiB,
            free: 60 * GiB,
            process_used: 19 * GiB
          }
        ]
      }
    });
    expect(view.label).toContain('NVIDIA H100');
    expect(view.fraction).toBeCloseTo(0.25);
    expect(view.text).toBe('20.0 GiB / 80.0 GiB');
  });

  it('keeps the KV part inside the used part and survives a zero total', () => {
    const base = snapshot();
    const view = memoryView({
      ...base,
      memory: { ...base.memory, process_rss: 1 * MiB, kv_bytes: 1 * GiB }
    });
    expect(view.kvFraction).toBeLessThanOrEqual(view.fraction);
    const empty = memoryView({ ...base, memory: { ...base.memory, host_total: 0 } });
    expect(empty.fraction).toBe(0);
    expect(empty.kvFraction).toBe(0);
  });
});

describe('sparkline', () => {
  it('keeps at most HISTORY_LENGTH samples, newest last', () => {
    let history: number[] = [];
    for (let i = 0; i < HISTORY_LENGTH + 5; i++) {
      history = pushHistory(history, i);
    }
    expect(history).toHaveLength(HISTORY_LENGTH);
    expect(history[0]).toBe(5);
    expect(history[history.length - 1]).toBe(HISTORY_LENGTH + 4);
    expect(pushHistory([], Number.NaN)).toEqual([0]);
  });

  it('draws values left to right with the maximum at the top', () => {
    expect(sparklinePath([], 100, 10)).toBe('');
    expect(sparklinePath([5], 100, 10)).toBe('M0,0 L100,0');
    expect(sparklinePath([0, 5, 10], 100, 10)).toBe('M0,10 L50,5 L100,0');
    expect(sparklinePath([0, 0], 100, 10)).toBe('M0,10 L100,10');
  });
});

describe('statusView', () => {
  it('is hidden unless the kernel answers', () => {
    for (const phase of ['no-notebook', 'no-kernel', 'connecting', 'not-loaded'] as const) {
      expect(statusView(phase, snapshot()).visible).toBe(false);
    }
  });

  it('says idle, busy with throughput, or no model', () => {
    expect(statusView('connected', null)).toEqual({
      visible: true,
      text: 'nbollama: no model',
      busy: false
    });
    expect(statusView('connected', snapshot()).text).toBe('nbollama idle');
    const busy = statusView(
      'connected',
      snapshot({ busy_slots: 3, throughput: 95.2, queue: { length: 2, max: 0 } })
    );
    expect(busy).toEqual({
      visible: true,
      text: 'nbollama 3/4 busy · 95 tok/s · 2 queued',
      busy: true
    });
    expect(statusView('connected', snapshot({ closed: true })).text).toBe(
      'nbollama: engine closed'
    );
  });
});

describe('hintView and engineView', () => {
  it('tells the user what to run', () => {
    expect(hintView('not-loaded', null)?.code).toBe('%load_ext nbollama');
    expect(hintView('connected', null)?.code).toBe('%nbollama load');
    expect(hintView('no-notebook', null)?.text).toMatch(/Open a notebook/);
    expect(hintView('connected', snapshot())).toBeNull();
  });

  it('summarises the engine', () => {
    const snap = snapshot({
      queue: { length: 3, max: 0 },
      throughput: 12.5,
      totals: {
        submitted: 10,
        completed: 6,
        cancelled: 1,
        errors: 0,
        prompt_tokens: 100,
        generated_tokens: 1234
      }
    });
    const view = engineView(snap, [1, 2, 3]);
    expect(view.model).toBe('gemma-3-270m-it-Q4_K_M');
    expect(view.meta).toBe('parallel 4 · ctx 2,048/slot');
    expect(view.rows).toHaveLength(4);
    expect(view.queueText).toBe('3 queued');
    expect(view.throughputText).toBe('13 tok/s');
    expect(view.totalTokens).toBe(1234);
    expect(view.totalTokensText).toBe('1,234 tokens generated');
    expect(view.sparkline.startsWith('M0,')).toBe(true);
  });

  it('words cancel answers', () => {
    expect(cancelNotice(2, 17)).toBe('Cancelled request 17 on slot 2.');
    expect(cancelNotice(1, null)).toBe('Slot 1 was idle: nothing to cancel.');
  });
});

describe('a remote engine', () => {
  const busy = remoteSnapshot({
    busy_slots: 2,
    slots: [
      slot(0, {
        state: 'generating',
        badge: 'generating',
        request_id: 4,
        prompt_preview: 'Mine',
        prompt_tokens: 5,
        prefilled_tokens: 5,
        decoded_tokens: 10,
        max_tokens: 64,
        tps: 12,
        origin: 'this kernel'
      }),
      slot(1, {
        state: 'generating',
        badge: 'generating',
        request_id: null,
        prompt_tokens: 9,
        prefilled_tokens: 9,
        decoded_tokens: 3,
        max_tokens: null,
        tps: null,
        kv_used: null,
        origin: 'another client'
      }),
      slot(2, {
        state: 'prefill',
        badge: 'prefill',
        request_id: 5,
        prompt_preview: 'Also mine',
        prompt_tokens: null,
        prefilled_tokens: null,
        origin: 'this kernel'
      }),
      slot(3, { prompt_tokens: null, prefilled_tokens: null, max_tokens: null, tps: null, kv_used: null })
    ]
  });

  it('is a valid snapshot with nulls where the server gives no figure', () => {
    expect(isEngineSnapshot(busy)).toBe(true);
    expect(parseKernelMessage({ v: 1, type: 'snapshot', engine: busy })).toEqual({
      v: 1,
      type: 'snapshot',
      engine: busy
    });
    const broken = remoteSnapshot({}, { in_flight: 'two' as unknown as number });
    expect(isEngineSnapshot(broken)).toBe(false);
  });

  it('shows unknown figures as "?" and another client as such, not cancellable', () => {
    const rows = slotRows(busy);
    expect(rows[0]).toMatchObject({ origin: 'this kernel', cancellable: true, progressText: '10/64' });
    expect(rows[1]).toMatchObject({
      origin: 'another client',
      cancellable: false,
      preview: 'another client',
      progressText: '3/?',
      progress: 0,
      tpsText: '? tok/s'
    });
    expect(rows[2]).toMatchObject({ progressText: 'prefill ?/?', progress: 0, cancellable: true });
    expect(rows[3]).toMatchObject({ preview: '', progressText: '', tpsText: '', cancellable: false });
  });

  it('says where the server is and what it reports', () => {
    const view = engineView(busy, []);
    expect(view.meta).toBe('llama-server · server parallel 4 · ctx 512');
    expect(view.remote).toEqual({
      kind: 'llama-server',
      endpoint: 'http://gpu-box:8080',
      client: 'this kernel: 1/4 in flight · 2 waiting',
      server: 'server: 2 running, 0 waiting · 41 tok/s',
      parallelSource: 'total_slots from /props, llama-server -np',
      error: null
    });
    const ollama = remoteSnapshot(
      { kind: 'ollama', ctx_per_slot: null },
      { server_parallel: null, server_running: null, server_waiting: null, server_throughput: null, reachable: false, error: 'connection refused' }
    );
    expect(engineView(ollama, []).meta).toBe('ollama · server parallel ? · ctx ?');
    expect(remoteView(ollama)?.server).toBe('server: ? running, ? waiting');
    expect(remoteView(ollama)?.error).toBe('server unreachable: connection refused');
    expect(remoteView(snapshot())).toBeNull();
  });

  it('shows server memory as unknown unless the server, or this machine, tells', () => {
    const unknown = memoryView(busy);
    expect(unknown).toMatchObject({
      source: 'remote',
      label: 'Server memory',
      text: 'unknown (the server does not report it)',
      kvText: 'KV cache 2,048 tokens',
      fraction: 0,
      kvFraction: 0
    });
    const ollama = memoryView(
      remoteSnapshot(
        { kv: { used: null, total: null, bytes: null } },
        {
          models: [
            { name: 'llama3.2:latest', size: 3 * GiB, size_vram: 3 * GiB, context_length: 4096, expires_at: null }
          ]
        }
      )
    );
    expect(ollama.text).toBe('llama3.2:latest: 3.00 GiB (VRAM 3.00 GiB)');
    expect(ollama.kvText).toBe('KV cache unknown');
    const vllm = memoryView(
      remoteSnapshot({ kv: { used: 8192, total: 32768, bytes: null } }, { kv_usage: 0.25 })
    );
    expect(vllm.kvText).toBe('KV cache 25% in use of 32,768 tokens');
    const base = remoteSnapshot();
    const here = memoryView({
      ...base,
      memory: {
        ...base.memory,
        gpus: [{ index: 0, name: 'NVIDIA L4', total: 24 * GiB, used: 6 * GiB, free: 18 * GiB, process_used: null }]
      }
    });
    expect(here.label).toContain("this machine (the server's host)");
    expect(here.fraction).toBeCloseTo(0.25);
  });

  it('gives the sent badge its own colour', () => {
    expect(badgeColour('sent')).not.toBe(badgeColour('idle'));
  });
});

describe('adaptive parallelism', () => {
  it('shows "parallel 6 of 16", the target and the reason of the last change', () => {
    const snap = adaptiveSnapshot();
    expect(isEngineSnapshot(snap)).toBe(true);
    expect(parallelText(snap)).toBe('parallel 6 of 16');
    const view = engineView(snap, []);
    expect(view.meta).toBe('parallel 6 of 16 · ctx 512/slot');
    expect(view.rows).toHaveLength(16);
    expect(view.adaptive).toMatchObject({
      text: 'adaptive · min_tps=15',
      lastChange: 'parallel=6 of 16: per-request 15.2 tok/s at 8, floor 15',
      changes: 2
    });
    expect(view.adaptive?.title).toContain('min_tps=15');
    // the tooltip lists every change, oldest first, one a line
    const lines = view.adaptive?.historyText.split('\n') ?? [];
    expect(lines).toHaveLength(2);
    expect(lines[0]).toMatch(/^\d\d:\d\d:\d\d parallel=8 of 16: .*more demand$/);
    expect(lines[1]).toMatch(/parallel=6 of 16: per-request 15\.2 tok\/s at 8, floor 15$/);
  });

  it('says "of N" at every active count once adaptive, and the starting reason before any change', () => {
    const full = adaptiveSnapshot({ parallel: 16 }, { history: [] });
    expect(parallelText(full)).toBe('parallel 16 of 16');
    expect(adaptiveView(full)).toMatchObject({
      lastChange: 'parallel=6 of 16: per-request 15.2 tok/s at 8, floor 15',
      changes: 0,
      historyText: ''
    });
    // fewer slots in use than reserved reads "of N" even without the adaptive block
    expect(parallelText(snapshot({ parallel: 2, parallel_max: 4 }))).toBe('parallel 2 of 4');
  });

  it('keeps the plain wording for a fixed parallel and for older kernels', () => {
    expect(parallelText(snapshot())).toBe('parallel 4');
    expect(adaptiveView(snapshot())).toBeNull();
    const old = snapshot();
    delete old.parallel_max;
    delete old.adaptive;
    delete old.reproducible;
    delete old.prefix_cache;
    expect(isEngineSnapshot(old)).toBe(true);
    const view = engineView(old, []);
    expect(view.meta).toBe('parallel 4 · ctx 2,048/slot');
    expect(view).toMatchObject({ adaptive: null, reproducible: false, prefixCache: null });
  });

  it('rejects a malformed adaptive block', () => {
    const bad = adaptiveSnapshot({}, { history: [{ time: 1, parallel: 'six', reason: 'x' }] as never });
    expect(isEngineSnapshot(bad)).toBe(false);
    expect(isEngineSnapshot(snapshot({ parallel_max: 'x' as unknown as number }))).toBe(false);
  });
});

describe('reproducible mode', () => {
  it('is shown when the snapshot says so', () => {
    expect(engineView(snapshot({ reproducible: true }), []).reproducible).toBe(true);
    expect(engineView(snapshot(), []).reproducible).toBe(false);
    expect(engineView(remoteSnapshot(), []).reproducible).toBe(false);
  });
});

describe('prefix cache', () => {
  it('tags a slot that reused cached prompt tokens, compactly', () => {
    const snap = snapshot({
      slots: [
        slot(0, {
          state: 'generating',
          badge: 'generating',
          request_id: 3,
          prompt_preview: 'You are a tutor. Question 1',
          prompt_tokens: 412,
          prefilled_tokens: 412,
          cached_tokens: 380,
          decoded_tokens: 4,
          max_tokens: 32,
          tps: 20
        }),
        slot(1, {
          state: 'prefill',
          badge: 'prefill',
          request_id: 4,
          prompt_preview: 'New prompt',
          prompt_tokens: 1200,
          prefilled_tokens: 64,
          cached_tokens: 0,
          max_tokens: 32
        }),
        slot(2, { badge: 'done', request_id: 2, prompt_preview: 'x', prompt_tokens: 2048, cached_tokens: 1500, decoded_tokens: 8, max_tokens: 8 }),
        // idle: it keeps its cached prefix, but no request shows a hit
        slot(3, { request_id: 1, prompt_tokens: 400, cached_tokens: 380 })
      ]
    });
    const rows = slotRows(snap);
    expect(rows[0].cacheText).toBe('cached 380/412');
    expect(rows[0].cacheTitle).toBe('380 of 412 prompt tokens reused from the prefix cache (not computed again)');
    expect(rows[1].cacheText).toBe('');
    expect(rows[2].cacheText).toBe('cached 1,500/2,048');
    expect(rows[3].cacheText).toBe('');
  });

  it('reads unknown remote figures as "?" and never crashes on them', () => {
    expect(
      cacheTag(slot(0, { state: 'generating', badge: 'generating', cached_tokens: 12, prompt_tokens: null })).text
    ).toBe('cached 12/?');
    expect(cacheTag(slot(0, { state: 'generating', badge: 'generating', cached_tokens: null })).text).toBe('');
    const noField = slot(0, { state: 'generating', badge: 'generating' });
    delete noField.cached_tokens;
    expect(cacheTag(noField).text).toBe('');
    // another client's request on a shared server: not this kernel's cache figures
    const shared = remoteSnapshot({
      slots: [slot(0, { state: 'generating', badge: 'generating', cached_tokens: 50, prompt_tokens: 60, origin: 'another client' })]
    });
    expect(slotRows(shared)[0].cacheText).toBe('');
  });

  it('gives the hit rate, the tokens reused and the shared prefills; "off" when disabled', () => {
    const base = snapshot();
    const warm = snapshot({
      prefix_cache: { enabled: true, hit_rate: 0.4234, shared_prefills: 3 },
      totals: { ...base.totals, prompt_tokens: 2914, cached_tokens: 1234 }
    });
    expect(prefixCacheText(warm)).toBe('prefix cache 42% hit · 1,234 tokens reused · 3 shared prefills');
    expect(engineView(warm, []).prefixCache).toBe(prefixCacheText(warm));
    expect(prefixCacheText(snapshot({ prefix_cache: { enabled: true, hit_rate: 0, shared_prefills: 1 } }))).toBe(
      'prefix cache 0% hit · 1 shared prefill'
    );
    expect(prefixCacheText(snapshot({ prefix_cache: { enabled: false, hit_rate: 0, shared_prefills: 0 } }))).toBe(
      'prefix cache off'
    );
    const kept = snapshot({
      prefix_cache: { enabled: true, hit_rate: 0.97, shared_prefills: 7, ram_prompts: 17, ram_bytes: 87_451_238 }
    });
    expect(prefixCacheText(kept)).toBe('prefix cache 97% hit · 7 shared prefills · 17 prompts in RAM (83.4 MiB)');
    const none = snapshot({ prefix_cache: { enabled: true, hit_rate: 0, shared_prefills: 0, ram_prompts: 0, ram_bytes: 0 } });
    expect(prefixCacheText(none)).toBe('prefix cache 0% hit · 0 shared prefills');
  });

  it('says "?" for what a remote server does not tell', () => {
    expect(prefixCacheText(remoteSnapshot())).toBe('prefix cache ?');
    const llamaServer = remoteSnapshot({ prefix_cache: { enabled: true, hit_rate: 0.5, shared_prefills: null } });
    expect(prefixCacheText(llamaServer)).toBe('prefix cache 50% hit · shared prefills ?');
    expect(prefixCacheText(snapshot({ prefix_cache: { enabled: true, hit_rate: null, shared_prefills: null } }))).toBe(
      'prefix cache ? hit · shared prefills ?'
    );
    // the remote view keeps its own wording for parallel
    expect(engineView(remoteSnapshot(), []).meta).toBe('llama-server · server parallel 4 · ctx 512');
    expect(engineView(remoteSnapshot(), []).adaptive).toBeNull();
  });

  it('accepts the kernel message with these parts', () => {
    const snap = adaptiveSnapshot({ reproducible: true, prefix_cache: { enabled: true, hit_rate: 0.1, shared_prefills: 2 } });
    expect(parseKernelMessage({ v: 1, type: 'snapshot', engine: snap })).toEqual({ v: 1, type: 'snapshot', engine: snap });
    const withRam = snapshot({ prefix_cache: { enabled: true, hit_rate: 0.1, shared_prefills: 2, ram_prompts: 3, ram_bytes: 1024 } });
    expect(parseKernelMessage({ v: 1, type: 'snapshot', engine: withRam })).toEqual({ v: 1, type: 'snapshot', engine: withRam });
    const badRam = snapshot({ prefix_cache: { enabled: true, hit_rate: 0.1, shared_prefills: 2, ram_prompts: '3' } as never });
    expect(parseKernelMessage({ v: 1, type: 'snapshot', engine: badRam })).toEqual({ invalid: 'malformed engine snapshot' });
    const bad = snapshot({ prefix_cache: { enabled: 'yes' } as never });
    expect(parseKernelMessage({ v: 1, type: 'snapshot', engine: bad })).toEqual({ invalid: 'malformed engine snapshot' });
  });
});
