/**
 * nbollama's JupyterLab extension: a right-hand side panel and a status-bar
 * item that follow the current notebook's kernel and show its nbollama
 * engine live over the `nbollama` comm (see `nbollama/comm.py`), and the
 * highlighting of `%%generate` cells (see `generate.ts`).
 */

import {
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import {
  EditorExtensionRegistry,
  IEditorExtensionRegistry
} from '@jupyterlab/codemirror';
import { INotebookTracker } from '@jupyterlab/notebook';
import { IStatusBar } from '@jupyterlab/statusbar';

import { KernelLink } from './connection';
import { generateCellHighlighting } from './generate';
import { NbollamaPanel, PANEL_ID } from './panel';
import { NbollamaStatus } from './status';

/** Command that shows (and focuses) the panel. */
export const OPEN_PANEL_COMMAND = 'nbollama:open-panel';

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'nbollama:plugin',
  description:
    'Side panel and status-bar item showing the slots, queue, throughput and memory of the kernel\'s nbollama engine.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [IStatusBar],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    statusBar: IStatusBar | null
  ): void => {
    const link = new KernelLink();
    const panel = new NbollamaPanel(link);
    app.shell.add(panel, 'right', { rank: 900 });

    const follow = (): void => {
      link.setSession(tracker.currentWidget?.sessionContext ?? null);
    };
    tracker.currentChanged.connect(follow);
    follow();

    app.commands.addCommand(OPEN_PANEL_COMMAND, {
      label: 'Show nbollama Panel',
      caption: 'Show the slots, throughput and memory of the kernel\'s nbollama engine',
      execute: () => {
        app.shell.activateById(PANEL_ID);
      }
    });

    if (statusBar !== null) {
      const item = new NbollamaStatus(link, () => {
        void app.commands.execute(OPEN_PANEL_COMMAND);
      });
      item.id = 'nbollama-status';
      statusBar.registerStatusItem('nbollama:status', {
        item,
        align: 'left',
        rank: 4,
        isActive: () => item.isActiveItem,
        activeStateChanged: item.activeStateChanged
      });
    }
  }
};

/** `%%generate` cells: options highlighted as options, prompts as plain text. */
const generateHighlighting: JupyterFrontEndPlugin<void> = {
  id: 'nbollama:generate-highlighting',
  description: 'Highlights the options of a %%generate cell and leaves its prompts plain text.',
  autoStart: true,
  requires: [IEditorExtensionRegistry],
  activate: (_app: JupyterFrontEnd, extensions: IEditorExtensionRegistry): void => {
    extensions.addExtension({
      name: 'nbollama:generate-cells',
      factory: options =>
        EditorExtensionRegistry.createImmutableExtension(
          generateCellHighlighting(options.model, options.model.sharedModel.getSource())
        )
    });
  }
};

export default [plugin, generateHighlighting];
