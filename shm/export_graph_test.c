/*
 * export_graph_test.c — the host-side logic of libattnx-export-graph that needs no GPU: the Q-run placement
 * (runs never wrap, the head only moves forward) and the layer-slot mapping (token-major, layer-minor Q rows over
 * a 128-bit layer mask), the same inline functions the kernels call, and rule 9's counter arithmetic (the kernels'
 * step starts and END-time freed_step against the capture's refusal test): each case replays a sequence of engine
 * and capture events the way k_step_begin / k_step_start / end_row update the counters and says which capture
 * checks must refuse. Cases in tables; suite 'python' (the adapter's CPU tests).
 */
#include "attnx_export_graph.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

/* The Python mirror (shm/python/attnx/graph.py) asserts the same sizes. */
_Static_assert(sizeof(ax_graph_ivec) == 32, "ax_graph_ivec size");
_Static_assert(sizeof(ax_graph_step_args) == 216, "ax_graph_step_args size");
_Static_assert(sizeof(ax_graph_config) == 40, "ax_graph_config size");
_Static_assert(sizeof(ax_graph_stats) == 56, "ax_graph_stats size");

static void test_q_run(void **state)
{
	(void)state;
	static const struct {
		uint64_t head, rows, ring, want;
	} cases[] = {
		{0, 1, 8, 0},     {0, 8, 8, 0},     {3, 5, 8, 3},    {3, 6, 8, 8},      /* skips to the next lap */
		{8, 8, 8, 8},     {15, 1, 8, 15},   {15, 2, 8, 16},  {1000, 24, 1024, 1000},
		{1001, 24, 1024, 1024}, {7, 1, 1, 7},
	};
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		uint64_t got = ax_graph_q_run(cases[i].head, cases[i].rows, cases[i].ring);
		assert_int_equal(got, cases[i].want);
		assert_true(got >= cases[i].head);
		assert_true(got % cases[i].ring + cases[i].rows <= cases[i].ring);
	}
}

static void test_layer_slot(void **state)
{
	(void)state;
	static const struct {
		uint64_t m0, m1;
		uint32_t layer;
		int want;
	} cases[] = {
		{0x1, 0, 0, 0},         {0x1, 0, 1, -1},       {0xf0, 0, 4, 0},          {0xf0, 0, 7, 3},
		{0xf0, 0, 3, -1},       {1ull << 63, 1, 63, 0}, {1ull << 63, 1, 64, 1},   {~0ull, ~0ull, 127, 127},
		{~0ull, ~0ull, 64, 64}, {0, 1ull << 63, 127, 0}, {~0ull, 0, 128, -1},     {0, 0x6, 66, 1},
	};
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		uint64_t m[2] = {cases[i].m0, cases[i].m1};
		assert_int_equal(ax_graph_layer_slot(m, cases[i].layer), cases[i].want);
	}
}

/* Events: 'S' a step start (k_step_begin / k_step_start), 'E' END of the request (end_row: freed_step); a BEGIN
 * reusing the row is not modelled (the capture's req_id check refuses that). 'p' a capture check that must pass, 'r' one
 * that must refuse. A row is wrong only if its keys were read after a write into a freed slot, which the engine
 * makes only after a step start that follows the END: every 'r' below follows such an 'S'. */
static void test_recycle_counters(void **state)
{
	(void)state;
	static const struct {
		uint64_t steps0; /* steps_started at open (ax_export_step_start has counted one) */
		const char *events;
	} cases[] = {
		{1, "ppSpSp"},     /* never freed: every row passes */
		{1, "SpEpSr"},     /* END then the next step: refused only after its start */
		{1, "EppSrr"},     /* rows checked between END and the next step start pass (the last rows) */
		{5, "SSEpppSrSr"}, /* a long-lived engine: counters well above 1 */
		{1, "EpSrSrSr"},   /* once refused, always refused */
		{0, "EpSr"},       /* a counter at 0 (freed_step still ≠ 0) */
	};
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		uint64_t steps = cases[i].steps0, freed = 0;
		for (const char *e = cases[i].events; *e; e++) {
			if (*e == 'S')
				steps = ax_graph_next_step(steps);
			else if (*e == 'E')
				freed = ax_graph_freed_step(steps);
			else
				assert_int_equal(ax_graph_row_recycled(freed, steps), *e == 'r');
		}
		assert_true(steps >= cases[i].steps0);
	}
}

/* Load width of a Q copy: every address, stride and the head row must be a multiple of it. */
static void test_q_unit(void **state)
{
	(void)state;
	static const struct {
		uint64_t addr;
		uint32_t esize;
		int64_t st_b, st_t, st_h;
		uint32_t D;
		unsigned want;
	} cases[] = {
		{0x1000, 2, 0, 4096, 128, 128, 16},   /* HF bf16 [B, H, S, D] decode: st_b 0 */
		{0x1000, 2, 0, 1536, 128, 128, 16},   /* SGLang q, a slice of a fused qkv */
		{0x1002, 2, 0, 4096, 128, 128, 2},    /* an odd-element address */
		{0x1004, 2, 0, 4096, 128, 128, 4},
		{0x1000, 2, 0, 4098, 128, 128, 4},    /* a token stride that is not a multiple of 8 elements */
		{0x1000, 2, 0, 4096, 128, 6, 4},      /* D 6: 12-byte rows */
		{0x1000, 2, 0, 4096, 128, 5, 2},      /* D 5: 10-byte rows */
		{0x1000, 4, 0, 512, 64, 64, 16},      /* f32 */
		{0x1000, 4, 0, 513, 64, 64, 4},
		{0x1000, 1, 0, 4096, 128, 128, 16},   /* fp8 */
		{0x1001, 1, 0, 4096, 128, 128, 0},    /* fp8 at an odd address: refused */
		{0x1000, 1, 0, 4097, 128, 128, 0},    /* fp8 with an odd token stride */
		{0x1000, 2, -4096, 4096, 128, 128, 16}, /* a negative stride keeps its alignment */
	};
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
		assert_int_equal(ax_graph_q_unit(cases[i].addr, cases[i].esize, cases[i].st_b, cases[i].st_t,
						 cases[i].st_h, cases[i].D),
				 cases[i].want);
}

/* Which steps take the one-block fused kernels, and with how many threads. */
static void test_fuse(void **state)
{
	(void)state;
	static const struct {
		uint32_t n_rows, n_tok, H, D, esize;
		int vec, want;
	} cases[] = {
		{1, 1, 32, 128, 2, 0, 1},     /* batch 1 decode: 8 KB */
		{4, 1, 32, 128, 2, 0, 1},     /* 32 KB: the limit */
		{5, 1, 32, 128, 2, 0, 0},
		{32, 1, 32, 128, 2, 0, 0},    /* batch 32: 256 KB, two kernels */
		{1, 4, 32, 128, 2, 0, 1},     /* a short prefill */
		{1, 5, 32, 128, 2, 0, 0},
		{1, 1, 32, 128, 2, 1, 0},     /* SGLang extend: per-row counts only on the device */
		{1, 0, 32, 128, 2, 0, 0},     /* no token count at all */
		{1024, 1, 1, 8, 4, 0, 1},
		{0xffffffffu, 0xffffffffu, 32, 128, 2, 0, 0}, /* no overflow */
		{0x10000, 0x10000, 1, 1, 1, 0, 0},            /* 2^32 tokens of one byte */
		{1, 1, 0, 128, 2, 0, 0},                      /* a degenerate shape */
	};
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
		assert_int_equal(ax_graph_fuse(cases[i].n_rows, cases[i].n_tok, cases[i].vec, cases[i].H, cases[i].D,
					       cases[i].esize),
				 cases[i].want);
	static const uint32_t threads[][3] = {
		{1, 32, 32}, {1, 256, 256}, {33, 32, 64}, {256, 32, 256}, {257, 256, 512}, {1000, 32, 1024},
		{1024, 256, 1024}, {5000, 32, 1024}, /* callers keep n_rows ≤ 1024; never more than one full block */
	};
	for (size_t i = 0; i < sizeof threads / sizeof threads[0]; i++)
		assert_int_equal(ax_graph_block_threads(threads[i][0], threads[i][1]), threads[i][2]);
}

/* Which layers may be exported (ax_graph_set_layers). */
static void test_layer_set(void **state)
{
	(void)state;
	static const struct {
		uint32_t n_layers;
		uint64_t w0, w1;
		int null_want, rc;
		uint64_t m0, m1;
	} cases[] = {
		{8, 0, 0, 1, 0, 0xff, 0},              /* NULL: every layer */
		{8, 0, 0, 0, 0, 0xff, 0},              /* both 0: every layer */
		{8, 0xd4, 0, 0, 0, 0xd4, 0},           /* the capture's auto set of 8 layers: 2, 4, 6, 7 */
		{8, 0x3f0, 0, 0, 0, 0xf0, 0},          /* layers past the model dropped */
		{8, 0x300, 0, 0, -1, 0, 0},            /* only layers past the model: refused */
		{64, ~0ull, 0, 0, 0, ~0ull, 0},
		{65, 0, 1, 0, 0, 0, 1},                /* layer 64 only */
		{128, 0, 0, 1, 0, ~0ull, ~0ull},
		{200, 0, 0, 1, 0, ~0ull, ~0ull},       /* never more than 128 */
		{0, 0, 0, 1, 0, 0, 0},
	};
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		uint64_t want[2] = {cases[i].w0, cases[i].w1}, out[2] = {7, 7};
		int rc = ax_graph_layer_set(cases[i].n_layers, cases[i].null_want ? NULL : want, out);
		assert_int_equal(rc, cases[i].rc);
		if (rc == 0) {
			assert_true(out[0] == cases[i].m0 && out[1] == cases[i].m1);
		} else {
			assert_true(out[0] == 7 && out[1] == 7);
		}
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_q_run),
		cmocka_unit_test(test_layer_slot),
		cmocka_unit_test(test_recycle_counters),
		cmocka_unit_test(test_q_unit),
		cmocka_unit_test(test_fuse),
		cmocka_unit_test(test_layer_set),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
