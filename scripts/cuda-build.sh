#!/bin/sh
# Builds the CUDA `tessera` (and the `device_check` example) on a machine
# with no GPU, no driver and no system CUDA toolkit, so that the binaries
# can be carried to a GPU machine and run there (issue 23, item 1).
#
#   scripts/cuda-build.sh [OUT_DIR]      # default: $CARGO_TARGET_DIR/cuda-dist
#   scripts/cuda-build.sh --toolkit-only # install nvcc, print its CUDA_HOME
#
# What it takes, and why:
#
# - nvcc 13.0 from PyPI (`nvidia-cuda-nvcc` and the wheels its headers and
#   libdevice live in), installed under $TESSERA_HOME/cuda-13.0. candle's
#   kernels are compiled to PTX, which a driver can JIT only if it knows
#   the PTX version: 13.0 is what driver 580 (the GPU machine we borrow)
#   supports, and a newer nvcc would emit PTX that driver refuses.
# - cudarc, candle's binding to the driver and to cuBLAS/cuRAND/NVRTC, is
#   asked by candle for `dynamic-linking`: the final link then needs the
#   driver's libcuda.so, which only a machine with the driver (or a full
#   toolkit's stubs) has. cudarc also has a `dynamic-loading` mode that
#   opens those libraries with dlopen when first used. Cargo cannot turn a
#   dependency's feature off, so this script builds against a copy of the
#   registry's cudarc in which candle's `dynamic-linking` request means
#   dynamic loading (two edits, made below; the copy lives in the build
#   directory and is never committed). The binary then starts on machines
#   without the driver, and `--device cuda` there is a typed error.
# - candle's kernel crate links the CUDA runtime (libcudart.so.13)
#   directly. The build records `$ORIGIN` as a library path (host/build.rs)
#   and this script copies libcudart next to the binaries, so the bundle
#   needs nothing but the driver (and cuBLAS, found through
#   LD_LIBRARY_PATH) where it runs.
#
# The result: OUT_DIR/{tessera,device_check,libcudart.so.13} (stripped),
# and OUT_DIR.tar.xz, small enough to travel to the device machine.
set -eu

: "${TESSERA_HOME:=$HOME/.cache/tessera}"
: "${CARGO_TARGET_DIR:=$(pwd)/target}"
CUDA_VERSION_PIN=13.0.88
TOOLKIT="$TESSERA_HOME/cuda-13.0"
OUT_DIR="${1:-$CARGO_TARGET_DIR/cuda-dist}"
TARGET="$CARGO_TARGET_DIR/cuda"
# The GPU to compile the static (MMQ/MoE) kernels for: 90 is Hopper (H100,
# H200). The PTX kernels are JIT-compiled by the driver for whatever GPU
# runs them.
: "${CUDA_COMPUTE_CAP:=90}"

PY="${PYTHON:-$TESSERA_HOME/venv/bin/python}"
[ -x "$PY" ] || PY=python3
if [ ! -x "$TOOLKIT/nvidia/cu13/bin/nvcc" ]; then
    echo "installing nvcc $CUDA_VERSION_PIN from PyPI into $TOOLKIT" >&2
    "$PY" -m pip install -q --target "$TOOLKIT" \
        "nvidia-cuda-nvcc==$CUDA_VERSION_PIN" "nvidia-cuda-crt==$CUDA_VERSION_PIN" \
        "nvidia-nvvm==$CUDA_VERSION_PIN" "nvidia-cuda-runtime==13.0.96" \
        "nvidia-cuda-cccl==13.0.85"
fi
CUDA_HOME="$TOOLKIT/nvidia/cu13"
# The linker looks for the unversioned name; the wheel has only the soname.
ln -sf libcudart.so.13 "$CUDA_HOME/lib/libcudart.so"
if [ "${1:-}" = "--toolkit-only" ]; then
    echo "$CUDA_HOME"
    exit 0
fi

# cudarc, made to load its libraries at run time.
CUDARC_VERSION=$(awk '/^name = "cudarc"/ { getline; gsub(/[^0-9.]/, "", $0); print; exit }' Cargo.lock)
REGISTRY="${CARGO_HOME:-$HOME/.cargo}/registry/src"
cargo fetch -q
SRC=$(ls -d "$REGISTRY"/*/"cudarc-$CUDARC_VERSION" | head -n 1)
PATCHED="$TARGET/patched/cudarc-$CUDARC_VERSION"
FRESH="$TARGET/patched/.fresh"
rm -rf "$FRESH"
mkdir -p "$TARGET/patched"
cp -R "$SRC" "$FRESH"
chmod -R u+w "$FRESH"
# 1. The `dynamic-linking` feature candle asks for turns dynamic loading on.
sed -i 's/^dynamic-linking = \[\]$/dynamic-linking = ["dynamic-loading"]/' "$FRESH/Cargo.toml"
grep -q '^dynamic-linking = \["dynamic-loading"\]$' "$FRESH/Cargo.toml" || {
    echo "cuda-build: cudarc $CUDARC_VERSION's Cargo.toml has no plain dynamic-linking feature to redirect" >&2
    exit 1
}
# 2. Nothing keys on `dynamic-linking` any more (no link lines, no clash check).
find "$FRESH" -name '*.rs' -exec sed -i 's/feature = "dynamic-linking"/feature = "tessera-links-nothing"/g' {} +
# An unchanged copy is kept as it is, so that its timestamps do not make
# cargo rebuild cudarc and candle.
if diff -r -q "$FRESH" "$PATCHED" > /dev/null 2>&1; then
    rm -rf "$FRESH"
else
    rm -rf "$PATCHED"
    mv "$FRESH" "$PATCHED"
fi

# A patch rewrites Cargo.lock's cudarc entry, so the build runs in a copy of
# the working tree (uncommitted changes included) and never touches this one.
SRC_COPY="$TARGET/src"
rm -rf "$SRC_COPY"
mkdir -p "$SRC_COPY"
git ls-files -z --cached --others --exclude-standard |
    tar --null --ignore-failed-read -T - -cf - | tar -C "$SRC_COPY" -xf -

export CUDA_HOME CUDA_COMPUTE_CAP
export CUDARC_CUDA_VERSION=13000
# Nothing is linked at build time here, so host/build.rs writes no stubs.
export TESSERA_CUDA_LINK_STUBS=off
export PATH="$CUDA_HOME/bin:$PATH"
export LIBRARY_PATH="$CUDA_HOME/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
(cd "$SRC_COPY" && cargo build --release -p tessera --features cuda --bin tessera --example device_check \
    --target-dir "$TARGET" \
    --config "patch.crates-io.cudarc.path='$PATCHED'")

rm -rf "$OUT_DIR"
mkdir -p "$OUT_DIR"
cp "$TARGET/release/tessera" "$TARGET/release/examples/device_check" "$OUT_DIR/"
cp "$CUDA_HOME/lib/libcudart.so.13" "$OUT_DIR/"
strip "$OUT_DIR/tessera" "$OUT_DIR/device_check"
tar -C "$(dirname "$OUT_DIR")" -cJf "$OUT_DIR.tar.xz" "$(basename "$OUT_DIR")"
ls -l "$OUT_DIR" "$OUT_DIR.tar.xz"
