// Tessera's JavaScript SDK for collaboration strategies.
//
// A strategy is a WebAssembly component of the `tessera:collab` package
// (`wit/collab.wit`), built from JavaScript with componentize-js
// (`guest-sdk/js/build.mjs`). The host runs the models; a strategy asks it
// through the `models` interface and records its steps through `trace`. This
// module wraps those calls and carries the Rust SDK's helpers (answer
// extraction, normalisation and voting; typed configuration), so a method
// reads like its pseudo-code:
//
//   import { strategy, generators, generate } from 'tessera-sdk';
//   export const { run, fit } = strategy({
//     run(req) {
//       const first = generators()[0];
//       return { text: generate(first.id, req.input, req.params).text, annotations: [] };
//     },
//   });
//
// Errors: throw `ModuleError` (the strategy failed: `module-failed`) or
// `ConfigError` (the caller's configuration: `invalid-params`), or let a
// host call's own error propagate (budget, deadline, permission): the
// export reports each as the host's typed error.

import * as models from 'tessera:collab/models@0.1.2';
import { emit } from 'tessera:collab/trace@0.1.2';
import * as output from 'tessera:collab/output@0.1.2';

import { Config, ConfigError } from './config.js';

export { Config, ConfigError, invalid } from './config.js';
export { extract, normalize, vote, choice, letter, f1, lastBoxed } from './answer.js';

/** The strategy itself failed (reported as `module-failed`). */
export class ModuleError extends Error {}

/** The WIT error payload an exception stands for. */
function hostError(e) {
  if (e && typeof e === 'object' && 'payload' in e && e.payload && typeof e.payload.tag === 'string') return e.payload;
  if (e instanceof ConfigError) return { tag: 'invalid-params', val: e.message };
  const what = e instanceof Error ? `${e.name}: ${e.message}` : String(e);
  return { tag: 'module-failed', val: what };
}

/** One line for a host call's error (for traces and messages). */
export function errorText(e) {
  const p = hostError(e);
  if (p.val === undefined) return p.tag;
  const detail = typeof p.val === 'object' ? JSON.stringify(p.val) : p.val;
  return `${p.tag}: ${detail}`;
}

/** The exports of a strategy world from `{ run, fit }`: `fit` receives a
 * `Config`; exceptions become typed host errors. */
export function strategy({ run, fit }) {
  return {
    run(req) {
      try {
        return run(req);
      } catch (e) {
        throw hostError(e);
      }
    },
    fit(dev, config) {
      if (!fit) return undefined;
      try {
        return fit(dev, new Config(config));
      } catch (e) {
        throw hostError(e);
      }
    },
  };
}

/** Every member this module may call, with its card. */
export function listModels() {
  return models.listModels();
}

/** The members that generate, in pool order. */
export function generators() {
  return models.listModels().filter((m) => m.capabilities.includes('generate'));
}

/** Decoding parameters; `undefined` leaves a field to the member's default.
 * `seed` is a BigInt (u64). */
export function params({ maxTokens, temperature, topP, topK, seed, stop = [] } = {}) {
  return { maxTokens, temperature, topP, topK, seed, stop };
}

/** A one-turn chat input. */
export function user(text) {
  return { tag: 'chat', val: [{ role: 'user', content: text }] };
}

/** One generation by `model` (throws the host's typed error). */
export function generate(model, input, genParams) {
  return models.generate(model, input, genParams);
}

/** `generate`, with every token also sent to a streaming caller as it
 * decodes (`output`, WIT 0.1.2). The answer the strategy returns must begin
 * with everything it streamed. */
export function generateStreamed(model, input, genParams) {
  return output.generateStreamed(model, input, genParams);
}

/** Sends `text` to a streaming caller now, as the next piece of the answer.
 * Each write counts as one host call; an empty one sends nothing. */
export function write(text) {
  output.write(text);
}

/** Many generations at once, run in parallel by the host: one
 * `{ ok: generation }` or `{ err: payload }` per job. */
export function fanOut(jobs) {
  return models.fanOut(jobs).map((r) => (r.tag === 'ok' ? { ok: r.val } : { err: r.val }));
}

/** Log-likelihood of each continuation after `prompt`. */
export function score(model, prompt, continuations) {
  return models.score(model, prompt, continuations);
}

/** L2-normalised sentence embeddings. */
export function embed(model, texts) {
  return models.embed(model, texts);
}

/** Records one step of the strategy in the answer's provenance. */
export function trace(model, role, note) {
  emit({ model: model ?? undefined, role, note });
}

/** A u64 seed plus `i`, wrapping as the Rust modules' `wrapping_add`. */
export function seedPlus(seed, i) {
  return (BigInt(seed ?? 0) + BigInt(i)) & 0xffffffffffffffffn;
}
