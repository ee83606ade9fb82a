/*
 * main.c — the attnx-relay program: options → ax_relay_opts, then open, run until SIGINT/SIGTERM, close.
 * Exit status: 0 after a clean stop, 1 when it could not start, 2 on a usage error.
 */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attnx_common.h"
#include "attnx_relay.h"

static void usage(FILE *f, const ax_relay_opts *d)
{
	fprintf(f,
		"usage: attnx-relay [options]\n"
		"OpenAI-compatible proxy that merges live attention records into responses, plus WebSocket / nng feeds.\n\n"
		"  --listen ADDR:PORT         HTTP address (default %s; port 0 picks a free port)\n"
		"  --upstream URL             OpenAI-compatible engine (default %s)\n"
		"  --records ADDR             nng PULL for capture records (default %s)\n"
		"  --policy ADDR              nng PUB for per-request policies (default %s)\n"
		"  --feed ADDR                nng PUB re-publishing every record frame (default %s)\n"
		"  --web DIR                  static files (default %s)\n"
		"  --token TOKEN              bearer token required on every route but /healthz\n"
		"                             (Authorization: Bearer TOKEN, or ?token=TOKEN for browsers and /ws)\n"
		"  --cors ORIGIN              allow this Origin (repeatable, up to 16; '*' allows any)\n"
		"  --max-body BYTES           request body cap, 413 above (default %zu)\n"
		"  --max-connections N        HTTP worker threads (default %d). Every open request, SSE stream and\n"
		"                             WebSocket client holds one thread for its whole life, so this is the\n"
		"                             number of concurrent connections; more wait in the accept queue.\n"
		"  --attention-wait-ms MS     how long a token's chunk may wait for its attention (default %d)\n"
		"  --policy-wait-ms MS        how long an attention request waits for every live capture to acknowledge\n"
		"                             its policy before it goes upstream anyway (default %d; 0 = no wait)\n"
		"  --upstream-timeout-ms MS   upstream connect timeout and longest silence (default %d)\n"
		"  --ws-queue N               records queued per WebSocket client before the oldest drop (default %d)\n"
		"  --log-level LEVEL          error|warn|info|debug (default info)\n"
		"  -h, --help                 this text\n",
		d->listen, d->upstream, d->records, d->policy, d->feed, d->web, d->max_body, d->max_connections,
		d->attention_wait_ms, d->policy_wait_ms, d->upstream_timeout_ms, d->ws_queue);
}

static int to_ll(const char *s, long long lo, long long hi, long long *v)
{
	char *e;
	errno = 0;
	long long x = strtoll(s, &e, 10);
	if (errno || e == s || *e || x < lo || x > hi)
		return -EINVAL;
	*v = x;
	return 0;
}

static int log_level(const char *s)
{
	static const char *names[] = {"error", "warn", "info", "debug"};
	for (int i = 0; i < 4; i++)
		if (strcmp(s, names[i]) == 0)
			return i;
	return -EINVAL;
}

enum { O_LISTEN = 256, O_UP, O_REC, O_POL, O_FEED, O_WEB, O_TOKEN, O_CORS, O_BODY, O_CONN, O_WAIT, O_UPTO, O_WSQ,
       O_PWAIT, O_LOG };

static int numeric(int opt, const char *arg, ax_relay_opts *o)
{
	long long v;
	switch (opt) {
	case O_BODY:
		if (to_ll(arg, 1, 1ll << 32, &v))
			return -EINVAL;
		o->max_body = (size_t)v;
		return 0;
	case O_CONN:
		if (to_ll(arg, 2, 4096, &v))
			return -EINVAL;
		o->max_connections = (int)v;
		return 0;
	case O_WAIT:
		if (to_ll(arg, 0, 600000, &v))
			return -EINVAL;
		o->attention_wait_ms = (int)v;
		return 0;
	case O_UPTO:
		if (to_ll(arg, 1, INT_MAX, &v))
			return -EINVAL;
		o->upstream_timeout_ms = (int)v;
		return 0;
	case O_WSQ:
		if (to_ll(arg, 1, 1 << 22, &v))
			return -EINVAL;
		o->ws_queue = (int)v;
		return 0;
	case O_PWAIT:
		if (to_ll(arg, 0, 60000, &v))
			return -EINVAL;
		o->policy_wait_ms = (int)v;
		return 0;
	}
	return -EINVAL;
}

static int parse(int argc, char **argv, ax_relay_opts *o)
{
	static const struct option lo[] = {
		{"listen", 1, 0, O_LISTEN}, {"upstream", 1, 0, O_UP}, {"records", 1, 0, O_REC},
		{"policy", 1, 0, O_POL}, {"feed", 1, 0, O_FEED}, {"web", 1, 0, O_WEB}, {"token", 1, 0, O_TOKEN},
		{"cors", 1, 0, O_CORS}, {"max-body", 1, 0, O_BODY}, {"max-connections", 1, 0, O_CONN},
		{"attention-wait-ms", 1, 0, O_WAIT}, {"upstream-timeout-ms", 1, 0, O_UPTO}, {"ws-queue", 1, 0, O_WSQ},
		{"policy-wait-ms", 1, 0, O_PWAIT},
		{"log-level", 1, 0, O_LOG}, {"help", 0, 0, 'h'}, {0, 0, 0, 0}};
	int c, lvl;
	while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
		switch (c) {
		case O_LISTEN: o->listen = optarg; break;
		case O_UP: o->upstream = optarg; break;
		case O_REC: o->records = optarg; break;
		case O_POL: o->policy = optarg; break;
		case O_FEED: o->feed = optarg; break;
		case O_WEB: o->web = optarg; break;
		case O_TOKEN: o->token = *optarg ? optarg : NULL; break;
		case O_CORS:
			if (o->n_cors == AX_RELAY_MAX_CORS)
				return -E2BIG;
			o->cors[o->n_cors++] = optarg;
			break;
		case O_LOG:
			if ((lvl = log_level(optarg)) < 0)
				return -EINVAL;
			ax_log_set_level(lvl);
			break;
		case 'h': return 1;
		default:
			if (c < O_BODY || c > O_PWAIT || numeric(c, optarg, o))
				return -EINVAL;
		}
	}
	return optind < argc ? -EINVAL : 0;
}

int main(int argc, char **argv)
{
	ax_relay_opts o, d;
	ax_relay_opts_default(&o);
	d = o;
	int rc = parse(argc, argv, &o);
	if (rc) {
		usage(rc > 0 ? stdout : stderr, &d);
		return rc > 0 ? 0 : 2;
	}
	o.handle_signals = 1;
	ax_relay *r;
	if ((rc = ax_relay_open(&r, &o))) {
		ax_log(AX_LOG_ERROR, "relay", "cannot start: %s", ax_strerror(rc));
		return 1;
	}
	rc = ax_relay_run(r);
	ax_relay_close(r);
	return rc ? 1 : 0;
}
