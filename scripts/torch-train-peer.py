"""The PyTorch peer of `benches/train_speed.rs`: the same model, data, batch
and steps, trained with torch + transformers (+ peft for LoRA) on the CPU.

    python scripts/torch-train-peer.py BASE_DIR [THREADS]

BASE_DIR is the Hugging Face folder `tessera contribute train` itself
trains (SmolLM2-135M dequantized from the pool's GGUF, under
$TESSERA_HOME/models/bases/). The bench runs this right after its own
measurement when TESSERA_TORCH_PYTHON names a Python with torch,
transformers and peft, so both figures come from one run. Prints one line
per method: `peer <label> <tokens/s> <tokens> <seconds>`.

Matches the bench: 16 prompt/completion pairs rendered through the model's
chat template, loss on completion tokens only, batch 4 padded to the
longest, 6 optimizer steps with the first dropped as warm-up, AdamW,
gradient-norm clipping at 1.0, f32; tokens counted as the bench counts
them (each example's length minus one, padding excluded).
"""

import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

STEPS = 6
FILLER = "Tiles of many colours fit together into one picture, and each tile was laid by a different hand."


def examples(tok):
    out = []
    for i in range(16):
        prompt = f"Question {i}: describe the mosaic in two sentences. {FILLER}"
        completion = f"{FILLER} {FILLER} Number {i}."
        user = [{"role": "user", "content": prompt}]
        head = tok.apply_chat_template(user, tokenize=True, add_generation_prompt=True)
        full = tok.apply_chat_template(user + [{"role": "assistant", "content": completion}], tokenize=True)
        if hasattr(head, "input_ids"):
            head, full = head["input_ids"], full["input_ids"]
        labels = [-100] * len(head) + full[len(head):]
        out.append((full, labels))
    return out


def batches(exs, size):
    for s in range(0, len(exs), size):
        chunk = exs[s:s + size]
        n = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([i + [0] * (n - len(i)) for i, _ in chunk])
        labels = torch.tensor([l + [-100] * (n - len(l)) for _, l in chunk])
        att = torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i, _ in chunk])
        yield ids, labels, att, sum(len(i) - 1 for i, _ in chunk)


def run(base, label, lora):
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        )
    model.train()
    tok = AutoTokenizer.from_pretrained(base)
    exs = examples(tok)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    data = list(batches(exs, 4))
    tokens, secs = 0, 0.0
    for step in range(STEPS):
        ids, labels, att, n = data[step % len(data)]
        t0 = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if step > 0:
            tokens += n
            secs += dt
    trained = sum(p.numel() for p in params)
    print(f"peer {label} {tokens / secs:.1f} {tokens} {secs:.2f} trained={trained}", flush=True)


def main():
    base = sys.argv[1]
    if len(sys.argv) > 2:
        torch.set_num_threads(int(sys.argv[2]))
    run(base, "lora", True)
    run(base, "full", False)


if __name__ == "__main__":
    main()
