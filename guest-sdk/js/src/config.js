// A strategy's configuration: the manifest's `[config]`, overridden by the
// request's decoding parameters and its `config` pairs, read with typed,
// range-checked accessors whose errors name the key, the value and the fix.

/** A configuration value that cannot be used: the caller's fault, reported
 * to the host as `invalid-params`. */
export class ConfigError extends Error {}

/** The error for `key` = `value`, saying `why`. */
export function invalid(key, value, why) {
  return new ConfigError(`config \`${key}\` = \`${value}\`: ${why}`);
}

export class Config {
  /** @param {Array<[string, string]>} pairs the last one given for a key wins */
  constructor(pairs = []) {
    this.pairs = [...pairs];
  }

  /** The request's decoding parameters, then its `config` pairs (which win). */
  static forRequest(req) {
    const pairs = [];
    for (const [key, field] of [
      ['max_tokens', 'maxTokens'],
      ['temperature', 'temperature'],
      ['top_p', 'topP'],
      ['top_k', 'topK'],
    ]) {
      const v = req.params[field];
      if (v !== undefined && v !== null) pairs.push([key, String(v)]);
    }
    return new Config([...pairs, ...req.config]);
  }

  /** The raw value of `key`, or `undefined`. */
  get(key) {
    for (let i = this.pairs.length - 1; i >= 0; i--) if (this.pairs[i][0] === key) return this.pairs[i][1];
    return undefined;
  }

  /** `key` as an integer (`int`), a number (`float`), a boolean or a string,
   * `dflt` when absent. */
  parse(key, dflt, kind = typeof dflt === 'number' ? (Number.isInteger(dflt) ? 'int' : 'float') : typeof dflt) {
    const raw = this.get(key);
    if (raw === undefined) return dflt;
    const t = raw.trim();
    let v;
    if (kind === 'int') v = /^[+-]?\d+$/.test(t) ? Number(t) : NaN;
    else if (kind === 'float') v = t === '' ? NaN : Number(t);
    else if (kind === 'boolean') v = { true: true, 1: true, yes: true, false: false, 0: false, no: false }[t.toLowerCase()];
    else v = t;
    if (v === undefined || (typeof v === 'number' && Number.isNaN(v))) {
      const name = { int: 'integer', float: 'number', boolean: 'boolean' }[kind] ?? kind;
      throw new ConfigError(`config \`${key}\` = \`${raw}\` is not a valid ${name}`);
    }
    return v;
  }
}
