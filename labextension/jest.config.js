/**
 * Jest runs the pure view-model tests under src/__tests__ through ts-jest;
 * nothing there touches the DOM or JupyterLab, so a node environment is enough.
 */
module.exports = {
  preset: 'ts-jest',
  testEnvironment: 'node',
  testRegex: 'src/__tests__/.*\\.spec\\.ts$',
  transform: {
    '^.+\\.ts$': ['ts-jest', { tsconfig: 'tsconfig.test.json' }]
  }
};
