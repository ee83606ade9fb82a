/*
 * fuzz_cuda.c — libFuzzer target for the decoders of attnx_shm_cuda.h: the VMM server's request check (every
 * datagram a peer sends), the client's reply check (with every fd count it could have received), IPC handle
 * parsing (raw and PyTorch-prefixed bytes), and a buffer-table entry's event field and extent check. Built with
 * -Dfuzz=true (CC=clang) as build-fuzz/shm/fuzz_cuda; seed corpus in shm/fuzz_corpus/cuda/.
 * Run: build-fuzz/shm/fuzz_cuda -max_total_time=60 shm/fuzz_corpus/cuda
 */
#include <stdint.h>
#include <string.h>

#include "attnx_shm_cuda.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	uint64_t id = 0;
	uint8_t h[AX_CUDA_IPC_HANDLE_SIZE];
	(void)ax_vmm_request_check(data, size, &id);
	(void)ax_cuda_ipc_handle_parse(data, size, h);
	if (size >= sizeof(ax_vmm_reply)) {
		ax_vmm_reply r;
		memcpy(&r, data, sizeof r);
		for (int nfds = 0; nfds < 3; nfds++)
			(void)ax_vmm_reply_check(&r, size, r.id ^ (uint64_t)(size > sizeof r), nfds);
	}
	if (size >= sizeof(ax_shm_buffer) + 8) {
		ax_shm_buffer b;
		uint64_t alloc;
		memcpy(&b, data, sizeof b);
		memcpy(&alloc, data + sizeof b, sizeof alloc);
		(void)ax_cuda_check_extent(&b, alloc);
		(void)ax_cuda_entry_event(&b, h);
		(void)ax_cuda_entry_vmm_id(&b);
	}
	return 0;
}
