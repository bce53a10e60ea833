"""Reading answers out of model replies, comparing them and voting.

The same rules as the Rust SDK's `tessera_sdk::answer` (and so the same as
the `tessera eval` harness), so that a Python strategy and a Rust one agree
on what an answer is. Pure Python: usable and testable outside a component.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

_ARTICLES = {"a", "an", "the"}


def last_boxed(text: str) -> Optional[str]:
    """The content of the last `\\boxed{...}` (or `\\box{...}`), nested braces kept."""
    found: Optional[Tuple[int, str]] = None
    for marker in ("\\boxed{", "\\box{"):
        pos = text.find(marker)
        while pos != -1:
            start = pos + len(marker)
            depth = 1
            for i, ch in enumerate(text[start:]):
                if ch == "{":
                    depth += 1
                elif ch == "}":
                    depth -= 1
                else:
                    continue
                if depth == 0:
                    if found is None or pos > found[0]:
                        found = (pos, text[start : start + i])
                    break
            pos = text.find(marker, pos + 1)
    return None if found is None else found[1]


def _clean(s: str) -> str:
    s = s.strip().strip("*\"'`: \t\r\n\v\f")
    s = s.rstrip(".!,")
    return s.strip()


def _rfind_ignoring_case(text: str, marker: str) -> int:
    """Where the ASCII `marker` last occurs in `text`, ignoring ASCII case
    (-1: nowhere). It searches `text` itself: positions in `text.lower()`
    are not positions in `text` (some letters lowercase to two)."""
    m = len(marker)
    for pos in range(len(text) - m, -1, -1):
        chunk = text[pos : pos + m]
        if chunk.isascii() and chunk.lower() == marker:
            return pos
    return -1


def _first_sentence(line: str) -> str:
    """`line` up to its first ";" or its first "." that ends a sentence
    (followed by a space or the end): "18.75" stays whole."""
    for i, c in enumerate(line):
        if c == ";" or (c == "." and (i + 1 == len(line) or line[i + 1] in " \t\n\r\f")):
            return line[:i]
    return line


_NUMBER = re.compile(r"[0-9]+(?:[.,][0-9]+)*")


def _last_number(s: str) -> Optional[float]:
    """The last number written in `s` (`,` thousands separators, a decimal
    point, a leading "-" as its sign unless it is a hyphen in a word)."""
    last = None
    for m in _NUMBER.finditer(s):
        start = m.start()
        signed = start > 0 and s[start - 1] == "-" and (start == 1 or not (s[start - 2].isascii() and s[start - 2].isalnum()))
        try:
            value = float(m.group().replace(",", ""))
        except ValueError:
            continue
        last = -value if signed else value
    return last


def _as_number(s: str) -> Optional[float]:
    """`s` as one number ("1,600", "$18", "-3", "4.0"), if that is all it is.
    Commas count only as thousands separators: "2,3" is a list, not 23."""
    t = s.strip().lstrip("$")
    if any(len(group) != 3 for group in t.split(".")[0].split(",")[1:]):
        return None
    try:
        return float(t.replace(",", ""))
    except ValueError:
        return None


def extract(text: str) -> str:
    """The final answer of a reply: the last boxed value, else what follows the
    last "final answer:" / "the answer is" / "answer:" (to the end of that
    sentence), else the first non-empty line."""
    boxed = last_boxed(text)
    if boxed is not None:
        return _clean(boxed)
    for marker in ("final answer:", "final answer is", "the answer is", "answer:"):
        pos = _rfind_ignoring_case(text, marker)
        if pos != -1:
            rest = text[pos + len(marker) :]
            line = next((l.strip() for l in rest.splitlines() if l.strip()), "")
            c = _clean(_first_sentence(line))
            if c:
                return c
    first = next((l.strip() for l in text.splitlines() if l.strip()), "")
    return _clean(first)


def normalize(s: str) -> str:
    """SQuAD-style normal form: lower case, punctuation to spaces, articles
    dropped, whitespace collapsed."""
    lowered = "".join(c if (c.isalnum() or c.isspace()) else " " for c in s.lower())
    return " ".join(w for w in lowered.split() if w not in _ARTICLES)


@dataclass
class Tally:
    """The outcome of a vote."""

    winner: int
    """Index (in the answers voted on) of the first answer of the winning form."""
    answer: str
    """The winning normal form."""
    votes: int
    """Votes it got."""
    counts: List[Tuple[str, int]]
    """Every form with its votes, most first."""


def _canonical(n: str, forms: Sequence[str]) -> str:
    shorter = [f for f in forms if len(f) < len(n) and n.endswith(" " + f)]
    return min(shorter, key=len) if shorter else n


def vote(answers: Sequence[str], priority: Sequence[int] = ()) -> Optional[Tally]:
    """Plurality over normalised answers ("the answer is Paris" and "Paris"
    count as one); ties go to the lower `priority` value, then to the earlier
    answer. `None` when no answer is non-empty."""
    forms = [f for f in (normalize(a) for a in answers) if f]
    counts: List[list] = []  # [norm, count, first index, best priority]
    for i, a in enumerate(answers):
        n = normalize(a)
        if not n:
            continue
        n = _canonical(n, forms)
        p = priority[i] if i < len(priority) else 2**64 - 1
        for c in counts:
            if c[0] == n:
                c[1] += 1
                c[3] = min(c[3], p)
                break
        else:
            counts.append([n, 1, i, p])
    if not counts:
        return None
    counts.sort(key=lambda c: (-c[1], c[3], c[2]))
    top = counts[0]
    return Tally(winner=top[2], answer=top[0], votes=top[1], counts=[(c[0], c[1]) for c in counts])


def letter(i: int) -> str:
    """The option letter of index `i` (A, B, ...)."""
    return chr(ord("A") + i % 26)


def choice(reply: str, options: Sequence[str]) -> Optional[int]:
    """The option a reply picks: a leading letter ("B", "(B)", "B) ..."), a
    letter after "answer is" / "answer:" / "option", or exactly one option's
    text. A reply naming two options picks none."""
    n = len(options)

    def letter_at(s: str) -> Optional[int]:
        s = s.lstrip(" \t\r\n\v\f*([")
        if not s:
            return None
        c = s[0]
        nxt = s[1] if len(s) > 1 else None
        if not (c.isascii() and c.isalpha()):
            return None
        idx = ord(c.upper()) - ord("A")
        # "I'm" and "A's" are words, not letters.
        bounded = nxt is None or not (nxt.isalnum() or nxt in "'\u2019")
        return idx if (0 <= idx < n and bounded) else None

    i = letter_at(reply)
    if i is not None:
        stripped = reply.lstrip()
        after = stripped[1:]
        # Not the English words "A" and "I" opening a sentence.
        word = (
            stripped[:1] in ("A", "a", "I", "i")
            and after.startswith(" ")
            and after.strip() != ""
            and not after.lstrip().startswith(("-", ":", ")"))
        )
        if not word:
            return i
    for marker in ("answer is", "answer:", "option"):
        pos = _rfind_ignoring_case(reply, marker)
        if pos != -1:
            i = letter_at(reply[pos + len(marker) :])
            if i is not None:
                return i
    norm = normalize(reply)
    hits = [
        i for i, o in enumerate(options) if normalize(o) and f" {normalize(o)} " in f" {norm} "
    ]
    return hits[0] if len(hits) == 1 else None


def answer_of(reply: str, options: Optional[Sequence[str]] = None) -> Optional[str]:
    """The answer of one reply: the picked option's letter for multiple
    choice, else the extracted final answer (`None` when there is none)."""
    if options is not None:
        i = choice(reply, options)
        return None if i is None else letter(i)
    a = extract(reply)
    return a if a.strip() else None


def plurality(replies: Sequence[Optional[str]], options: Optional[Sequence[str]] = None) -> Optional[Tuple[str, int]]:
    """The most common answer among `replies` (`None` for a failed call) and
    the index of the first reply giving it. Multiple choice counts letters
    exactly (ties: the first seen); free text votes as `vote` does."""
    answers = []
    for i, t in enumerate(replies):
        if t is None:
            continue
        a = answer_of(t, options)
        if a is not None:
            answers.append((i, a))
    if options is not None:
        counts: List[list] = []
        for i, a in answers:
            for c in counts:
                if c[0] == a:
                    c[1] += 1
                    break
            else:
                counts.append([a, 1, i])
        counts.sort(key=lambda c: -c[1])
        return (counts[0][0], counts[0][2]) if counts else None
    tally = vote([a for _, a in answers])
    if tally is None:
        return None
    return tally.answer, answers[tally.winner][0]


def is_correct(reply: str, answer: str, choices: Sequence[str] = ()) -> bool:
    """Whether `reply` answers a dev example right: for multiple choice the
    picked option must be the gold one (given as its letter or its text);
    otherwise the extracted answer must equal the gold one after
    normalisation, end with it, or equal it as a number."""
    if choices:
        want = answer.strip()
        if len(want) == 1:
            right = ord(want.upper()) - ord("A")
            right = right if right >= 0 else None
        else:
            right = next((i for i, c in enumerate(choices) if normalize(c) == normalize(want)), None)
        return right is not None and choice(reply, choices) == right
    extracted = extract(reply)
    number = _as_number(answer)
    if number is not None:
        # A numeric gold answer is compared as a number, sign and decimals
        # kept: the last number the answer states.
        got_number = _last_number(extracted)
        return got_number is not None and abs(got_number - number) < 1e-6
    got = normalize(extracted)
    want = normalize(answer)
    if not want:
        return False
    return got == want or got.endswith(" " + want)


def f1(pred: str, gold: str) -> float:
    """SQuAD token F1 of two answers after normalisation."""
    p = normalize(pred).split()
    g = normalize(gold).split()
    if not p or not g:
        return 1.0 if p == g else 0.0
    left = list(g)
    common = 0
    for t in p:
        if t in left:
            left.remove(t)
            common += 1
    if common == 0:
        return 0.0
    precision = common / len(p)
    recall = common / len(g)
    return 2 * precision * recall / (precision + recall)
