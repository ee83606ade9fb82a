/*
 * export_test.c — the engine's shm export seen from a consumer (suite 'engine').
 *
 * Starts the engine on the shipped model with export on, attaches as a capture would (ax_shm_attach), asks for
 * every layer's Q rows including prefill, and runs the reference prompt. While the request is still generating
 * (its index-table row is live), it recomputes attention probabilities from the exported Q rows and the K pools
 * read through the exported index table, and compares them with transformers' eager attention saved in
 * engine/testdata/attn_add.f32 (max abs error ≤ 1e-4). It also checks BEGIN (prompt ids), the prefill and decode
 * FORWARD descriptors (positions, decode_step, token ids), and END after a cancel. A second case checks that a
 * finished request's index row stays intact after its END (the capture reads it late) until the row or its
 * slots are needed by later requests.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "attnx_common.h"
#include "attnx_engine.h"
#include "attnx_shm.h"

static void test_export_matches_hf_attention(void **state)
{
	json_t *d = json_load_file("testdata/reference_logits.json", 0, NULL);
	assert_non_null(d);
	json_t *cs = json_object_get(json_object_get(d, "cases"), "add");
	json_t *jids = json_object_get(cs, "ids"), *shape = json_object_get(cs, "attn_shape");
	int P = (int)json_array_size(jids);
	int32_t prompt[256];
	for (int i = 0; i < P; i++)
		prompt[i] = (int32_t)json_integer_value(json_array_get(jids, i));
	int L = (int)json_integer_value(json_array_get(shape, 0)), H = (int)json_integer_value(json_array_get(shape, 1));
	size_t na = (size_t)L * H * P * P;
	float *ref = malloc(na * sizeof *ref);
	FILE *f = fopen("testdata/attn_add.f32", "rb");
	assert_non_null(f);
	assert_int_equal(fread(ref, sizeof *ref, na, f), na);
	fclose(f);

	char name[64];
	snprintf(name, sizeof name, "/attnx.engine-test.%d", (int)getpid());
	ax_engine_config cfg = {.model_dir = "models/attnx-tiny", .threads = 2, .max_batch = 2, .ctx = 256,
				.shm_name = name};
	ax_engine *e;
	assert_int_equal(ax_engine_open(&e, &cfg), 0);
	assert_true(ax_engine_exporting(e));
	ax_shm *s;
	assert_int_equal(ax_shm_attach(&s, name), 0);
	uint64_t all[2] = {(1ull << L) - 1, 0};
	ax_shm_set_wanted(s, all, 1);

	ax_gen_params gp = {.max_tokens = 200, .ignore_eos = 1};
	ax_req *r;
	assert_int_equal(ax_engine_submit(e, "ax-export-test", prompt, P, &gp, &r), 0);
	ax_gen_event ev;
	for (int k = 0; k < 3; k++) /* three tokens: prefill and two decode steps are published */
		assert_int_equal(ax_req_next(r, &ev, 10000), 1);

	const ax_shm_header *h = ax_shm_hdr(s);
	int D = (int)h->head_dim, Hkv = (int)h->n_kv_heads, grp = H / Hkv;
	int qb = ax_shm_find_buffer(s, AX_BUF_Q_RING, -1);
	assert_true(qb >= 0);
	uint32_t nb;
	const ax_shm_buffer *bufs = ax_shm_buffers(s, &nb);
	const float *qring = ax_shm_host_ptr(s, (uint32_t)qb);
	uint64_t qrows = bufs[qb].dim[0];
	ax_shm_step st;
	int seen_begin = 0, seen_prefill = 0, seen_decode = 0;
	float worst = 0;
	while (ax_shm_next(s, &st, NULL) == 1) {
		if (st.kind == AX_STEP_BEGIN) {
			ax_shm_request rq;
			assert_int_equal(ax_shm_read_request(s, st.req_slot, st.req_id, &rq), 0);
			assert_string_equal(rq.rid, "ax-export-test");
			assert_int_equal(rq.prompt_len, P);
			int32_t got[256];
			assert_int_equal(ax_shm_read_tokens(s, rq.prompt_pos, rq.prompt_len, got), 0);
			assert_memory_equal(got, prompt, (size_t)P * sizeof *got);
			seen_begin = 1;
		} else if (st.kind == AX_STEP_FORWARD && (st.flags & AX_STEP_F_PREFILL)) {
			assert_int_equal(st.pos0, 0);
			assert_int_equal(st.n_tokens, P);
			assert_int_equal(st.layers[0], all[0]);
			const int32_t *idx = (const int32_t *)ax_shm_host_ptr(s, st.index_buf) +
					     (size_t)st.index_row * bufs[st.index_buf].dim[1];
			for (int l = 0; l < L; l++) {
				const float *K = ax_shm_host_ptr(s, (uint32_t)ax_shm_find_buffer(s, AX_BUF_K_POOL, l));
				for (int t = 0; t < P; t++)
					for (int hh = 0; hh < H; hh++) {
						const float *q = qring + ((st.q_row + (uint64_t)t * L + l) % qrows) * H * D + hh * D;
						double sc[256], mx = -1e30, sum = 0;
						for (int j = 0; j <= t; j++) {
							const float *k = K + ((size_t)idx[j] * Hkv + hh / grp) * D;
							double dd = 0;
							for (int x = 0; x < D; x++)
								dd += (double)q[x] * k[x];
							sc[j] = dd * h->scale;
							mx = fmax(mx, sc[j]);
						}
						for (int j = 0; j <= t; j++)
							sum += (sc[j] = exp(sc[j] - mx));
						for (int j = 0; j <= t; j++) {
							float want = ref[(((size_t)l * H + hh) * P + t) * P + j];
							worst = fmaxf(worst, fabsf((float)(sc[j] / sum) - want));
						}
					}
			}
			assert_int_equal(ax_shm_check_q(s, st.q_row, (uint64_t)P * L, qrows), 0);
			seen_prefill = 1;
		} else if (st.kind == AX_STEP_FORWARD) {
			assert_int_equal(st.pos0, P + seen_decode);
			assert_int_equal(st.n_tokens, 1);
			assert_int_equal(st.decode_step, seen_decode + 1);
			assert_int_equal(st.seq_len, st.pos0 + 1);
			seen_decode++;
		}
	}
	print_message("exported Q·K attention vs transformers eager: max abs error %.2e\n", worst);
	assert_true(seen_begin && seen_prefill && seen_decode >= 1);
	assert_true(worst <= 1e-4f);

	ax_req_cancel(r);
	int fin = 0;
	while (!fin && ax_req_next(r, &ev, 10000) == 1)
		fin = ev.finish;
	assert_int_equal(fin, AX_FINISH_ABORT);
	ax_req_release(r);
	int ended = 0;
	for (int tries = 0; tries < 200 && !ended; tries++) {
		int rc = ax_shm_next(s, &st, NULL);
		if (rc == 1 && st.kind == AX_STEP_END) {
			assert_int_equal(st.end_reason, AX_END_ABORT);
			ended = 1;
		} else if (rc == 0) {
			usleep(5000);
		}
	}
	assert_true(ended);
	ax_shm_detach(s);
	ax_engine_close(e);
	assert_int_equal(access("/dev/shm/attnx.engine-test", F_OK), -1);
	free(ref);
	json_decref(d);
}

/* Requests the engine must refuse, and a clean shutdown with a request still queued. */
static void test_engine_bad_requests(void **state)
{
	ax_engine_config cfg = {.model_dir = "models/attnx-tiny", .threads = 1, .max_batch = 1, .ctx = 64, .no_export = 1};
	ax_engine *e;
	assert_int_equal(ax_engine_open(&e, &cfg), 0);
	assert_false(ax_engine_exporting(e));
	ax_gen_params gp = {.max_tokens = 8};
	ax_req *r;
	int32_t ids[100] = {1, 2, 3};
	assert_int_equal(ax_engine_submit(e, NULL, ids, 0, &gp, &r), -EINVAL);
	assert_int_equal(ax_engine_submit(e, NULL, ids, 100, &gp, &r), -E2BIG);
	int32_t bad[1] = {1 << 20};
	assert_int_equal(ax_engine_submit(e, NULL, bad, 1, &gp, &r), -EINVAL);
	gp.max_tokens = 0;
	assert_int_equal(ax_engine_submit(e, NULL, ids, 3, &gp, &r), -EINVAL);
	gp.max_tokens = 1000; /* clamped to the context */
	ax_req *a, *b;
	assert_int_equal(ax_engine_submit(e, "a", ids, 3, &gp, &a), 0);
	assert_int_equal(ax_engine_submit(e, "b", ids, 3, &gp, &b), 0); /* waits: max_batch 1 */
	ax_engine_close(e);                                              /* both end (length or abort) */
	ax_gen_event ev;
	int fa = 0, fb = 0;
	while (ax_req_next(a, &ev, 1000) == 1)
		fa = ev.finish ? ev.finish : fa;
	while (ax_req_next(b, &ev, 1000) == 1)
		fb = ev.finish ? ev.finish : fb;
	assert_true(fa == AX_FINISH_ABORT || fa == AX_FINISH_LENGTH);
	assert_int_equal(fb, AX_FINISH_ABORT);
	ax_req_release(a);
	ax_req_release(b);
	assert_int_equal(ax_engine_open(&e, &(ax_engine_config){.model_dir = "/nonexistent"}), -ENOENT);
}

/* Run one request to its end; returns the finish reason. */
static int run_to_end(ax_engine *e, const char *rid, const int32_t *prompt, int n, int max_tokens)
{
	ax_gen_params gp = {.max_tokens = max_tokens, .ignore_eos = 1};
	ax_req *r;
	assert_int_equal(ax_engine_submit(e, rid, prompt, n, &gp, &r), 0);
	ax_gen_event ev;
	int fin = 0;
	while (!fin && ax_req_next(r, &ev, 10000) == 1)
		fin = ev.finish;
	ax_req_release(r);
	return fin;
}

/* Take descriptors up to the next END; returns the index row of the last FORWARD and its seq_len. */
static int drain_to_end(ax_shm *s, uint64_t *seq_len)
{
	ax_shm_step st;
	int row = -1;
	for (int tries = 0; tries < 400; tries++) {
		int rc = ax_shm_next(s, &st, NULL);
		if (rc == 0) {
			usleep(5000);
			continue;
		}
		assert_int_equal(rc, 1);
		if (st.kind == AX_STEP_FORWARD) {
			row = (int)st.index_row;
			*seq_len = st.seq_len;
		} else if (st.kind == AX_STEP_END) {
			return row;
		}
	}
	fail_msg("no END descriptor");
	return -1;
}

/* 1 if positions 0..n-1 of index row `row` all hold slots. */
static int row_intact(ax_shm *s, int row, uint64_t n)
{
	int ib = ax_shm_find_buffer(s, AX_BUF_INDEX_TOKEN, -1);
	uint32_t nb;
	const ax_shm_buffer *bufs = ax_shm_buffers(s, &nb);
	const int32_t *idx = (const int32_t *)ax_shm_host_ptr(s, (uint32_t)ib) + (size_t)row * bufs[ib].dim[1];
	for (uint64_t p = 0; p < n; p++)
		if (idx[p] < 0 || (uint64_t)idx[p] >= bufs[ax_shm_find_buffer(s, AX_BUF_K_POOL, 0)].dim[0])
			return 0;
	return 1;
}

/* Retired rows: a finished request's keys stay readable after END until a later request needs the row (the
 * oldest retired row goes first) or its slots (ctx 64, one request's worth of slots). */
/* --max-steps-per-s: 20 decode tokens at 50 steps a second take at least 0.38 s (unpaced they take a few ms). */
static void test_pacing(void **state)
{
	(void)state;
	ax_engine_config cfg = {.model_dir = "models/attnx-tiny", .threads = 1, .max_batch = 1, .ctx = 64,
				.no_export = 1, .max_steps_per_s = 50};
	ax_engine *e;
	assert_int_equal(ax_engine_open(&e, &cfg), 0);
	int32_t ids[3] = {1, 2, 3};
	uint64_t t0 = ax_now_ns();
	assert_int_equal(run_to_end(e, "paced", ids, 3, 20), AX_FINISH_LENGTH);
	uint64_t dt = ax_now_ns() - t0;
	assert_true(dt >= 380000000ull);
	ax_engine_close(e);
}

static void test_retired_rows(void **state)
{
	char name[64];
	snprintf(name, sizeof name, "/attnx.engine-retire.%d", (int)getpid());
	ax_engine_config cfg = {.model_dir = "models/attnx-tiny", .threads = 1, .max_batch = 1, .ctx = 64,
				.shm_name = name};
	ax_engine *e;
	assert_int_equal(ax_engine_open(&e, &cfg), 0);
	ax_shm *s;
	assert_int_equal(ax_shm_attach(&s, name), 0);
	uint64_t last[2] = {1ull << 5, 0};
	ax_shm_set_wanted(s, last, 0);
	int32_t prompt[48];
	for (int i = 0; i < 48; i++)
		prompt[i] = 100 + i;
	uint64_t na = 0, nb = 0, nc = 0, nd = 0;
	assert_int_equal(run_to_end(e, "a", prompt, 3, 5), AX_FINISH_LENGTH);
	int ra = drain_to_end(s, &na);
	assert_int_equal(na, 3 + 5 - 1); /* the last FORWARD ran at position 6 */
	assert_true(row_intact(s, ra, na));
	assert_int_equal(run_to_end(e, "b", prompt, 3, 5), AX_FINISH_LENGTH);
	int rb = drain_to_end(s, &nb);
	assert_int_not_equal(ra, rb); /* a free row is preferred over a retired one */
	assert_true(row_intact(s, ra, na) && row_intact(s, rb, nb));
	assert_int_equal(run_to_end(e, "c", prompt, 3, 5), AX_FINISH_LENGTH);
	int rc = drain_to_end(s, &nc);
	assert_int_equal(rc, ra); /* no free row: the oldest retired row (a) was released */
	assert_true(row_intact(s, rb, nb) && row_intact(s, rc, nc));
	/* 48 + 15 positions need 62 of the 64 slots: b and c hold 14, so both are released. */
	assert_int_equal(run_to_end(e, "d", prompt, 48, 16), AX_FINISH_LENGTH);
	drain_to_end(s, &nd);
	assert_int_equal(nd, 48 + 16 - 1);
	ax_shm_detach(s);
	ax_engine_close(e);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_export_matches_hf_attention),
		cmocka_unit_test(test_retired_rows),
		cmocka_unit_test(test_engine_bad_requests),
		cmocka_unit_test(test_pacing),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
