#!/usr/bin/env python3
"""llama.cpp's prefill and decode speed on a GGUF file, for benches/speed.rs.

Usage: llama_cpp_speed.py MODEL.gguf THREADS PROMPT_FILE DECODE_TOKENS REPS
Prints one JSON object: {"prefill_tok_s", "decode_tok_s", "prompt_tokens"}
(medians over REPS). Needs `pip install llama-cpp-python`.
"""
import json
import statistics
import sys
import time

from llama_cpp import Llama


def main():
    path, threads, prompt_file, n_decode, reps = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    prompt = open(prompt_file, encoding="utf-8").read()
    m = Llama(model_path=path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
    toks = m.tokenize(prompt.encode(), add_bos=True, special=True)
    prefill, decode = [], []
    for _ in range(reps):
        m.reset()
        t = time.perf_counter()
        m.eval(toks)
        prefill.append(len(toks) / (time.perf_counter() - t))
        # Greedy decode, one token at a time, as a generation loop would.
        t = time.perf_counter()
        for _ in range(n_decode):
            tok = m.sample(top_k=1, temp=0.0)
            m.eval([tok])
        decode.append(n_decode / (time.perf_counter() - t))
    print(json.dumps({
        "prefill_tok_s": statistics.median(prefill),
        "decode_tok_s": statistics.median(decode),
        "prompt_tokens": len(toks),
    }))


if __name__ == "__main__":
    main()
