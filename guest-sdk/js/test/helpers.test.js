// The pure helpers agree with the Rust SDK's (the same cases as
// guest-sdk/src/answer.rs and config.rs). Run: node --test guest-sdk/js/test/
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { choice, extract, f1, lastBoxed, normalize, vote } from '../src/answer.js';
import { Config, ConfigError } from '../src/config.js';

const OPTS = ['Paris', 'Lyon', 'Marseille', 'Nice'];

test('boxed keeps nested braces and takes the last', () => {
  assert.equal(lastBoxed('so \\boxed{\\frac{1}{2}} done'), '\\frac{1}{2}');
  assert.equal(lastBoxed('\\boxed{1} then \\boxed{2}'), '2');
  assert.equal(lastBoxed('\\box{7}'), '7');
  assert.equal(lastBoxed('\\boxed{unclosed'), null);
});

test('extract prefers box, then answer is, then the first line', () => {
  assert.equal(extract('Work... The answer is **Paris**.'), 'Paris');
  assert.equal(extract('Final Answer: 42\nmore'), '42');
  assert.equal(extract('Paris.\nIt is the capital.'), 'Paris');
  assert.equal(extract('x \\boxed{12} and the answer is 13'), '12');
});

test('normalize is SQuAD style', () => {
  assert.equal(normalize('The  Eiffel-Tower!'), 'eiffel tower');
  assert.equal(normalize('an Apple'), 'apple');
  assert.equal(normalize('Zürich, 東京!'), 'zürich 東京');
});

test('vote counts normal forms and breaks ties by priority', () => {
  const a = ['Paris', 'paris.', 'Lyon', '', 'Lyon'];
  const t = vote(a);
  assert.deepEqual([t.answer, t.votes, t.winner], ['paris', 2, 0]);
  assert.equal(vote(a, [5, 5, 0, 5, 5]).answer, 'lyon');
  assert.equal(vote(['']), null);
  const s = vote(['The capital of France is Paris', 'Paris', 'Lyon', 'paris.']);
  assert.deepEqual([s.answer, s.votes], ['paris', 3]);
  assert.equal(vote(['It is Paris', 'Lyon']).answer, 'it is paris');
});

test('choice reads a leading letter or an answer marker', () => {
  assert.equal(choice('B', OPTS), 1);
  assert.equal(choice('(C) Marseille', OPTS), 2);
  assert.equal(choice('d.', OPTS), 3);
  assert.equal(choice('A) Paris', OPTS), 0);
  assert.equal(choice('I think the answer is C.', OPTS), 2);
  assert.equal(choice('Answer: b', OPTS), 1);
  assert.equal(choice('It must be Lyon.', OPTS), 1);
  assert.equal(choice('Paris or Lyon', OPTS), null);
  assert.equal(choice('A city in the south', OPTS), null);
  assert.equal(choice('E', OPTS), null);
  assert.equal(choice('Because', OPTS), null);
});

test('markers are found in the reply itself, and decimals end no sentence', () => {
  assert.equal(extract('İİ ANSWER: Paris'), 'Paris');
  assert.equal(extract('İİİ The answer is 4'), '4');
  assert.equal(extract('The answer is 18.75. Then more'), '18.75');
});

test('the words I and A are not options', () => {
  const o = Array.from({ length: 13 }, (_, i) => `option text ${i}`);
  assert.equal(choice('I think the answer is B', o), 1);
  assert.equal(choice("I'm not sure", o), null);
  assert.equal(choice('i guess so', o), null);
  assert.equal(choice('I', o), 8);
  assert.equal(choice('I) option text 8', o), 8);
  assert.equal(choice('(I)', o), 8);
});

test('f1 is SQuAD token overlap', () => {
  assert.equal(f1('The Eiffel Tower', 'eiffel tower'), 1);
  assert.equal(f1('Paris', 'Lyon'), 0);
  assert.ok(Math.abs(f1('the tower in paris', 'eiffel tower') - 0.4) < 1e-9);
  assert.equal(f1('', ''), 1);
});

test('config: the last value wins, types follow the default, errors name the fix', () => {
  const c = new Config([['k', '3'], ['k', '7'], ['t', '0.5'], ['on', 'yes'], ['bad', 'many']]);
  assert.equal(c.parse('k', 5), 7);
  assert.equal(c.parse('t', 1.5), 0.5);
  assert.equal(c.parse('missing', 9), 9);
  assert.equal(c.parse('on', false), true);
  assert.throws(() => c.parse('bad', 5), (e) => e instanceof ConfigError && /config `bad` = `many` is not a valid integer/.test(e.message));
  assert.throws(() => c.parse('t', 5), /not a valid integer/);
});
