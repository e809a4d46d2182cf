#!/usr/bin/env bash
# Build MegaBlocks, stanford-stk and grouped_gemm from their PyPI source distributions into a
# Python environment whose torch is already installed (the registry has no wheels for them, and
# their pins — megablocks 0.10.0: torch==2.7.0, numpy<2.1, packaging<24.2 — would replace ours).
#
#   tools/megablocks/build.sh [--python PY] [--sdists DIR] [--target DIR] [--only NAMES] [--download-only]
#
#   --python PY    the interpreter to build for and install into (default: .venv/bin/python)
#   --sdists DIR   where the three .tar.gz are, or are downloaded to (default: build/megablocks/sdist);
#                  without network, put them there first (tools/gpu/prep does)
#   --target DIR   pip install --target DIR instead of into PY's environment (the device kit)
#   --only NAMES   build only these (comma-separated: stanford_stk,grouped_gemm,megablocks)
#   --download-only  fetch the three source distributions into --sdists and stop (tools/gpu/prep)
#
# No dependency resolution (--no-deps), no build isolation (the build sees the installed torch),
# two source patches: megablocks' csrc/cumsum.h passes `debug_synchronous` to cub::DeviceScan,
# an argument CUDA 13's CUB no longer takes (dropped); grouped_gemm compiles with -std=c++17,
# which torch 2.14's headers reject (-std=c++20 there; older torch keeps c++17). Needs nvcc, no
# GPU: TORCH_CUDA_ARCH_LIST (default "8.0;9.0") names the targets. MAX_JOBS: ninja's jobs. The
# CUDA library headers torch's headers include (cusparse.h, cublas_v2.h, ...) come from the pip
# packages nvidia-* beside torch when the toolkit lacks them (no cusparse.h in it): their include/
# folders join CPATH.
set -euo pipefail

MB_VERSION=0.10.0
STK_VERSION=0.7.1
GG_VERSION=0.3.0

here=$(cd "$(dirname "$0")/../.." && pwd)
py="$here/.venv/bin/python"
sdists="$here/build/megablocks/sdist"
target=""
only="stanford_stk,grouped_gemm,megablocks"
download_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --python) py="$2"; shift 2 ;;
    --sdists) sdists="$2"; shift 2 ;;
    --target) target="$2"; shift 2 ;;
    --only) only="$2"; shift 2 ;;
    --download-only) download_only=1; shift ;;
    *) echo "build.sh: unknown argument '$1'; allowed: --python PY --sdists DIR --target DIR --only NAMES --download-only" >&2; exit 2 ;;
  esac
done
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
"$py" -c "import torch" || { echo "build.sh: $py has no torch" >&2; exit 1; }

mkdir -p "$sdists"
files=("megablocks-$MB_VERSION.tar.gz" "stanford_stk-$STK_VERSION.tar.gz" "grouped_gemm-$GG_VERSION.tar.gz")
missing=0
for f in "${files[@]}"; do [ -f "$sdists/$f" ] || missing=1; done
if [ $missing = 1 ]; then
  # metadata preparation runs the setup.py files: they import torch (no isolation) and need the arch list
  "$py" -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$sdists" \
    "megablocks==$MB_VERSION" "stanford-stk==$STK_VERSION" "grouped_gemm==$GG_VERSION"
fi
if [ $download_only = 1 ]; then
  ls "${files[@]/#/$sdists/}"
  exit 0
fi
command -v nvcc >/dev/null || { echo "build.sh: nvcc not found on PATH (CUDA toolkit needed to build)" >&2; exit 1; }
# torch finds the toolkit (lib64/libcudart.so to link) from CUDA_HOME, else from nvcc's folder, which is
# wrong when nvcc on PATH is a wrapper (/usr/local/bin/nvcc here): take the toolkit nvcc reports itself
if [ -z "${CUDA_HOME:-}" ]; then
  nvcc_dir=$(touch "${TMPDIR:-/tmp}/rmoe-empty.cu" && nvcc -v -E "${TMPDIR:-/tmp}/rmoe-empty.cu" -o /dev/null 2>&1 \
    | sed -n 's/^#\$ _HERE_=\(.*\)\/bin$/\1/p' | head -1)
  [ -n "$nvcc_dir" ] && [ -d "$nvcc_dir/lib64" ] && export CUDA_HOME="$nvcc_dir"
fi
nvidia_includes=$("$py" - <<'PY'
import glob, importlib.util, os
spec = importlib.util.find_spec("nvidia")
roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
print(":".join(d for r in roots for d in sorted(glob.glob(os.path.join(r, "*", "include")))))
PY
)
toolkit_inc=$(ls -d "${CUDA_HOME:-$(dirname "$(command -v nvcc)")/..}"/include/cusparse.h \
  "${CUDA_HOME:-/nonexistent}"/targets/*/include/cusparse.h 2>/dev/null | head -1)
[ -n "$toolkit_inc" ] && nvidia_includes=""  # a full toolkit: its own headers only
[ -n "$nvidia_includes" ] && export CPATH="$nvidia_includes${CPATH:+:$CPATH}"

work=$(mktemp -d "${TMPDIR:-/tmp}/rmoe-megablocks.XXXXXX")
trap 'rm -rf "$work"' EXIT
for f in "${files[@]}"; do tar -xzf "$sdists/$f" -C "$work"; done

# CUB patch: drop the `debug_synchronous` argument of cub::DeviceScan::{Ex,In}clusiveSum
"$py" - "$work/megablocks-$MB_VERSION/csrc/cumsum.h" <<'PY'
import re, sys
p = sys.argv[1]
s = open(p).read()
t, n = re.subn(r",\s*debug_synchronous\)\);", "));", s)
if n != 2:
    sys.exit(f"cumsum.h patch: expected 2 DeviceScan calls passing debug_synchronous, found {n}")
open(p, "w").write(t)
PY
# C++ standard: torch >= 2.14's headers need C++20
std=$("$py" -c "import torch; v = tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2]); print('c++20' if v >= (2, 14) else 'c++17')")
sed -i "s/\"-std=c++17\"/\"-std=$std\"/" "$work/grouped_gemm-$GG_VERSION/setup.py"
grep -q -- "-std=$std" "$work/grouped_gemm-$GG_VERSION/setup.py" || { echo "grouped_gemm setup.py patch failed" >&2; exit 1; }

install=("$py" -m pip install --no-deps --no-build-isolation --no-index --no-cache-dir)
[ -n "$target" ] && install+=(--target "$target" --upgrade)
echo "build.sh: torch $("$py" -c 'import torch; print(torch.__version__)'), nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, grouped_gemm -std=$std, MAX_JOBS=$MAX_JOBS, CUDA_HOME=${CUDA_HOME:-torch default}, CPATH+=${nvidia_includes:-none}"
for d in "stanford_stk-$STK_VERSION" "grouped_gemm-$GG_VERSION" "megablocks-$MB_VERSION"; do
  [[ ",$only," == *",${d%-*},"* ]] || continue
  start=$(date +%s)
  "${install[@]}" "$work/$d"
  echo "build.sh: $d installed in $(( $(date +%s) - start )) s"
done
