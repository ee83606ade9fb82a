/*
 * fuzz_descriptor.c — libFuzzer target for the shm validators (ax_shm_validate_header, _buffer, _step).
 *
 * The input is laid out as ax_shm_header (512 bytes) | ax_shm_step (128) | uint64_t mapped_size |
 * ax_shm_buffer (256) × N (at most 64), native-endian; a short input is zero-padded. The validators are pure, so
 * all three run on every input whatever the others say: none may crash, read outside the structs it is given or
 * hit undefined behaviour (build with -fsanitize=fuzzer,address,undefined). The header's buf_count is clamped to
 * the entries present, the one promise validate_step asks of its caller. Seeds: shm/gen_corpus.c writes
 * tests/fuzz/corpus/descriptor/.
 */
#include "attnx_shm.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define MAX_BUFS 64

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static size_t take(void *dst, size_t n, const uint8_t **p, size_t *left)
{
	size_t k = *left < n ? *left : n;
	memset(dst, 0, n);
	memcpy(dst, *p, k);
	*p += k;
	*left -= k;
	return k;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	ax_shm_header h;
	ax_shm_step s;
	uint64_t mapped;
	static ax_shm_buffer bufs[MAX_BUFS];
	const uint8_t *p = data;
	size_t left = size;
	take(&h, sizeof h, &p, &left);
	take(&s, sizeof s, &p, &left);
	take(&mapped, sizeof mapped, &p, &left);
	uint32_t n = 0;
	while (left >= sizeof(ax_shm_buffer) && n < MAX_BUFS)
		take(&bufs[n++], sizeof(ax_shm_buffer), &p, &left);
	if (h.buf_count > n)
		h.buf_count = n;

	int rh = ax_shm_validate_header(&h, mapped);
	for (uint32_t i = 0; i < n; i++)
		(void)ax_shm_validate_buffer(&h, &bufs[i]);
	int rs = ax_shm_validate_step(&h, bufs, &s);
	/* Results are 0 or a negative errno, never anything else. */
	if (rh > 0 || rs > 0)
		__builtin_trap();
	(void)ax_dtype_name(s.kind);
	(void)ax_dtype_size(s.flags);
	return 0;
}
