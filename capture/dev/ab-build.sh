#!/bin/bash
# ab-build.sh — build attn_cuda_test (the fast path's tests and --bench) from a source tree for A/B runs on a GPU
# machine: the same compile as scripts/gpu-test's attn_cuda_test stage, cudart static, sm_90, xz-compressed for the
# device tool's carry.   usage: capture/dev/ab-build.sh OUT.xz [SRC_TREE (default .)] [extra nvcc flags...]
#   e.g. git archive <commit> | tar x -C /tmp/base && capture/dev/ab-build.sh .ab/base.xz /tmp/base
set -euo pipefail
out=$(realpath -m "$1"); src=${2:-.}; shift $(( $# > 1 ? 2 : 1 ))
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
cd "$src"
inc="-Icapture -Iproto -Ishm -Icommon"
# shellcheck disable=SC2086
gcc -O2 -std=gnu11 -D_GNU_SOURCE -Wno-psabi $inc -c capture/attn_cpu.c -o "$tmp/attn_cpu.o"
# shellcheck disable=SC2086
nvcc -O2 -std=c++17 -gencode arch=compute_90,code=sm_90 -lineinfo $inc "$@" -o "$tmp/bin" capture/attn_cuda_test.cu \
	capture/attn_cuda.cu capture/attn_cuda_fast.cu capture/attn_cuda_prefill.cu "$tmp/attn_cpu.o"
mkdir -p "$(dirname "$out")"
xz -T0 -c "$tmp/bin" >"$out"
ls -la "$out"
