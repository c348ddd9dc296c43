/**
 * The nbollama icon: four slot bars of different lengths, coloured with the
 * theme's icon class so it follows light and dark themes.
 */

import { LabIcon } from '@jupyterlab/ui-components';

const svgstr = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <rect x="3" y="3" width="18" height="3" rx="1.5"/>
    <rect x="3" y="8" width="11" height="3" rx="1.5"/>
    <rect x="3" y="13" width="15" height="3" rx="1.5"/>
    <rect x="3" y="18" width="7" height="3" rx="1.5"/>
  </g>
</svg>`;

export const nbollamaIcon = new LabIcon({ name: 'nbollama:slots', svgstr });
