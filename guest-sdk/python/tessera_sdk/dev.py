"""Measuring members on dev examples for `fit`, as the Rust SDK's
`tessera_sdk::dev` does (same prompts, greedy decoding, same grading, same
ranking and the same state encoding of a member's results)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

from .answer import is_correct


@dataclass
class MemberScore:
    """One member's dev results, example by example."""

    model: str
    correct: List[bool]

    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct) if self.correct else 0.0

    def write(self, w) -> None:
        """postcard, as the Rust struct (`model`, then `correct`)."""
        w.string(self.model)
        w.seq(self.correct, lambda w, b: w.boolean(b))

    @staticmethod
    def read(r) -> "MemberScore":
        return MemberScore(r.string(), r.seq(lambda r: r.boolean()))


def evaluate(dev: Sequence, members: Sequence, max_tokens: int) -> List[MemberScore]:
    """Every member answers every dev example greedily (one fan-out); each
    answer graded by `is_correct`."""
    from . import error_text, fan_out, params, trace, types

    jobs = [
        types.Job(model=m.id, input=e.input, params=params(max_tokens=max_tokens, temperature=0.0))
        for m in members
        for e in dev
    ]
    results = fan_out(jobs)
    out = []
    for mi, m in enumerate(members):
        correct = []
        for ei, e in enumerate(dev):
            g, err = results[mi * len(dev) + ei]
            if g is not None:
                correct.append(is_correct(g.text, e.answer, e.choices))
            else:
                trace(m.id, "fit", f"dev example {ei} failed: {error_text(err)}")
                correct.append(False)
        s = MemberScore(m.id, correct)
        trace(m.id, "fit", f"{sum(correct)}/{len(dev)} dev answers correct")
        out.append(s)
    return out


def ranking(scores: Sequence[MemberScore]) -> List[str]:
    """Member ids by dev accuracy, best first (stable: pool order breaks ties)."""
    return [s.model for s in sorted(scores, key=lambda s: -s.accuracy())]


def best_member(ranking_ids: Optional[Sequence[str]], members: Sequence):
    """The first member of `ranking_ids` that is granted, else the first
    member; `None` when there is none."""
    if ranking_ids is not None:
        for mid in ranking_ids:
            for m in members:
                if m.id == mid:
                    return m
    return members[0] if members else None
