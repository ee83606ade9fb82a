#!/usr/bin/env bash
# shm/python/build_libs.sh OUTDIR — build the three shared libraries the attnx Python package loads
# (libattnx-export.so, libattnx-export-cuda.so, libattnx-export-graph.so) with plain cc and nvcc, for machines
# where the meson build cannot be configured (a GPU machine without nng/civetweb/... dev packages). They depend
# on nothing but libc, pthreads and the CUDA runtime/driver. Then: ATTNX_LIB_DIR=OUTDIR python3 ...
# Environment: AX_GPU_ARCH (default 90), CC (default cc), NVCC (default nvcc on PATH or /usr/local/cuda/bin/nvcc).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: build_libs.sh OUTDIR}
mkdir -p "$out"
cc=${CC:-cc}
nvcc=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
cuda=$(dirname "$(dirname "$nvcc")")
arch=${AX_GPU_ARCH:-90}
flags=(-std=gnu11 -O2 -g -fPIC -D_GNU_SOURCE -Icommon -Ishm -I"$out")
printf '#define AX_HAVE_CUDA 1\n' >"$out/attnx_config.h"
"$cc" "${flags[@]}" -shared -o "$out/libattnx-export.so" common/common.c shm/shm.c shm/export.c shm/attach.c \
	-lrt -lpthread -lm
"$cc" "${flags[@]}" -I"$cuda/include" -shared -o "$out/libattnx-export-cuda.so" \
	shm/cuda_handle.c shm/vmm_fd.c shm/cuda_import.c shm/cuda_ops.c \
	-L"$out" -lattnx-export -L"$cuda/lib64" -L"$cuda/lib64/stubs" -lcudart -lcuda -lpthread \
	-Wl,-rpath,'$ORIGIN' -Wl,-rpath,"$cuda/lib64"
"$nvcc" -std=c++17 -O2 -lineinfo -gencode "arch=compute_${arch},code=sm_${arch}" -Xcompiler -fPIC -shared \
	-Icommon -Ishm -I"$out" -o "$out/libattnx-export-graph.so" shm/export_graph.cu \
	-L"$out" -lattnx-export -lpthread -Xlinker -rpath -Xlinker '$ORIGIN'
echo "build_libs: $(ls "$out"/*.so | tr '\n' ' ')"
