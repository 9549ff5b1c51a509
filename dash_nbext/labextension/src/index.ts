/** DASH in JupyterLab: a status bar item and a side panel, fed by the gateway's overview. */
import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';

import { DashModel } from './api';
import { DashPanel, PANEL_ID } from './panel';
import { PlacementTracker } from './placement';
import { DashStatus } from './status';

const OPEN_PANEL = 'dash-distributed:open-panel';

const dashIcon = new LabIcon({
  name: 'dash-distributed:logo',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 64 64" width="16" height="16">' +
    '<path class="jp-icon3" fill="none" stroke="#616161" stroke-width="6" ' +
    'd="M14 18h14c10 0 16 6 16 14s-6 14-16 14H14z"/>' +
    '<path fill="none" stroke="#f2a900" stroke-width="5" stroke-linecap="round" ' +
    'stroke-linejoin="round" d="M40 24l10 8-10 8"/></svg>'
});

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'dash-distributed-jupyterlab:plugin',
  description: 'DASH: workers and GPUs online, where this notebook runs, and the cluster panel.',
  autoStart: true,
  optional: [IStatusBar, ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    statusBar: IStatusBar | null,
    palette: ICommandPalette | null
  ): void => {
    const model = new DashModel();
    const placements = new PlacementTracker(app.shell);

    const panel = new DashPanel(model, placements);
    panel.title.icon = dashIcon;
    panel.title.caption = 'DASH distributed';
    app.shell.add(panel, 'right', { rank: 900 });

    app.commands.addCommand(OPEN_PANEL, {
      label: 'Show the DASH panel',
      caption: 'Workers, sessions, work and storage of the DASH cluster',
      execute: () => app.shell.activateById(PANEL_ID)
    });
    palette?.addItem({ command: OPEN_PANEL, category: 'DASH' });

    if (statusBar) {
      const item = new DashStatus(model, placements, () => {
        void app.commands.execute(OPEN_PANEL);
      });
      statusBar.registerStatusItem('dash-distributed-jupyterlab:status', {
        item,
        align: 'left',
        rank: 1000
      });
    }
    model.start();
  }
};

export default plugin;
