#!/usr/bin/env python3
"""Writes tests/fixtures/<member>-llama-cpp.json: what llama.cpp (the
llama-cpp-python package) says about each GGUF member of the default pool on a
few fixed inputs, so the Rust tests can compare Tessera's tokenizer and
inference with the reference engine without Python in CI. Chat prompts are
rendered by llama-cpp-python's own Jinja2 formatter from the file's template.

Usage: pip install llama-cpp-python==0.3.36 && python3 scripts/llama-cpp-reference.py
"""
import json
import math
import os
import sys

from llama_cpp import Llama

HOME = os.environ.get("TESSERA_HOME", os.path.expanduser("~/.cache/tessera"))
MODELS = {
    "smollm2-135m-instruct": ("SmolLM2-135M-Instruct.Q4_1.gguf", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "qwen2.5-coder-0.5b-instruct": ("Qwen2.5-Coder-0.5B-Instruct.gguf", "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "gemma-3-270m": ("gemma-3-270m-q4_k_m.gguf", "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}
# Raw prompts whose token ids are compared (digits, spacing, Unicode, code).
TOKENIZE = [
    "Hello world!  Two  spaces, naïve café 日本語 🙂",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "In 1969, 3 astronauts flew 384,400 km.",
]
FIXTURES = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")

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
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    meta = m.metadata
    tokens = lambda key: m.detokenize([int(meta[key])], special=True).decode() if key in meta else ""
    fmt = Jinja2ChatFormatter(
        template=meta["tokenizer.chat_template"],
        eos_token=tokens("tokenizer.ggml.eos_token_id"),
        bos_token=tokens("tokenizer.ggml.bos_token_id"),
    )
    return fmt(messages=[{"role": "user", "content": q}]).prompt


def top5(m, text):
    # add_bos=True adds BOS only where the model's metadata asks for it.
    toks = m.tokenize(text.encode(), add_bos=True, special=True)
    m.reset()
    m.eval(toks)
    logits = m.scores[len(toks) - 1]
    mx = max(logits)
    lse = mx + math.log(sum(math.exp(x - mx) for x in logits))
    best = sorted(range(len(logits)), key=lambda i: -logits[i])[:5]
    return toks, [{"token": i, "logprob": float(logits[i] - lse)} for i in best]


def one(member, file, sha):
    m = Llama(model_path=os.path.join(HOME, "models", file), n_ctx=512, n_threads=2, verbose=False, logits_all=True)
    out = {"engine": "llama-cpp-python 0.3.36", "member": member, "model_sha256": sha,
           "prompt_token_ids": {}, "chat_token_ids": {}, "next_token_top5": {}, "greedy_chat": {}, "greedy_prompt": {}}
    has_template = "tokenizer.chat_template" in m.metadata
    for p in TOKENIZE:
        out["prompt_token_ids"][p] = m.tokenize(p.encode(), add_bos=True, special=True)
    for q in CHATS if has_template else []:
        out["chat_token_ids"][q] = m.tokenize(render(m, q).encode(), add_bos=False, special=True)
    for p in PROMPTS:
        _, best = top5(m, p)
        out["next_token_top5"][p] = best
    for q in GREEDY if has_template else []:
        r = m.create_chat_completion(messages=[{"role": "user", "content": q}], temperature=0.0, top_k=1, max_tokens=16)
        out["greedy_chat"][q] = r["choices"][0]["message"]["content"]
    for p in PROMPTS:
        r = m.create_completion(p, temperature=0.0, top_k=1, max_tokens=16)
        out["greedy_prompt"][p] = r["choices"][0]["text"]
    os.makedirs(FIXTURES, exist_ok=True)
    path = os.path.join(FIXTURES, f"{member}-llama-cpp.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print("wrote", os.path.normpath(path), file=sys.stderr)


def main():
    for member, (file, sha) in MODELS.items():
        one(member, file, sha)


if __name__ == "__main__":
    main()
