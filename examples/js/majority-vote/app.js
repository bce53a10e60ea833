// majority-vote in JavaScript: the Rust module `modules/majority-vote`
// ported line for line to the JavaScript SDK (same config, seeds, jobs,
// votes and tie-breaks), so the two give the same answer on the same
// request and pool.
//
// Samples k answers round-robin across the pool (each sample its own seed),
// extracts each final answer, and returns the most common one; ties go to
// the member `fit` measured most accurate on dev, then to pool order.

import {
  Config,
  ConfigError,
  ModuleError,
  errorText,
  extract,
  fanOut,
  generators,
  normalize,
  params,
  seedPlus,
  strategy,
  trace,
  vote,
} from 'tessera-sdk';

/** `fit`'s state: one `id<TAB>correct<TAB>total` line per member. */
function parseState(state) {
  const out = [];
  for (const line of new TextDecoder().decode(state).split('\n')) {
    const f = line.split('\t');
    if (f.length < 3 || !/^\d+$/.test(f[1]) || !/^\d+$/.test(f[2])) continue;
    out.push([f[0], Number(f[1]), Number(f[2])]);
  }
  return out;
}

/** Tie-break rank per member: dev accuracy when `fit` ran, else pool order. */
function ranks(voters, state) {
  const acc = state === undefined ? [] : parseState(state);
  const score = (id) => {
    const hit = acc.find(([m]) => m === id);
    return hit ? hit[1] / Math.max(hit[2], 1) : -1;
  };
  const order = voters.map((_, i) => i).sort((a, b) => score(voters[b].id) - score(voters[a].id) || a - b);
  const rank = new Array(voters.length).fill(0);
  order.forEach((i, r) => {
    rank[i] = r;
  });
  return rank;
}

export const { run, fit } = strategy({
  run(req) {
    const cfg = Config.forRequest(req);
    const k = cfg.parse('k', 5);
    if (k < 1 || k > 64) throw new ConfigError(`k = ${k}: use 1..=64 samples`);
    const temperature = cfg.parse('temperature', req.params.temperature ?? 0.7, 'float');
    const topP = cfg.parse('top_p', req.params.topP ?? 0.9, 'float');
    const maxTokens = cfg.parse('max_tokens', req.params.maxTokens ?? 128, 'int');
    const seed = req.params.seed ?? 0n;
    const voters = generators();
    if (voters.length === 0) throw new ModuleError('no generative member was granted');
    const jobs = [];
    for (let i = 0; i < k; i++) {
      jobs.push({
        model: voters[i % voters.length].id,
        input: req.input,
        params: params({ maxTokens, temperature, topP, topK: req.params.topK, seed: seedPlus(seed, i), stop: req.params.stop }),
      });
    }
    const rank = ranks(voters, req.state);
    if (req.state !== undefined) {
      const shown = parseState(req.state).map(([m, c, t]) => `${m} ${c}/${t}`);
      trace(undefined, 'tie-break', `dev ranking from fit: ${shown.join(', ')}`);
    }
    const texts = [];
    const answers = [];
    const priority = [];
    fanOut(jobs).forEach((r, i) => {
      if (r.ok) {
        const a = extract(r.ok.text);
        trace(r.ok.model, 'voter', `sample ${i}: answered \`${a}\``);
        texts.push(r.ok.text);
        answers.push(a);
        priority.push(rank[i % voters.length]);
      } else {
        trace(jobs[i].model, 'voter', `sample ${i} failed: ${errorText({ payload: r.err })}`);
      }
    });
    const tally = vote(answers, priority);
    if (tally === null) throw new ModuleError('no sample produced an answer');
    const agreement = tally.votes / Math.max(answers.length, 1);
    trace(undefined, 'aggregator', `\`${tally.answer}\` won with ${tally.votes}/${answers.length} votes`);
    return {
      text: texts[tally.winner],
      annotations: [
        ['answer', tally.answer],
        ['agreement', agreement.toFixed(2)],
        ['votes', `${tally.votes}/${answers.length}`],
        ['counts', tally.counts.map(([a, n]) => `${a}=${n}`).join('; ')],
      ],
    };
  },

  // Each member's greedy accuracy on the dev examples (for tie-breaks).
  fit(dev, config) {
    const maxTokens = config.parse('max_tokens', 128);
    let state = '';
    for (const m of generators()) {
      const jobs = dev.map((e) => ({ model: m.id, input: e.input, params: params({ maxTokens, temperature: 0 }) }));
      let correct = 0;
      fanOut(jobs).forEach((r, i) => {
        if (r.ok && normalize(extract(r.ok.text)) === normalize(dev[i].answer)) correct++;
      });
      trace(m.id, 'fit', `${correct}/${dev.length} dev answers correct`);
      state += `${m.id}\t${correct}\t${dev.length}\n`;
    }
    return new TextEncoder().encode(state);
  },
});
