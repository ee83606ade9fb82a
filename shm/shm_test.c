/*
 * shm_test.c — unit tests of the shm module: validators, the export/attach round trip, the ring's error paths
 * (wrap-around, full ring, torn and malformed descriptors, laps), request-table exhaustion, engine restart and
 * stale segments, and producer and consumer in two processes (including a stalled consumer and a killed engine).
 *
 * Every test gets its own segment named after the test pid and a tag, and unlinks it in teardown. Corruptions are
 * listed in tables: each row mutates a known-good header, buffer or descriptor and names the error expected.
 */
#include "attnx_common.h"
#include "attnx_shm.h"
#include "shm_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

/* ---- fixture -------------------------------------------------------------------------------------------- */

enum { LAYERS = 4, HQ = 4, HKV = 2, D = 8, MAXCTX = 256, QROWS = 32, IDXROWS = 4 };

typedef struct fx {
	char name[AX_SHM_NAME_MAX];
	ax_export_config cfg;
	ax_export *ex;
	ax_shm *sh;
	uint32_t qbuf, ibuf, kbuf[LAYERS];
	float *q;     /* Q ring [QROWS, HQ, D] */
	int32_t *idx; /* index table [IDXROWS, MAXCTX] */
} fx;

static void seg_name(char *out, const char *tag)
{
	snprintf(out, AX_SHM_NAME_MAX, "/attnx.test.%d.%s", (int)getpid(), tag);
}

static ax_export_config base_cfg(const char *name)
{
	return (ax_export_config){.name = name, .engine = "shm_test", .model = "toy", .world_size = 1,
				  .n_layers = LAYERS, .n_q_heads = HQ, .n_kv_heads = HKV, .head_dim = D,
				  .q_dtype = AX_DTYPE_F32, .k_dtype = AX_DTYPE_F32, .max_ctx = MAXCTX,
				  .req_cap = 8, .ring_cap = 8, .arena_cap = 64, .data_size = 1 << 20};
}

/* Add the Q ring, one token index table and a K pool per layer. */
static void add_buffers(fx *f)
{
	void *p;
	ax_shm_buffer q = {.kind = AX_BUF_Q_RING, .loc = AX_LOC_HOST, .dtype = AX_DTYPE_F32, .layer = -1, .ndim = 3,
			   .dim = {QROWS, HQ, D}, .scale = 1};
	assert_int_equal(ax_export_add_host_buffer(f->ex, &q, &p, &f->qbuf), 0);
	f->q = p;
	ax_shm_buffer ix = {.kind = AX_BUF_INDEX_TOKEN, .loc = AX_LOC_HOST, .dtype = AX_DTYPE_I32, .layer = -1,
			    .ndim = 2, .dim = {IDXROWS, MAXCTX}, .scale = 1};
	assert_int_equal(ax_export_add_host_buffer(f->ex, &ix, &p, &f->ibuf), 0);
	f->idx = p;
	for (int l = 0; l < LAYERS; l++) {
		ax_shm_buffer k = {.kind = AX_BUF_K_POOL, .loc = AX_LOC_HOST, .dtype = AX_DTYPE_F32, .layer = l,
				   .ndim = 3, .dim = {MAXCTX, HKV, D}, .scale = 1};
		assert_int_equal(ax_export_add_host_buffer(f->ex, &k, NULL, &f->kbuf[l]), 0);
	}
}

static int fx_open(fx *f, const char *tag, void (*tweak)(ax_export_config *))
{
	seg_name(f->name, tag);
	shm_unlink(f->name);
	f->cfg = base_cfg(f->name);
	if (tweak)
		tweak(&f->cfg);
	int rc = ax_export_open(&f->ex, &f->cfg);
	if (rc)
		return rc;
	add_buffers(f);
	return ax_shm_attach(&f->sh, f->name);
}

static int setup(void **state)
{
	fx *f = calloc(1, sizeof *f);
	*state = f;
	return fx_open(f, "fx", NULL) ? -1 : 0;
}

static int teardown(void **state)
{
	fx *f = *state;
	ax_shm_detach(f->sh);
	ax_export_close(f->ex);
	shm_unlink(f->name);
	free(f);
	return 0;
}

static uint32_t popcount2(const uint64_t l[2])
{
	return (uint32_t)(__builtin_popcountll(l[0]) + __builtin_popcountll(l[1]));
}

/* The value a test producer writes at Q row element (t, li, h, d) of the step at position pos. */
static float q_value(uint64_t pos, uint32_t li, uint32_t h, uint32_t d)
{
	return (float)(pos * 1000 + li * 100 + h * 10 + d);
}
static int32_t tok_value(uint64_t pos) { return (int32_t)(pos * 7 + 3); }

/* Export one FORWARD step with Q rows and token ids of known values. Returns ax_export_step's result. */
static int put_step(ax_export *ex, uint32_t qbuf, uint32_t ibuf, uint64_t req, uint64_t pos0, uint32_t n,
		    uint64_t l0)
{
	ax_shm_step s = {.req_id = req, .n_tokens = n, .pos0 = pos0, .seq_len = pos0 + n, .index_buf = ibuf,
			 .index_row = 0, .layers = {l0, 0}};
	uint32_t nl = popcount2(s.layers);
	if (nl) {
		void *p;
		int rc = ax_export_q_reserve(ex, qbuf, n * nl, &s.q_row, &p);
		if (rc)
			return rc;
		float *q = p;
		for (uint32_t t = 0; t < n; t++)
			for (uint32_t li = 0; li < nl; li++)
				for (uint32_t h = 0; h < HQ; h++)
					for (uint32_t d = 0; d < D; d++)
						*q++ = q_value(pos0 + t, li, h, d);
	}
	int32_t toks[64];
	for (uint32_t t = 0; t < n; t++)
		toks[t] = tok_value(pos0 + t);
	return ax_export_step(ex, &s, toks);
}

/* Check a taken FORWARD descriptor's Q rows and token ids against the values put_step wrote. */
static void check_step_payload(ax_shm *sh, const ax_shm_step *s)
{
	int32_t toks[64];
	assert_int_equal(ax_shm_read_tokens(sh, s->tok_pos, s->n_tokens, toks), 0);
	for (uint32_t t = 0; t < s->n_tokens; t++)
		assert_int_equal(toks[t], tok_value(s->pos0 + t));
	uint32_t nl = popcount2(s->layers);
	if (nl == 0)
		return; /* no Q rows exported for this step */
	int qi = ax_shm_find_buffer(sh, AX_BUF_Q_RING, -1);
	assert_true(qi >= 0);
	uint32_t nb;
	const ax_shm_buffer *b = &ax_shm_buffers(sh, &nb)[qi];
	const float *q = ax_shm_host_ptr(sh, (uint32_t)qi);
	float got[8 * 2 * HQ * D];
	uint64_t n = (uint64_t)s->n_tokens * nl;
	assert_true(n * HQ * D <= AX_ARRAY_LEN(got));
	memcpy(got, q + (s->q_row % b->dim[0]) * b->stride[0], n * HQ * D * sizeof(float));
	assert_int_equal(ax_shm_check_q(sh, s->q_row, n, b->dim[0]), 0);
	const float *r = got;
	for (uint32_t t = 0; t < s->n_tokens; t++)
		for (uint32_t li = 0; li < nl; li++)
			for (uint32_t h = 0; h < HQ; h++)
				for (uint32_t d = 0; d < D; d++)
					assert_true(*r++ == q_value(s->pos0 + t, li, h, d));
}

/* ---- pure helpers ------------------------------------------------------------------------------------------ */

static void test_dtypes(void **state)
{
	static const struct {
		uint32_t id;
		size_t size;
		const char *name;
	} cases[] = {{AX_DTYPE_F32, 4, "f32"},	     {AX_DTYPE_F16, 2, "f16"},		 {AX_DTYPE_BF16, 2, "bf16"},
		     {AX_DTYPE_FP8_E4M3, 1, "fp8_e4m3"}, {AX_DTYPE_FP8_E5M2, 1, "fp8_e5m2"}, {AX_DTYPE_I32, 4, "i32"},
		     {AX_DTYPE_I64, 8, "i64"}};
	for (size_t i = 0; i < AX_ARRAY_LEN(cases); i++) {
		assert_int_equal(ax_dtype_size(cases[i].id), cases[i].size);
		assert_string_equal(ax_dtype_name(cases[i].id), cases[i].name);
		assert_int_equal(ax_dtype_parse(cases[i].name), (int)cases[i].id);
	}
	assert_int_equal(ax_dtype_parse("BFloat16"), AX_DTYPE_BF16);
	assert_int_equal(ax_dtype_size(0), 0);
	assert_int_equal(ax_dtype_size(99), 0);
	assert_string_equal(ax_dtype_name(99), "?");
	assert_int_equal(ax_dtype_parse("f33"), -EINVAL);
	assert_int_equal(ax_dtype_parse(""), -EINVAL);
	assert_int_equal(ax_dtype_parse(NULL), -EINVAL);
}

/* ---- header validator ---------------------------------------------------------------------------------------- */

typedef struct hdr_case {
	const char *what;
	void (*mutate)(ax_shm_header *h, uint64_t *mapped);
	int want;
} hdr_case;

#define HMUT(fn, body) \
	static void fn(ax_shm_header *h, uint64_t *mapped) { (void)h, (void)mapped; body; }
HMUT(h_magic, h->magic ^= 1)
HMUT(h_version, h->version = 2)
HMUT(h_hsize, h->header_size = 500)
HMUT(h_truncated, *mapped = h->segment_size - 64)
HMUT(h_segsmall, h->segment_size = 100)
HMUT(h_engine_nul, memset(h->engine, 'x', sizeof h->engine))
HMUT(h_model_nul, memset(h->model, 'x', sizeof h->model))
HMUT(h_rank, h->rank = h->world_size)
HMUT(h_world0, h->world_size = 0)
HMUT(h_layers0, h->n_layers = 0)
HMUT(h_layers_big, h->n_layers = 129)
HMUT(h_gqa, h->n_kv_heads = 3)
HMUT(h_kv0, h->n_kv_heads = 0)
HMUT(h_hd0, h->head_dim = 0)
HMUT(h_hd_big, h->head_dim = 2048)
HMUT(h_heads_total, h->n_q_heads_total = h->n_q_heads - 1)
HMUT(h_qdtype, h->q_dtype = AX_DTYPE_I32)
HMUT(h_kdtype, h->k_dtype = 0)
HMUT(h_scale0, h->scale = 0)
HMUT(h_scale_nan, h->scale = __builtin_nanf(""))
HMUT(h_cap_neg, h->logit_cap = -1)
HMUT(h_window, h->window = -1)
HMUT(h_maxctx, h->max_ctx = 0)
HMUT(h_bufcap0, h->buf_cap = 0)
HMUT(h_bufcount, h->buf_count = h->buf_cap + 1)
HMUT(h_reqcap, h->req_cap = 70000)
HMUT(h_ring_pow2, h->ring_cap = 6)
HMUT(h_ring1, h->ring_cap = 1)
HMUT(h_arena0, h->arena_cap = 0)
HMUT(h_arena_huge, h->arena_cap = 1ull << 62)
HMUT(h_buf_misaligned, h->buf_off += 8)
HMUT(h_buf_in_header, h->buf_off = 0)
HMUT(h_req_overlap, h->req_off = h->buf_off)
HMUT(h_ring_past, h->ring_off = h->segment_size)
HMUT(h_data_big, h->data_size = h->segment_size)
HMUT(h_data_wrap, h->data_off = UINT64_MAX - 63)
HMUT(h_data_used, h->data_used = h->data_size + 1)

static const hdr_case hdr_cases[] = {
	{"bad magic", h_magic, -EPROTO},
	{"bad version", h_version, -EPROTO},
	{"header_size", h_hsize, -EINVAL},
	{"mapping shorter than segment", h_truncated, -ERANGE},
	{"segment smaller than header", h_segsmall, -ERANGE},
	{"engine not NUL-terminated", h_engine_nul, -EINVAL},
	{"model not NUL-terminated", h_model_nul, -EINVAL},
	{"rank >= world", h_rank, -EINVAL},
	{"world 0", h_world0, -EINVAL},
	{"0 layers", h_layers0, -EINVAL},
	{"129 layers", h_layers_big, -EINVAL},
	{"q heads not a multiple of kv heads", h_gqa, -EINVAL},
	{"0 kv heads", h_kv0, -EINVAL},
	{"head_dim 0", h_hd0, -EINVAL},
	{"head_dim 2048", h_hd_big, -EINVAL},
	{"head range past total", h_heads_total, -EINVAL},
	{"q dtype not float", h_qdtype, -EINVAL},
	{"k dtype unknown", h_kdtype, -EINVAL},
	{"scale 0", h_scale0, -EINVAL},
	{"scale NaN", h_scale_nan, -EINVAL},
	{"negative logit cap", h_cap_neg, -EINVAL},
	{"negative window", h_window, -EINVAL},
	{"max_ctx 0", h_maxctx, -EINVAL},
	{"buf_cap 0", h_bufcap0, -EINVAL},
	{"buf_count > buf_cap", h_bufcount, -EINVAL},
	{"req_cap too big", h_reqcap, -EINVAL},
	{"ring_cap not a power of two", h_ring_pow2, -EINVAL},
	{"ring_cap 1", h_ring1, -EINVAL},
	{"arena_cap 0", h_arena0, -EINVAL},
	{"arena past segment", h_arena_huge, -ERANGE},
	{"misaligned buffer table", h_buf_misaligned, -EINVAL},
	{"buffer table inside header", h_buf_in_header, -ERANGE},
	{"request table overlaps buffer table", h_req_overlap, -ERANGE},
	{"ring past segment end", h_ring_past, -ERANGE},
	{"data region past segment end", h_data_big, -ERANGE},
	{"data offset wraps", h_data_wrap, -ERANGE},
	{"data_used past data_size", h_data_used, -ERANGE},
};

static void test_validate_header(void **state)
{
	fx *f = *state;
	const ax_shm_header *live = ax_shm_hdr(f->sh);
	assert_int_equal(ax_shm_validate_header(live, live->segment_size), 0);
	const ax_shm_header *snap = ax_shm_snapshot(f->sh);
	assert_ptr_not_equal(snap, live);
	assert_int_equal(snap->generation, live->generation);
	assert_int_equal(snap->n_q_heads, HQ);
	assert_string_equal(snap->model, "toy");
	for (size_t i = 0; i < AX_ARRAY_LEN(hdr_cases); i++) {
		ax_shm_header h = *live;
		uint64_t mapped = h.segment_size;
		hdr_cases[i].mutate(&h, &mapped);
		int rc = ax_shm_validate_header(&h, mapped);
		if (rc != hdr_cases[i].want)
			fail_msg("header case '%s': got %d, want %d", hdr_cases[i].what, rc, hdr_cases[i].want);
	}
}

/* ---- buffer validator ---------------------------------------------------------------------------------------- */

typedef struct buf_case {
	const char *what;
	uint32_t which; /* 0: Q ring, 1: index table, 2: K pool of layer 0 */
	void (*mutate)(ax_shm_buffer *b, const ax_shm_header *h);
	int want;
} buf_case;

#define BMUT(fn, body) \
	static void fn(ax_shm_buffer *b, const ax_shm_header *h) { (void)h; body; }
BMUT(b_kind0, b->kind = 0)
BMUT(b_kind9, b->kind = 9)
BMUT(b_loc, b->loc = 7)
BMUT(b_dtype, b->dtype = 0)
BMUT(b_ndim0, b->ndim = 0)
BMUT(b_ndim5, b->ndim = 5)
BMUT(b_dim0, b->dim[1] = 0)
BMUT(b_bytes, b->bytes -= 1)
BMUT(b_stride_ovf, b->stride[0] = UINT64_MAX / 2)
BMUT(b_outside, b->offset = h->data_off + h->data_size - 64)
BMUT(b_before, b->offset = h->data_off - 64)
BMUT(b_misaligned, b->offset += 2)
BMUT(b_hostdev, b->device = 0)
BMUT(b_q_heads, b->dim[1] = HQ + 1)
BMUT(b_q_hd, b->dim[2] = D * 2)
BMUT(b_q_layer, b->layer = 0)
BMUT(b_q_int, b->dtype = AX_DTYPE_I32)
BMUT(b_ix_float, b->dtype = AX_DTYPE_F32)
BMUT(b_ix_ndim, b->ndim = 3)
BMUT(b_k_layer, b->layer = LAYERS)
BMUT(b_k_neg, b->layer = -1)
BMUT(b_k_heads, b->dim[1] = HKV + 1)
BMUT(b_fp8_scale, b->dtype = AX_DTYPE_FP8_E4M3; b->scale = 0)
BMUT(b_ipc_dev, b->loc = AX_LOC_CUDA_IPC; b->device = -1)
BMUT(b_vmm_sock, b->loc = AX_LOC_CUDA_VMM; b->device = 0; memset(b->vmm_socket, 'x', sizeof b->vmm_socket))
BMUT(b_vmm_empty, b->loc = AX_LOC_CUDA_VMM; b->device = 0; b->vmm_socket[0] = 0)

static const buf_case buf_cases[] = {
	{"kind 0", 0, b_kind0, -EINVAL},
	{"kind 9", 1, b_kind9, -EINVAL},
	{"unknown loc", 0, b_loc, -EINVAL},
	{"unknown dtype", 2, b_dtype, -EINVAL},
	{"ndim 0", 0, b_ndim0, -EINVAL},
	{"ndim 5", 0, b_ndim5, -EINVAL},
	{"zero dim", 2, b_dim0, -EINVAL},
	{"bytes short of the extent", 1, b_bytes, -ERANGE},
	{"stride overflows", 2, b_stride_ovf, -ERANGE},
	{"host range past data region", 2, b_outside, -ERANGE},
	{"host offset before data region", 0, b_before, -ERANGE},
	{"host offset misaligned", 0, b_misaligned, -EINVAL},
	{"host buffer with a device", 1, b_hostdev, -EINVAL},
	{"Q ring head count", 0, b_q_heads, -EINVAL},
	{"Q ring head dim", 0, b_q_hd, -EINVAL},
	{"Q ring with a layer", 0, b_q_layer, -EINVAL},
	{"Q ring of ints", 0, b_q_int, -EINVAL},
	{"index table of floats", 1, b_ix_float, -EINVAL},
	{"token index with 3 dims", 1, b_ix_ndim, -EINVAL},
	{"K pool layer >= n_layers", 2, b_k_layer, -EINVAL},
	{"K pool layer -1", 2, b_k_neg, -EINVAL},
	{"K pool kv heads", 2, b_k_heads, -EINVAL},
	{"fp8 scale 0", 2, b_fp8_scale, -EINVAL},
	{"CUDA IPC without a device", 2, b_ipc_dev, -EINVAL},
	{"VMM socket not NUL-terminated", 2, b_vmm_sock, -EINVAL},
	{"VMM socket empty", 2, b_vmm_empty, -EINVAL},
};

static void test_validate_buffer(void **state)
{
	fx *f = *state;
	const ax_shm_header *h = ax_shm_hdr(f->sh);
	uint32_t n;
	const ax_shm_buffer *bufs = ax_shm_buffers(f->sh, &n);
	assert_int_equal(n, 2 + LAYERS);
	for (uint32_t i = 0; i < n; i++)
		assert_int_equal(ax_shm_validate_buffer(h, &bufs[i]), 0);
	const uint32_t pick[3] = {f->qbuf, f->ibuf, f->kbuf[0]};
	for (size_t i = 0; i < AX_ARRAY_LEN(buf_cases); i++) {
		ax_shm_buffer b = bufs[pick[buf_cases[i].which]];
		buf_cases[i].mutate(&b, h);
		int rc = ax_shm_validate_buffer(h, &b);
		if (rc != buf_cases[i].want)
			fail_msg("buffer case '%s': got %d, want %d", buf_cases[i].what, rc, buf_cases[i].want);
	}
	/* Device entries are accepted by the exporter and survive attach validation. */
	ax_shm_buffer dev = bufs[f->kbuf[1]];
	dev.loc = AX_LOC_CUDA_IPC, dev.device = 0, dev.offset = 4096;
	uint32_t di;
	assert_int_equal(ax_export_add_device_buffer(f->ex, &dev, &di), 0);
	assert_int_equal(ax_shm_find_buffer(f->sh, AX_BUF_K_POOL, 1), (int)f->kbuf[1]);
	assert_non_null(ax_shm_buffers(f->sh, &n));
	assert_int_equal(n, di + 1);
	assert_null(ax_shm_host_ptr(f->sh, di));
	assert_non_null(ax_shm_host_ptr(f->sh, f->qbuf));
	assert_null(ax_shm_host_ptr(f->sh, 999));
	dev.loc = AX_LOC_HOST;
	assert_int_equal(ax_export_add_device_buffer(f->ex, &dev, &di), -EINVAL);
}

/* ---- round trip ---------------------------------------------------------------------------------------------- */

static void test_roundtrip(void **state)
{
	fx *f = *state;
	const int32_t prompt[5] = {11, 12, 13, 14, 15};
	uint64_t req;
	assert_int_equal(ax_export_request_begin(f->ex, "ax-0001", prompt, 5, &req), 0);
	assert_int_not_equal(req, 0);
	assert_int_equal(put_step(f->ex, f->qbuf, f->ibuf, req, 0, 5, 0x9), 0); /* prefill, layers 0 and 3 */
	assert_int_equal(put_step(f->ex, f->qbuf, f->ibuf, req, 5, 1, 0x9), 0);
	assert_int_equal(ax_export_request_end(f->ex, req, AX_END_STOP), 0);

	ax_shm_step s;
	uint64_t lost = 99;
	assert_int_equal(ax_shm_next(f->sh, &s, &lost), 1);
	assert_int_equal(lost, 0);
	assert_int_equal(s.kind, AX_STEP_BEGIN);
	assert_int_equal(s.seq, 1); /* the seqlock word: sequence number 0, plus one */
	ax_shm_request r;
	assert_int_equal(ax_shm_read_request(f->sh, s.req_slot, req, &r), 0);
	assert_string_equal(r.rid, "ax-0001");
	assert_int_equal(r.prompt_len, 5);
	int32_t got[5];
	assert_int_equal(ax_shm_read_tokens(f->sh, r.prompt_pos, 5, got), 0);
	assert_memory_equal(got, prompt, sizeof prompt);
	for (int i = 0; i < 2; i++) {
		assert_int_equal(ax_shm_next(f->sh, &s, &lost), 1);
		assert_int_equal(s.kind, AX_STEP_FORWARD);
		assert_int_equal(s.req_id, req);
		assert_int_equal(s.pos0, i ? 5 : 0);
		check_step_payload(f->sh, &s);
	}
	assert_int_equal(ax_shm_next(f->sh, &s, &lost), 1);
	assert_int_equal(s.kind, AX_STEP_END);
	assert_int_equal(s.end_reason, AX_END_STOP);
	/* The entry stays readable after END until the slot is reused. */
	assert_int_equal(ax_shm_read_request(f->sh, s.req_slot, req, &r), 0);
	assert_int_equal(r.state, AX_REQ_ENDED);
	assert_int_equal(ax_shm_next(f->sh, &s, &lost), 0);
	assert_int_equal(ax_shm_read_request(f->sh, s.req_slot, req + 1, &r), -ESTALE);
	assert_int_equal(ax_export_request_end(f->ex, req, AX_END_STOP), -ENOENT);
	assert_int_equal(put_step(f->ex, f->qbuf, f->ibuf, req, 6, 1, 0), -ENOENT);
	ax_shm_stats st;
	ax_shm_get_stats(f->sh, &st);
	assert_int_equal(st.taken, 4);
	assert_int_equal(st.rejected + st.torn + st.lost, 0);
}

/* ---- malformed descriptors ------------------------------------------------------------------------------------- */

/* Publish a raw descriptor into the ring, bypassing ax_export_step's own checks. */
static void raw_publish(ax_export *ex, const ax_shm_step *d)
{
	ax_shm_header *h = ax_export_header(ex);
	ax_shm_step *ring = (ax_shm_step *)((uint8_t *)h + h->ring_off);
	uint64_t seq = h->ring_head;
	ax__shm_slot_write(&ring[seq & (h->ring_cap - 1)], seq, d);
	__atomic_store_n(&h->ring_head, seq + 1, __ATOMIC_RELEASE);
}

typedef struct step_case {
	const char *what;
	void (*mutate)(ax_shm_step *s, const fx *f);
	int want;
} step_case;

#define SMUT(fn, body) \
	static void fn(ax_shm_step *s, const fx *f) { (void)f; body; }
SMUT(s_kind0, s->kind = 0)
SMUT(s_kind4, s->kind = 4)
SMUT(s_flags, s->flags = 2)
SMUT(s_flags_begin, s->kind = AX_STEP_BEGIN; s->flags = AX_STEP_F_PREFILL)
SMUT(s_slot, s->req_slot = 8)
SMUT(s_reqid0, s->req_id = 0)
SMUT(s_end_reason, s->kind = AX_STEP_END; s->end_reason = 9)
SMUT(s_ntok0, s->n_tokens = 0; s->seq_len = s->pos0)
SMUT(s_seqlen, s->seq_len += 1)
SMUT(s_pos_wrap, s->pos0 = UINT64_MAX; s->seq_len = 1)
SMUT(s_maxctx, s->pos0 = MAXCTX - 1; s->seq_len = MAXCTX + 1)
SMUT(s_ibuf_range, s->index_buf = 99)
SMUT(s_ibuf_kind, s->index_buf = f->kbuf[0])
SMUT(s_ibuf_q, s->index_buf = f->qbuf)
SMUT(s_irow, s->index_row = IDXROWS)
SMUT(s_layer_bit, s->layers[0] |= 1ull << LAYERS)
SMUT(s_layer_hi, s->layers[1] = 1)
SMUT(s_q_unwritten, s->q_row += 2)
SMUT(s_q_wrap, s->q_row = QROWS - 1)
SMUT(s_q_future, s->q_row = 1000)
SMUT(s_tok_unwritten, s->tok_pos += 1)
SMUT(s_tok_future, s->tok_pos = 1ull << 40)

static const step_case step_cases[] = {
	{"kind 0", s_kind0, -EINVAL},
	{"kind 4", s_kind4, -EINVAL},
	{"unknown flag", s_flags, -EINVAL},
	{"prefill flag on BEGIN", s_flags_begin, -EINVAL},
	{"req_slot >= req_cap", s_slot, -EINVAL},
	{"req_id 0", s_reqid0, -EINVAL},
	{"END reason unknown", s_end_reason, -EINVAL},
	{"n_tokens 0", s_ntok0, -EINVAL},
	{"seq_len != pos0 + n_tokens", s_seqlen, -EINVAL},
	{"pos0 + n_tokens overflows", s_pos_wrap, -EINVAL},
	{"seq_len > max_ctx", s_maxctx, -ERANGE},
	{"index_buf out of range", s_ibuf_range, -EINVAL},
	{"index_buf is a K pool", s_ibuf_kind, -EINVAL},
	{"index_buf is the Q ring", s_ibuf_q, -EINVAL},
	{"index_row outside the table", s_irow, -ERANGE},
	{"layer bit >= n_layers", s_layer_bit, -EINVAL},
	{"layer bit in the high word", s_layer_hi, -EINVAL},
	{"Q rows not yet written", s_q_unwritten, -ERANGE},
	{"Q rows wrap the ring", s_q_wrap, -ERANGE},
	{"Q rows far in the future", s_q_future, -ERANGE},
	{"tokens not yet written", s_tok_unwritten, -ERANGE},
	{"tokens far in the future", s_tok_future, -ERANGE},
};

/* A good FORWARD descriptor: the last one exported, copied out of the ring. */
static void last_good_step(fx *f, uint64_t *req, ax_shm_step *s)
{
	assert_int_equal(ax_export_request_begin(f->ex, "ax-bad", NULL, 0, req), 0);
	assert_int_equal(put_step(f->ex, f->qbuf, f->ibuf, *req, 10, 2, 0x3), 0);
	uint64_t lost;
	assert_int_equal(ax_shm_next(f->sh, s, &lost), 1);
	assert_int_equal(ax_shm_next(f->sh, s, &lost), 1);
	assert_int_equal(s->kind, AX_STEP_FORWARD);
}

static void test_malformed_steps(void **state)
{
	fx *f = *state;
	uint64_t req;
	ax_shm_step good;
	last_good_step(f, &req, &good);
	const ax_shm_header *h = ax_shm_hdr(f->sh);
	uint32_t nb;
	const ax_shm_buffer *bufs = ax_shm_buffers(f->sh, &nb);
	assert_int_equal(ax_shm_validate_step(h, bufs, &good), 0);
	uint64_t rejected = 0;
	for (size_t i = 0; i < AX_ARRAY_LEN(step_cases); i++) {
		ax_shm_step s = good;
		step_cases[i].mutate(&s, f);
		int rc = ax_shm_validate_step(h, bufs, &s);
		if (rc != step_cases[i].want)
			fail_msg("step case '%s': got %d, want %d", step_cases[i].what, rc, step_cases[i].want);
		/* Through the ring: rejected, counted, and the consumer moves on. */
		raw_publish(f->ex, &s);
		ax_shm_step out;
		assert_int_equal(ax_shm_next(f->sh, &out, NULL), -EBADMSG);
		ax_shm_stats st;
		ax_shm_get_stats(f->sh, &st);
		assert_int_equal(st.rejected, ++rejected);
		/* The exporter refuses the same mistakes (those it does not fill in itself). */
		if (s.kind == AX_STEP_FORWARD && s.req_id == req && s.tok_pos == good.tok_pos && s.req_slot == good.req_slot)
			assert_int_equal(ax_export_step(f->ex, &s, (int32_t[64]){0}), -EINVAL);
	}
	raw_publish(f->ex, &good);
	ax_shm_step out;
	assert_int_equal(ax_shm_next(f->sh, &out, NULL), 1);
	assert_memory_equal(&out.kind, &good.kind, offsetof(ax_shm_step, t_ns) - offsetof(ax_shm_step, kind));
}

/* seq_len must fit the index table named (narrower than max_ctx here): token-level and paged tables. */
static void test_index_extent(void **state)
{
	fx *f = *state;
	uint64_t req;
	ax_shm_step good;
	last_good_step(f, &req, &good); /* pos0 10, 2 tokens: seq_len 12 */
	ax_shm_buffer narrow = {.kind = AX_BUF_INDEX_TOKEN, .loc = AX_LOC_HOST, .dtype = AX_DTYPE_I64, .layer = -1,
				.ndim = 2, .dim = {IDXROWS, 11}, .scale = 1};
	ax_shm_buffer paged = {.kind = AX_BUF_INDEX_PAGED, .loc = AX_LOC_HOST, .dtype = AX_DTYPE_I32, .layer = -1,
			       .ndim = 2, .dim = {IDXROWS, 3, 4}, .scale = 1}; /* 3 blocks of 4 tokens */
	uint32_t in, ip;
	assert_int_equal(ax_export_add_host_buffer(f->ex, &narrow, NULL, &in), 0);
	assert_int_equal(ax_export_add_host_buffer(f->ex, &paged, NULL, &ip), 0);
	ax_shm_find_buffer(f->sh, AX_BUF_INDEX_PAGED, -1); /* the consumer picks up the new entries */
	const ax_shm_header *h = ax_shm_hdr(f->sh);
	uint32_t nb;
	const ax_shm_buffer *bufs = ax_shm_buffers(f->sh, &nb);
	static const struct {
		int paged;
		uint64_t pos0;
		int want;
	} cases[] = {{0, 9, 0}, {0, 10, -ERANGE}, {1, 10, 0}, {1, 11, -ERANGE}};
	for (size_t i = 0; i < AX_ARRAY_LEN(cases); i++) {
		ax_shm_step st = good;
		st.index_buf = cases[i].paged ? ip : in;
		st.pos0 = cases[i].pos0;
		st.seq_len = st.pos0 + st.n_tokens;
		assert_int_equal(ax_shm_validate_step(h, bufs, &st), cases[i].want);
		raw_publish(f->ex, &st);
		ax_shm_step out;
		assert_int_equal(ax_shm_next(f->sh, &out, NULL), cases[i].want ? -EBADMSG : 1);
	}
	paged.dim[2] = 0;
	assert_int_equal(ax_export_add_host_buffer(f->ex, &paged, NULL, &ip), -EINVAL); /* no block size */
}

/* ---- paged layouts (vLLM) --------------------------------------------------------------------------------------- */

typedef struct paged_case {
	const char *what;
	int pool;            /* 0: the block table, 1: the 4-D K pool */
	void (*mutate)(ax_shm_buffer *b);
	int want;
} paged_case;

#define PMUT(fn, body) \
	static void fn(ax_shm_buffer *b) { body; }
PMUT(p_none, (void)b)
PMUT(p_bs0, b->dim[2] = 0)
PMUT(p_bs_max, b->dim[2] = AX_SHM_MAX_BLOCK_SIZE)
PMUT(p_bs_big, b->dim[2] = AX_SHM_MAX_BLOCK_SIZE + 1)
PMUT(p_bs_huge, b->dim[2] = 1ull << 40)
PMUT(p_i64, b->dtype = AX_DTYPE_I64; b->bytes *= 2)
PMUT(p_f32, b->dtype = AX_DTYPE_F32)
PMUT(p_colstride, b->stride[1] = 2; b->stride[0] = 16; b->bytes = 4 * 16 * 4)
PMUT(p_dim3, b->dim[3] = 1)
PMUT(p_stride2, b->stride[2] = 1)
PMUT(p_ndim3, b->ndim = 3)
PMUT(p_layer, b->layer = 0)
PMUT(p_rows_short, b->bytes -= 4)
PMUT(p_k_bs0, b->dim[1] = 0)
PMUT(p_k_bs_big, b->dim[1] = AX_SHM_MAX_BLOCK_SIZE + 1)
PMUT(p_k_heads, b->dim[2] = HKV + 1)
PMUT(p_k_hd, b->dim[3] = D + 1)
PMUT(p_k_short, b->bytes -= 1)
PMUT(p_k_layer, b->layer = LAYERS)
PMUT(p_k_int, b->dtype = AX_DTYPE_I32)
PMUT(p_k_hnd, b->stride[1] = D; b->stride[2] = 16 * D) /* HND: [blocks, H_kv, bs, D] through strides */
PMUT(p_k_ndim5, b->ndim = 5)

static const paged_case paged_cases[] = {
	{"good block table", 0, p_none, 0},
	{"block size 0", 0, p_bs0, -EINVAL},
	{"block size at the maximum", 0, p_bs_max, 0},
	{"block size past the maximum", 0, p_bs_big, -EINVAL},
	{"block size 2^40", 0, p_bs_huge, -EINVAL},
	{"table of i64", 0, p_i64, -EINVAL},
	{"table of floats", 0, p_f32, -EINVAL},
	{"column stride 2", 0, p_colstride, -EINVAL},
	{"dim[3] set", 0, p_dim3, -EINVAL},
	{"stride[2] set", 0, p_stride2, -EINVAL},
	{"table with 3 dims", 0, p_ndim3, -EINVAL},
	{"table with a layer", 0, p_layer, -EINVAL},
	{"table bytes short of its extent", 0, p_rows_short, -ERANGE},
	{"good 4-D K pool", 1, p_none, 0},
	{"K pool block size 0", 1, p_k_bs0, -EINVAL},
	{"K pool block size past the maximum", 1, p_k_bs_big, -EINVAL},
	{"K pool kv heads", 1, p_k_heads, -EINVAL},
	{"K pool head dim", 1, p_k_hd, -EINVAL},
	{"K pool bytes short", 1, p_k_short, -ERANGE},
	{"K pool layer >= n_layers", 1, p_k_layer, -EINVAL},
	{"K pool of ints", 1, p_k_int, -EINVAL},
	{"K pool HND strides", 1, p_k_hnd, 0},
	{"K pool with 5 dims", 1, p_k_ndim5, -EINVAL},
};

/* Block table i32 [4, 8] of 16 and a 4-D K pool [8, 16, H_kv, D], validated in place (inside the data region). */
static void test_paged_buffers(void **state)
{
	fx *f = *state;
	const ax_shm_header *h = ax_shm_hdr(f->sh);
	ax_shm_buffer t, k;
	assert_int_equal(ax_shm_block_table_desc(&t, 4, 8, 16), 0);
	assert_int_equal(ax_shm_paged_kpool_desc(&k, 1, AX_DTYPE_BF16, 8, 16, HKV, D), 0);
	assert_true(t.stride[0] == 8 && t.stride[1] == 1 && t.bytes == 4 * 8 * 4 && t.dim[2] == 16 && t.dim[3] == 0);
	assert_true(k.stride[0] == 16 * HKV * D && k.stride[1] == HKV * D && k.stride[2] == D && k.stride[3] == 1);
	assert_true(k.bytes == 8ull * 16 * HKV * D * 2 && k.ndim == 4 && k.layer == 1);
	assert_int_equal(ax_shm_block_size(&t), 16);
	assert_int_equal(ax_shm_block_size(&k), 16);
	for (size_t i = 0; i < AX_ARRAY_LEN(paged_cases); i++) {
		ax_shm_buffer b = paged_cases[i].pool ? k : t;
		b.loc = AX_LOC_HOST, b.offset = h->data_off;
		paged_cases[i].mutate(&b);
		int rc = ax_shm_validate_buffer(h, &b);
		if (rc != paged_cases[i].want)
			fail_msg("paged case '%s': got %d, want %d", paged_cases[i].what, rc, paged_cases[i].want);
	}
	/* The helpers refuse what the validator would. */
	ax_shm_buffer b;
	assert_int_equal(ax_shm_block_table_desc(&b, 4, 8, 0), -EINVAL);
	assert_int_equal(ax_shm_block_table_desc(&b, 4, 8, AX_SHM_MAX_BLOCK_SIZE + 1), -EINVAL);
	assert_int_equal(ax_shm_block_table_desc(&b, 0, 8, 16), -EINVAL);
	assert_int_equal(ax_shm_block_table_desc(&b, 1ull << 40, 1ull << 40, 16), -EINVAL);
	assert_int_equal(ax_shm_block_table_desc(NULL, 4, 8, 16), -EINVAL);
	assert_int_equal(ax_shm_paged_kpool_desc(&b, 0, AX_DTYPE_I32, 8, 16, HKV, D), -EINVAL);
	assert_int_equal(ax_shm_paged_kpool_desc(&b, 0, AX_DTYPE_F32, 8, 0, HKV, D), -EINVAL);
	assert_int_equal(ax_shm_paged_kpool_desc(&b, 0, AX_DTYPE_F32, 1ull << 50, 256, HKV, 1024), -EINVAL);
	ax_shm_buffer k3 = {.kind = AX_BUF_K_POOL, .ndim = 3, .dim = {16, HKV, D}};
	assert_int_equal(ax_shm_block_size(&k3), 0);
	assert_int_equal(ax_shm_block_size(NULL), 0);
}

/* The export calls of a paged engine, and steps through a block table: extents, rows, and a table scribbled on
 * after it was exported (rejected at the consumer's copy, and every step naming it rejected and counted). */
static void test_paged_steps(void **state)
{
	fx *f = *state;
	int32_t *tab;
	uint32_t ti, ki, ti2;
	assert_int_equal(ax_export_add_block_table(f->ex, 4, 8, 16, &tab, &ti), 0); /* 128 tokens a row */
	assert_non_null(tab);
	assert_int_equal(tab[4 * 8 - 1], 0);
	ax_shm_buffer k;
	assert_int_equal(ax_shm_paged_kpool_desc(&k, 2, AX_DTYPE_F32, 8, 16, HKV, D), 0);
	k.loc = AX_LOC_HOST;
	assert_int_equal(ax_export_add_host_buffer(f->ex, &k, NULL, &ki), 0);
	assert_int_equal(ax_export_add_block_table(f->ex, 4, 8, 0, &tab, NULL), -EINVAL);
	assert_int_equal(ax_export_add_block_table(NULL, 4, 8, 16, &tab, NULL), -EINVAL);
	assert_int_equal(ax_export_add_block_table(f->ex, 4, 8, 16, NULL, &ti2), 0); /* scribbled on below */
	ax_shm_header *eh = ax_export_header(f->ex);
	ax_shm_buffer *shared = (ax_shm_buffer *)((uint8_t *)eh + eh->buf_off);
	shared[ti2].dim[2] = 0; /* before the consumer copies it */
	ax_shm_find_buffer(f->sh, AX_BUF_INDEX_PAGED, -1); /* the consumer picks up the new entries */
	uint32_t nb;
	const ax_shm_buffer *bufs = ax_shm_buffers(f->sh, &nb);
	assert_int_equal(nb, ti2 + 1);
	assert_int_equal(bufs[ti].kind, AX_BUF_INDEX_PAGED);
	assert_int_equal(bufs[ki].kind, AX_BUF_K_POOL);
	assert_int_equal(bufs[ti2].kind, 0); /* failed validation: kind 0, never read */
	uint64_t req;
	ax_shm_step good;
	last_good_step(f, &req, &good);
	const ax_shm_header *h = ax_shm_hdr(f->sh);
	static const struct {
		uint32_t which;  /* 0: the good table, 1: the scribbled one */
		uint64_t pos0;   /* 2 tokens: seq_len pos0 + 2 */
		uint32_t row;
		int want;
	} cases[] = {{0, 10, 0, 0}, {0, 126, 3, 0}, {0, 127, 0, -ERANGE}, {0, 10, 4, -ERANGE}, {1, 10, 0, -EINVAL}};
	uint64_t rejected = 0;
	for (size_t i = 0; i < AX_ARRAY_LEN(cases); i++) {
		ax_shm_step st = good;
		st.index_buf = cases[i].which ? ti2 : ti;
		st.index_row = cases[i].row;
		st.pos0 = cases[i].pos0;
		st.seq_len = st.pos0 + st.n_tokens;
		assert_int_equal(ax_shm_validate_step(h, bufs, &st), cases[i].want);
		raw_publish(f->ex, &st);
		ax_shm_step out;
		assert_int_equal(ax_shm_next(f->sh, &out, NULL), cases[i].want ? -EBADMSG : 1);
		ax_shm_stats sts;
		ax_shm_get_stats(f->sh, &sts);
		rejected += cases[i].want != 0;
		assert_int_equal(sts.rejected, rejected);
	}
}

/* Q rows and tokens that the producer has lapped are rejected as stale. */
static void test_lapped_payload(void **state)
{
	fx *f = *state;
	uint64_t req;
	ax_shm_step good;
	last_good_step(f, &req, &good);
	const ax_shm_header *h = ax_shm_hdr(f->sh);
	uint32_t nb;
	const ax_shm_buffer *bufs = ax_shm_buffers(f->sh, &nb);
	/* Reserve a whole ring of Q rows: the good step's rows are overwritten. */
	uint64_t q_row;
	void *p;
	assert_int_equal(ax_export_q_reserve(f->ex, f->qbuf, QROWS, &q_row, &p), 0);
	assert_int_equal(q_row % QROWS, 0);
	assert_int_equal(ax_shm_validate_step(h, bufs, &good), -ESTALE);
	assert_int_equal(ax_shm_check_q(f->sh, good.q_row, 4, QROWS), -ESTALE);
	ax_shm_step noq = good;
	noq.layers[0] = 0;
	assert_int_equal(ax_shm_validate_step(h, bufs, &noq), 0);
	/* Lap the token arena (64 entries) with a long prompt. */
	int32_t prompt[64] = {0};
	uint64_t r2;
	assert_int_equal(ax_export_request_begin(f->ex, "ax-lap", prompt, 64, &r2), 0);
	assert_int_equal(ax_shm_validate_step(h, bufs, &noq), -ESTALE);
	int32_t toks[2];
	assert_int_equal(ax_shm_read_tokens(f->sh, good.tok_pos, 2, toks), -ESTALE);
	assert_int_equal(ax_shm_read_tokens(f->sh, h->arena_head, 1, toks), -ERANGE);
	assert_int_equal(ax_shm_read_tokens(f->sh, 0, 65, toks), -ERANGE);
	/* Through the ring both are rejected. */
	raw_publish(f->ex, &good);
	raw_publish(f->ex, &noq);
	ax_shm_step out;
	assert_int_equal(ax_shm_next(f->sh, &out, NULL), 1); /* the BEGIN of ax-lap */
	assert_int_equal(ax_shm_next(f->sh, &out, NULL), -EBADMSG);
	assert_int_equal(ax_shm_next(f->sh, &out, NULL), -EBADMSG);
	/* Q reservations never wrap and reject impossible sizes. */
	assert_int_equal(ax_export_q_reserve(f->ex, f->qbuf, QROWS - 1, &q_row, &p), 0);
	assert_int_equal(ax_export_q_reserve(f->ex, f->qbuf, 2, &q_row, &p), 0);
	assert_int_equal(q_row % QROWS, 0);
	assert_ptr_equal(p, f->q);
	assert_int_equal(ax_export_q_reserve(f->ex, f->qbuf, QROWS + 1, &q_row, &p), -EINVAL);
	assert_int_equal(ax_export_q_reserve(f->ex, f->qbuf, 0, &q_row, &p), -EINVAL);
	assert_int_equal(ax_export_q_reserve(f->ex, f->ibuf, 1, &q_row, &p), -EINVAL);
}

/* ---- ring behaviour ------------------------------------------------------------------------------------------ */

/* Take descriptors until the ring is empty; returns how many were taken (1); *lost_sum accumulates *lost. */
static int drain(ax_shm *sh, ax_shm_step *out, int max, uint64_t *lost_sum, int *bad)
{
	int n = 0;
	for (;;) {
		uint64_t lost = 0;
		int rc = ax_shm_next(sh, &out[n < max ? n : max - 1], &lost);
		*lost_sum += lost;
		if (rc == 0)
			return n;
		if (rc == -EBADMSG) {
			(*bad)++;
			continue;
		}
		assert_int_equal(rc, 1);
		n++;
	}
}

/* Many laps around an 8-slot ring, a 64-entry token arena and a 32-row Q ring, every value checked. */
static void test_wraparound(void **state)
{
	fx *f = *state;
	uint64_t req, pos = 0, next_seq, lost = 0;
	assert_int_equal(ax_export_request_begin(f->ex, "ax-wrap", NULL, 0, &req), 0);
	ax_shm_step out[8];
	int bad = 0;
	assert_int_equal(drain(f->sh, out, 8, &lost, &bad), 1);
	next_seq = out[0].seq + 1;
	for (int round = 0; round < 600; round++) {
		int k = 1 + round % 7;
		for (int i = 0; i < k; i++) {
			uint32_t n = 1 + (uint32_t)(round + i) % 3;
			if (pos + n > MAXCTX)
				pos = 0;
			assert_int_equal(put_step(f->ex, f->qbuf, f->ibuf, req, pos, n, 0x4), 0);
			pos += n;
		}
		assert_int_equal(drain(f->sh, out, 8, &lost, &bad), k);
		for (int i = 0; i < k; i++) {
			assert_int_equal(out[i].seq, next_seq++);
			check_step_payload(f->sh, &out[i]);
		}
	}
	assert_int_equal(lost, 0);
	assert_int_equal(bad, 0);
	const ax_shm_header *h = ax_shm_hdr(f->sh);
	assert_true(h->ring_head > 100 * h->ring_cap);
	assert_true(h->arena_head > 20 * h->arena_cap);
	assert_true(h->q_head > 20 * QROWS);
}

/* No consumer progress: the producer drops and counts, the consumer hears about it through *lost. */
static void test_full_ring(void **state)
{
	fx *f = *state;
	uint64_t req;
	assert_int_equal(ax_export_request_begin(f->ex, "ax-full", NULL, 0, &req), 0);
	int ok = 0, dropped = 0;
	for (int i = 0; i < 20; i++) {
		int rc = put_step(f->ex, f->qbuf, f->ibuf, req, (uint64_t)i, 1, 0);
		if (rc == 0)
			ok++;
		else if (rc == -EAGAIN)
			dropped++;
		else
			fail_msg("put_step: %d", rc);
	}
	assert_int_equal(ok, 7); /* the BEGIN holds the eighth slot */
	assert_int_equal(dropped, 13);
	assert_int_equal(ax_export_request_end(f->ex, req, AX_END_ABORT), -EAGAIN);
	const ax_shm_header *h = ax_shm_hdr(f->sh);
	assert_int_equal(h->ring_dropped, 14);
	ax_shm_step s;
	uint64_t lost = 0;
	assert_int_equal(ax_shm_next(f->sh, &s, &lost), 1);
	assert_int_equal(lost, 14);
	assert_int_equal(s.kind, AX_STEP_BEGIN);
	for (int i = 0; i < 7; i++) {
		assert_int_equal(ax_shm_next(f->sh, &s, &lost), 1);
		assert_int_equal(lost, 0);
		assert_int_equal(s.pos0, (uint64_t)i);
		check_step_payload(f->sh, &s);
	}
	assert_int_equal(ax_shm_next(f->sh, &s, &lost), 0);
	ax_shm_stats st;
	ax_shm_get_stats(f->sh, &st);
	assert_int_equal(st.lost, 14);
	/* A consumer that attaches later starts from now and is not told about drops before it came. */
	ax_shm_detach(f->sh);
	assert_int_equal(ax_export_request_begin(f->ex, "ax-full2", NULL, 0, &req), 0);
	for (int i = 0; i < 10; i++)
		put_step(f->ex, f->qbuf, f->ibuf, req, (uint64_t)i, 1, 0);
	assert_int_equal(ax_shm_attach(&f->sh, f->name), 0);
	assert_int_equal(ax_shm_next(f->sh, &s, &lost), 0);
	assert_int_equal(lost, 0);
	assert_int_equal(put_step(f->ex, f->qbuf, f->ibuf, req, 10, 1, 0), 0);
	assert_int_equal(ax_shm_next(f->sh, &s, &lost), 1);
	assert_int_equal(s.pos0, 10);
}

/* A slot being rewritten (seq word 0) or already rewritten by a later lap is counted as torn and skipped. */
static void test_torn_slot(void **state)
{
	fx *f = *state;
	ax_shm_header *h = ax_export_header(f->ex);
	ax_shm_step *ring = (ax_shm_step *)((uint8_t *)h + h->ring_off);
	uint64_t req;
	assert_int_equal(ax_export_request_begin(f->ex, "ax-torn", NULL, 0, &req), 0);
	assert_int_equal(put_step(f->ex, f->qbuf, f->ibuf, req, 0, 1, 0), 0);
	assert_int_equal(put_step(f->ex, f->qbuf, f->ibuf, req, 1, 1, 0), 0);
	assert_int_equal(put_step(f->ex, f->qbuf, f->ibuf, req, 2, 1, 0), 0);
	ring[0].seq = 0;		     /* BEGIN: writer in the middle of a rewrite */
	ring[1].seq += h->ring_cap;  /* step 1: already overwritten by the next lap */
	ax_shm_step s;
	assert_int_equal(ax_shm_next(f->sh, &s, NULL), -EBADMSG);
	assert_int_equal(ax_shm_next(f->sh, &s, NULL), -EBADMSG);
	assert_int_equal(ax_shm_next(f->sh, &s, NULL), 1);
	assert_int_equal(s.pos0, 1);
	ax_shm_stats st;
	ax_shm_get_stats(f->sh, &st);
	assert_int_equal(st.torn, 2);
	assert_int_equal(st.taken, 1);
	assert_int_equal(st.rejected, 0);
}

/* A writer thread rewrites one slot as fast as it can; no copy the reader accepts may mix two versions. */
typedef struct race {
	ax_shm_step slot;
	int stop;
} race;

static void *race_writer(void *arg)
{
	race *r = arg;
	ax_shm_step body;
	for (uint64_t v = 1; !__atomic_load_n(&r->stop, __ATOMIC_RELAXED); v++) {
		memset(&body, (int)(v & 0xff), sizeof body);
		ax__shm_slot_write(&r->slot, v, &body);
	}
	return NULL;
}

static void test_torn_race(void **state)
{
	static race r;
	memset(&r, 0, sizeof r);
	pthread_t t;
	assert_int_equal(pthread_create(&t, NULL, race_writer, &r), 0);
	uint64_t clean = 0, torn = 0, t0 = ax_now_ns();
	while (ax_now_ns() - t0 < 200000000ull || clean == 0) {
		uint64_t w = __atomic_load_n(&r.slot.seq, __ATOMIC_ACQUIRE);
		if (w == 0)
			continue;
		ax_shm_step out;
		if (ax__shm_slot_read(&r.slot, w - 1, &out)) {
			torn++;
			continue;
		}
		clean++;
		const uint8_t *b = (const uint8_t *)&out + sizeof out.seq;
		for (size_t i = 0; i < sizeof out - sizeof out.seq; i++)
			if (b[i] != (uint8_t)((w - 1) & 0xff))
				fail_msg("accepted a mixed copy of version %llu", (unsigned long long)(w - 1));
	}
	__atomic_store_n(&r.stop, 1, __ATOMIC_RELAXED);
	pthread_join(t, NULL);
	print_message("# seqlock race: %llu clean copies, %llu retried\n", (unsigned long long)clean,
		      (unsigned long long)torn);
}

/* ---- request table ----------------------------------------------------------------------------------------- */

static void test_request_table(void **state)
{
	fx *f = *state;
	uint64_t ids[8], extra;
	char rid[AX_SHM_RID_MAX + 8];
	ax_shm_step s;
	for (int i = 0; i < 8; i++) {
		snprintf(rid, sizeof rid, "ax-%d", i);
		assert_int_equal(ax_export_request_begin(f->ex, rid, NULL, 0, &ids[i]), 0);
		for (int j = 0; j < i; j++)
			assert_int_not_equal(ids[i], ids[j]);
		assert_int_equal(ax_shm_next(f->sh, &s, NULL), 1);
	}
	assert_int_equal(ax_export_request_begin(f->ex, "ax-9", NULL, 0, &extra), -ENOSPC);
	assert_int_equal(ax_export_request_begin(f->ex, "ax-10", NULL, 0, &extra), -ENOSPC);
	assert_int_equal(ax_shm_hdr(f->sh)->reqs_dropped, 2);
	assert_int_equal(ax_shm_next(f->sh, &s, NULL), 0); /* nothing published for them */
	assert_int_equal(ax_export_request_end(f->ex, ids[3], AX_END_LENGTH), 0);
	assert_int_equal(ax_shm_next(f->sh, &s, NULL), 1);
	uint32_t slot3 = s.req_slot;
	assert_int_equal(ax_export_request_begin(f->ex, "ax-again", NULL, 0, &extra), 0);
	assert_int_equal(ax_shm_next(f->sh, &s, NULL), 1);
	assert_int_equal(s.req_slot, slot3); /* the only free slot, reused under a new id */
	assert_int_not_equal(extra, ids[3]);
	ax_shm_request r;
	assert_int_equal(ax_shm_read_request(f->sh, slot3, ids[3], &r), -ESTALE);
	assert_int_equal(ax_shm_read_request(f->sh, slot3, extra, &r), 0);
	assert_string_equal(r.rid, "ax-again");
	assert_int_equal(ax_shm_read_request(f->sh, 8, extra, &r), -EINVAL);
	/* Bad request ids and arguments. */
	memset(rid, 'x', sizeof rid);
	rid[AX_SHM_RID_MAX] = 0;
	assert_int_equal(ax_export_request_end(f->ex, ids[0], AX_END_STOP), 0);
	assert_int_equal(ax_export_request_begin(f->ex, rid, NULL, 0, &extra), -EINVAL);
	assert_int_equal(ax_export_request_begin(f->ex, "", NULL, 0, &extra), -EINVAL);
	assert_int_equal(ax_export_request_begin(f->ex, NULL, NULL, 0, &extra), -EINVAL);
	assert_int_equal(ax_export_request_begin(f->ex, "ax-p", NULL, 3, &extra), -EINVAL);
	assert_int_equal(ax_export_request_begin(f->ex, "ax-p", (int32_t[65]){0}, 65, &extra), -EINVAL);
	assert_int_equal(ax_export_request_end(f->ex, 0, AX_END_STOP), -ENOENT);
	assert_int_equal(ax_export_request_end(f->ex, 12345, AX_END_STOP), -ENOENT);
	ax_shm_step bad = {.req_id = ids[1], .n_tokens = 1, .pos0 = 0, .seq_len = 1, .index_buf = f->ibuf};
	assert_int_equal(ax_export_step(f->ex, &bad, NULL), -EINVAL);
	bad.req_id = ids[0];
	assert_int_equal(ax_export_step(f->ex, &bad, (int32_t[1]){1}), -ENOENT);
}

/* ---- engine lifecycle ---------------------------------------------------------------------------------------- */

static void test_restart_generation(void **state)
{
	fx *f = *state;
	uint64_t gen = ax_shm_hdr(f->sh)->generation;
	assert_int_equal(ax_shm_alive(f->sh, 1000000000ull), 1);
	ax_export_close(f->ex);
	f->ex = NULL;
	ax_shm_step s;
	assert_int_equal(ax_shm_next(f->sh, &s, NULL), -ESTALE);
	assert_int_equal(ax_shm_alive(f->sh, 1000000000ull), -ESTALE);
	ax_shm *again;
	assert_int_equal(ax_shm_attach(&again, f->name), -ENOENT); /* unlinked by close */
	assert_int_equal(ax_export_open(&f->ex, &f->cfg), 0);
	add_buffers(f);
	assert_int_equal(ax_shm_next(f->sh, &s, NULL), -ESTALE); /* the old mapping stays closed */
	ax_shm_detach(f->sh);
	assert_int_equal(ax_shm_attach(&f->sh, f->name), 0);
	assert_int_not_equal(ax_shm_hdr(f->sh)->generation, gen);
	assert_int_equal(ax_shm_next(f->sh, &s, NULL), 0);
	/* A second engine under a live name is refused. */
	ax_export *two;
	assert_int_equal(ax_export_open(&two, &f->cfg), -EEXIST);
	/* Engine heartbeat too old: not alive. */
	ax_shm_header *h = ax_export_header(f->ex);
	h->heartbeat_ns = ax_now_ns() - 3000000000ull;
	assert_int_equal(ax_shm_alive(f->sh, 1000000000ull), 0);
	ax_export_heartbeat(f->ex);
	assert_int_equal(ax_shm_alive(f->sh, 1000000000ull), 1);
}

/* A segment left behind by an engine that died is replaced; consumers of the old one see it closed. */
static void test_stale_segment(void **state)
{
	fx *f = *state;
	char name[AX_SHM_NAME_MAX];
	seg_name(name, "stale");
	shm_unlink(name);
	ax_export_config cfg = base_cfg(name);
	pid_t pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		ax_export *ex;
		_exit(ax_export_open(&ex, &cfg) == 0 ? 0 : 1); /* dies without closing */
	}
	int status;
	assert_int_equal(waitpid(pid, &status, 0), pid);
	assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
	ax_shm *old;
	assert_int_equal(ax_shm_attach(&old, name), 0);
	assert_int_equal(ax_shm_alive(old, 60000000000ull), 0); /* its pid is gone */
	uint64_t gen = ax_shm_hdr(old)->generation;
	ax_export *ex;
	assert_int_equal(ax_export_open(&ex, &cfg), 0);
	ax_shm_step s;
	assert_int_equal(ax_shm_next(old, &s, NULL), -ESTALE);
	ax_shm *fresh;
	assert_int_equal(ax_shm_attach(&fresh, name), 0);
	assert_int_not_equal(ax_shm_hdr(fresh)->generation, gen);
	assert_int_equal(ax_shm_hdr(fresh)->engine_pid, (uint32_t)getpid());
	assert_int_equal(ax_shm_alive(fresh, 1000000000ull), 1);
	ax_shm_detach(fresh);
	ax_shm_detach(old);
	ax_export_close(ex);
	ax_shm *none;
	assert_int_equal(ax_shm_attach(&none, name), -ENOENT);
	(void)f;
}

/* ---- consumer area -------------------------------------------------------------------------------------------- */

static pid_t dead_pid(void)
{
	pid_t pid = fork();
	if (pid == 0)
		_exit(0);
	waitpid(pid, NULL, 0);
	return pid;
}

static void test_wanted(void **state)
{
	fx *f = *state;
	uint64_t layers[2] = {7, 7};
	int prefill = 7;
	ax_shm_header *h = ax_export_header(f->ex);
	assert_int_equal(h->consumer_pid, (uint64_t)getpid());
	assert_int_equal(ax_export_wanted(f->ex, layers, &prefill), 1);
	assert_int_equal(layers[0] | layers[1], 0);
	assert_int_equal(prefill, 0);
	ax_shm_set_wanted(f->sh, (uint64_t[2]){0x9, 0}, 1);
	assert_int_equal(ax_export_wanted(f->ex, layers, &prefill), 1);
	assert_int_equal(layers[0], 0x9);
	assert_int_equal(prefill, 1);
	/* Heartbeat older than 5 s: no consumer. */
	h->consumer_heartbeat_ns = ax_now_ns() - 6000000000ull;
	assert_int_equal(ax_export_wanted(f->ex, layers, &prefill), 0);
	assert_int_equal(layers[0], 0);
	ax_shm_heartbeat(f->sh);
	assert_int_equal(ax_export_wanted(f->ex, layers, NULL), 1);
	/* Consumer process gone. */
	h->consumer_pid = (uint64_t)dead_pid();
	assert_int_equal(ax_export_wanted(f->ex, layers, &prefill), 0);
	h->consumer_pid = (uint64_t)getpid();
	assert_int_equal(ax_export_wanted(f->ex, NULL, NULL), 1);
	/* Detached: pid cleared. */
	ax_shm_detach(f->sh);
	f->sh = NULL;
	assert_int_equal(h->consumer_pid, 0);
	assert_int_equal(ax_export_wanted(f->ex, layers, &prefill), 0);
	/* Attaching claims the area again and starts from the current head. */
	uint64_t req;
	assert_int_equal(ax_export_request_begin(f->ex, "ax-w", NULL, 0, &req), 0);
	assert_int_equal(ax_shm_attach(&f->sh, f->name), 0);
	assert_int_equal(h->consumer_tail, h->ring_head);
	assert_int_equal(ax_export_wanted(f->ex, layers, &prefill), 1);
	/* ... and with an empty wish: nothing of the previous consumer's (layer 0 and 3, prefill) until it says so */
	assert_int_equal(layers[0] | layers[1], 0);
	assert_int_equal(prefill, 0);
}

/* ---- error paths of open / attach / add ----------------------------------------------------------------------- */

#define CMUT(fn, body) \
	static void fn(ax_export_config *c) { body; }
CMUT(c_layers0, c->n_layers = 0)
CMUT(c_layers_big, c->n_layers = 129)
CMUT(c_gqa, c->n_kv_heads = 3)
CMUT(c_hd0, c->head_dim = 0)
CMUT(c_rank, c->rank = 1)
CMUT(c_qdtype, c->q_dtype = AX_DTYPE_I64)
CMUT(c_maxctx, c->max_ctx = 0)
CMUT(c_reqcap, c->req_cap = 70000)
CMUT(c_engine, c->engine = "an engine name that is far too long for the header field")
CMUT(c_scale, c->scale = -1)
CMUT(c_heads_total, c->n_q_heads_total = 2)
CMUT(c_noslash, c->name = "attnx.noslash")
CMUT(c_twoslash, c->name = "/attnx/sub")
CMUT(c_toolong, c->name = "/attnx.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")

static const struct {
	const char *what;
	void (*mutate)(ax_export_config *c);
	int want;
} cfg_cases[] = {
	{"0 layers", c_layers0, -EINVAL},     {"129 layers", c_layers_big, -EINVAL},
	{"GQA ratio", c_gqa, -EINVAL},	      {"head_dim 0", c_hd0, -EINVAL},
	{"rank >= world", c_rank, -EINVAL},   {"integer Q", c_qdtype, -EINVAL},
	{"max_ctx 0", c_maxctx, -EINVAL},     {"req_cap too big", c_reqcap, -EINVAL},
	{"engine too long", c_engine, -EINVAL}, {"negative scale", c_scale, -EINVAL},
	{"head range", c_heads_total, -EINVAL}, {"name without slash", c_noslash, -EINVAL},
	{"name with two slashes", c_twoslash, -EINVAL}, {"name too long", c_toolong, -ENAMETOOLONG},
};

static void test_open_errors(void **state)
{
	char name[AX_SHM_NAME_MAX];
	seg_name(name, "cfg");
	for (size_t i = 0; i < AX_ARRAY_LEN(cfg_cases); i++) {
		ax_export_config c = base_cfg(name);
		cfg_cases[i].mutate(&c);
		ax_export *ex = NULL;
		int rc = ax_export_open(&ex, &c);
		if (rc != cfg_cases[i].want)
			fail_msg("config case '%s': got %d, want %d", cfg_cases[i].what, rc, cfg_cases[i].want);
		assert_null(ex);
	}
	assert_int_equal(ax_export_open(NULL, NULL), -EINVAL);
	ax_export_close(NULL);
	ax_shm_detach(NULL);
	assert_null(ax_export_header(NULL));
}

/* Write a raw segment file of `size` bytes holding `h` (may be NULL) at its start. */
static void raw_segment(const char *name, size_t size, const ax_shm_header *h)
{
	shm_unlink(name);
	int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
	assert_true(fd >= 0);
	assert_int_equal(ftruncate(fd, (off_t)size), 0);
	if (h)
		assert_int_equal(pwrite(fd, h, sizeof *h, 0), (ssize_t)sizeof *h);
	close(fd);
}

static void test_attach_errors(void **state)
{
	fx *f = *state;
	char name[AX_SHM_NAME_MAX];
	seg_name(name, "raw");
	ax_shm *s = NULL;
	shm_unlink(name);
	assert_int_equal(ax_shm_attach(&s, name), -ENOENT);
	assert_int_equal(ax_shm_attach(&s, "nope"), -EINVAL);
	assert_int_equal(ax_shm_attach(NULL, name), -EINVAL);
	raw_segment(name, 0, NULL);
	assert_int_equal(ax_shm_attach(&s, name), -EAGAIN); /* created, not sized yet */
	raw_segment(name, 4096, NULL);
	assert_int_equal(ax_shm_attach(&s, name), -EAGAIN); /* sized, magic not yet written */
	ax_shm_header h = *ax_shm_hdr(f->sh);
	h.magic = 0x1234;
	raw_segment(name, (size_t)h.segment_size, &h);
	assert_int_equal(ax_shm_attach(&s, name), -EPROTO);
	h = *ax_shm_hdr(f->sh);
	raw_segment(name, 4096, &h); /* a header that claims more than the file holds */
	assert_int_equal(ax_shm_attach(&s, name), -ERANGE);
	h.state = 2;
	raw_segment(name, (size_t)h.segment_size, &h);
	assert_int_equal(ax_shm_attach(&s, name), -EAGAIN); /* closed by its engine */
	/* A ready segment claiming this very pid, but not open in this process: left by an earlier incarnation
	 * that had the same pid (a restarted container). It is stale, not live. */
	h = *ax_shm_hdr(f->sh);
	h.engine_pid = (uint32_t)getpid();
	raw_segment(name, (size_t)h.segment_size, &h);
	assert_int_equal(ax_shm_attach(&s, name), 0);
	ax_shm_detach(s);
	/* An engine replaces any of these (no live pid owns them). */
	ax_export_config c = base_cfg(name);
	ax_export *ex;
	assert_int_equal(ax_export_open(&ex, &c), 0);
	assert_int_equal(ax_shm_attach(&s, name), 0);
	ax_shm_detach(s);
	ax_export_close(ex);
	assert_null(s = NULL);
}

static void test_add_buffer_errors(void **state)
{
	fx *f = *state;
	ax_shm_buffer k = {.kind = AX_BUF_K_POOL, .loc = AX_LOC_HOST, .dtype = AX_DTYPE_F32, .layer = 0, .ndim = 3,
			   .dim = {1 << 20, HKV, D}, .scale = 1};
	void *p;
	uint32_t i;
	assert_int_equal(ax_export_add_host_buffer(f->ex, &k, &p, &i), -ENOSPC); /* 64 MiB > data region */
	k.dim[0] = 16;
	k.dim[1] = HKV + 1;
	assert_int_equal(ax_export_add_host_buffer(f->ex, &k, &p, &i), -EINVAL);
	k.dim[1] = HKV;
	k.loc = AX_LOC_CUDA_IPC;
	assert_int_equal(ax_export_add_host_buffer(f->ex, &k, &p, &i), -EINVAL);
	k.loc = AX_LOC_HOST;
	k.ndim = 0;
	assert_int_equal(ax_export_add_host_buffer(f->ex, &k, &p, &i), -EINVAL);
	k.ndim = 3;
	/* Fill the table (buf_cap = 2 * layers + 8 = 16; 6 used). */
	uint32_t used = 2 + LAYERS;
	for (; used < 2 * LAYERS + 8; used++)
		assert_int_equal(ax_export_add_host_buffer(f->ex, &k, &p, &i), 0);
	assert_int_equal(((uintptr_t)p) % 64, 0);
	assert_int_equal(ax_export_add_host_buffer(f->ex, &k, &p, &i), -ENOSPC);
	assert_int_equal(ax_shm_find_buffer(f->sh, AX_BUF_K_POOL, 0), (int)f->kbuf[0]);
	assert_int_equal(ax_shm_find_buffer(f->sh, AX_BUF_INDEX_PAGED, -1), -ENOENT);
	uint32_t n;
	ax_shm_buffers(f->sh, &n);
	assert_int_equal(n, 2 * LAYERS + 8);
}

/* ---- two processes --------------------------------------------------------------------------------------------- */

static int send_byte(int fd, char c) { return write(fd, &c, 1) == 1 ? 0 : -1; }
static char recv_byte(int fd)
{
	char c = 0;
	return read(fd, &c, 1) == 1 ? c : 0;
}

/* A forked engine still running when a test fails is killed and reaped here, so no test leaves a spinner. */
static pid_t g_child;
static char g_child_seg[AX_SHM_NAME_MAX];

static int kill_child(void **state)
{
	if (g_child > 0) {
		kill(g_child, SIGKILL);
		waitpid(g_child, NULL, 0);
	}
	g_child = 0;
	if (g_child_seg[0])
		shm_unlink(g_child_seg);
	g_child_seg[0] = 0;
	return 0;
}

/* The child gives up after 30 s of waiting on the parent. */
static uint64_t g_child_deadline;
static void child_wait(void)
{
	if (ax_now_ns() > g_child_deadline)
		_exit(99);
	sched_yield();
}

/* Child-side check: no cmocka in the child, just an exit code naming the step that failed. */
#define CHILD_CHECK(cond, code) \
	do { \
		if (!(cond)) \
			_exit(code); \
	} while (0)

enum { FORK_STEPS = 2000, FORK_QROWS = 64, STALL_STEPS = 100, LAP_STEPS = 20 };

static void fork_cfg(ax_export_config *c)
{
	c->ring_cap = 16;
	c->arena_cap = 256;
	c->req_cap = 4;
}

/* The producer: phase 1 paced (no loss), phase 2 and 3 against a stalled consumer. */
static void child_producer(const char *name, int rfd, int wfd)
{
	fx f = {0};
	g_child_deadline = ax_now_ns() + 30000000000ull;
	snprintf(f.name, sizeof f.name, "%s", name);
	f.cfg = base_cfg(f.name);
	fork_cfg(&f.cfg);
	CHILD_CHECK(ax_export_open(&f.ex, &f.cfg) == 0, 10);
	void *p;
	ax_shm_buffer q = {.kind = AX_BUF_Q_RING, .loc = AX_LOC_HOST, .dtype = AX_DTYPE_F32, .layer = -1, .ndim = 3,
			   .dim = {FORK_QROWS, HQ, D}, .scale = 1};
	CHILD_CHECK(ax_export_add_host_buffer(f.ex, &q, &p, &f.qbuf) == 0, 11);
	ax_shm_buffer ix = {.kind = AX_BUF_INDEX_TOKEN, .loc = AX_LOC_HOST, .dtype = AX_DTYPE_I32, .layer = -1,
			    .ndim = 2, .dim = {IDXROWS, MAXCTX}, .scale = 1};
	CHILD_CHECK(ax_export_add_host_buffer(f.ex, &ix, &p, &f.ibuf) == 0, 12);
	CHILD_CHECK(send_byte(wfd, 'R') == 0 && recv_byte(rfd) == 'G', 13);
	ax_shm_header *h = ax_export_header(f.ex);
	const int32_t prompt[3] = {101, 102, 103};
	uint64_t req, pos = 0;
	CHILD_CHECK(ax_export_request_begin(f.ex, "ax-fork-1", prompt, 3, &req) == 0, 14);
	for (int i = 0; i < FORK_STEPS; i++) {
		uint32_t n = 1 + (uint32_t)i % 3;
		if (pos + n > MAXCTX)
			pos = 0;
		/* The test (not the library) waits, so that phase 1 loses nothing. */
		while (__atomic_load_n(&h->ring_head, __ATOMIC_ACQUIRE) -
			       __atomic_load_n(&h->consumer_tail, __ATOMIC_ACQUIRE) >= 8)
			child_wait();
		CHILD_CHECK(put_step(f.ex, f.qbuf, f.ibuf, req, pos, n, 0x5) == 0, 15);
		pos += n;
	}
	while (__atomic_load_n(&h->ring_head, __ATOMIC_ACQUIRE) - __atomic_load_n(&h->consumer_tail, __ATOMIC_ACQUIRE))
		child_wait();
	CHILD_CHECK(ax_export_request_end(f.ex, req, AX_END_STOP) == 0, 16);
	/* Phase 2: the consumer stalls; 16 fit, the rest drop. */
	CHILD_CHECK(recv_byte(rfd) == 'P', 17);
	CHILD_CHECK(ax_export_request_begin(f.ex, "ax-fork-2", NULL, 0, &req) == 0, 18);
	int dropped = 0;
	for (int i = 0; i < STALL_STEPS; i++) {
		int rc = put_step(f.ex, f.qbuf, f.ibuf, req, (uint64_t)i, 1, 0);
		CHILD_CHECK(rc == 0 || rc == -EAGAIN, 19);
		dropped += rc == -EAGAIN;
	}
	CHILD_CHECK(dropped == STALL_STEPS - 15, 20);
	CHILD_CHECK(send_byte(wfd, 'D') == 0, 21);
	/* Phase 3: 4 Q rows per step into a 64-row Q ring while the consumer stalls: early rows get lapped. */
	CHILD_CHECK(recv_byte(rfd) == 'L', 22);
	for (int i = 0; i < LAP_STEPS; i++) {
		int rc = put_step(f.ex, f.qbuf, f.ibuf, req, 200 + (uint64_t)i, 1, 0xf);
		CHILD_CHECK(rc == 0 || rc == -EAGAIN, 23);
	}
	CHILD_CHECK(send_byte(wfd, 'D') == 0, 24);
	CHILD_CHECK(recv_byte(rfd) == 'E', 25);
	ax_export_close(f.ex);
	_exit(0);
}

/* Poll the ring until `want` descriptors were taken or rejected, or 20 s pass; checks payloads and seq order.
 * Returns how many were taken. */
static int consume(ax_shm *sh, int want, uint64_t *next_seq, uint64_t *lost_sum, int *rejected)
{
	int got = 0, bad0 = *rejected;
	uint64_t t0 = ax_now_ns();
	while (got + *rejected - bad0 < want && ax_now_ns() - t0 < 20000000000ull) {
		ax_shm_step s;
		uint64_t lost = 0;
		int rc = ax_shm_next(sh, &s, &lost);
		*lost_sum += lost;
		if (rc == 0) {
			usleep(50);
			continue;
		}
		if (rc == -EBADMSG) {
			if (getenv("SHM_TEST_DEBUG"))
				print_message("# rejected seq %llu\n", (unsigned long long)*next_seq);
			(*rejected)++;
			(*next_seq)++;
			continue;
		}
		assert_int_equal(rc, 1);
		assert_int_equal(s.seq, ++*next_seq); /* seqlock word = sequence number + 1 */
		if (s.kind == AX_STEP_FORWARD)
			check_step_payload(sh, &s);
		got++;
	}
	return got;
}

static void test_two_processes(void **state)
{
	char name[AX_SHM_NAME_MAX];
	seg_name(name, "fork");
	shm_unlink(name);
	snprintf(g_child_seg, sizeof g_child_seg, "%s", name);
	int p2c[2], c2p[2];
	assert_int_equal(pipe(p2c), 0);
	assert_int_equal(pipe(c2p), 0);
	pid_t pid = fork();
	assert_true(pid >= 0);
	if (pid == 0)
		child_producer(name, p2c[0], c2p[1]);
	g_child = pid;
	assert_int_equal(recv_byte(c2p[0]), 'R');
	ax_shm *sh;
	assert_int_equal(ax_shm_attach(&sh, name), 0);
	uint64_t seq = ax_shm_hdr(sh)->consumer_tail, lost = 0; /* where this consumer starts */
	assert_int_equal(send_byte(p2c[1], 'G'), 0);
	int rejected = 0;
	/* Phase 1: BEGIN, every step, END — in order, values intact, nothing lost. */
	assert_int_equal(consume(sh, FORK_STEPS + 2, &seq, &lost, &rejected), FORK_STEPS + 2);
	assert_int_equal(lost, 0);
	assert_int_equal(rejected, 0);
	/* Phase 2: stall while the child overfills the ring. */
	assert_int_equal(send_byte(p2c[1], 'P'), 0);
	assert_int_equal(recv_byte(c2p[0]), 'D');
	assert_int_equal(consume(sh, 16, &seq, &lost, &rejected), 16);
	assert_int_equal(lost, STALL_STEPS - 15);
	assert_int_equal(rejected, 0);
	/* Phase 3: stall again; the first descriptors' Q rows are lapped and rejected, the rest are intact. */
	assert_int_equal(send_byte(p2c[1], 'L'), 0);
	assert_int_equal(recv_byte(c2p[0]), 'D');
	lost = 0;
	int got = consume(sh, 16, &seq, &lost, &rejected);
	assert_int_equal(lost, LAP_STEPS - 16);
	assert_true(rejected >= 1 && rejected <= 5);
	assert_int_equal(got + rejected, 16);
	ax_shm_stats st;
	ax_shm_get_stats(sh, &st);
	assert_int_equal(st.rejected, (uint64_t)rejected);
	assert_int_equal(st.lost, STALL_STEPS - 15 + LAP_STEPS - 16);
	assert_int_equal(st.torn, 0);
	assert_int_equal(send_byte(p2c[1], 'E'), 0);
	int status;
	assert_int_equal(waitpid(pid, &status, 0), pid);
	g_child = 0;
	if (!WIFEXITED(status) || WEXITSTATUS(status))
		fail_msg("producer child failed with status %d", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
	ax_shm_step s;
	assert_int_equal(ax_shm_next(sh, &s, NULL), -ESTALE); /* closed by the child */
	ax_shm_detach(sh);
	close(p2c[0]), close(p2c[1]), close(c2p[0]), close(c2p[1]);
	shm_unlink(name);
}

/* The engine is killed mid-stream: the consumer notices and nothing crashes. */
static void test_engine_killed(void **state)
{
	char name[AX_SHM_NAME_MAX];
	seg_name(name, "kill");
	shm_unlink(name);
	snprintf(g_child_seg, sizeof g_child_seg, "%s", name);
	int c2p[2];
	assert_int_equal(pipe(c2p), 0);
	pid_t pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		fx f = {0};
		snprintf(f.name, sizeof f.name, "%s", name);
		f.cfg = base_cfg(f.name);
		CHILD_CHECK(ax_export_open(&f.ex, &f.cfg) == 0, 10);
		void *p;
		ax_shm_buffer ix = {.kind = AX_BUF_INDEX_TOKEN, .loc = AX_LOC_HOST, .dtype = AX_DTYPE_I32, .layer = -1,
				    .ndim = 2, .dim = {IDXROWS, MAXCTX}, .scale = 1};
		CHILD_CHECK(ax_export_add_host_buffer(f.ex, &ix, &p, &f.ibuf) == 0, 11);
		uint64_t req;
		CHILD_CHECK(ax_export_request_begin(f.ex, "ax-kill", NULL, 0, &req) == 0, 12);
		CHILD_CHECK(send_byte(c2p[1], 'R') == 0, 13);
		g_child_deadline = ax_now_ns() + 30000000000ull;
		for (uint64_t i = 0;; i++) {
			put_step(f.ex, 0, f.ibuf, req, i % MAXCTX, 1, 0);
			usleep(100);
			child_wait();
		}
	}
	g_child = pid;
	assert_int_equal(recv_byte(c2p[0]), 'R');
	ax_shm *sh;
	assert_int_equal(ax_shm_attach(&sh, name), 0);
	/* The child publishes all the while: the ring head read after the attach may be past the step the attachment
	 * starts from (a fresh-clone CI run under ASan hit it), so the first step taken sets the sequence. */
	ax_shm_step s0;
	int r0 = 0;
	const uint64_t t0 = ax_now_ns();
	while ((r0 = ax_shm_next(sh, &s0, NULL)) != 1 && ax_now_ns() - t0 < 20000000000ull) {
		assert_true(r0 == 0 || r0 == -EBADMSG);
		usleep(50);
	}
	assert_int_equal(r0, 1);
	uint64_t seq = s0.seq, lost = 0;
	int rejected = 0;
	assert_int_equal(consume(sh, 19, &seq, &lost, &rejected), 19);
	assert_int_equal(ax_shm_alive(sh, 5000000000ull), 1);
	assert_int_equal(kill(pid, SIGKILL), 0);
	assert_int_equal(waitpid(pid, NULL, 0), pid);
	g_child = 0;
	assert_int_equal(ax_shm_alive(sh, 5000000000ull), 0);
	/* What it published is still readable; then the ring is simply empty. */
	ax_shm_step s;
	int rc, n = 0;
	while ((rc = ax_shm_next(sh, &s, NULL)) != 0 && n < 100)
		n++, assert_true(rc == 1 || rc == -EBADMSG);
	assert_int_equal(rc, 0);
	assert_int_equal(ax_shm_alive(sh, 5000000000ull), 0);
	ax_shm_detach(sh);
	close(c2p[0]), close(c2p[1]);
	shm_unlink(name);
}

/* ---- main ------------------------------------------------------------------------------------------------------ */

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_dtypes),
		cmocka_unit_test_setup_teardown(test_validate_header, setup, teardown),
		cmocka_unit_test_setup_teardown(test_validate_buffer, setup, teardown),
		cmocka_unit_test_setup_teardown(test_roundtrip, setup, teardown),
		cmocka_unit_test_setup_teardown(test_malformed_steps, setup, teardown),
		cmocka_unit_test_setup_teardown(test_index_extent, setup, teardown),
		cmocka_unit_test_setup_teardown(test_paged_buffers, setup, teardown),
		cmocka_unit_test_setup_teardown(test_paged_steps, setup, teardown),
		cmocka_unit_test_setup_teardown(test_lapped_payload, setup, teardown),
		cmocka_unit_test_setup_teardown(test_wraparound, setup, teardown),
		cmocka_unit_test_setup_teardown(test_full_ring, setup, teardown),
		cmocka_unit_test_setup_teardown(test_torn_slot, setup, teardown),
		cmocka_unit_test(test_torn_race),
		cmocka_unit_test_setup_teardown(test_request_table, setup, teardown),
		cmocka_unit_test_setup_teardown(test_restart_generation, setup, teardown),
		cmocka_unit_test_setup_teardown(test_stale_segment, setup, teardown),
		cmocka_unit_test_setup_teardown(test_wanted, setup, teardown),
		cmocka_unit_test(test_open_errors),
		cmocka_unit_test_setup_teardown(test_attach_errors, setup, teardown),
		cmocka_unit_test_setup_teardown(test_add_buffer_errors, setup, teardown),
		cmocka_unit_test_teardown(test_two_processes, kill_child),
		cmocka_unit_test_teardown(test_engine_killed, kill_child),
	};
	if (getenv("SHM_TEST_FILTER")) /* e.g. SHM_TEST_FILTER=test_two_processes */
		cmocka_set_test_filter(getenv("SHM_TEST_FILTER"));
	return cmocka_run_group_tests(tests, NULL, NULL);
}
