#!/usr/bin/env python3
"""The composed-request peer of benches/serve_load.rs (`-- composed`): the
same majority vote as Tessera's `majority-vote` system (one greedy answer
per member, the plurality of the normalised answers, ties to the member
listed first), written as a sequential Python pipeline over
llama-cpp-python, one request after another.

Usage: pipeline_peer.py JOB.json
JOB.json: {"models": [GGUF paths], "prompts": [user turns],
           "max_tokens": 16, "threads": 2}
Prints one JSON object: {"requests", "wall_s", "req_s", "p50_ms", "p99_ms",
"answers"} (models are loaded, and each answers one warm-up prompt, before
the clock starts). Needs llama-cpp-python (LLAMA_CPP_PYTHON, RESULTS.md).
"""
import json
import re
import statistics
import string
import sys
import time

from llama_cpp import Llama


def normalise(text):
    """The first line, lower case, without punctuation or articles."""
    line = text.strip().split("\n", 1)[0].lower()
    line = "".join(ch for ch in line if ch not in string.punctuation)
    line = re.sub(r"\b(a|an|the)\b", " ", line)
    return " ".join(line.split())


def vote(answers):
    """Plurality of the normalised answers; ties to the earliest member."""
    forms = [normalise(a) for a in answers]
    counts = {}
    for f in forms:
        if f:
            counts[f] = counts.get(f, 0) + 1
    if not counts:
        return answers[0] if answers else ""
    best = max(counts.values())
    for a, f in zip(answers, forms):
        if counts.get(f) == best:
            return a
    return answers[0]


def percentile(sorted_ms, p):
    i = round(p / 100 * (len(sorted_ms) - 1))
    return sorted_ms[min(i, len(sorted_ms) - 1)]


def main():
    job = json.load(open(sys.argv[1], encoding="utf-8"))
    threads, max_tokens = job["threads"], job["max_tokens"]
    models = [
        Llama(model_path=p, n_ctx=2048, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
        for p in job["models"]
    ]

    def ask(prompt):
        answers = []
        for m in models:
            out = m.create_chat_completion(
                messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens,
                temperature=0.0,
                top_k=1,
            )
            answers.append(out["choices"][0]["message"]["content"] or "")
        return vote(answers)

    ask("Say hello.")
    latencies, answers = [], []
    started = time.perf_counter()
    for prompt in job["prompts"]:
        t = time.perf_counter()
        answers.append(ask(prompt))
        latencies.append((time.perf_counter() - t) * 1000)
    wall = time.perf_counter() - started
    ms = sorted(latencies)
    print(json.dumps({
        "requests": len(latencies),
        "wall_s": wall,
        "req_s": len(latencies) / wall,
        "p50_ms": statistics.median(ms),
        "p99_ms": percentile(ms, 99),
        "answers": answers,
    }))


if __name__ == "__main__":
    main()
