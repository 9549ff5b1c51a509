/** The status bar item, "DASH: 3 workers · 1 GPU · this notebook: local-0": opens the panel. */
import { Widget } from '@lumino/widgets';

import { DashModel } from './api';
import { summary } from './format';
import { PlacementTracker } from './placement';

export const UNREACHABLE = 'DASH gateway not reachable';

/** The status bar's DASH item; activating it runs `open` (shows the panel). */
export class DashStatus extends Widget {
  constructor(model: DashModel, placements: PlacementTracker, open: () => void) {
    super({ node: document.createElement('div') });
    this._model = model;
    this._placements = placements;
    this.addClass('dash-StatusItem');
    this._button = document.createElement('button');
    this._button.type = 'button';
    this._button.className = 'dash-StatusItem-button';
    this._button.addEventListener('click', open);
    this.node.appendChild(this._button);
    model.changed.connect(this.update, this);
    placements.changed.connect(this.update, this);
    this.update();
  }

  /** The text the item shows now. */
  get text(): string {
    const model = this._model;
    const overview = model.overview;
    let text: string;
    if (overview) {
      text = `DASH: ${summary(overview)}`;
    } else if (model.connection === 'unreachable') {
      text = UNREACHABLE;
    } else {
      text = 'DASH: connecting…';
    }
    const placement = this._placements.current;
    if (placement) {
      text += ` · this notebook: ${placement.worker}`;
    }
    return text;
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this._model.changed.disconnect(this.update, this);
    this._placements.changed.disconnect(this.update, this);
    super.dispose();
  }

  protected onUpdateRequest(): void {
    const text = this.text;
    const placement = this._placements.current;
    this._button.textContent = text;
    const detail = [text];
    if (placement?.where) {
      detail.push(`This notebook's session runs on ${placement.where}.`);
    }
    if (this._model.error) {
      detail.push(this._model.error);
    }
    detail.push('Open the DASH panel.');
    this._button.title = detail.join('\n');
    this._button.setAttribute('aria-label', detail.join('. ').replace(/\.\./g, '.'));
    this.toggleClass('dash-mod-unreachable', this._model.connection === 'unreachable');
  }

  private _model: DashModel;
  private _placements: PlacementTracker;
  private _button: HTMLButtonElement;
}
