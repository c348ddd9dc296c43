/**
 * The status-bar item: `nbollama 3/4 busy · 95 tok/s` or `nbollama idle`,
 * hidden while the current kernel has no nbollama; a click opens the panel.
 */

import { ISignal, Signal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';

import { KernelLink } from './connection';
import { nbollamaIcon } from './icon';
import { statusView } from './model';

export class NbollamaStatus extends Widget {
  constructor(link: KernelLink, onClick: () => void) {
    super();
    this._link = link;
    this.addClass('nbollama-status');
    this.node.title = 'Show the nbollama panel';
    this.node.setAttribute('role', 'button');
    this.node.tabIndex = 0;
    const icon = document.createElement('span');
    icon.className = 'nbollama-status-icon';
    nbollamaIcon.element({ container: icon });
    this._text = document.createElement('span');
    this._text.className = 'nbollama-status-text';
    this.node.append(icon, this._text);
    this.node.addEventListener('click', onClick);
    this.node.addEventListener('keydown', (event: KeyboardEvent) => {
      if (event.key === 'Enter' || event.key === ' ') {
        event.preventDefault();
        onClick();
      }
    });
    link.changed.connect(this._render, this);
    this._render();
  }

  /** For IStatusBar.IItem.activeStateChanged. */
  get activeStateChanged(): ISignal<this, void> {
    return this._activeStateChanged;
  }

  /** For IStatusBar.IItem.isActive: shown only while nbollama answers. */
  get isActiveItem(): boolean {
    return this._visible;
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this._link.changed.disconnect(this._render, this);
    super.dispose();
  }

  private _render(): void {
    const { phase, snapshot } = this._link.state;
    const view = statusView(phase, snapshot);
    if (this._text.textContent !== view.text) {
      this._text.textContent = view.text;
    }
    this.node.classList.toggle('nbollama-status-busy', view.busy);
    if (view.visible !== this._visible) {
      this._visible = view.visible;
      this._activeStateChanged.emit();
    }
  }

  private _link: KernelLink;
  private _text: HTMLSpanElement;
  private _visible = false;
  private _activeStateChanged = new Signal<this, void>(this);
}
