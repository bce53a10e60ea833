#!/usr/bin/env python3
"""Writes tests/fixtures/smollm2-llama-cpp.json: what llama.cpp (the
llama-cpp-python package) says about SmolLM2-135M-Instruct Q4_1 on a few fixed
inputs, so the Rust tests can compare Tessera's tokenizer and inference with
the reference engine without Python in CI.

Usage: pip install llama-cpp-python==0.3.36 && python3 scripts/llama-cpp-reference.py
"""
import json
import math
import os
import sys

from llama_cpp import Llama

HOME = os.environ.get("TESSERA_HOME", os.path.expanduser("~/.cache/tessera"))
MODEL = os.path.join(HOME, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "smollm2-llama-cpp.json")

CHATS = [
    "What is the capital of France?",
    "What is the capital of France.",
    "Write 3 haikus about 12 cats & 7 dogs!",
]
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Water boils at a temperature of",
]
GREEDY = ["What is the capital of France?", "What is the capital of France."]


def render(m, q):
    # The GGUF's own template (ChatML with SmolLM's default system turn).
    return (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
    )


def top5(m, text):
    toks = m.tokenize(text.encode(), add_bos=False, special=True)
    m.reset()
    m.eval(toks)
    logits = m.scores[len(toks) - 1]
    mx = max(logits)
    lse = mx + math.log(sum(math.exp(x - mx) for x in logits))
    best = sorted(range(len(logits)), key=lambda i: -logits[i])[:5]
    return toks, [{"token": i, "logprob": float(logits[i] - lse)} for i in best]


def main():
    m = Llama(model_path=MODEL, n_ctx=512, n_threads=2, verbose=False, logits_all=True)
    out = {"engine": "llama-cpp-python 0.3.36", "model_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
           "chat_token_ids": {}, "next_token_top5": {}, "greedy_chat": {}}
    for q in CHATS:
        out["chat_token_ids"][q] = m.tokenize(render(m, q).encode(), add_bos=False, special=True)
    for p in PROMPTS:
        _, best = top5(m, p)
        out["next_token_top5"][p] = best
    for q in GREEDY:
        r = m.create_chat_completion(messages=[{"role": "user", "content": q}], temperature=0.0, top_k=1, max_tokens=16)
        out["greedy_chat"][q] = r["choices"][0]["message"]["content"]
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print("wrote", os.path.normpath(OUT), file=sys.stderr)


if __name__ == "__main__":
    main()
