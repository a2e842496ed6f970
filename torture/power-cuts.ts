import type { Campaign } from './harness.js'
export const powerCutCampaign: Campaign = { name: 'power-cuts', unit: 'x', async run() { return { counts: {}, done: 0, failures: 0, stoppedByTime: false } }, async replay() {} }
