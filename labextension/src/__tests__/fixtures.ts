/** Snapshots shaped like the kernel's (nbollama/_core/_snapshot.py), for the specs. */
import { IEngineSnapshot, ISlotSnapshot } from '../model';

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
      generated_tokens: 0
    },
    recent: [],
    ...extra
  };
}
