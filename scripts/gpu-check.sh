#!/bin/bash
# The one command to run on a lent GPU machine (issue 23, item 4): no Rust
# there and no registries, so the binaries are built here and carried.
#
#   here:   scripts/cuda-build.sh           # -> $CARGO_TARGET_DIR/cuda-dist{,.tar.xz}:
#                                           #    tessera, device_check, libcudart.so.13
#   there:  scripts/gpu-check.sh BIN_DIR    # results go to $OUT (default ./gpu-check-out)
#
# With the session's device tool, which carries ignored paths of the
# checkout (64 MiB at most) and brings back what lands under $OUT:
#
#   mkdir -p gpu-carry && cp "$CARGO_TARGET_DIR/cuda-dist.tar.xz" gpu-carry/
#   run  carry=["gpu-carry"]  timeout_s=540  command=
#     "tar -xJf gpu-carry/cuda-dist.tar.xz -C /tmp && scripts/gpu-check.sh /tmp/cuda-dist"
#
# BIN_DIR may also hold a CPU-only build (`cargo build --release -p tessera
# --bin tessera --example device_check`): the CUDA entries then say so and
# the rest still runs.
#
# What it does there (written to fit in about 6 minutes on an H200; not yet
# timed on one):
# 1. Records the GPU and driver, and puts the CUDA libraries it finds
#    (PyTorch's pip-installed nvidia/* folders, /usr/local/cuda) on
#    LD_LIBRARY_PATH: the carried build opens the driver and cuBLAS at run
#    time and ships only the CUDA runtime.
# 2. Makes synthetic models of real shapes (`tessera pool synth`:
#    SmolLM2-135M, Qwen2.5-0.5B and 1.5B, Q8_0, seeded) and runs
#    `device_check` on each: CPU against CUDA and against wgpu (Vulkan):
#    top-5 log-prob gap, prefill, greedy decode, 16 sequences decoded
#    together.
# 3. The peer: transformers on the same shapes, random-initialised from the
#    same configuration, bf16 on CUDA, `generate` (scripts/gpu_peer.py).
# 4. One LoRA training run of a few steps on the SmolLM2 shape on CUDA and
#    the same on the CPU (tokens per second from each run's train-log), and
#    a merge of the two results on the GPU through wgpu.
# Everything lands in $OUT as JSON lines (results.jsonl) and one table.
#
# SHAPES and CHECK_TIMEOUT (seconds per shape) may be set; a tiny shape
# (SHAPES=tiny-llama) tries the whole script anywhere.
set -uo pipefail
BIN=$(cd "${1:?usage: scripts/gpu-check.sh BIN_DIR}" && pwd)
OUT=${OUT:-./gpu-check-out}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
# Models, training runs and merges (gigabytes) go to a scratch folder, so
# that $OUT holds only the results: a device call brings back $OUT.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export TESSERA_HOME="$WORK/home"

# 1. The machine, and the CUDA libraries where they are.
gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)
libdirs=$(
  { python3 - <<'PY' 2>/dev/null
import glob, os
try:
    import nvidia
    for root in nvidia.__path__:
        for lib in glob.glob(os.path.join(root, "**", "libcublas*.so*"), recursive=True) + \
                   glob.glob(os.path.join(root, "**", "libcurand*.so*"), recursive=True):
            print(os.path.dirname(lib))
except ImportError:
    pass
PY
    for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do [ -d "$d" ] && echo "$d"; done
  } | sort -u | paste -sd: -)
export LD_LIBRARY_PATH="$BIN${libdirs:+:$libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
python3 -c 'import json,sys; print(json.dumps({"gpu": sys.argv[1], "cuda_library_dirs": sys.argv[2]}))' \
  "${gpu:-none found}" "${libdirs:-none found}" >> "$RESULTS"

# 2. Agreement and speed per shape.
SHAPES=${SHAPES:-smollm2-135m qwen2.5-0.5b qwen2.5-1.5b}
for shape in $SHAPES; do
  "$BIN/tessera" pool synth --like "$shape" --quant q8_0 --seed 1 --out "$WORK/$shape.gguf" >&2
  # One line per device as it finishes; a time limit loses only the rest.
  timeout "${CHECK_TIMEOUT:-120}" "$BIN/device_check" --devices "${DEVICES:-cuda,wgpu}" "$WORK/$shape.gguf" |
    sed "s/^{/{\"shape\":\"$shape\",/" >> "$RESULTS"
  [ "${PIPESTATUS[0]}" = 124 ] && echo "{\"shape\":\"$shape\",\"error\":\"device_check passed its ${CHECK_TIMEOUT:-120} s\"}" >> "$RESULTS"
  [ "$shape" = "${SHAPES%% *}" ] || rm -f "$WORK/$shape.gguf"
done

# 3. The peer, before training: a time limit that stops the script short
# keeps the comparison.
if python3 -c 'import torch, transformers' 2>/dev/null; then
  timeout 240 python3 "$HERE/gpu_peer.py" >> "$RESULTS" || echo '{"peer":"failed"}' >> "$RESULTS"
else
  echo '{"peer":"no torch/transformers here"}' >> "$RESULTS"
fi

# 4. Training on the GPU and a merge there, on the first shape.
first=${SHAPES%% *}
sha=$(sha256sum "$WORK/$first.gguf" | cut -d' ' -f1)
cat > "$WORK/pool.toml" <<EOF
[[member]]
id = "synth"
backend = "gguf"
path = "$WORK/$first.gguf"
sha256 = "$sha"
[member.card]
contributor = "scripts/gpu-check.sh"
description = "seeded random weights of the $first shape"
domains = ["test"]
license = "none"
source = "tessera pool synth --like $first --seed 1"
EOF
for i in $(seq 1 32); do
  echo "{\"prompt\":\"Question $i: what is $i plus $i? Explain the steps briefly.\",\"completion\":\" $i plus $i is $((i + i)): add the two numbers.\"}"
done > "$WORK/train.jsonl"
for device in cuda cpu; do
  rm -rf "$WORK/trained-$device"
  t0=$(date +%s.%N)
  if err=$(TESSERA_POOL="$WORK/pool.toml" timeout 120 "$BIN/tessera" contribute train --device "$device" \
        --base synth --data "$WORK/train.jsonl" --out "$WORK/trained-$device" --steps 4 --batch 8 2>&1 >/dev/null); then
    python3 - "$device" "$WORK/trained-$device/train-log.jsonl" "$t0" "$(date +%s.%N)" >> "$RESULTS" <<'PY'
import json, sys
steps = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
print(json.dumps({"train": sys.argv[1], "shape_steps": len(steps), "last_loss": steps[-1]["loss"],
                  "tokens_per_s_last_step": steps[-1]["tokens_per_s"], "wall_s": float(sys.argv[4]) - float(sys.argv[3])}))
PY
  else
    python3 -c 'import json,sys; print(json.dumps({"train": sys.argv[1], "error": sys.argv[2][-600:]}))' "$device" "$err" >> "$RESULTS"
  fi
done
if [ -d "$WORK/trained-cuda" ] && [ -d "$WORK/trained-cpu" ]; then
  t0=$(date +%s.%N)
  if msg=$("$BIN/tessera" merge --merge-device gpu --method linear \
        --model "$WORK/trained-cuda" --model "$WORK/trained-cpu" --out "$WORK/merged" 2>&1); then
    python3 -c 'import json,sys; print(json.dumps({"merge": sys.argv[1].strip()[:300], "wall_s": float(sys.argv[3]) - float(sys.argv[2])}))' \
      "$msg" "$t0" "$(date +%s.%N)" >> "$RESULTS"
  else
    python3 -c 'import json,sys; print(json.dumps({"merge": "failed", "error": sys.argv[1][-600:]}))' "$msg" >> "$RESULTS"
  fi
else
  echo '{"merge":"skipped: a training run failed"}' >> "$RESULTS"
fi
rm -f "$WORK/$first.gguf"

python3 - "$RESULTS" > "$OUT/table.md" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def num(v, fmt):
    return format(v, fmt) if isinstance(v, (int, float)) else "-"
print("| shape | device | gap vs CPU (nats) | same top-1 | prefill s | decode tok/s | 16-seq tok/s |")
print("|---|---|---|---|---|---|---|")
shaped = [r for r in rows if "shape" in r]
order = list(dict.fromkeys(r["shape"] for r in shaped))
for r in sorted(shaped, key=lambda r: order.index(r["shape"])):
    if r.get("engine") == "transformers":
        dev = "transformers bf16 (" + r.get("device", "?") + ")"
    else:
        dev = r.get("device", "-")
    if "error" in r:
        print(f"| {r['shape']} | {dev} | error: {r['error'][:200]} | | | | |")
        continue
    gap = num(r.get("top5_gap_nats"), ".4f") if "top5_gap_nats" in r else "-"
    print(f"| {r['shape']} | {dev} | {gap} | {r.get('same_top1', '-')} | {num(r.get('prefill_s'), '.3f')} | "
          f"{num(r.get('decode_tok_s'), '.1f')} | {num(r.get('batch16_tok_s'), '.1f')} |")
print()
for r in rows:
    if "train" in r or "merge" in r or "gpu" in r or "peer" in r:
        print("-", json.dumps(r))
PY
cat "$OUT/table.md"
