/*
 * bench_ws.c — a WebSocket subscriber of the relay's /ws feed that measures, for every record carrying `ts` (the
 * sender's wall clock when it sent the record, see bench_sender.c), the delay until its WebSocket frame was
 * received here; for scripts/bench-relay-latency, not a test.
 *
 * It connects with civetweb's client, sends nothing (so it receives every record as JSON text frames), keeps the
 * latencies of records whose src starts with "bench:" in an array, and after --count of them or --timeout seconds
 * prints count, p50, p90, p99, p99.9 and max in microseconds as one JSON line.
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <civetweb.h>
#include <jansson.h>

#include "attnx_common.h"

static struct {
	pthread_mutex_t mu;
	double *lat_us;
	size_t n, cap, skip;
	int closed;
} S = {.mu = PTHREAD_MUTEX_INITIALIZER};

static void take(json_t *j, uint64_t now)
{
	size_t i;
	json_t *v;

	if (json_is_array(j)) {
		json_array_foreach(j, i, v)
			take(v, now);
		return;
	}
	const char *src = json_string_value(json_object_get(j, "src"));
	json_t *ts = json_object_get(j, "ts");
	if (!src || strncmp(src, "bench:", 6) || !json_is_integer(ts))
		return;
	if (S.skip) { /* the first records include connection set-up */
		S.skip--;
		return;
	}
	if (S.n < S.cap)
		S.lat_us[S.n++] = ((double)now - (double)json_integer_value(ts)) / 1e3;
}

static int on_data(struct mg_connection *c, int flags, char *data, size_t len, void *arg)
{
	uint64_t now = ax_wall_ns();

	if ((flags & 0xf) != MG_WEBSOCKET_OPCODE_TEXT)
		return 1;
	json_t *j = json_loadb(data, len, 0, NULL);
	pthread_mutex_lock(&S.mu);
	take(j, now);
	pthread_mutex_unlock(&S.mu);
	json_decref(j);
	return 1;
}

static void on_close(const struct mg_connection *c, void *arg)
{
	pthread_mutex_lock(&S.mu);
	S.closed = 1;
	pthread_mutex_unlock(&S.mu);
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

static double pct(double p)
{
	size_t i = (size_t)ceil(p / 100.0 * (double)S.n);
	return S.n ? S.lat_us[i ? i - 1 : 0] : NAN;
}

int main(int argc, char **argv)
{
	const char *host = argc > 1 ? argv[1] : "127.0.0.1";
	int port = argc > 2 ? atoi(argv[2]) : 8081;
	size_t count = argc > 3 ? strtoul(argv[3], NULL, 10) : 10000;
	double timeout = argc > 4 ? strtod(argv[4], NULL) : 30;
	char err[256] = "";

	S.cap = count;
	S.skip = argc > 5 ? strtoul(argv[5], NULL, 10) : 100;
	S.lat_us = malloc(count * sizeof *S.lat_us);
	mg_init_library(0);
	struct mg_connection *c = mg_connect_websocket_client(host, port, 0, err, sizeof err, "/ws", NULL, on_data,
							       on_close, NULL);
	if (!c) {
		fprintf(stderr, "bench_ws: %s:%d: %s\n", host, port, err);
		return 1;
	}
	printf("{\"connected\":true}\n");
	fflush(stdout);
	uint64_t end = ax_now_ns() + (uint64_t)(timeout * 1e9);
	for (;;) {
		pthread_mutex_lock(&S.mu);
		int done = S.n >= S.cap || S.closed;
		pthread_mutex_unlock(&S.mu);
		if (done || ax_now_ns() > end)
			break;
		usleep(10000);
	}
	mg_close_connection(c);
	pthread_mutex_lock(&S.mu);
	qsort(S.lat_us, S.n, sizeof *S.lat_us, cmp);
	printf("{\"count\":%zu,\"p50_us\":%.1f,\"p90_us\":%.1f,\"p99_us\":%.1f,\"p999_us\":%.1f,\"max_us\":%.1f}\n",
	       S.n, pct(50), pct(90), pct(99), pct(99.9), S.n ? S.lat_us[S.n - 1] : NAN);
	pthread_mutex_unlock(&S.mu);
	mg_exit_library();
	free(S.lat_us);
	return S.n ? 0 : 1;
}
