"""llm-blender in Python: the Rust module `modules/llm-blender` ported line
for line to the Python SDK, so the two give the same answer on the same
request and pool (and `fit` writes the same state bytes).

Every generative member answers; a ranker member judges every unordered
pair of answers ("which is better, A or B?"); the answers are ranked by
pairwise points and a fuser member rewrites the top `top_k` into one final
answer. See modules/llm-blender/README.md for the method and its source.
"""

import re

from tessera_sdk import (
    ModuleError,
    Strategy,
    error_text,
    fan_out,
    generate,
    generators,
    params,
    question,
    response,
    trace,
    types,
    user,
)
from tessera_sdk import state as st
from tessera_sdk.config import Config, ConfigError
from tessera_sdk.dev import MemberScore, best_member, evaluate, ranking

STATE_VERSION = 1
SHOWN_CHARS = 1500
TIE_WORDS = {"tie", "tied", "equal", "equally", "both", "neither", "same"}
LABEL_WORDS = {"response", "answer", "assistant", "option", "candidate", "output"}
VERDICT_VERBS = {"is", "was", "wins", "seems", "better", "because", "since", "provides", "gives", "answers", "has", "does"}
U64 = 2**64


class FitState:
    """What `fit` learns: each member's dev results, and their ranking."""

    def __init__(self, ranking_ids, scores):
        self.ranking = ranking_ids
        self.scores = scores

    def write(self, w):
        w.seq(self.ranking, lambda w, s: w.string(s))
        w.seq(self.scores, lambda w, s: s.write(w))

    @staticmethod
    def read(r):
        return FitState(r.seq(lambda r: r.string()), r.seq(MemberScore.read))


def settings(cfg):
    top_k = cfg.parse("top_k", 3)
    if not 1 <= top_k <= 16:
        raise ConfigError(f"config `top_k` = {top_k}: use 1..=16")
    max_tokens = cfg.parse("max_tokens", 256)
    if not 1 <= max_tokens <= 4096:
        raise ConfigError(f"config `max_tokens` = {max_tokens}: use 1..=4096")
    judge_max_tokens = cfg.parse("judge_max_tokens", 8)
    if not 1 <= judge_max_tokens <= 256:
        raise ConfigError(f"config `judge_max_tokens` = {judge_max_tokens}: use 1..=256")
    return top_k, max_tokens, judge_max_tokens


def shown(text):
    t = text.strip()
    return t[:SHOWN_CHARS] + " [...]" if len(t) > SHOWN_CHARS else t


def with_preamble(inp, preamble):
    if isinstance(inp, types.Input_Prompt):
        return types.Input_Prompt(f"{preamble}\n\n{inp.value}")
    msgs = [types.Message(role=m.role, content=m.content) for m in inp.value]
    for m in reversed(msgs):
        if m.role == "user":
            m.content = f"{preamble}\n\n{m.content}"
            break
    else:
        msgs.append(types.Message(role="user", content=preamble))
    return types.Input_Chat(msgs)


def verdict(reply):
    """'A', 'B', 'tie' or 'unclear': the Rust module's reading of a ranker reply."""
    words = [w for w in re.split(r"[^\w]|_", reply) if w]
    lower = [w.lower() for w in words]
    label = {"A": "A", "a": "A", "B": "B", "b": "B"}.get
    if words and label(words[0]):
        first = words[0]
        nxt = lower[1] if len(lower) > 1 else None
        article = first == "A" and nxt is not None and nxt not in VERDICT_VERBS and label(nxt) is None
        lowercase_article = first == "a" and nxt is not None
        if not article and not lowercase_article:
            return label(first)
    mentions = []
    for i, w in enumerate(words):
        after_label = i > 0 and lower[i - 1] in LABEL_WORDS
        if w in ("A", "B") and i > 0:
            mentions.append(label(w))
        elif w in ("a", "b") and after_label:
            mentions.append(label(w))
        ordinal_follows = i + 1 < len(lower) and (lower[i + 1] == "one" or lower[i + 1] in LABEL_WORDS)
        if lower[i] == "first" and ordinal_follows:
            mentions.append("A")
        elif lower[i] == "second" and ordinal_follows:
            mentions.append("B")
    has_a, has_b = "A" in mentions, "B" in mentions
    tie_word = any(w in TIE_WORDS for w in lower)
    if has_a and not has_b and not tie_word:
        return "A"
    if has_b and not has_a and not tie_word:
        return "B"
    return "tie" if tie_word else "unclear"


def points(v):
    return {"A": (1.0, 0.0), "B": (0.0, 1.0)}.get(v, (0.5, 0.5))


def order(pts, dev_rank):
    return sorted(range(len(pts)), key=lambda i: (-pts[i], dev_rank[i], i))


def configured(cfg, key, members):
    mid = (cfg.get(key) or "").strip()
    if not mid:
        return None
    for m in members:
        if m.id == mid:
            return m
    raise ConfigError(f"config `{key}` = `{mid}` is not a granted generative member")


def fmt_points(p):
    return f"{p:.0f}" if p == int(p) else f"{p:.1f}"


def choose_ranker(cfg, members, fitted):
    m = configured(cfg, "ranker", members)
    if m is not None:
        trace(m.id, "ranker", "ranker set by config `ranker`")
        return m
    m = best_member(fitted.ranking if fitted else None, members)
    if m is None:
        raise ModuleError("no generative member was granted")
    if fitted is not None:
        acc = next((s.accuracy() for s in fitted.scores if s.model == m.id), 0.0)
        why = f"ranker is the best dev member (accuracy {acc:.2f}); dev ranking: {', '.join(fitted.ranking)}"
    else:
        why = "no fit state: ranker is the first generative member in pool order"
    trace(m.id, "ranker", why)
    return m


def request_params(req, **override):
    p = req.params
    fields = dict(max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=p.seed, stop=p.stop)
    fields.update(override)
    return params(**fields)


def propose(req, members, max_tokens, seed):
    jobs = [
        types.Job(model=m.id, input=req.input, params=request_params(req, max_tokens=max_tokens, seed=(seed + i) % U64))
        for i, m in enumerate(members)
    ]
    cands = []
    for m, (g, err) in zip(members, fan_out(jobs)):
        if g is not None:
            trace(m.id, "proposer", f"answered ({g.usage.completion_tokens} tokens)")
            cands.append(types.Candidate(model=m.id, text=g.text))
        else:
            trace(m.id, "proposer", f"failed ({error_text(err)}); left out of the ranking")
    if not cands:
        raise ModuleError("no member produced an answer")
    return cands


def pairings(n):
    pairs = []
    for i in range(n):
        for j in range(i + 1, n):
            pairs.append((i, j) if len(pairs) % 2 == 0 else (j, i))
    return pairs


def judge_pairs(inp, ranker, cands, pairs, judge_max_tokens, seed):
    q = question(inp)
    jobs = [
        types.Job(
            model=ranker.id,
            input=user(
                f"You judge two responses to a question.\n\nQuestion:\n{q}\n\nResponse A:\n{shown(cands[a].text)}"
                f"\n\nResponse B:\n{shown(cands[b].text)}\n\nWhich response is better, A or B? Reply with one letter."
            ),
            params=params(max_tokens=judge_max_tokens, temperature=0.0, seed=(seed + 1000 + p) % U64),
        )
        for p, (a, b) in enumerate(pairs)
    ]
    results = fan_out(jobs) if jobs else []
    score = [0.0] * len(cands)
    for (a, b), (g, err) in zip(pairs, results):
        if g is not None:
            v, reply = verdict(g.text), f"replied `{g.text.strip()}`"
        else:
            v, reply = "unclear", f"failed ({error_text(err)})"
        pa, pb = points(v)
        score[a] += pa
        score[b] += pb
        outcome = {
            "A": f"{cands[a].model} wins",
            "B": f"{cands[b].model} wins",
            "tie": "tie: 0.5 each",
            "unclear": "no clear verdict: 0.5 each",
        }[v]
        trace(ranker.id, "judge", f"A = {cands[a].model} vs B = {cands[b].model}: {reply}; {outcome}")
    return score


def dev_ranks(cands, dev_ranking):
    big = U64 - 1
    if dev_ranking is None:
        return [big] * len(cands)
    return [dev_ranking.index(c.model) if c.model in dev_ranking else big for c in cands]


def unfused(winner, annotations):
    return response(winner.text, annotations + [("fused", "false"), ("winner", winner.model)])


def fuse(req, max_tokens, seed, fuser, cands, top, annotations):
    preamble = (
        "Here are candidate responses to the question below, best first. Write one final response that keeps "
        "what they get right and fixes their mistakes. Reply with the final response only.\n"
    )
    for r, i in enumerate(top):
        preamble += f"\nCandidate {r + 1}:\n{shown(cands[i].text)}\n"
    preamble += "\nQuestion:"
    annotations = annotations + [("fuser", fuser.id)]
    try:
        g = generate(
            fuser.id,
            with_preamble(req.input, preamble),
            request_params(req, max_tokens=max_tokens, seed=(seed + 2000) % U64),
        )
    except Exception as e:  # noqa: BLE001 - a failed fusion returns the winner
        winner = cands[top[0]]
        trace(fuser.id, "fuser", f"fusion failed ({error_text(e)}); returning the winner {winner.model}")
        return unfused(winner, annotations)
    trace(fuser.id, "fuser", f"fused the top {len(top)}: {', '.join(cands[i].model for i in top)}")
    return response(g.text, annotations + [("fused", "true")])


class WitWorld(Strategy):
    def run(self, req):
        cfg = Config.for_request(req)
        top_k, max_tokens, judge_max_tokens = settings(cfg)
        members = generators()
        if not members:
            raise ModuleError("no generative member was granted")
        fitted = st.load(STATE_VERSION, req.state, FitState.read)
        ranker = choose_ranker(cfg, members, fitted)
        fuser = configured(cfg, "fuser", members) or ranker
        seed = req.params.seed or 0

        cands = propose(req, members, max_tokens, seed)
        pairs = pairings(len(cands))
        score = judge_pairs(req.input, ranker, cands, pairs, judge_max_tokens, seed)
        ranked = order(score, dev_ranks(cands, fitted.ranking if fitted else None))
        shown_points = [f"{cands[i].model}={fmt_points(score[i])}" for i in ranked]
        trace(ranker.id, "ranker", f"ranking by pairwise points: {', '.join(shown_points)}")

        top = ranked[: min(top_k, len(cands))]
        annotations = [
            ("points", "; ".join(shown_points)),
            ("ranking", ", ".join(cands[i].model for i in ranked)),
            ("ranker", ranker.id),
            ("judge_calls", str(len(pairs))),
            ("top", ", ".join(cands[i].model for i in top)),
        ]
        if len(top) == 1:
            why = (
                "top_k = 1: the winner's answer is returned unfused"
                if top_k == 1
                else "only one answer to fuse: returned unfused"
            )
            trace(cands[top[0]].model, "fuser", why)
            return unfused(cands[top[0]], annotations)
        return fuse(req, max_tokens, seed, fuser, cands, top, annotations)

    def fit(self, dev, config):
        """Scores every member greedily on dev and keeps the ranking: the best
        dev member ranks and fuses, and dev rank breaks ties in points."""
        settings(config)
        fit_max_tokens = config.parse("fit_max_tokens", 32)
        if not 1 <= fit_max_tokens <= 4096:
            raise ConfigError(f"config `fit_max_tokens` = {fit_max_tokens}: use 1..=4096")
        if not dev:
            raise ConfigError("fit needs at least one dev example")
        scores = evaluate(dev, generators(), fit_max_tokens)
        state = FitState(ranking(scores), scores)
        trace(None, "fit", f"dev ranking: {', '.join(state.ranking)}")
        return st.save(STATE_VERSION, state.write)
