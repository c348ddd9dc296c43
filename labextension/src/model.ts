/**
 * Pure snapshot -> view logic for the nbollama panel and status-bar item.
 *
 * Everything here is a plain function of its arguments (no DOM, no
 * JupyterLab), so the rules for what the panel shows are unit-tested with
 * jest while the widgets only copy the resulting view onto the page.
 *
 * The snapshot types mirror `nbollama/_core/_snapshot.py` (`EngineSnapshot`),
 * the contract between the kernel and every view of the engine. A remote
 * engine (llama-server, Ollama, vLLM) fills the same shape with `null` where
 * the server gives no figure, and adds a `remote` block: the panel shows those
 * figures as unknown, never as zero.
 */

/** The protocol version this panel speaks (the `v` of every message). */
export const PROTOCOL_VERSION = 1;

/** How many throughput samples the sparkline keeps. */
export const HISTORY_LENGTH = 60;

/** `sent`: a remote request went to a server that shows no slots, no token yet. */
export type SlotState = 'idle' | 'prefill' | 'generating' | 'sent';
export type SlotBadge =
  | 'idle'
  | 'prefill'
  | 'generating'
  | 'sent'
  | 'done'
  | 'cancelled'
  | 'error';

/** Whose request a slot serves (a shared server has other clients). */
export type SlotOrigin = 'this kernel' | 'another client';

export interface ISlotSnapshot {
  id: number;
  state: SlotState;
  badge: SlotBadge;
  request_id: number | null;
  prompt_preview: string;
  /** null: unknown (a remote server does not say) */
  prompt_tokens: number | null;
  /** prompt tokens already in the KV cache, cached ones included */
  prefilled_tokens: number | null;
  /** of those, taken from the prefix cache instead of computed (absent from older kernels) */
  cached_tokens?: number | null;
  decoded_tokens: number;
  max_tokens: number | null;
  tps: number | null;
  kv_used: number | null;
  origin?: SlotOrigin;
}

export interface IQueueSnapshot {
  length: number;
  max: number;
}

export interface IKVSnapshot {
  used: number | null;
  total: number | null;
  bytes: number | null;
}

export interface IGPUFigures {
  index: number;
  name: string;
  total: number;
  used: number;
  free: number;
  process_used: number | null;
}

export interface IMemoryFigures {
  /** `remote`: a server's memory; the process and host figures are then null. */
  source: 'nvml' | 'host' | 'remote';
  process_rss: number | null;
  process_pss: number | null;
  host_total: number | null;
  host_available: number | null;
  gpus: IGPUFigures[];
  kv_bytes: number | null;
  kv_estimate: string;
  /** "f16", "q8_0", "K q8_0 / V f16"; "" when unknown (absent from older kernels) */
  kv_type?: string;
  note: string;
}

export interface ITotals {
  submitted: number;
  completed: number;
  cancelled: number;
  errors: number;
  prompt_tokens: number;
  generated_tokens: number;
  /** prompt tokens reused from the prefix cache (absent from older kernels) */
  cached_tokens?: number;
}

/** The prefix cache's figures (`PrefixCacheFigures` in `_snapshot.py`). */
export interface IPrefixCacheFigures {
  /** null: unknown (a remote server that does not say) */
  enabled: boolean | null;
  /** cached / prompt tokens over the engine's life, 0..1 */
  hit_rate: number | null;
  /** prefixes computed once and copied to other slots; null: unknown remotely */
  shared_prefills: number | null;
  /** prompts kept in host RAM after their slot moved on, and their bytes; null or absent: remote */
  ram_prompts?: number | null;
  ram_bytes?: number | null;
}

/** One change of the active slot count by adaptive parallelism. */
export interface IParallelChange {
  time: number;
  parallel: number;
  reason: string;
}

/** Adaptive parallelism's target and its last changes, oldest first. */
export interface IAdaptiveFigures {
  target: string;
  history: IParallelChange[];
}

export interface IModelSnapshot {
  name: string;
  path: string;
  arch: string;
  size_bytes: number | null;
  n_params: number | null;
}

/** A model a server holds in memory (Ollama's `/api/ps`). */
export interface IRemoteModel {
  name: string;
  size: number | null;
  size_vram: number | null;
  context_length: number | null;
  expires_at: string | null;
}

/** What a remote engine knows of its server (`RemoteFigures` in `_snapshot.py`). */
export interface IRemoteFigures {
  server_parallel: number | null;
  parallel_source: string;
  rows: 'server slots' | 'requests in flight';
  max_inflight: number;
  in_flight: number;
  waiting: number;
  server_running: number | null;
  server_waiting: number | null;
  server_throughput: number | null;
  kv_usage: number | null;
  prefix_cache_hit_rate: number | null;
  server_ttft: number | null;
  models: IRemoteModel[];
  metrics: boolean;
  host_is_local: boolean;
  version: string | null;
  reachable: boolean;
  error: string | null;
  polled_at: number | null;
}

export interface IEngineSnapshot {
  v: number;
  time: number;
  seq: number;
  /** the engine's name in the kernel ("default", `--as NAME`); absent from older kernels */
  name?: string;
  closed: boolean;
  /** 'local', or the kind of server; absent from older kernels */
  kind?: string;
  /** a remote engine's URL, credentials redacted */
  endpoint?: string | null;
  model: IModelSnapshot;
  /** slots taking requests now (adaptive parallelism moves it) */
  parallel: number;
  /** slots whose KV is reserved; equals parallel unless adaptive (absent from older kernels) */
  parallel_max?: number;
  /** batch-invariant decoding: tokens do not depend on what else runs */
  reproducible?: boolean;
  ctx_per_slot: number | null;
  n_batch: number | null;
  gpu_layers: number | null;
  parallel_reason: string;
  slots: ISlotSnapshot[];
  queue: IQueueSnapshot;
  throughput: number;
  throughput_window: number;
  busy_slots: number;
  kv: IKVSnapshot;
  memory: IMemoryFigures;
  totals: ITotals;
  recent: unknown[];
  /** absent from older kernels */
  prefix_cache?: IPrefixCacheFigures | null;
  /** null unless parallel="adaptive" */
  adaptive?: IAdaptiveFigures | null;
  /** only in a remote engine's snapshot */
  remote?: IRemoteFigures | null;
}

/** One of the kernel's engines, as the `engines` message lists it. */
export interface IEngineEntry {
  name: string;
  kind: string;
  model: string;
  parallel: number;
  kv_type: string;
}

/** The kernel's engines: which there are, the default, and the one the snapshots are of. */
export interface IEnginesMessage {
  v: number;
  type: 'engines';
  engines: IEngineEntry[];
  default: string | null;
  shown: string | null;
  /** the engine this view was pinned to with `select`; null: it follows the default (absent from older kernels) */
  pinned: string | null;
}

/** Messages the kernel sends on the `nbollama` comm. */
export type KernelMessage =
  | { v: number; type: 'snapshot'; engine: IEngineSnapshot | null }
  | { v: number; type: 'error'; message: string }
  | { v: number; type: 'cancelled'; slot: number; request_id: number | null }
  | IEnginesMessage;

/** Messages the panel sends on the `nbollama` comm. */
export type PanelMessage =
  | { type: 'cancel'; slot: number }
  | { type: 'refresh' }
  | { type: 'select'; name: string | null };

/**
 * Where the panel stands with the current notebook's kernel.
 *
 * - `no-notebook`: no notebook is open (or focused) in the shell;
 * - `no-kernel`: the notebook has no running kernel;
 * - `connecting`: a comm open was sent and nothing came back yet;
 * - `not-loaded`: the kernel has no `nbollama` comm target (closed at once);
 * - `connected`: the kernel answers; the snapshot may still be null (no engine).
 */
export type ConnectionPhase =
  | 'no-notebook'
  | 'no-kernel'
  | 'connecting'
  | 'not-loaded'
  | 'connected';

// ---------------------------------------------------------------- validation

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function isNumber(value: unknown): value is number {
  return typeof value === 'number' && Number.isFinite(value);
}

/** A number, or null for a figure a remote server does not give. */
function isNumberOrNull(value: unknown): value is number | null {
  return value === null || isNumber(value);
}

function isSlot(value: unknown): value is ISlotSnapshot {
  return (
    isRecord(value) &&
    isNumber(value.id) &&
    typeof value.state === 'string' &&
    typeof value.badge === 'string' &&
    typeof value.prompt_preview === 'string' &&
    isNumber(value.decoded_tokens) &&
    isNumberOrNull(value.max_tokens) &&
    isNumberOrNull(value.tps)
  );
}

function isPrefixCache(value: unknown): value is IPrefixCacheFigures | null | undefined {
  if (value === undefined || value === null) {
    return true;
  }
  return (
    isRecord(value) &&
    (value.enabled === null || typeof value.enabled === 'boolean') &&
    isNumberOrNull(value.hit_rate) &&
    isNumberOrNull(value.shared_prefills ?? null) &&
    isNumberOrNull(value.ram_prompts ?? null) &&
    isNumberOrNull(value.ram_bytes ?? null)
  );
}

function isAdaptive(value: unknown): value is IAdaptiveFigures | null | undefined {
  if (value === undefined || value === null) {
    return true;
  }
  return (
    isRecord(value) &&
    typeof value.target === 'string' &&
    Array.isArray(value.history) &&
    value.history.every(
      c => isRecord(c) && isNumber(c.parallel) && typeof c.reason === 'string'
    )
  );
}

function isRemote(value: unknown): value is IRemoteFigures | null | undefined {
  if (value === undefined || value === null) {
    return true;
  }
  return (
    isRecord(value) &&
    isNumberOrNull(value.server_parallel) &&
    isNumber(value.max_inflight) &&
    isNumber(value.in_flight) &&
    isNumber(value.waiting) &&
    Array.isArray(value.models) &&
    typeof value.reachable === 'boolean'
  );
}

/**
 * Whether `value` has the fields the panel reads from an engine snapshot.
 *
 * A kernel running another nbollama version could send a different shape;
 * the panel then says so instead of throwing while rendering.
 */
export function isEngineSnapshot(value: unknown): value is IEngineSnapshot {
  if (!isRecord(value)) {
    return false;
  }
  const { model, queue, kv, memory, totals, slots } = value;
  return (
    isNumber(value.seq) &&
    isNumber(value.parallel) &&
    isNumberOrNull(value.ctx_per_slot) &&
    isNumber(value.throughput) &&
    isNumber(value.busy_slots) &&
    isRecord(model) &&
    typeof model.name === 'string' &&
    isRecord(queue) &&
    isNumber(queue.length) &&
    isRecord(kv) &&
    isNumberOrNull(kv.bytes) &&
    isRecord(memory) &&
    (memory.source === 'nvml' || memory.source === 'host' || memory.source === 'remote') &&
    isNumberOrNull(memory.process_rss) &&
    isNumberOrNull(memory.host_total) &&
    Array.isArray(memory.gpus) &&
    isRecord(totals) &&
    isNumber(totals.generated_tokens) &&
    Array.isArray(slots) &&
    slots.every(isSlot) &&
    (value.parallel_max === undefined || isNumber(value.parallel_max)) &&
    isPrefixCache(value.prefix_cache) &&
    isAdaptive(value.adaptive) &&
    isRemote(value.remote)
  );
}

/**
 * Parse one comm message from the kernel, or return an error string.
 *
 * Never throws: whatever arrives, the panel gets something it can show.
 */
export function parseKernelMessage(
  data: unknown
): KernelMessage | { invalid: string } {
  if (!isRecord(data) || typeof data.type !== 'string') {
    return { invalid: 'message without a type' };
  }
  if (data.v !== PROTOCOL_VERSION) {
    return {
      invalid: `protocol version ${String(data.v)} (this panel speaks ${PROTOCOL_VERSION})`
    };
  }
  switch (data.type) {
    case 'snapshot':
      if (data.engine === null) {
        return { v: PROTOCOL_VERSION, type: 'snapshot', engine: null };
      }
      if (!isEngineSnapshot(data.engine)) {
        return { invalid: 'malformed engine snapshot' };
      }
      return { v: PROTOCOL_VERSION, type: 'snapshot', engine: data.engine };
    case 'error':
      return {
        v: PROTOCOL_VERSION,
        type: 'error',
        message: typeof data.message === 'string' ? data.message : 'error'
      };
    case 'engines': {
      if (!Array.isArray(data.engines)) {
        return { invalid: 'engines message without a list of engines' };
      }
      const engines: IEngineEntry[] = [];
      for (const entry of data.engines) {
        if (!isRecord(entry) || typeof entry.name !== 'string') {
          return { invalid: 'engines message with an engine without a name' };
        }
        engines.push({
          name: entry.name,
          kind: typeof entry.kind === 'string' ? entry.kind : '',
          model: typeof entry.model === 'string' ? entry.model : '',
          parallel: isNumber(entry.parallel) ? entry.parallel : 0,
          kv_type: typeof entry.kv_type === 'string' ? entry.kv_type : ''
        });
      }
      return {
        v: PROTOCOL_VERSION,
        type: 'engines',
        engines,
        default: typeof data.default === 'string' ? data.default : null,
        shown: typeof data.shown === 'string' ? data.shown : null,
        pinned: typeof data.pinned === 'string' ? data.pinned : null
      };
    }
    case 'cancelled':
      if (!isNumber(data.slot)) {
        return { invalid: 'cancelled message without a slot' };
      }
      return {
        v: PROTOCOL_VERSION,
        type: 'cancelled',
        slot: data.slot,
        request_id: isNumber(data.request_id) ? data.request_id : null
      };
    default:
      return { invalid: `unknown message type ${JSON.stringify(data.type)}` };
  }
}

// ---------------------------------------------------------------- formatting

/** Bytes in binary units, e.g. `1.5 GiB`, `512 MiB`, `0 B`. */
export function formatBytes(bytes: number): string {
  if (!isNumber(bytes) || bytes <= 0) {
    return '0 B';
  }
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  const digits = unit === 0 || value >= 100 ? 0 : value >= 10 ? 1 : 2;
  return `${value.toFixed(digits)} ${units[unit]}`;
}

/** A figure, or `?` when a remote server does not give it. */
export function known(value: number | null | undefined): string {
  return isNumber(value) ? String(value) : '?';
}

/** Tokens per second with sensible precision: `95 tok/s`, `3.4 tok/s`. */
export function formatRate(tps: number): string {
  if (!isNumber(tps) || tps <= 0) {
    return '0 tok/s';
  }
  return tps >= 10 ? `${Math.round(tps)} tok/s` : `${tps.toFixed(1)} tok/s`;
}

/** An integer with thousands separators that do not depend on the locale. */
export function formatCount(n: number): string {
  const whole = Math.max(0, Math.round(isNumber(n) ? n : 0));
  return whole.toString().replace(/\B(?=(\d{3})+(?!\d))/g, ',');
}

function clamp01(x: number): number {
  if (!isNumber(x) || x <= 0) {
    return 0;
  }
  return x >= 1 ? 1 : x;
}

// ---------------------------------------------------------------- slots

/** The colour of a slot badge, as a JupyterLab theme variable with fallback. */
export function badgeColour(badge: SlotBadge | string): string {
  switch (badge) {
    case 'sent':
      return 'var(--jp-layout-color4, #78909c)';
    case 'prefill':
      return 'var(--jp-warn-color1, #f57c00)';
    case 'generating':
      return 'var(--jp-brand-color1, #1976d2)';
    case 'done':
      return 'var(--jp-success-color1, #388e3c)';
    case 'cancelled':
      return 'var(--jp-warn-color2, #ffb74d)';
    case 'error':
      return 'var(--jp-error-color1, #d32f2f)';
    default:
      return 'var(--jp-layout-color3, #bdbdbd)';
  }
}

export interface ISlotRowView {
  slot: number;
  state: SlotState;
  badge: SlotBadge;
  badgeColour: string;
  requestId: number | null;
  preview: string;
  /** `decoded/max`, or `prefill n/m` while the prompt is being read. */
  progressText: string;
  /** 0..1, how far the request is towards its max_tokens. */
  progress: number;
  tpsText: string;
  /** Only a busy slot serving this kernel has something to cancel. */
  cancellable: boolean;
  /** `another client` on a shared server's slot serving someone else's request */
  origin: SlotOrigin;
  /**
   * A prefix-cache hit: `cached 380/412` (prompt tokens reused of the prompt's),
   * or '' (no hit, an idle slot, or unknown remotely).
   */
  cacheText: string;
  /** the same in words, for a tooltip */
  cacheTitle: string;
}

/**
 * The cache tag of a slot, as the dashboard's: shown while the slot serves (or
 * just finished) a request that took prompt tokens from the prefix cache.
 */
export function cacheTag(slot: ISlotSnapshot): { text: string; title: string } {
  const cached = slot.cached_tokens;
  if (!isNumber(cached) || cached <= 0 || slot.badge === 'idle') {
    return { text: '', title: '' };
  }
  const of = known(slot.prompt_tokens);
  return {
    text: `cached ${formatCount(cached)}/${isNumber(slot.prompt_tokens) ? formatCount(slot.prompt_tokens) : of}`,
    title: `${cached} of ${of} prompt tokens reused from the prefix cache (not computed again)`
  };
}

/** One row per slot, in slot order. */
export function slotRows(snapshot: IEngineSnapshot): ISlotRowView[] {
  return [...snapshot.slots]
    .sort((a, b) => a.id - b.id)
    .map(slot => {
      const busy = slot.state !== 'idle';
      const prefilling = slot.state === 'prefill';
      const origin: SlotOrigin = slot.origin ?? 'this kernel';
      const other = busy && origin === 'another client';
      const progressText = prefilling
        ? `prefill ${known(slot.prefilled_tokens)}/${known(slot.prompt_tokens)}`
        : `${slot.decoded_tokens}/${known(slot.max_tokens)}`;
      const progress = prefilling
        ? isNumber(slot.prefilled_tokens) && isNumber(slot.prompt_tokens)
          ? clamp01(slot.prefilled_tokens / Math.max(1, slot.prompt_tokens))
          : 0
        : isNumber(slot.max_tokens)
          ? clamp01(slot.decoded_tokens / Math.max(1, slot.max_tokens))
          : 0;
      const idleWithoutHistory = !busy && slot.request_id === null;
      let tpsText = '';
      if (isNumber(slot.tps) && (busy || slot.tps > 0)) {
        tpsText = formatRate(slot.tps);
      } else if (busy && slot.state === 'generating') {
        tpsText = '? tok/s';
      }
      const preview = other
        ? slot.prompt_preview
          ? `another client: ${slot.prompt_preview}`
          : 'another client'
        : slot.prompt_preview;
      const cache = other ? { text: '', title: '' } : cacheTag(slot);
      return {
        slot: slot.id,
        state: slot.state,
        badge: slot.badge,
        badgeColour: badgeColour(slot.badge),
        requestId: slot.request_id,
        preview: idleWithoutHistory ? '' : preview,
        progressText: idleWithoutHistory ? '' : progressText,
        progress: idleWithoutHistory ? 0 : progress,
        tpsText,
        cancellable: busy && !other,
        origin: other ? 'another client' : 'this kernel',
        cacheText: cache.text,
        cacheTitle: cache.title
      };
    });
}

// ---------------------------------------------------------------- memory

export interface IMemoryView {
  source: 'nvml' | 'host' | 'remote';
  label: string;
  used: number;
  total: number;
  /** 0..1 of the bar that is used. */
  fraction: number;
  /** 0..1 of the bar that is the KV cache (drawn inside the used part). */
  kvFraction: number;
  text: string;
  kvText: string;
  note: string;
}

/**
 * The memory bar: VRAM of GPU 0 when NVML answered, else this process's
 * resident memory against the host's RAM; the KV cache is shown in both.
 */
export function memoryView(snapshot: IEngineSnapshot): IMemoryView {
  const memory = snapshot.memory;
  if (memory.source === 'remote') {
    return remoteMemoryView(snapshot);
  }
  const kvBytes = (isNumber(memory.kv_bytes) ? memory.kv_bytes : snapshot.kv.bytes) ?? 0;
  const gpu =
    memory.gpus.find(g => g.index === 0) ??
    (memory.gpus.length > 0 ? memory.gpus[0] : undefined);
  let label: string;
  let used: number;
  let total: number;
  if (memory.source === 'nvml' && gpu !== undefined) {
    label = `VRAM · GPU ${gpu.index} ${gpu.name}`.trim();
    used = gpu.used;
    total = gpu.total;
  } else {
    label = 'RAM · kernel process / host';
    used = memory.process_rss ?? 0;
    total = memory.host_total ?? 0;
  }
  const fraction = total > 0 ? clamp01(used / total) : 0;
  const kvFraction = total > 0 ? Math.min(fraction, clamp01(kvBytes / total)) : 0;
  return {
    source: memory.source,
    label,
    used,
    total,
    fraction,
    kvFraction,
    text: `${formatBytes(used)} / ${formatBytes(total)}`,
    kvText: `KV cache ${formatBytes(kvBytes)}` + (memory.kv_type ? ` · ${memory.kv_type}` : ''),
    note: memory.note ?? ''
  };
}

/**
 * A server's memory: this machine's GPU 0 only when the server runs here,
 * otherwise what the server reports (Ollama's models, vLLM's KV use) and
 * "unknown" for the rest.
 */
function remoteMemoryView(snapshot: IEngineSnapshot): IMemoryView {
  const memory = snapshot.memory;
  const remote = snapshot.remote ?? null;
  const gpu = memory.gpus.find(g => g.index === 0) ?? memory.gpus[0];
  const models = remote?.models ?? [];
  let label: string;
  let used = 0;
  let total = 0;
  let text: string;
  if (gpu !== undefined) {
    label = `VRAM · GPU ${gpu.index} ${gpu.name} · this machine (the server's host)`.trim();
    used = gpu.used;
    total = gpu.total;
    text = `${formatBytes(used)} / ${formatBytes(total)}`;
  } else if (models.length > 0) {
    label = 'Server memory · models loaded';
    text = models
      .map(
        m =>
          `${m.name}: ${isNumber(m.size) ? formatBytes(m.size) : 'unknown'}` +
          (isNumber(m.size_vram) ? ` (VRAM ${formatBytes(m.size_vram)})` : '')
      )
      .join('; ');
  } else {
    label = 'Server memory';
    text = 'unknown (the server does not report it)';
  }
  let kvText = 'KV cache unknown';
  if (remote !== null && isNumber(remote.kv_usage)) {
    kvText =
      `KV cache ${Math.round(remote.kv_usage * 100)}% in use` +
      (isNumber(snapshot.kv.total) ? ` of ${formatCount(snapshot.kv.total)} tokens` : '');
  } else if (isNumber(snapshot.kv.total)) {
    kvText = `KV cache ${formatCount(snapshot.kv.total)} tokens`;
  }
  const fraction = total > 0 ? clamp01(used / total) : 0;
  return {
    source: 'remote',
    label,
    used,
    total,
    fraction,
    kvFraction: 0,
    text,
    kvText,
    note: memory.note ?? ''
  };
}

// ---------------------------------------------------------------- sparkline

/** Append a sample, keeping the last `limit` of them. */
export function pushHistory(
  history: readonly number[],
  value: number,
  limit: number = HISTORY_LENGTH
): number[] {
  const next = [...history, isNumber(value) && value > 0 ? value : 0];
  return next.length > limit ? next.slice(next.length - limit) : next;
}

function fmt(x: number): string {
  return (Math.round(x * 100) / 100).toString();
}

/**
 * An SVG path (`M x,y L x,y ...`) drawing `values` left to right in a
 * `width` x `height` box, zero at the bottom and the largest value at the
 * top; a single sample is a flat line; no samples give an empty path.
 */
export function sparklinePath(
  values: readonly number[],
  width: number,
  height: number
): string {
  if (values.length === 0) {
    return '';
  }
  const max = Math.max(...values.map(v => (isNumber(v) ? v : 0)));
  const scale = max > 0 ? height / max : 0;
  const y = (v: number): number => height - (isNumber(v) ? v : 0) * scale;
  if (values.length === 1) {
    return `M0,${fmt(y(values[0]))} L${fmt(width)},${fmt(y(values[0]))}`;
  }
  const step = width / (values.length - 1);
  return values
    .map((v, i) => `${i === 0 ? 'M' : 'L'}${fmt(i * step)},${fmt(y(v))}`)
    .join(' ');
}

// ---------------------------------------------------------------- status bar

export interface IStatusView {
  visible: boolean;
  text: string;
  busy: boolean;
}

/**
 * The status-bar text: `nbollama 3/4 busy · 95 tok/s`, `nbollama idle`,
 * `nbollama: no model`; hidden while the kernel has no nbollama.
 */
export function statusView(
  phase: ConnectionPhase,
  snapshot: IEngineSnapshot | null
): IStatusView {
  if (phase !== 'connected') {
    return { visible: false, text: '', busy: false };
  }
  if (snapshot === null) {
    return { visible: true, text: 'nbollama: no model', busy: false };
  }
  if (snapshot.closed) {
    return { visible: true, text: 'nbollama: engine closed', busy: false };
  }
  const queued = snapshot.queue.length > 0 ? ` · ${snapshot.queue.length} queued` : '';
  if (snapshot.busy_slots <= 0) {
    return { visible: true, text: `nbollama idle${queued}`, busy: false };
  }
  return {
    visible: true,
    text: `nbollama ${snapshot.busy_slots}/${snapshot.parallel} busy · ${formatRate(snapshot.throughput)}${queued}`,
    busy: true
  };
}

// ---------------------------------------------------------------- panel

export interface IHintView {
  text: string;
  /** Code for the user to run, shown in a `<code>`, if any. */
  code: string | null;
}

/** What the panel says instead of the engine view, or null when live. */
export function hintView(
  phase: ConnectionPhase,
  snapshot: IEngineSnapshot | null
): IHintView | null {
  switch (phase) {
    case 'no-notebook':
      return { text: 'Open a notebook to see its nbollama engine.', code: null };
    case 'no-kernel':
      return { text: 'The current notebook has no running kernel.', code: null };
    case 'connecting':
      return { text: 'Connecting to the kernel…', code: null };
    case 'not-loaded':
      return {
        text: 'nbollama is not loaded in this kernel. Run:',
        code: '%load_ext nbollama'
      };
    case 'connected':
      if (snapshot === null) {
        return { text: 'No model is loaded. Run:', code: '%nbollama load' };
      }
      return null;
  }
}

/** What the panel says of a remote engine's server, or null for the in-kernel engine. */
export interface IRemoteView {
  kind: string;
  endpoint: string;
  /** this kernel's share: in flight and waiting in nbollama's queue */
  client: string;
  /** what the server says of its load, with unknowns said so */
  server: string;
  /** where the server's parallel came from, or why it is unknown */
  parallelSource: string;
  /** why the server could not be reached at the last look, or null */
  error: string | null;
}

export function remoteView(snapshot: IEngineSnapshot): IRemoteView | null {
  const remote = snapshot.remote;
  if (remote === undefined || remote === null) {
    return null;
  }
  let server = `server: ${known(remote.server_running)} running, ${known(remote.server_waiting)} waiting`;
  if (isNumber(remote.server_throughput)) {
    server += ` · ${formatRate(remote.server_throughput)}`;
  }
  if (isNumber(remote.server_ttft)) {
    server += ` · mean TTFT ${remote.server_ttft.toFixed(2)} s`;
  }
  return {
    kind: snapshot.kind ?? 'remote',
    endpoint: snapshot.endpoint ?? '',
    client: `this kernel: ${remote.in_flight}/${remote.max_inflight} in flight · ${remote.waiting} waiting`,
    server,
    parallelSource: remote.parallel_source,
    error: remote.reachable ? null : `server unreachable: ${remote.error ?? 'unknown reason'}`
  };
}

/** Adaptive parallelism as the panel words it. */
export interface IAdaptiveView {
  /** `adaptive · min_tps=15` */
  text: string;
  /** what that means, for a tooltip */
  title: string;
  /** the reason of the last change: `parallel=6 of 16: per-request 15.2 tok/s, floor 15` */
  lastChange: string;
  /** every change kept, oldest first, one per line (a tooltip) */
  historyText: string;
  changes: number;
}

/**
 * `parallel 6 of 16` while adaptive parallelism runs fewer slots than it
 * reserved (or at all), else `parallel 4`; a missing `parallel_max` (an older
 * kernel) reads as `parallel`.
 */
export function parallelText(snapshot: IEngineSnapshot): string {
  const max = isNumber(snapshot.parallel_max) ? snapshot.parallel_max : snapshot.parallel;
  const adaptive = snapshot.adaptive !== undefined && snapshot.adaptive !== null;
  return max > snapshot.parallel || adaptive
    ? `parallel ${snapshot.parallel} of ${max}`
    : `parallel ${snapshot.parallel}`;
}

function clockTime(epochSeconds: number): string {
  if (!isNumber(epochSeconds)) {
    return '?';
  }
  const d = new Date(epochSeconds * 1000);
  const two = (n: number): string => String(n).padStart(2, '0');
  return `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`;
}

/** The target and the last change of adaptive parallelism, or null when parallel is fixed. */
export function adaptiveView(snapshot: IEngineSnapshot): IAdaptiveView | null {
  const adaptive = snapshot.adaptive;
  if (adaptive === undefined || adaptive === null) {
    return null;
  }
  const history = adaptive.history ?? [];
  const last = history.length > 0 ? history[history.length - 1] : null;
  return {
    text: `adaptive · ${adaptive.target || '?'}`,
    title: `adaptive parallelism, target ${adaptive.target || '?'}: the engine moves the slots in use (now ${snapshot.parallel}) to meet it`,
    lastChange: last !== null ? last.reason : snapshot.parallel_reason ?? '',
    historyText: history.map(c => `${clockTime(c.time)} ${c.reason}`).join('\n'),
    changes: history.length
  };
}

/**
 * The prefix cache in one line: `prefix cache 42% hit · 1,234 tokens reused ·
 * 3 shared prefills`, `prefix cache off`, `prefix cache ?` (a server that does
 * not say); null for a kernel whose snapshot has no prefix-cache figures.
 */
export function prefixCacheText(snapshot: IEngineSnapshot): string | null {
  const cache = snapshot.prefix_cache;
  if (cache === undefined || cache === null) {
    return null;
  }
  if (cache.enabled === false) {
    return 'prefix cache off';
  }
  if (cache.enabled === null) {
    return 'prefix cache ?';
  }
  const rate = isNumber(cache.hit_rate) ? `${Math.round(cache.hit_rate * 100)}% hit` : '? hit';
  const parts = [`prefix cache ${rate}`];
  const reused = snapshot.totals.cached_tokens;
  if (isNumber(reused) && reused > 0) {
    parts.push(`${formatCount(reused)} tokens reused`);
  }
  const shared = cache.shared_prefills;
  parts.push(
    isNumber(shared)
      ? `${formatCount(shared)} shared prefill${shared === 1 ? '' : 's'}`
      : 'shared prefills ?'
  );
  const kept = cache.ram_prompts;
  if (isNumber(kept) && kept > 0) {
    const bytes = isNumber(cache.ram_bytes) ? ` (${formatBytes(cache.ram_bytes)})` : '';
    parts.push(`${formatCount(kept)} prompt${kept === 1 ? '' : 's'} in RAM${bytes}`);
  }
  return parts.join(' · ');
}

export interface IEngineView {
  model: string;
  meta: string;
  parallelReason: string;
  /** adaptive parallelism's target and last change, or null */
  adaptive: IAdaptiveView | null;
  /** batch-invariant decoding (`--reproducible`) */
  reproducible: boolean;
  /** see `prefixCacheText` */
  prefixCache: string | null;
  closed: boolean;
  rows: ISlotRowView[];
  queueLength: number;
  queueText: string;
  throughputText: string;
  totalTokens: number;
  totalTokensText: string;
  sparkline: string;
  memory: IMemoryView;
  remote: IRemoteView | null;
}

/** Sparkline box size in SVG user units. */
export const SPARK_WIDTH = 240;
export const SPARK_HEIGHT = 36;

/** Everything the panel draws for a live engine. */
export function engineView(
  snapshot: IEngineSnapshot,
  history: readonly number[]
): IEngineView {
  const totals = snapshot.totals;
  const closed = snapshot.closed ? ' · closed' : '';
  const remote = snapshot.remote ?? null;
  const ctx = isNumber(snapshot.ctx_per_slot) ? formatCount(snapshot.ctx_per_slot) : '?';
  const meta =
    remote === null
      ? `${parallelText(snapshot)} · ctx ${ctx}/slot${closed}`
      : `${snapshot.kind ?? 'remote'} · server parallel ${known(remote.server_parallel)} · ctx ${ctx}${closed}`;
  return {
    model: snapshot.model.name,
    meta,
    parallelReason: snapshot.parallel_reason ?? '',
    adaptive: adaptiveView(snapshot),
    reproducible: snapshot.reproducible === true,
    prefixCache: prefixCacheText(snapshot),
    closed: snapshot.closed,
    rows: slotRows(snapshot),
    queueLength: snapshot.queue.length,
    queueText:
      snapshot.queue.length === 0 ? 'queue empty' : `${snapshot.queue.length} queued`,
    throughputText: formatRate(snapshot.throughput),
    totalTokens: totals.generated_tokens,
    totalTokensText: `${formatCount(totals.generated_tokens)} tokens generated`,
    sparkline: sparklinePath(history, SPARK_WIDTH, SPARK_HEIGHT),
    memory: memoryView(snapshot),
    remote: remoteView(snapshot)
  };
}

/** The text shown after the kernel answered a cancel. */
/** The selector's label for one engine: its name, model, slots and KV type, and whether it is the default. */
export function engineOptionLabel(entry: IEngineEntry, defaultName: string | null): string {
  const parts = [entry.name, entry.model];
  if (entry.kind !== '' && entry.kind !== 'local') {
    parts.push(entry.kind);
  }
  parts.push(`${entry.parallel} slot${entry.parallel === 1 ? '' : 's'}`);
  if (entry.kv_type !== '') {
    parts.push(entry.kv_type);
  }
  return parts.join(' · ') + (entry.name === defaultName ? ' (default)' : '');
}

/** What the panel says of a view pinned to one engine, and the way back to the default. */
export interface IPinView {
  /** `pinned to 'small'` */
  text: string;
  /** a tooltip: what pinned means here and which engine is the default */
  title: string;
  /** the button's label */
  follow: string;
}

/**
 * `pinned to 'small'` while the view shows the engine picked in its
 * selector (it no longer follows `%nbollama use`); null while it follows
 * the kernel's default engine.
 */
export function pinView(pinned: string | null, defaultName: string | null): IPinView | null {
  if (pinned === null) {
    return null;
  }
  const now =
    defaultName === null
      ? 'the kernel has no default engine now'
      : defaultName === pinned
        ? `'${pinned}' is also the default now`
        : `the default is '${defaultName}'`;
  return {
    text: `pinned to '${pinned}'`,
    title: `This view shows '${pinned}' whatever %nbollama use makes the default (${now}).`,
    follow: 'follow the default'
  };
}

export function cancelNotice(slot: number, requestId: number | null): string {
  return requestId === null
    ? `Slot ${slot} was idle: nothing to cancel.`
    : `Cancelled request ${requestId} on slot ${slot}.`;
}
