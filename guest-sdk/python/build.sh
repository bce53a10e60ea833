#!/bin/sh
# Builds one Python strategy into a component with componentize-py:
#   build.sh COMPONENTIZE_PY SRC_DIR OUT.wasm
# SRC_DIR holds app.py (the module defining `WitWorld`) and manifest.toml
# (its `world` picks the WIT world). Rebuilt only when SRC_DIR, the SDK or
# the WIT is newer than OUT.wasm; written to a temporary file first, so an
# interrupted build never leaves a half-written component.
set -eu
cpy=$1; src=$2; out=$3
root=$(cd "$(dirname "$0")/../.." && pwd)
world=$(sed -n 's/^world = "\(.*\)"/\1/p' "$src/manifest.toml")
[ -n "$world" ] || { echo "$src/manifest.toml names no world" >&2; exit 1; }
if [ -f "$out" ] && [ -z "$(find "$src" "$root/guest-sdk/python/tessera_sdk" "$root/wit" -newer "$out" -print | head -n 1)" ]; then
  exit 0
fi
echo "componentize-py: $src -> $out"
"$cpy" -d "$root/wit" -w "$world" componentize -p "$src" -p "$root/guest-sdk/python" app -o "$out.tmp" >/dev/null
mv "$out.tmp" "$out"
