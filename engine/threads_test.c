/*
 * threads_test.c — the engine leaves a core to an attached consumer (suite 'engine').
 *
 * With the default thread count (or spare_core on), the engine's forward runs on one pool thread fewer while a
 * consumer is attached to its shm segment with a live heartbeat, and on all of them before it attaches, after it
 * detaches and after its heartbeat stops (a hung or killed capture); with an explicit --threads (spare_core
 * auto) or spare_core off it never changes. Each phase runs a real greedy request on the shipped model through
 * the engine's scheduler and reads ax_engine_threads (the pool workers the latest step used; pool.c's own test
 * checks that a job really runs on exactly that many workers), and every phase must generate the same tokens
 * (fewer workers change only how rows are split, never a result). The consumer is a real ax_shm_attach handle.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "attnx_common.h"
#include "attnx_engine.h"
#include "attnx_shm.h"

#define GEN 12

/* Generate GEN greedy tokens of a fixed prompt; return the threads the last step used. */
static int generate(ax_engine *e, int32_t out[GEN])
{
	static const int32_t prompt[] = {40, 1079, 264, 408, 315, 279, 1879, 13};
	ax_gen_params gp = {.max_tokens = GEN, .ignore_eos = 1};
	ax_req *r;
	assert_int_equal(ax_engine_submit(e, NULL, prompt, (int)(sizeof prompt / sizeof prompt[0]), &gp, &r), 0);
	ax_gen_event ev;
	int n = 0;
	while (ax_req_next(r, &ev, 10000) == 1) {
		if (ev.token >= 0 && n < GEN)
			out[n++] = ev.token;
		if (ev.finish)
			break;
	}
	assert_int_equal(n, GEN);
	ax_req_release(r);
	return ax_engine_threads(e);
}

/* A consumer whose process lives but whose heartbeat is older than the producer's 5 s timeout. */
static void stop_heartbeat(ax_shm *s)
{
	ax_shm_header *h = (ax_shm_header *)ax_shm_hdr(s); /* the consumer area is ours to write */
	__atomic_store_n(&h->consumer_heartbeat_ns, ax_now_ns() - 6000000000ull, __ATOMIC_RELEASE);
}

typedef struct threads_case {
	const char *what;
	int threads, spare_core, no_export;
	int off, on; /* threads used without / with a consumer; 0 = all cores, -1 = all cores less one on 4 or more
		      * cores (the default's threshold), else all */
} threads_case;

static const threads_case cases[] = {
	{"explicit 3, spare on", 3, 1, 0, 3, 2},
	{"explicit 2, spare on", 2, 1, 0, 2, 1},
	{"default (all cores)", 0, 0, 0, 0, -1},
	{"explicit 2, spare auto: fixed", 2, 0, 0, 2, 2},
	{"explicit 3, spare off", 3, -1, 0, 3, 3},
	{"explicit 1, spare on: nothing to spare", 1, 1, 0, 1, 1},
	{"spare on, no export: no consumer can attach", 3, 1, 1, 3, 3},
};

static int resolve(int want)
{
	long c = sysconf(_SC_NPROCESSORS_ONLN);
	int all = c > 0 ? (int)(c > 256 ? 256 : c) : 1;
	if (want > 0)
		return want;
	return want == 0 ? all : (all >= 4 ? all - 1 : all);
}

static void run_case(const threads_case *c)
{
	char name[64];
	snprintf(name, sizeof name, "/attnx.threads-test.%d", (int)getpid());
	ax_engine_config cfg = {.model_dir = "models/attnx-tiny", .threads = c->threads, .spare_core = c->spare_core,
				.max_batch = 2, .ctx = 128, .shm_name = name, .no_export = c->no_export};
	ax_engine *e;
	assert_int_equal(ax_engine_open(&e, &cfg), 0);
	int off = resolve(c->off), on = resolve(c->on);
	int32_t ref[GEN], got[GEN];
	print_message("  %s: %d threads without a consumer, %d with one\n", c->what, off, on);
	assert_int_equal(generate(e, ref), off);

	ax_shm *s = NULL;
	if (!c->no_export) {
		assert_int_equal(ax_shm_attach(&s, name), 0);
		uint64_t all[2] = {~0ull, 0};
		ax_shm_set_wanted(s, all, 0);
	}
	assert_int_equal(generate(e, got), s ? on : off); /* attached, heartbeat live */
	assert_memory_equal(got, ref, sizeof ref);
	if (s) {
		stop_heartbeat(s); /* attached but silent for 6 s: gone */
		assert_int_equal(generate(e, got), off);
		assert_memory_equal(got, ref, sizeof ref);
		ax_shm_heartbeat(s); /* back */
		assert_int_equal(generate(e, got), on);
		assert_memory_equal(got, ref, sizeof ref);
		ax_shm_detach(s); /* detached: consumer_pid 0 */
		assert_int_equal(generate(e, got), off);
		assert_memory_equal(got, ref, sizeof ref);
	}
	ax_engine_close(e);
}

static void test_spare_core(void **state)
{
	(void)state;
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
		run_case(&cases[i]);
}

int main(void)
{
	ax_log_set_level(AX_LOG_WARN);
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_spare_core),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
