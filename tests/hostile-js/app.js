// The hostile suite's main cases written in JavaScript: one component, the
// case picked by the request's `case` config (the tests give each case its
// own manifest and budgets). Each must be contained by the host with a
// typed error, as its Rust counterpart in tests/hostile/ is.

import { Config, generate, params, strategy, user } from 'tessera-sdk';

function deep(n) {
  return deep(n + 1) + 1;
}

export const { run, fit } = strategy({
  run(req) {
    const c = Config.forRequest(req).get('case') ?? '';
    if (c === 'infinite-loop') {
      let n = 0;
      for (;;) n++;
    }
    if (c === 'memory-bomb') {
      const hoard = [];
      for (;;) hoard.push(new Uint8Array(1 << 20).fill(1));
    }
    if (c === 'deep-recursion') return { text: String(deep(0)), annotations: [] };
    if (c === 'forbidden-model') {
      const g = generate('smollm2-135m-instruct', user('hi'), params({ maxTokens: 4 }));
      return { text: g.text, annotations: [] };
    }
    if (c === 'giant-output') return { text: 'x'.repeat(4 << 20), annotations: [] };
    return { text: `benign: ${c || 'no case'}`, annotations: [] };
  },
});
