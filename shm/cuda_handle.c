/*
 * cuda_handle.c — plain-C helpers for CUDA buffer-table entries (attnx_shm_cuda.h, part 1).
 *
 * No CUDA here: these only move bytes between an engine's view of a handle and the fixed 256-byte entry, so both
 * the engine side (which may be Python through ctypes) and the capture's validator share one definition of what a
 * well-formed CUDA entry is. PyTorch's shareable handle is recognised by its exact length (66) and its two prefix
 * bytes (version 1..3, then 'c'); a 64-byte string is a raw handle, as torch ≤ 2.0 and plain CUDA programs share.
 */
#include "attnx_shm_cuda.h"

#include <errno.h>
#include <string.h>

#define TORCH_PREFIX 2
#define TORCH_TYPE_CUDA_MALLOC 'c'
#define TORCH_TYPE_EXPANDABLE 'e'

int ax_cuda_ipc_handle_parse(const void *bytes, size_t len, uint8_t out[AX_CUDA_IPC_HANDLE_SIZE])
{
	const uint8_t *p = bytes;
	if (p == NULL)
		return -EINVAL;
	if (len == AX_CUDA_IPC_HANDLE_SIZE) {
		memcpy(out, p, AX_CUDA_IPC_HANDLE_SIZE);
		return 0;
	}
	if (len >= TORCH_PREFIX && p[0] >= 1 && p[0] <= 3 && p[1] == TORCH_TYPE_EXPANDABLE)
		return -ENOTSUP;
	if (len != AX_CUDA_IPC_HANDLE_SIZE + TORCH_PREFIX || p[0] < 1 || p[0] > 3 || p[1] != TORCH_TYPE_CUDA_MALLOC)
		return -EINVAL;
	memcpy(out, p + TORCH_PREFIX, AX_CUDA_IPC_HANDLE_SIZE);
	return 0;
}

int ax_cuda_entry_set_ipc(ax_shm_buffer *b, int device, const void *handle, size_t handle_len, uint64_t offset,
			  uint64_t bytes)
{
	uint8_t h[AX_CUDA_IPC_HANDLE_SIZE];
	int rc = ax_cuda_ipc_handle_parse(handle, handle_len, h);
	if (rc)
		return rc;
	if (device < 0)
		return -EINVAL;
	b->loc = AX_LOC_CUDA_IPC;
	b->device = device;
	memcpy(b->handle, h, sizeof h);
	memset(b->vmm_socket, 0, sizeof b->vmm_socket);
	b->offset = offset;
	b->bytes = bytes;
	return 0;
}

int ax_cuda_entry_set_event(ax_shm_buffer *b, const void *ev64)
{
	_Static_assert(sizeof b->vmm_socket == AX_CUDA_IPC_HANDLE_SIZE, "event handle fits vmm_socket");
	if (b->loc != AX_LOC_CUDA_IPC)
		return -EINVAL;
	if (ev64)
		memcpy(b->vmm_socket, ev64, AX_CUDA_IPC_HANDLE_SIZE);
	else
		memset(b->vmm_socket, 0, sizeof b->vmm_socket);
	return 0;
}

int ax_cuda_entry_event(const ax_shm_buffer *b, uint8_t out[AX_CUDA_IPC_HANDLE_SIZE])
{
	if (b->loc != AX_LOC_CUDA_IPC)
		return -EINVAL;
	uint8_t any = 0;
	for (size_t i = 0; i < sizeof b->vmm_socket; i++)
		any |= (uint8_t)b->vmm_socket[i];
	if (!any)
		return 0;
	memcpy(out, b->vmm_socket, AX_CUDA_IPC_HANDLE_SIZE);
	return 1;
}

int ax_cuda_entry_set_vmm(ax_shm_buffer *b, int device, uint64_t alloc_id, const char *socket_path,
			  uint64_t offset, uint64_t bytes)
{
	if (socket_path == NULL || socket_path[0] == '\0' || device < 0)
		return -EINVAL;
	size_t n = strlen(socket_path);
	if (n >= sizeof b->vmm_socket)
		return -ENAMETOOLONG;
	b->loc = AX_LOC_CUDA_VMM;
	b->device = device;
	memset(b->handle, 0, sizeof b->handle);
	memcpy(b->handle, &alloc_id, sizeof alloc_id);
	memset(b->vmm_socket, 0, sizeof b->vmm_socket);
	memcpy(b->vmm_socket, socket_path, n);
	b->offset = offset;
	b->bytes = bytes;
	return 0;
}

uint64_t ax_cuda_entry_vmm_id(const ax_shm_buffer *b)
{
	uint64_t id;
	memcpy(&id, b->handle, sizeof id);
	return id;
}

int ax_cuda_check_extent(const ax_shm_buffer *b, uint64_t alloc_bytes)
{
	uint64_t end;
	if (b->bytes == 0 || __builtin_add_overflow(b->offset, b->bytes, &end) || end > alloc_bytes)
		return -ERANGE;
	return 0;
}
