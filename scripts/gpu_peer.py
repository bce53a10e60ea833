"""The peer of scripts/gpu-check.sh: transformers on the shapes Tessera's
synthetic models have, random-initialised from the same configuration,
bf16 on CUDA, greedy `generate` of 32 tokens after a 128-token prompt,
alone and for 16 prompts at once. One JSON line per shape: prefill
seconds, decode tokens per second, and the 16 sequences' aggregate decode
tokens per second."""
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

# [hidden, layers, heads, kv_heads, head_dim, ffn, vocab, rope_base], as
# host/src/pool/synth.rs names them.
SHAPES = {
    "smollm2-135m": ("llama", [576, 30, 9, 3, 64, 1536, 49152, 100000.0]),
    "qwen2.5-0.5b": ("qwen2", [896, 24, 14, 2, 64, 4864, 151936, 1000000.0]),
    "qwen2.5-1.5b": ("qwen2", [1536, 28, 12, 2, 128, 8960, 151936, 1000000.0]),
}


def timed(model, ids, tokens, dev):
    """Seconds for a greedy `generate` of exactly `tokens` new tokens after
    `ids` (the device synchronised before and after), and its output."""
    if dev == "cuda":
        torch.cuda.synchronize()
    t = time.time()
    out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    if dev == "cuda":
        torch.cuda.synchronize()
    return time.time() - t, out


def main() -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for name, (arch, (h, layers, heads, kvh, hd, ffn, vocab, base)) in SHAPES.items():
        kw = dict(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kvh, head_dim=hd, intermediate_size=ffn, vocab_size=vocab,
                  rope_theta=base, max_position_embeddings=4096)
        cfg, cls = (LlamaConfig(**kw), LlamaForCausalLM) if arch == "llama" else (Qwen2Config(**kw), Qwen2ForCausalLM)
        torch.manual_seed(1)
        model = cls(cfg).to(dev, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            ids = torch.randint(0, vocab, (1, 128), device=dev)
            model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
            prefill, _ = timed(model, ids, 1, dev)
            elapsed, out = timed(model, ids, 33, dev)
            new = out.shape[1] - ids.shape[1] - 1
            # 16 sequences at once, timed as device_check times Tessera's:
            # the run with one token each is taken away, so the figure is
            # decoding alone.
            batch = torch.randint(0, vocab, (16, 128), device=dev)
            first, _ = timed(model, batch, 1, dev)
            batched, many = timed(model, batch, 33, dev)
        decoded = 16 * (many.shape[1] - batch.shape[1] - 1)
        print(json.dumps({"shape": name, "engine": "transformers", "device": dev,
                          "prefill_s": prefill, "decode_tok_s": new / max(elapsed - prefill, 1e-9),
                          "batch16_tok_s": decoded / max(batched - first, 1e-9)}))
        del model
        if dev == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
