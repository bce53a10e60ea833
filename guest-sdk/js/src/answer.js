// Reading answers out of model replies, comparing them and voting: the same
// rules as the Rust SDK's `tessera_sdk::answer` (and the `tessera eval`
// harness), so JavaScript, Python and Rust strategies agree on what an
// answer is. Pure JavaScript: testable with `node --test`.

const ARTICLES = new Set(['a', 'an', 'the']);

/** Rust's `char::is_alphanumeric`, without Unicode property escapes (the
 * component's JS engine is built without them): ASCII exactly; beyond
 * ASCII, letters with case, and everything that is not whitespace,
 * punctuation or a symbol of the Latin-1, general-punctuation and CJK
 * punctuation blocks (so CJK ideographs count as letters). */
export function isAlnum(c) {
  const code = c.codePointAt(0);
  if (code < 0x80) return /[A-Za-z0-9]/.test(c);
  if (/\s/.test(c)) return false;
  if (c.toLowerCase() !== c.toUpperCase()) return true;
  if (code <= 0xbf || code === 0xd7 || code === 0xf7) return false;
  if ((code >= 0x2000 && code <= 0x2bff) || (code >= 0x3000 && code <= 0x303f)) return false;
  if ((code >= 0xfe30 && code <= 0xfe4f) || (code >= 0xff00 && code <= 0xff0f)) return false;
  return true;
}

/** The content of the last `\boxed{...}` (or `\box{...}`), nested braces kept. */
export function lastBoxed(text) {
  let found = null;
  for (const marker of ['\\boxed{', '\\box{']) {
    let pos = text.indexOf(marker);
    while (pos !== -1) {
      const start = pos + marker.length;
      let depth = 1;
      for (let i = start; i < text.length; i++) {
        const ch = text[i];
        if (ch === '{') depth++;
        else if (ch === '}') depth--;
        else continue;
        if (depth === 0) {
          if (found === null || pos > found[0]) found = [pos, text.slice(start, i)];
          break;
        }
      }
      pos = text.indexOf(marker, pos + 1);
    }
  }
  return found === null ? null : found[1];
}

function clean(s) {
  return s
    .trim()
    .replace(/^[*"'`:\s]+|[*"'`:\s]+$/g, '')
    .replace(/[.!,]+$/, '')
    .trim();
}

function firstLine(text) {
  for (const l of text.split(/\r?\n/)) {
    if (l.trim()) return l.trim();
  }
  return '';
}

/** The final answer of a reply: the last boxed value, else what follows the
 * last "final answer:" / "the answer is" / "answer:" (to the end of that
 * sentence), else the first non-empty line. */
export function extract(text) {
  const boxed = lastBoxed(text);
  if (boxed !== null) return clean(boxed);
  for (const marker of ['final answer:', 'final answer is', 'the answer is', 'answer:']) {
    const pos = lastIndexIgnoringCase(text, marker);
    if (pos !== -1) {
      const line = firstLine(text.slice(pos + marker.length));
      const c = clean(firstSentence(line));
      if (c) return c;
    }
  }
  return clean(firstLine(text));
}

/** Where the ASCII `marker` last occurs in `text`, ignoring ASCII case (-1:
 * nowhere). It searches `text` itself: positions in `text.toLowerCase()` are
 * not positions in `text` (some letters lowercase to two code units). */
function lastIndexIgnoringCase(text, marker) {
  for (let pos = text.length - marker.length; pos >= 0; pos--) {
    const chunk = text.slice(pos, pos + marker.length);
    if (/^[\x00-\x7f]*$/.test(chunk) && chunk.toLowerCase() === marker) return pos;
  }
  return -1;
}

/** `line` up to its first ";" or its first "." that ends a sentence
 * (followed by a space or the end): "18.75" stays whole. */
function firstSentence(line) {
  for (let i = 0; i < line.length; i++) {
    const c = line[i];
    if (c === ';' || (c === '.' && (i + 1 === line.length || ' \t\n\r\f'.includes(line[i + 1])))) {
      return line.slice(0, i);
    }
  }
  return line;
}

/** SQuAD-style normal form: lower case, punctuation to spaces, articles
 * dropped, whitespace collapsed. */
export function normalize(s) {
  const lowered = Array.from(s.toLowerCase())
    .map((c) => (isAlnum(c) || /\s/.test(c) ? c : ' '))
    .join('');
  return lowered
    .split(/\s+/)
    .filter((w) => w && !ARTICLES.has(w))
    .join(' ');
}

function canonical(n, forms) {
  let best = null;
  for (const f of forms) {
    if (f.length < n.length && n.endsWith(' ' + f) && (best === null || f.length < best.length)) best = f;
  }
  return best ?? n;
}

/** Plurality over normalised answers; ties go to the lower `priority`, then
 * to the earlier answer. `null` when no answer is non-empty. Returns
 * `{winner, answer, votes, counts: [[form, votes], ...]}`. */
export function vote(answers, priority = []) {
  const forms = answers.map(normalize).filter((f) => f);
  const counts = []; // [norm, count, first index, best priority]
  answers.forEach((a, i) => {
    let n = normalize(a);
    if (!n) return;
    n = canonical(n, forms);
    const p = i < priority.length ? priority[i] : Number.MAX_SAFE_INTEGER;
    const c = counts.find((c) => c[0] === n);
    if (c) {
      c[1] += 1;
      c[3] = Math.min(c[3], p);
    } else counts.push([n, 1, i, p]);
  });
  if (counts.length === 0) return null;
  counts.sort((a, b) => b[1] - a[1] || a[3] - b[3] || a[2] - b[2]);
  const top = counts[0];
  return { winner: top[2], answer: top[0], votes: top[1], counts: counts.map((c) => [c[0], c[1]]) };
}

/** The option letter of index `i`. */
export function letter(i) {
  return String.fromCharCode(65 + (i % 26));
}

/** The option a reply picks (leading letter, a letter after "answer is" /
 * "answer:" / "option", or exactly one option's text), else `null`. */
export function choice(reply, options) {
  const n = options.length;
  const letterAt = (s) => {
    s = s.replace(/^[\s*([]+/, '');
    if (!s) return null;
    const c = s[0];
    const next = s.length > 1 ? s[1] : null;
    if (!/^[A-Za-z]$/.test(c)) return null;
    const idx = c.toUpperCase().charCodeAt(0) - 65;
    // "I'm" and "A's" are words, not letters.
    const bounded = next === null || !(isAlnum(next) || next === "'" || next === '\u2019');
    return idx < n && bounded ? idx : null;
  };
  const i = letterAt(reply);
  if (i !== null) {
    const stripped = reply.replace(/^\s+/, '');
    const after = stripped.slice(1);
    // Not the English words "A" and "I" opening a sentence.
    const word =
      ['A', 'a', 'I', 'i'].includes(stripped[0]) &&
      after.startsWith(' ') &&
      after.trim() !== '' &&
      !/^[-:)]/.test(after.replace(/^\s+/, ''));
    if (!word) return i;
  }
  for (const marker of ['answer is', 'answer:', 'option']) {
    const pos = lastIndexIgnoringCase(reply, marker);
    if (pos !== -1) {
      const j = letterAt(reply.slice(pos + marker.length));
      if (j !== null) return j;
    }
  }
  const norm = normalize(reply);
  const hits = [];
  options.forEach((o, k) => {
    const no = normalize(o);
    if (no && ` ${norm} `.includes(` ${no} `)) hits.push(k);
  });
  return hits.length === 1 ? hits[0] : null;
}

/** SQuAD token F1 of two answers after normalisation. */
export function f1(pred, gold) {
  const p = normalize(pred).split(' ').filter((x) => x);
  const g = normalize(gold).split(' ').filter((x) => x);
  if (p.length === 0 || g.length === 0) return p.length === g.length ? 1 : 0;
  const left = [...g];
  let common = 0;
  for (const t of p) {
    const k = left.indexOf(t);
    if (k !== -1) {
      left.splice(k, 1);
      common++;
    }
  }
  if (common === 0) return 0;
  const precision = common / p.length;
  const recall = common / g.length;
  return (2 * precision * recall) / (precision + recall);
}
