"""majority-vote in Python: the Rust module `modules/majority-vote` ported
line for line to the Python SDK (same config, seeds, jobs, votes and
tie-breaks), so the two give the same answer on the same request and pool.

Samples k answers round-robin across the pool (each sample its own seed),
extracts each final answer, and returns the most common one; ties go to the
member `fit` measured most accurate on dev, then to pool order.
"""

from tessera_sdk import (
    ConfigError,
    ModuleError,
    Strategy,
    error_text,
    fan_out,
    generators,
    params,
    response,
    trace,
    types,
)
from tessera_sdk.answer import extract, normalize, vote
from tessera_sdk.config import Config


def parse_state(state: bytes):
    """`fit`'s state: one `id<TAB>correct<TAB>total` line per member."""
    out = []
    for line in state.decode("utf-8", "replace").splitlines():
        f = line.split("\t")
        try:
            out.append((f[0], int(f[1]), int(f[2])))
        except (IndexError, ValueError):
            continue
    return out


def ranks(voters, state):
    """Tie-break rank per member: dev accuracy when `fit` ran, else pool order."""
    acc = parse_state(state) if state is not None else []

    def score(mid):
        for m, c, t in acc:
            if m == mid:
                return c / max(t, 1)
        return -1.0

    order = sorted(range(len(voters)), key=lambda i: (-score(voters[i].id), i))
    rank = [0] * len(voters)
    for r, i in enumerate(order):
        rank[i] = r
    return rank


class WitWorld(Strategy):
    def run(self, req):
        cfg = Config.for_request(req)
        k = cfg.parse("k", 5)
        if k < 1 or k > 64:
            raise ConfigError(f"k = {k}: use 1..=64 samples")
        temperature = cfg.parse("temperature", req.params.temperature if req.params.temperature is not None else 0.7, float)
        top_p = cfg.parse("top_p", req.params.top_p if req.params.top_p is not None else 0.9, float)
        max_tokens = cfg.parse("max_tokens", req.params.max_tokens if req.params.max_tokens is not None else 128)
        seed = req.params.seed or 0
        voters = generators()
        if not voters:
            raise ModuleError("no generative member was granted")
        jobs = [
            types.Job(
                model=voters[i % len(voters)].id,
                input=req.input,
                params=params(
                    max_tokens=max_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    top_k=req.params.top_k,
                    seed=(seed + i) % 2**64,
                    stop=req.params.stop,
                ),
            )
            for i in range(k)
        ]
        rank = ranks(voters, req.state)
        if req.state is not None:
            shown = [f"{m} {c}/{t}" for m, c, t in parse_state(req.state)]
            trace(None, "tie-break", "dev ranking from fit: " + ", ".join(shown))
        texts, answers, priority = [], [], []
        for i, (g, err) in enumerate(fan_out(jobs)):
            if g is not None:
                a = extract(g.text)
                trace(g.model, "voter", f"sample {i}: answered `{a}`")
                texts.append(g.text)
                answers.append(a)
                priority.append(rank[i % len(voters)])
            else:
                trace(jobs[i].model, "voter", f"sample {i} failed: {error_text(err)}")
        tally = vote(answers, priority)
        if tally is None:
            raise ModuleError("no sample produced an answer")
        agreement = tally.votes / max(len(answers), 1)
        trace(None, "aggregator", f"`{tally.answer}` won with {tally.votes}/{len(answers)} votes")
        counts = "; ".join(f"{a}={n}" for a, n in tally.counts)
        return response(
            texts[tally.winner],
            [
                ("answer", tally.answer),
                ("agreement", f"{agreement:.2f}"),
                ("votes", f"{tally.votes}/{len(answers)}"),
                ("counts", counts),
            ],
        )

    def fit(self, dev, config):
        """Each member's greedy accuracy on the dev examples (for tie-breaks)."""
        max_tokens = config.parse("max_tokens", 128)
        state = ""
        for m in generators():
            jobs = [
                types.Job(model=m.id, input=e.input, params=params(max_tokens=max_tokens, temperature=0.0))
                for e in dev
            ]
            correct = sum(
                1
                for (g, _), e in zip(fan_out(jobs), dev)
                if g is not None and normalize(extract(g.text)) == normalize(e.answer)
            )
            trace(m.id, "fit", f"{correct}/{len(dev)} dev answers correct")
            state += f"{m.id}\t{correct}\t{len(dev)}\n"
        return state.encode()
