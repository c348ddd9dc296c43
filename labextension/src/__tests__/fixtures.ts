/** Snapshots shaped like the kernel's (nbollama/_core/_snapshot.py), for the specs. */
import {
  IAdaptiveFigures,
  IEngineSnapshot,
  IRemoteFigures,
  ISlotSnapshot
} from '../model';

export const GiB = 1024 ** 3;
export const MiB = 1024 ** 2;

export function slot(id: number, extra: Partial<ISlotSnapshot> = {}): ISlotSnapshot {
  return {
    id,
    state: 'idle',
    badge: 'idle',
    request_id: null,
    prompt_preview: '',
    prompt_tokens: 0,
    prefilled_tokens: 0,
    cached_tokens: 0,
    decoded_tokens: 0,
    max_tokens: 0,
    tps: 0,
    kv_used: 0,
    ...extra
  };
}

export function snapshot(extra: Partial<IEngineSnapshot> = {}): IEngineSnapshot {
  return {
    v: 1,
    time: 1700000000,
    seq: 7,
    closed: false,
    model: {
      name: 'gemma-3-270m-it-Q4_K_M',
      path: '/x/model.gguf',
      arch: 'gemma3',
      size_bytes: 253 * MiB,
      n_params: 268000000
    },
    parallel: 4,
    parallel_max: 4,
    reproducible: false,
    ctx_per_slot: 2048,
    n_batch: 512,
    gpu_layers: 0,
    parallel_reason: 'asked for 4',
    slots: [slot(0), slot(1), slot(2), slot(3)],
    queue: { length: 0, max: 0 },
    throughput: 0,
    throughput_window: 5,
    busy_slots: 0,
    kv: { used: 0, total: 8192, bytes: 144 * MiB },
    memory: {
      source: 'host',
      process_rss: 2 * GiB,
      process_pss: null,
      host_total: 16 * GiB,
      host_available: 10 * GiB,
      gpus: [],
      kv_bytes: 144 * MiB,
      kv_estimate: '4 slots x 2048 ctx x 18.0 KiB/token = 144 MiB',
      note: 'no GPU'
    },
    totals: {
      submitted: 0,
      completed: 0,
      cancelled: 0,
      errors: 0,
      prompt_tokens: 0,
      generated_tokens: 0,
      cached_tokens: 0
    },
    recent: [],
    prefix_cache: { enabled: true, hit_rate: 0, shared_prefills: 0 },
    adaptive: null,
    ...extra
  };
}

/**
 * An adaptive engine (`parallel="adaptive"`, 16 slots reserved, 6 in use) that
 * changed its parallel twice, the last time down to 6.
 */
export function adaptiveSnapshot(
  extra: Partial<IEngineSnapshot> = {},
  adaptive: Partial<IAdaptiveFigures> = {}
): IEngineSnapshot {
  const slots = Array.from({ length: 16 }, (_, i) => slot(i));
  return snapshot({
    parallel: 6,
    parallel_max: 16,
    parallel_reason: 'parallel=6 of 16: per-request 15.2 tok/s at 8, floor 15',
    slots,
    kv: { used: 0, total: 16 * 512, bytes: 288 * MiB },
    ctx_per_slot: 512,
    adaptive: {
      target: 'min_tps=15',
      history: [
        { time: 1700000000, parallel: 8, reason: 'parallel=8 of 16: per-request 40.1 tok/s at 4, floor 15, more demand' },
        { time: 1700000012, parallel: 6, reason: 'parallel=6 of 16: per-request 15.2 tok/s at 8, floor 15' }
      ],
      ...adaptive
    },
    ...extra
  });
}

/** A remote engine's snapshot (a llama-server with 4 slots): unknown figures are null. */
export function remoteSnapshot(
  extra: Partial<IEngineSnapshot> = {},
  remote: Partial<IRemoteFigures> = {}
): IEngineSnapshot {
  const base = snapshot();
  return {
    ...base,
    kind: 'llama-server',
    endpoint: 'http://gpu-box:8080',
    model: { name: 'gemma-3-270m-q4_k_m', path: '/m.gguf', arch: '', size_bytes: null, n_params: null },
    ctx_per_slot: 512,
    n_batch: null,
    gpu_layers: null,
    parallel_reason: "the server's slots",
    prefix_cache: { enabled: null, hit_rate: 0, shared_prefills: null },
    kv: { used: null, total: 2048, bytes: null },
    memory: {
      source: 'remote',
      process_rss: null,
      process_pss: null,
      host_total: null,
      host_available: null,
      gpus: [],
      kv_bytes: null,
      kv_estimate: '',
      note: "the server's memory is not visible from this kernel"
    },
    remote: {
      server_parallel: 4,
      parallel_source: 'total_slots from /props, llama-server -np',
      rows: 'server slots',
      max_inflight: 4,
      in_flight: 1,
      waiting: 2,
      server_running: 2,
      server_waiting: 0,
      server_throughput: 40.5,
      kv_usage: null,
      prefix_cache_hit_rate: null,
      server_ttft: null,
      models: [],
      metrics: true,
      host_is_local: false,
      version: 'b1-0c1e570',
      reachable: true,
      error: null,
      polled_at: 1700000000,
      ...remote
    },
    ...extra
  };
}
