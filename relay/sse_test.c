/*
 * sse_test.c — the SSE parser: events split at every byte boundary, CRLF and CR line ends (also split between two
 * feeds), multi-line data, comments and other fields ignored, an unterminated last event, a callback that stops.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "relay_int.h"

typedef struct got {
	char ev[8][64];
	int n;
	int stop_at;
} got;

static int collect(const char *d, size_t n, void *arg)
{
	got *g = arg;
	if (g->n < 8)
		snprintf(g->ev[g->n], sizeof g->ev[0], "%.*s", (int)n, d);
	g->n++;
	return g->stop_at && g->n == g->stop_at ? 7 : 0;
}

static const struct {
	const char *in;
	int n;
	const char *ev[3];
} cases[] = {
	{"data: {\"a\":1}\n\ndata: [DONE]\n\n", 2, {"{\"a\":1}", "[DONE]"}},
	{"data: x\r\n\r\ndata:y\r\n\r\n", 2, {"x", "y"}},
	{"data: a\rdata: b\r\r", 1, {"a\nb"}},
	{": comment\nevent: msg\nid: 4\ndata: z\nretry: 5\n\n", 1, {"z"}},
	{"data: one\ndata: two\n\n", 1, {"one\ntwo"}},
	{"\n\n\ndata: q\n\n", 1, {"q"}},
	{"datum: no\n\n", 0, {NULL}},
};

static void every_split(void **state)
{
	for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
		size_t len = strlen(cases[c].in);
		for (size_t cut = 0; cut <= len; cut++) {
			ax_sse s;
			got g = {0};
			ax__sse_init(&s);
			assert_int_equal(ax__sse_feed(&s, cases[c].in, cut, collect, &g), 0);
			assert_int_equal(ax__sse_feed(&s, cases[c].in + cut, len - cut, collect, &g), 0);
			assert_int_equal(ax__sse_finish(&s, collect, &g), 0);
			if (g.n != cases[c].n)
				fail_msg("case %zu cut %zu: %d events, want %d", c, cut, g.n, cases[c].n);
			for (int i = 0; i < g.n; i++)
				assert_string_equal(g.ev[i], cases[c].ev[i]);
			ax__sse_fini(&s);
		}
	}
}

static void byte_by_byte(void **state)
{
	const char *in = "data: {\"x\":\"1\"}\r\n\r\n: hi\r\ndata: [DONE]\r\n\r\n";
	ax_sse s;
	got g = {0};
	ax__sse_init(&s);
	for (size_t i = 0; in[i]; i++)
		assert_int_equal(ax__sse_feed(&s, in + i, 1, collect, &g), 0);
	assert_int_equal(g.n, 2);
	assert_string_equal(g.ev[0], "{\"x\":\"1\"}");
	assert_string_equal(g.ev[1], "[DONE]");
	ax__sse_fini(&s);
}

static void unterminated(void **state)
{
	ax_sse s;
	got g = {0};
	ax__sse_init(&s);
	assert_int_equal(ax__sse_feed(&s, "data: last", 10, collect, &g), 0);
	assert_int_equal(g.n, 0);
	assert_int_equal(ax__sse_finish(&s, collect, &g), 0);
	assert_int_equal(g.n, 1);
	assert_string_equal(g.ev[0], "last");
	ax__sse_fini(&s);
}

static void callback_stops(void **state)
{
	ax_sse s;
	got g = {.stop_at = 1};
	ax__sse_init(&s);
	const char *in = "data: a\n\ndata: b\n\n";
	assert_int_equal(ax__sse_feed(&s, in, strlen(in), collect, &g), 7);
	assert_int_equal(g.n, 1);
	ax__sse_fini(&s);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(every_split),
		cmocka_unit_test(byte_by_byte),
		cmocka_unit_test(unterminated),
		cmocka_unit_test(callback_stops),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
