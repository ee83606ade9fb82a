/*
 * main.c — attnx-engine: load a Llama/Qwen3 checkpoint, export Q/K through shm, serve the OpenAI API.
 *
 * Parses the command line, blocks SIGINT/SIGTERM in every thread (so civetweb's and the scheduler's threads
 * never take them), starts the engine and the HTTP server, then waits in sigwait() for a signal and shuts down
 * in reverse order: server first (no new requests), then the engine (running requests end as aborted, the shm
 * segment is closed and unlinked).
 */
#include "attnx_engine.h"

#include "attnx_common.h"
#include "attnx_shm.h"

#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void usage(FILE *f)
{
	fprintf(f,
		"usage: attnx-engine --model DIR [options]\n"
		"  --model DIR        Hugging Face checkpoint: config.json, model.safetensors, tokenizer.json\n"
		"  --listen ADDR:PORT HTTP address (default 127.0.0.1:8000)\n"
		"  --shm NAME         shm segment for attnx-capture (default " AX_SHM_DEFAULT_NAME ")\n"
		"  --no-export        do not create the shm segment\n"
		"  --threads N        compute threads (default: all cores; on 4 or more cores one fewer while an\n"
		"                     attnx-capture is attached, so the capture has a core and never preempts the\n"
		"                     forward pass; all come back when it detaches)\n"
		"  --spare-core WHEN  leave a core to an attached capture: auto (default: only without --threads and\n"
		"                     with >= 4 cores), on (whenever >= 2 threads, also with --threads N: N-1 while\n"
		"                     attached), off (never)\n"
		"  --max-batch N      concurrent requests (default 8)\n"
		"  --ctx N            longest sequence in tokens (default min(max_position_embeddings, 4096))\n"
		"  --prefill-chunk N  prompt tokens per request per step (default 256)\n"
		"  --http-threads N   civetweb worker threads (default 32)\n"
		"  --max-steps-per-s N  pace generation: at most N forward steps a second (default 0 = unpaced;\n"
		"                     for demos and tests that watch tokens stream)\n"
		"  -v, --verbose      debug logging\n");
}

static int parse_int(const char *s, int lo, int hi, int *out)
{
	char *end;
	long v = strtol(s, &end, 10);
	if (*s == 0 || *end || v < lo || v > hi)
		return -1;
	*out = (int)v;
	return 0;
}

/* --spare-core auto|on|off → ax_engine_config.spare_core 0 / 1 / -1. */
static int parse_spare(const char *s, int *out)
{
	static const struct { const char *name; int v; } t[] = {{"auto", 0}, {"on", 1}, {"off", -1}};
	for (size_t i = 0; i < sizeof t / sizeof t[0]; i++)
		if (!strcmp(s, t[i].name)) {
			*out = t[i].v;
			return 0;
		}
	return -1;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{"model", required_argument, 0, 'm'}, {"listen", required_argument, 0, 'l'},
		{"shm", required_argument, 0, 's'}, {"no-export", no_argument, 0, 'n'},
		{"threads", required_argument, 0, 't'}, {"max-batch", required_argument, 0, 'b'},
		{"ctx", required_argument, 0, 'c'}, {"prefill-chunk", required_argument, 0, 'p'},
		{"http-threads", required_argument, 0, 'H'}, {"verbose", no_argument, 0, 'v'},
		{"max-steps-per-s", required_argument, 0, 'P'}, {"spare-core", required_argument, 0, 'S'},
		{"help", no_argument, 0, 'h'}, {0, 0, 0, 0},
	};
	ax_engine_config cfg = {0};
	const char *listen = "127.0.0.1:8000";
	int http_threads = 32, o, bad = 0;
	while ((o = getopt_long(argc, argv, "m:l:s:nt:b:c:p:H:P:S:vh", opts, NULL)) != -1) {
		switch (o) {
		case 'm': cfg.model_dir = optarg; break;
		case 'l': listen = optarg; break;
		case 's': cfg.shm_name = optarg; break;
		case 'n': cfg.no_export = 1; break;
		case 't': bad |= parse_int(optarg, 1, 1024, &cfg.threads); break;
		case 'b': bad |= parse_int(optarg, 1, 1024, &cfg.max_batch); break;
		case 'c': bad |= parse_int(optarg, 16, 1 << 20, &cfg.ctx); break;
		case 'p': bad |= parse_int(optarg, 1, 1 << 16, &cfg.prefill_chunk); break;
		case 'H': bad |= parse_int(optarg, 1, 1024, &http_threads); break;
		case 'P': bad |= parse_int(optarg, 0, 1000000, &cfg.max_steps_per_s); break;
		case 'S': bad |= parse_spare(optarg, &cfg.spare_core); break;
		case 'v': ax_log_set_level(AX_LOG_DEBUG); break;
		case 'h': usage(stdout); return 0;
		default: bad = 1;
		}
	}
	if (bad || !cfg.model_dir || optind < argc) {
		usage(stderr);
		return 2;
	}
	/* civetweb needs "host:port"; accept a bare port too */
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGTERM);
	pthread_sigmask(SIG_BLOCK, &set, NULL);
	signal(SIGPIPE, SIG_IGN);
	ax_engine *e;
	int rc = ax_engine_open(&e, &cfg);
	if (rc) {
		ax_log(AX_LOG_ERROR, "engine", "start-up failed: %s", ax_strerror(rc));
		return 1;
	}
	ax_server *sv;
	rc = ax_server_open(&sv, e, listen, http_threads);
	if (rc) {
		ax_log(AX_LOG_ERROR, "engine", "cannot listen on %s", listen);
		ax_engine_close(e);
		return 1;
	}
	ax_log(AX_LOG_INFO, "engine", "serving %s on http://%s/v1", ax_engine_model_cfg(e)->name, listen);
	int sig = 0;
	sigwait(&set, &sig);
	ax_log(AX_LOG_INFO, "engine", "signal %d: shutting down", sig);
	ax_server_close(sv);
	ax_engine_close(e);
	return 0;
}
