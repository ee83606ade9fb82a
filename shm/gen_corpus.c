/*
 * gen_corpus.c — writes the seed corpus of tests/fuzz/fuzz_descriptor.c: a few valid and invalid inputs built
 * from a real layout, so libFuzzer starts from inputs that get past the magic check and into every validator.
 *
 * Input format (shared with fuzz_descriptor.c): ax_shm_header (512 bytes) | ax_shm_step (128) | uint64_t
 * mapped_size | ax_shm_buffer (256) × N, all native-endian. Usage: shm_gen_corpus DIR. A dev tool: it exits
 * non-zero on any error.
 */
#include "shm_internal.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

typedef struct input {
	ax_shm_header h;
	ax_shm_step s;
	uint64_t mapped;
	ax_shm_buffer b[3]; /* Q ring, token index table, K pool of layer 0 */
} input;

static void good_input(input *in)
{
	memset(in, 0, sizeof *in);
	ax_shm_header *h = &in->h;
	h->magic = AX_SHM_MAGIC;
	h->version = AX_SHM_VERSION;
	h->header_size = sizeof *h;
	h->world_size = 1;
	snprintf(h->engine, sizeof h->engine, "gen");
	h->n_layers = 2, h->n_q_heads = 4, h->n_kv_heads = 2, h->n_q_heads_total = 4, h->head_dim = 8;
	h->q_dtype = h->k_dtype = AX_DTYPE_F32;
	h->scale = 0.35f, h->max_ctx = 64;
	h->buf_cap = 3, h->buf_count = 3, h->req_cap = 4, h->ring_cap = 8, h->arena_cap = 64;
	h->data_size = 8192;
	ax_shm_layout l;
	ax__shm_layout(h->buf_cap, h->req_cap, h->ring_cap, h->arena_cap, h->data_size, &l);
	h->buf_off = l.buf_off, h->req_off = l.req_off, h->ring_off = l.ring_off, h->arena_off = l.arena_off;
	h->data_off = l.data_off, h->segment_size = l.segment_size;
	h->arena_head = 10, h->q_head = 8, h->ring_head = 3;
	in->mapped = l.segment_size;
	in->b[0] = (ax_shm_buffer){.kind = AX_BUF_Q_RING, .loc = AX_LOC_HOST, .dtype = AX_DTYPE_F32, .layer = -1,
				   .ndim = 3, .device = -1, .dim = {8, 4, 8}, .stride = {32, 8, 1},
				   .offset = l.data_off, .bytes = 8 * 32 * 4, .scale = 1};
	in->b[1] = (ax_shm_buffer){.kind = AX_BUF_INDEX_TOKEN, .loc = AX_LOC_HOST, .dtype = AX_DTYPE_I32, .layer = -1,
				   .ndim = 2, .device = -1, .dim = {4, 64}, .stride = {64, 1},
				   .offset = l.data_off + 1024, .bytes = 4 * 64 * 4, .scale = 1};
	in->b[2] = (ax_shm_buffer){.kind = AX_BUF_K_POOL, .loc = AX_LOC_HOST, .dtype = AX_DTYPE_F32, .layer = 0,
				   .ndim = 3, .device = -1, .dim = {64, 2, 8}, .stride = {16, 8, 1},
				   .offset = l.data_off + 2048, .bytes = 64 * 16 * 4, .scale = 1};
	in->s = (ax_shm_step){.seq = 3, .kind = AX_STEP_FORWARD, .req_id = 1 << 16, .req_slot = 0, .n_tokens = 2,
			      .pos0 = 5, .seq_len = 7, .index_row = 1, .q_row = 4, .layers = {3, 0}, .tok_pos = 8,
			      .index_buf = 1};
}

/* The good input with a paged layout: block table i32 [4, 4] of 16 (64 tokens a row), K pool [4, 16, 2, 8]. */
static void paged_input(input *in)
{
	good_input(in);
	uint64_t off1 = in->b[1].offset, off2 = in->b[2].offset;
	ax_shm_block_table_desc(&in->b[1], 4, 4, 16);
	ax_shm_paged_kpool_desc(&in->b[2], 0, AX_DTYPE_F32, 4, 16, 2, 8);
	in->b[1].loc = in->b[2].loc = AX_LOC_HOST;
	in->b[1].offset = off1, in->b[2].offset = off2;
}

static int write_input(const char *dir, const char *name, const input *in)
{
	char path[512];
	snprintf(path, sizeof path, "%s/%s", dir, name);
	FILE *f = fopen(path, "wb");
	if (!f || fwrite(in, sizeof *in, 1, f) != 1) {
		fprintf(stderr, "%s: %s\n", path, strerror(errno));
		if (f)
			fclose(f);
		return 1;
	}
	return fclose(f) != 0;
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: %s DIR\n", argv[0]);
		return 2;
	}
	const char *dir = argv[1];
	input in;
	int bad = 0;
	good_input(&in);
	if (ax_shm_validate_header(&in.h, in.mapped) || ax_shm_validate_step(&in.h, in.b, &in.s)) {
		fprintf(stderr, "the good input does not validate\n");
		return 1;
	}
	bad |= write_input(dir, "valid_forward", &in);
	in.s = (ax_shm_step){.seq = 1, .kind = AX_STEP_BEGIN, .req_id = 1 << 16};
	bad |= write_input(dir, "valid_begin", &in);
	in.s = (ax_shm_step){.seq = 2, .kind = AX_STEP_END, .req_id = 1 << 16, .end_reason = AX_END_STOP};
	bad |= write_input(dir, "valid_end", &in);
	good_input(&in);
	in.s.q_row = 0, in.h.q_head = 20;
	bad |= write_input(dir, "lapped_q", &in);
	good_input(&in);
	in.s.seq_len = 9;
	bad |= write_input(dir, "bad_seq_len", &in);
	good_input(&in);
	in.b[1].dim[0] = 0xffffffffffffffffull, in.b[1].stride[0] = 0x100000000ull;
	bad |= write_input(dir, "huge_index_shape", &in);
	paged_input(&in);
	if (ax_shm_validate_buffer(&in.h, &in.b[1]) || ax_shm_validate_buffer(&in.h, &in.b[2]) ||
	    ax_shm_validate_step(&in.h, in.b, &in.s)) {
		fprintf(stderr, "the paged input does not validate\n");
		return 1;
	}
	bad |= write_input(dir, "valid_forward_paged", &in);
	in.b[1].dim[2] = 0;
	bad |= write_input(dir, "paged_block_size_0", &in);
	paged_input(&in);
	in.b[1].dim[1] = 2; /* rows of 32 tokens: a step at 40 needs a third block (-ERANGE) */
	in.s.pos0 = 40, in.s.seq_len = 42;
	bad |= write_input(dir, "paged_past_row", &in);
	good_input(&in);
	in.h.ring_cap = 6;
	bad |= write_input(dir, "ring_not_pow2", &in);
	good_input(&in);
	in.h.magic ^= 1;
	bad |= write_input(dir, "bad_magic", &in);
	return bad;
}
