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

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_q_run),
		cmocka_unit_test(test_layer_slot),
		cmocka_unit_test(test_recycle_counters),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
