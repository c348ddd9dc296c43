/**
 * The nbollama side panel: model, slots, queue, throughput and memory of the
 * current notebook's engine, redrawn from each snapshot.
 *
 * Rows are kept per slot and updated in place, so a cancel button under the
 * pointer survives the ~4 Hz redraws and a click on it is not lost.
 */

import { Message } from '@lumino/messaging';
import { Widget } from '@lumino/widgets';

import { KernelLink } from './connection';
import { nbollamaIcon } from './icon';
import {
  IEngineEntry,
  ISlotRowView,
  SPARK_HEIGHT,
  SPARK_WIDTH,
  engineOptionLabel,
  engineView,
  hintView,
  pinView
} from './model';

/** The panel's widget id (and DOM id), used to activate it. */
export const PANEL_ID = 'nbollama-panel';

const SVG_NS = 'http://www.w3.org/2000/svg';

function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className: string,
  parent?: HTMLElement
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  node.className = className;
  if (parent !== undefined) {
    parent.appendChild(node);
  }
  return node;
}

/** Set text only when it changed, to spare layout work at 4 Hz. */
function setText(node: Element, text: string): void {
  if (node.textContent !== text) {
    node.textContent = text;
  }
}

interface IRowNodes {
  row: HTMLDivElement;
  badge: HTMLSpanElement;
  preview: HTMLDivElement;
  cache: HTMLSpanElement;
  fill: HTMLDivElement;
  progress: HTMLSpanElement;
  tps: HTMLSpanElement;
  cancel: HTMLButtonElement;
}

export class NbollamaPanel extends Widget {
  constructor(link: KernelLink) {
    super();
    this._link = link;
    this.id = PANEL_ID;
    this.addClass('nbollama-panel');
    this.title.icon = nbollamaIcon;
    this.title.caption = 'nbollama: slots, throughput and memory';

    const root = this.node;
    this._hint = el('div', 'nbollama-hint', root);
    this._hintText = el('span', 'nbollama-hint-text', this._hint);
    this._hintCode = el('code', 'nbollama-hint-code', this._hint);

    this._live = el('div', 'nbollama-live', root);
    const header = el('div', 'nbollama-header', this._live);
    // several engines in the kernel: which one the panel shows
    this._engineSelect = el('select', 'nbollama-engine-select jp-mod-styled', header);
    this._engineSelect.setAttribute('aria-label', 'engine shown');
    this._engineSelect.title = 'The kernel has several engines: pick the one to show';
    this._engineSelect.addEventListener('change', () => {
      this._link.select(this._engineSelect.value);
    });
    // picked in the selector: pinned to that engine, with the way back to the default
    this._pin = el('div', 'nbollama-pin', header);
    this._pinText = el('span', 'nbollama-pin-text', this._pin);
    this._followDefault = el('button', 'nbollama-follow-default jp-Button', this._pin);
    this._followDefault.type = 'button';
    this._followDefault.addEventListener('click', () => {
      this._link.followDefault();
    });
    this._model = el('div', 'nbollama-model', header);
    this._meta = el('div', 'nbollama-meta', header);
    // modes that change what the figures mean: adaptive parallelism, reproducible decoding
    this._modes = el('div', 'nbollama-modes', header);
    this._adaptiveMode = el('span', 'nbollama-mode nbollama-mode-adaptive', this._modes);
    this._reproducibleMode = el('span', 'nbollama-mode nbollama-mode-reproducible', this._modes);
    this._reproducibleMode.textContent = 'reproducible';
    this._reproducibleMode.title =
      "batch-invariant decoding: a request's tokens do not depend on what else runs";
    this._lastChange = el('div', 'nbollama-adaptive-change', header);

    // a remote engine's server: where, this kernel's share, what the server says
    this._remote = el('div', 'nbollama-remote', this._live);
    this._remoteEndpoint = el('div', 'nbollama-remote-endpoint', this._remote);
    this._remoteClient = el('div', 'nbollama-remote-client', this._remote);
    this._remoteServer = el('div', 'nbollama-remote-server', this._remote);
    this._remoteError = el('div', 'nbollama-remote-error', this._remote);

    el('div', 'nbollama-section-title', this._live).textContent = 'Slots';
    this._slots = el('div', 'nbollama-slots', this._live);

    const summary = el('div', 'nbollama-summary', this._live);
    this._queue = el('span', 'nbollama-queue', summary);
    this._throughput = el('span', 'nbollama-throughput', summary);
    this._total = el('div', 'nbollama-total-tokens', this._live);
    this._prefixCache = el('div', 'nbollama-prefix-cache', this._live);

    const spark = document.createElementNS(SVG_NS, 'svg');
    spark.setAttribute('class', 'nbollama-sparkline');
    spark.setAttribute('viewBox', `0 0 ${SPARK_WIDTH} ${SPARK_HEIGHT}`);
    spark.setAttribute('preserveAspectRatio', 'none');
    spark.setAttribute('role', 'img');
    spark.setAttribute('aria-label', 'aggregate tokens per second');
    this._sparkPath = document.createElementNS(SVG_NS, 'path');
    this._sparkPath.setAttribute('vector-effect', 'non-scaling-stroke');
    spark.appendChild(this._sparkPath);
    this._live.appendChild(spark);

    const memory = el('div', 'nbollama-memory', this._live);
    this._memLabel = el('div', 'nbollama-memory-label', memory);
    const bar = el('div', 'nbollama-membar', memory);
    this._memUsed = el('div', 'nbollama-membar-used', bar);
    this._memKV = el('div', 'nbollama-membar-kv', bar);
    this._memText = el('div', 'nbollama-memory-text', memory);
    this._memKVText = el('div', 'nbollama-memory-kv', memory);

    this._notice = el('div', 'nbollama-notice', root);

    link.changed.connect(this._render, this);
    this._render();
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this._link.changed.disconnect(this._render, this);
    super.dispose();
  }

  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    this._render();
  }

  private _render(): void {
    if (this.isDisposed) {
      return;
    }
    const state = this._link.state;
    this.node.dataset.phase = state.phase;

    if (state.notice === null) {
      this._notice.hidden = true;
    } else {
      this._notice.hidden = false;
      setText(this._notice, state.notice.text);
      this._notice.classList.toggle('nbollama-notice-error', state.notice.isError);
    }

    const hint = hintView(state.phase, state.snapshot);
    if (hint !== null || state.snapshot === null) {
      this._hint.hidden = false;
      this._live.hidden = true;
      setText(this._hintText, hint?.text ?? '');
      setText(this._hintCode, hint?.code ?? '');
      this._hintCode.hidden = hint?.code === null || hint?.code === undefined;
      return;
    }
    this._hint.hidden = true;
    this._live.hidden = false;
    if (!this.isVisible) {
      // Collapsed in the sidebar: draw the rest when shown again.
      return;
    }

    this._renderEngines(state.engines, state.defaultName, state.shown ?? state.snapshot.name ?? null);
    this._renderPin(state.pinned, state.defaultName);
    const view = engineView(state.snapshot, state.history);
    setText(this._model, view.model);
    setText(this._meta, view.meta);
    this._meta.title = view.parallelReason;
    const adaptive = view.adaptive;
    this._adaptiveMode.hidden = adaptive === null;
    this._reproducibleMode.hidden = !view.reproducible;
    this._modes.hidden = adaptive === null && !view.reproducible;
    this._lastChange.hidden = adaptive === null || adaptive.lastChange === '';
    this.node.dataset.adaptive = adaptive === null ? 'no' : 'yes';
    this.node.dataset.reproducible = view.reproducible ? 'yes' : 'no';
    if (adaptive !== null) {
      setText(this._adaptiveMode, adaptive.text);
      this._adaptiveMode.title = adaptive.title;
      setText(this._lastChange, `last change: ${adaptive.lastChange}`);
      this._lastChange.title = adaptive.historyText || adaptive.lastChange;
      this._lastChange.dataset.changes = String(adaptive.changes);
    }
    this.node.dataset.kind = view.remote === null ? 'local' : view.remote.kind;
    if (view.remote === null) {
      this._remote.hidden = true;
    } else {
      const remote = view.remote;
      this._remote.hidden = false;
      setText(this._remoteEndpoint, `${remote.kind} · ${remote.endpoint}`);
      this._remoteEndpoint.title = remote.parallelSource;
      setText(this._remoteClient, remote.client);
      setText(this._remoteServer, remote.server);
      this._remoteError.hidden = remote.error === null;
      setText(this._remoteError, remote.error ?? '');
    }
    this._updateRows(view.rows);
    setText(this._queue, view.queueText);
    this._queue.dataset.length = String(view.queueLength);
    setText(this._throughput, view.throughputText);
    setText(this._total, view.totalTokensText);
    this._total.dataset.value = String(view.totalTokens);
    this._prefixCache.hidden = view.prefixCache === null;
    setText(this._prefixCache, view.prefixCache ?? '');
    this._sparkPath.setAttribute('d', view.sparkline);

    const mem = view.memory;
    setText(this._memLabel, mem.label);
    this._memUsed.style.width = `${(mem.fraction * 100).toFixed(2)}%`;
    this._memKV.style.width = `${(mem.kvFraction * 100).toFixed(2)}%`;
    setText(this._memText, mem.text);
    setText(this._memKVText, mem.kvText);
    this._memText.title = mem.note;
    this.node.dataset.memorySource = mem.source;
  }

  /** The selector: shown only with several engines; options rebuilt only when the list changed. */
  private _renderEngines(engines: IEngineEntry[], defaultName: string | null, shown: string | null): void {
    const select = this._engineSelect;
    select.hidden = engines.length < 2;
    this.node.dataset.engines = String(engines.length);
    const labels = engines.map(e => engineOptionLabel(e, defaultName));
    const key = JSON.stringify(labels);
    if (select.dataset.key !== key) {
      select.dataset.key = key;
      select.replaceChildren(
        ...engines.map((e, i) => {
          const option = document.createElement('option');
          option.value = e.name;
          option.textContent = labels[i];
          return option;
        })
      );
    }
    if (shown !== null && select.value !== shown) {
      select.value = shown;
    }
    this.node.dataset.shown = shown ?? '';
  }

  /** `pinned to 'small'` and a button back to the default, while the view is pinned. */
  private _renderPin(pinned: string | null, defaultName: string | null): void {
    const view = pinView(pinned, defaultName);
    this._pin.hidden = view === null;
    this.node.dataset.pinned = pinned ?? '';
    if (view !== null) {
      setText(this._pinText, view.text);
      this._pin.title = view.title;
      setText(this._followDefault, view.follow);
      this._followDefault.title = view.title;
    }
  }

  private _updateRows(rows: ISlotRowView[]): void {
    const seen = new Set<number>();
    for (const view of rows) {
      seen.add(view.slot);
      let nodes = this._rows.get(view.slot);
      if (nodes === undefined) {
        nodes = this._createRow(view.slot);
        this._rows.set(view.slot, nodes);
      }
      // Keep DOM order equal to slot order even when rows were added later.
      if (this._slots.children[rows.indexOf(view)] !== nodes.row) {
        this._slots.insertBefore(nodes.row, this._slots.children[rows.indexOf(view)] ?? null);
      }
      const { row, badge, preview, cache, fill, progress, tps, cancel } = nodes;
      row.dataset.state = view.state;
      row.dataset.badge = view.badge;
      row.dataset.request = view.requestId === null ? '' : String(view.requestId);
      row.dataset.origin = view.origin;
      setText(badge, view.badge);
      badge.style.backgroundColor = view.badgeColour;
      setText(preview, view.preview);
      preview.title = view.preview;
      cache.hidden = view.cacheText === '';
      setText(cache, view.cacheText);
      cache.title = view.cacheTitle;
      fill.style.width = `${(view.progress * 100).toFixed(1)}%`;
      fill.style.backgroundColor = view.badgeColour;
      setText(progress, view.progressText);
      setText(tps, view.tpsText);
      cancel.disabled = !view.cancellable;
      cancel.title =
        view.origin === 'another client'
          ? `Slot ${view.slot} serves another client of the server: only this kernel's requests can be cancelled`
          : `Cancel the request on slot ${view.slot}`;
    }
    for (const [slot, nodes] of this._rows) {
      if (!seen.has(slot)) {
        nodes.row.remove();
        this._rows.delete(slot);
      }
    }
  }

  private _createRow(slot: number): IRowNodes {
    const row = el('div', 'nbollama-slot-row');
    row.dataset.slot = String(slot);
    el('span', 'nbollama-slot-id', row).textContent = `#${slot}`;
    const badge = el('span', 'nbollama-badge', row);
    const progress = el('span', 'nbollama-progress', row);
    const main = el('div', 'nbollama-slot-main', row);
    const line = el('div', 'nbollama-slot-line', main);
    const cache = el('span', 'nbollama-cache-hit', line);
    cache.hidden = true;
    const preview = el('div', 'nbollama-preview', line);
    const tps = el('span', 'nbollama-tps', line);
    const track = el('div', 'nbollama-progressbar', main);
    const fill = el('div', 'nbollama-progress-fill', track);
    const cancel = el('button', 'nbollama-cancel jp-Button', row);
    cancel.type = 'button';
    cancel.textContent = '✕';
    cancel.title = `Cancel the request on slot ${slot}`;
    cancel.setAttribute('aria-label', `Cancel slot ${slot}`);
    cancel.dataset.slot = String(slot);
    cancel.addEventListener('click', () => {
      this._link.cancel(slot);
    });
    return { row, badge, preview, cache, fill, progress, tps, cancel };
  }

  private _link: KernelLink;
  private _engineSelect: HTMLSelectElement;
  private _pin: HTMLDivElement;
  private _pinText: HTMLSpanElement;
  private _followDefault: HTMLButtonElement;
  private _hint: HTMLDivElement;
  private _hintText: HTMLSpanElement;
  private _hintCode: HTMLElement;
  private _live: HTMLDivElement;
  private _model: HTMLDivElement;
  private _meta: HTMLDivElement;
  private _modes: HTMLDivElement;
  private _adaptiveMode: HTMLSpanElement;
  private _reproducibleMode: HTMLSpanElement;
  private _lastChange: HTMLDivElement;
  private _remote: HTMLDivElement;
  private _remoteEndpoint: HTMLDivElement;
  private _remoteClient: HTMLDivElement;
  private _remoteServer: HTMLDivElement;
  private _remoteError: HTMLDivElement;
  private _slots: HTMLDivElement;
  private _queue: HTMLSpanElement;
  private _throughput: HTMLSpanElement;
  private _total: HTMLDivElement;
  private _prefixCache: HTMLDivElement;
  private _sparkPath: SVGPathElement;
  private _memLabel: HTMLDivElement;
  private _memUsed: HTMLDivElement;
  private _memKV: HTMLDivElement;
  private _memText: HTMLDivElement;
  private _memKVText: HTMLDivElement;
  private _notice: HTMLDivElement;
  private _rows = new Map<number, IRowNodes>();
}
