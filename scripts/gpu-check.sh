#!/bin/bash
# The one command to run on a lent GPU machine (issue 23, item 4): no Rust
# there and no registries, so the binaries are built here and carried.
#
#   here:   cargo build --release -p tessera --bin tessera --example device_check
#           strip target/release/tessera target/release/examples/device_check
#   there:  scripts/gpu-check.sh BIN_DIR      (BIN_DIR holds both binaries;
#                                              results go to $OUT, default ./gpu-check-out)
#
# It makes synthetic models of real shapes there (`tessera pool synth`:
# SmolLM2-135M, Qwen2.5-0.5B and 1.5B, Q8_0, seeded), runs `device_check`
# on each (CPU against wgpu through Vulkan: top-5 log-prob gap, prefill and
# greedy decode), and runs the peer: transformers on the same shapes,
# random-initialised from the same configuration, bf16 on CUDA, `generate`
# (scripts/gpu_peer.py). Everything lands in $OUT as JSON lines and one
# table.
#
# Not covered yet, and said so in the output: CUDA (the `cuda` build does
# not link without the driver's libraries here), 16-sequence batched
# decoding on the device, a LoRA step and a merge on the GPU.
set -euo pipefail
BIN=${1:?usage: scripts/gpu-check.sh BIN_DIR}
OUT=${OUT:-./gpu-check-out}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
: > "$OUT/results.jsonl"
# SHAPES and CHECK_TIMEOUT (seconds per shape) may be set; a tiny shape
# (SHAPES=tiny-llama) tries the script anywhere.
for shape in ${SHAPES:-smollm2-135m qwen2.5-0.5b qwen2.5-1.5b}; do
  "$BIN/tessera" pool synth --like "$shape" --quant q8_0 --seed 1 --out "$OUT/$shape.gguf" >&2
  timeout "${CHECK_TIMEOUT:-150}" "$BIN/device_check" "$OUT/$shape.gguf" | sed "s/^{/{\"shape\":\"$shape\",/" >> "$OUT/results.jsonl" || \
    echo "{\"shape\":\"$shape\",\"error\":\"device_check failed or timed out\"}" >> "$OUT/results.jsonl"
  rm -f "$OUT/$shape.gguf"
done
if python3 -c 'import torch, transformers' 2>/dev/null; then
  timeout 240 python3 "$HERE/gpu_peer.py" >> "$OUT/results.jsonl" || echo '{"peer":"failed"}' >> "$OUT/results.jsonl"
else
  echo '{"peer":"no torch/transformers here"}' >> "$OUT/results.jsonl"
fi
echo '{"not_covered":["cuda (no linked cuda build)","16-sequence batched decode on the device","LoRA step and merge on the GPU"]}' >> "$OUT/results.jsonl"
python3 - "$OUT/results.jsonl" > "$OUT/table.md" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| shape | gap (nats) | same top-1 | CPU prefill s | CPU decode tok/s | wgpu prefill s | wgpu decode tok/s | peer decode tok/s |")
print("|---|---|---|---|---|---|---|---|")
peer = {r["shape"]: r for r in rows if r.get("engine") == "transformers"}
for r in rows:
    if "top5_gap_nats" in r:
        p = peer.get(r["shape"], {})
        print(f"| {r['shape']} | {r['top5_gap_nats']:.4f} | {r['same_top1']} | {r['cpu']['prefill_s']:.3f} | "
              f"{r['cpu']['decode_tok_s']:.1f} | {r['wgpu']['prefill_s']:.3f} | {r['wgpu']['decode_tok_s']:.1f} | "
              f"{p.get('decode_tok_s', float('nan')):.1f} |")
    elif "error" in r:
        print(f"| {r['shape']} | error: {r['error']} | | | | | | |")
PY
cat "$OUT/table.md"
