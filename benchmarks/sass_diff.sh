#!/usr/bin/env bash
# Compares the device code (SASS) of two versions of csrc/, without a GPU: a refactor
# whose cubins come out byte-identical cannot change what runs on the GPU.
#   bash benchmarks/sass_diff.sh REV_A [REV_B]     (REV_B omitted: the working tree)
# Needs nvcc (sm_90a) and nvdisasm (CUDA toolkit, or `pip install nvidia-cuda-nvdisasm`,
# found via NVDISASM=...). Compiles with CMakeLists.txt's flags; a few minutes on 2 cores.
# Prints, per translation unit, "identical" or the kernels whose SASS differs and by how
# many lines.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 1 ]] || { sed -n 2,7p "$0"; exit 2; }
NVDISASM=${NVDISASM:-$(command -v nvdisasm || true)}
[[ -x "$NVDISASM" ]] || { echo "nvdisasm not found (set NVDISASM=...)"; exit 2; }
FFI=$(python3 -c "import jax; print(jax.ffi.include_dir())")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

build() {  # build NAME REV|-
  local dir="$work/$1"
  mkdir -p "$dir/src"
  if [[ $2 == - ]]; then cp -r csrc "$dir/src/"; else git archive "$2" csrc | tar -x -C "$dir/src"; fi
  for tu in fp8_gemm_ffi quant_ffi; do
    nvcc -gencode=arch=compute_90a,code=sm_90a -O3 --expt-relaxed-constexpr --split-compile=0 -std=c++17 \
      -I"$dir/src/csrc" -isystem "$FFI" -cubin -o "$dir/$tu.cubin" "$dir/src/csrc/$tu.cu" \
      > "$dir/$tu.log" 2>&1 || { cat "$dir/$tu.log"; echo "$1: $tu does not compile"; return 1; }
  done
}
build a "$1" & pa=$!
build b "${2:--}" & pb=$!
wait $pa && wait $pb

for tu in fp8_gemm_ffi quant_ffi; do
  if cmp -s "$work/a/$tu.cubin" "$work/b/$tu.cubin"; then
    echo "$tu: identical"
    continue
  fi
  echo "$tu: differs"
  for v in a b; do "$NVDISASM" -c "$work/$v/$tu.cubin" > "$work/$v/$tu.sass"; done
  python3 - "$work/a/$tu.sass" "$work/b/$tu.sass" <<'PY'
import difflib, re, sys
def kernels(path):  # kernel name -> SASS lines without addresses
  out, name = {}, None
  for line in open(path):
    m = re.match(r"^\.text\.(\S+):", line)
    if m:
      name = m.group(1)
      out[name] = []
    elif name:
      # Branch labels are numbered across the whole cubin: a kernel added or removed
      # elsewhere renumbers them all.
      line = re.sub(r"/\*[0-9a-f]{4,}\*/", "", line)
      out[name].append(re.sub(r"\.L_x_[0-9]+", ".L_x", line))
  return out
a, b = kernels(sys.argv[1]), kernels(sys.argv[2])
for name in sorted(set(a) | set(b)):
  if name not in a or name not in b:
    print(f"  {name}: only in {'b' if name not in a else 'a'}")
  elif a[name] != b[name]:
    n = sum(1 for l in difflib.unified_diff(a[name], b[name], n=0)
            if l[:1] in "+-" and l[:3] not in ("+++", "---"))
    print(f"  {name}: {n} lines differ ({len(a[name])} -> {len(b[name])})")
PY
done
