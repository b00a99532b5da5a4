#!/usr/bin/env bash
# Builds firstkd with `--features cuda` on a machine with no GPU and no CUDA toolkit, and packages
# the binaries (xz) into .dev/ for a CUDA 13.0 machine (driver >= 580, H200 = sm_90).
#
#   scripts/build-cuda.sh            # toolkit + build + test binaries + package
#   SKIP_BUILD=1 scripts/build-cuda.sh   # only (re)assemble the toolkit and print the env
#
# 1. Assembles a CUDA_HOME-like tree from the NVIDIA PyPI wheels, pinned to CUDA 13.0 (PTX from a
#    newer nvcc would not JIT on a 13.0 driver): bin/{nvcc,ptxas,...}, nvvm/, include/ (+ cccl),
#    lib/ (= lib64/) with unversioned .so links for cudart, cublas, cublasLt, curand, nvrtc.
# 2. Builds a stub libcuda.so (soname libcuda.so.1) exporting every cu* symbol of cudarc's driver
#    bindings, in lib/stubs/ only: it is used for linking and never shipped; the device's driver
#    provides the real libcuda.so.1.
# 3. cargo build/test --release --features cuda (sm_90, CUDARC_CUDA_VERSION=13000), -j$JOBS.
# 4. Strips firstkd, train_bench, label_bench, the lib unit-test and the `it` integration-test executables and
#    packs them as one solid .dev/firstkd-cuda.tar.xz (+ .dev/cuda-manifest.txt). On the GPU
#    machine run scripts/cuda-check.sh (unpacks into /tmp/fk, runs the cuda tests).
#
# Env: FIRSTKD_CACHE (wheel cache, default ~/.cache/firstkd), FIRSTKD_CUDA_HOME (toolkit tree,
# default /tmp/cuda13), CARGO_TARGET_DIR (default /tmp/firstkd-cuda-target), JOBS (default 2),
# CUDA_COMPUTE_CAP (default 90), XZ_PRESET (default 6; 2 packs in 1.5 min instead of 6, +5 MiB).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${FIRSTKD_CACHE:-$HOME/.cache/firstkd}/cuda13
WHEELS=$CACHE/wheels
CUDA_TREE=${FIRSTKD_CUDA_HOME:-/tmp/cuda13}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/tmp/firstkd-cuda-target}
JOBS=${JOBS:-2}
XZ_PRESET=${XZ_PRESET:-6}
DEV=$ROOT/.dev

# CUDA 13.0 pins (nvcc/nvvm/crt/cccl/nvrtc/runtime 13.0 update 2; cublas 13.0 U2; curand of 13.0).
PINS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
)

log() { printf '\n== %s\n' "$*" >&2; }

# ---------------------------------------------------------------- 1. toolkit from wheels
assemble_toolkit() {
  local stamp="$CUDA_TREE/.firstkd-toolkit" want
  want=$(printf '%s\n' "${PINS[@]}" stub-v1)
  if [[ -f $stamp && $(cat "$stamp") == "$want" && -x $CUDA_TREE/bin/nvcc ]]; then
    log "toolkit: $CUDA_TREE is up to date"
    return
  fi
  log "toolkit: downloading wheels into $WHEELS"
  mkdir -p "$WHEELS"
  local missing=() p name ver
  for p in "${PINS[@]}"; do
    name=${p%%==*}; ver=${p##*==}
    compgen -G "$WHEELS/${name//-/_}-${ver}-*.whl" >/dev/null || missing+=("$p")
  done
  if ((${#missing[@]})); then
    python3 -m pip download --no-deps --quiet --only-binary=:all: --dest "$WHEELS" \
      --python-version 3.11 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
      "${missing[@]}"
  fi

  log "toolkit: assembling $CUDA_TREE"
  local tmp="$CUDA_TREE.tmp.$$"
  rm -rf "$tmp"; mkdir -p "$tmp/unz" "$tmp/tree"
  for p in "${PINS[@]}"; do
    name=${p%%==*}; ver=${p##*==}
    unzip -q -o "$(compgen -G "$WHEELS/${name//-/_}-${ver}-*.whl" | head -1)" 'nvidia/cu13/*' -d "$tmp/unz"
  done
  cp -a "$tmp/unz/nvidia/cu13/." "$tmp/tree/"
  rm -rf "$tmp/unz"
  (
    cd "$tmp/tree"
    ln -sfn lib lib64
    mkdir -p targets/x86_64-linux
    ln -sfn ../../include targets/x86_64-linux/include
    ln -sfn ../../lib targets/x86_64-linux/lib
    cd lib
    ln -sfn libcudart.so.13 libcudart.so
    ln -sfn libcublas.so.13 libcublas.so
    ln -sfn libcublasLt.so.13 libcublasLt.so
    ln -sfn libcurand.so.10 libcurand.so
    ln -sfn libnvrtc.so.13 libnvrtc.so
  )
  build_libcuda_stub "$tmp/tree/lib/stubs"
  rm -rf "$CUDA_TREE"
  mv "$tmp/tree" "$CUDA_TREE"
  rm -rf "$tmp"
  printf '%s\n' "$want" >"$stamp"
}

# ---------------------------------------------------------------- 2. link-only libcuda stub
build_libcuda_stub() {
  local dir=$1 cudarc_ver src
  cudarc_ver=$(awk '/^name = "cudarc"$/{getline; gsub(/"/,"",$3); print $3; exit}' "$ROOT/Cargo.lock")
  (cd "$ROOT" && cargo fetch --quiet)
  src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$cudarc_ver"/src/driver/sys/mod.rs | head -1)
  mkdir -p "$dir"
  # Every symbol declared in the (non-dynamic-loading) extern blocks, all CUDA versions: a superset
  # of the cuda-13000 set. Each returns CUDA_ERROR_STUB_LIBRARY (34) in case it is ever run.
  grep -oE '^[[:space:]]+fn cu[A-Za-z0-9_]+\(' "$src" | grep -oE 'cu[A-Za-z0-9_]+' | sort -u \
    | awk '{printf "int %s(void) { return 34; }\n", $1}' >"$dir/libcuda_stub.c"
  gcc -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$dir/libcuda.so" "$dir/libcuda_stub.c"
  log "stub libcuda.so: $(wc -l <"$dir/libcuda_stub.c") symbols from cudarc-$cudarc_ver"
}

assemble_toolkit

export CUDA_HOME=$CUDA_TREE CUDA_PATH=$CUDA_TREE
export PATH=$CUDA_TREE/bin:$PATH
export CUDARC_CUDA_VERSION=13000
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDAFORGE_THREADS=$JOBS
export LIBRARY_PATH=$CUDA_TREE/lib:$CUDA_TREE/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
# For ld resolving libcublas.so.13 -> libcublasLt.so.13 at link time (build-time only).
export LD_LIBRARY_PATH=$CUDA_TREE/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvcc --version | tail -2 >&2

if [[ ${SKIP_BUILD:-0} == 1 ]]; then
  printf 'export CUDA_HOME=%q CUDA_PATH=%q PATH=%q CUDARC_CUDA_VERSION=13000 CUDA_COMPUTE_CAP=%q CUDAFORGE_THREADS=%q LIBRARY_PATH=%q LD_LIBRARY_PATH=%q CARGO_TARGET_DIR=%q\n' \
    "$CUDA_HOME" "$CUDA_PATH" "$PATH" "$CUDA_COMPUTE_CAP" "$JOBS" "$LIBRARY_PATH" "$LD_LIBRARY_PATH" "$CARGO_TARGET_DIR"
  exit 0
fi

# ---------------------------------------------------------------- 3. build
cd "$ROOT"
start=$(date +%s)
log "cargo build --release --features cuda --bin firstkd --examples (-j$JOBS, $CARGO_TARGET_DIR)"
cargo build --release --features cuda -j "$JOBS" --bin firstkd --examples
log "cargo test --release --features cuda --no-run"
tests_json=$(mktemp)
cargo test --release --features cuda -j "$JOBS" --no-run --message-format=json-render-diagnostics >"$tests_json"
log "build took $(($(date +%s) - start)) s"

# executable of a test target by (kind, name)
test_exe() {
  jq -r --arg k "$1" --arg n "$2" 'select(.reason == "compiler-artifact" and .profile.test == true
    and .target.name == $n and (.target.kind | index($k)) and .executable != null) | .executable' \
    "$tests_json" | tail -1
}
lib_tests=$(test_exe lib firstkd)
it_tests=$(test_exe test it)
rm -f "$tests_json"

# ---------------------------------------------------------------- 4. package
log "packaging into $DEV/firstkd-cuda.tar.xz (xz preset $XZ_PRESET, one solid stream)"
# The four executables share most of their code (datafusion, candle, the 32 MiB GGUF fatbin), so
# one solid xz stream with a dictionary spanning all of them is ~half the size of four .xz files
# (measured: 36.8 MiB vs 77.1 MiB at preset 6; preset 2: 41.8 MiB in 1.5 min instead of 6).
mkdir -p "$DEV"
grep -qxF '/.dev/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.dev/' >>"$ROOT/.git/info/exclude"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
manifest=$stage/cuda-manifest.txt
{
  echo "# firstkd cuda build, $(date -u +%FT%TZ), git $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- src tests examples Cargo.toml Cargo.lock || echo '+dirty')"
  echo "# CUDA ${PINS[*]}, CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP (cudaforge: sm_${CUDA_COMPUTE_CAP}a for >= 90), CUDARC_CUDA_VERSION=13000"
  echo "# CARGO_BIN_EXE_firstkd=$CARGO_TARGET_DIR/release/firstkd"
  echo "# CARGO_MANIFEST_DIR=$ROOT"
} >"$manifest"
names=()
pack() { # NAME SRC
  local name=$1 src=$2
  [[ -n $src && -f $src ]] || { echo "missing executable for $name" >&2; exit 1; }
  strip -o "$stage/$name" "$src"
  names+=("$name")
  awk -v n="$name" -v s="$(stat -c %s "$stage/$name")" -v src="${src#"$CARGO_TARGET_DIR"/}" \
    'BEGIN{printf "  %-18s stripped %6.1f MiB  (%s)\n", n, s/1048576, src}'
}
pack firstkd "$CARGO_TARGET_DIR/release/firstkd"
pack it-tests "$it_tests"
pack train_bench "$CARGO_TARGET_DIR/release/examples/train_bench"
pack label_bench "$CARGO_TARGET_DIR/release/examples/label_bench"
pack firstkd-lib-tests "$lib_tests"
(cd "$stage" && sha256sum "${names[@]}") >"$stage/SHA256SUMS"
rm -f "$DEV"/*.xz "$DEV/cuda-manifest.txt"
tar -C "$stage" -cf - cuda-manifest.txt SHA256SUMS "${names[@]}" \
  | xz -T1 --lzma2=preset="$XZ_PRESET",dict=512MiB -c >"$DEV/firstkd-cuda.tar.xz.part"
mv "$DEV/firstkd-cuda.tar.xz.part" "$DEV/firstkd-cuda.tar.xz"
cp "$manifest" "$DEV/cuda-manifest.txt"
awk -v t="$(stat -c %s "$DEV/firstkd-cuda.tar.xz")" 'BEGIN{printf "  firstkd-cuda.tar.xz %6.1f MiB (%d bytes)\n", t/1048576, t}'

log "NEEDED of firstkd"
readelf -d "$CARGO_TARGET_DIR/release/firstkd" | awk '/NEEDED/{print "  " $NF}'
echo "  max GLIBC:   $(objdump -T "$CARGO_TARGET_DIR/release/firstkd" | grep -o 'GLIBC_[0-9.]*' | sort -Vu | tail -1)"
echo "  max GLIBCXX: $(objdump -T "$CARGO_TARGET_DIR/release/firstkd" | grep -o 'GLIBCXX_[0-9.]*' | sort -Vu | tail -1)"
