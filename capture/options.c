/*
 * options.c — attnx-capture's command line: defaults, getopt_long parsing, list syntax and layer selection.
 *
 * Parsing fills an ax_capture_opts in place and never exits: it returns 1 after --help, -EINVAL after printing
 * one line that names the bad option, and main() turns those into exit codes 0 and 2. Lists ("1,3,5-7") are
 * parsed here once; layer selections (last / auto / all / list) stay symbolic until the segment tells the
 * capture how many layers the model has (ax_capture_resolve_layers).
 */
#include "capture.h"

#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "attnx_common.h"

void ax_capture_opts_default(ax_capture_opts *o)
{
	memset(o, 0, sizeof *o);
	snprintf(o->shm_name, sizeof o->shm_name, "%s", AX_SHM_DEFAULT_NAME);
	o->rank = -1;
	o->backend = AX_BACKEND_AUTO;
	o->device = -1;
	o->top_k = 5;
	o->layer_sel = AX_LAYERS_LAST;
	o->mode = AX_MODE_MEAN_LOGIT;
	o->stride = 1;
	o->max_tokens = 4096;
	long n = sysconf(_SC_NPROCESSORS_ONLN);
	o->threads = n > 1 ? (uint32_t)(n - 1) : 1;
	snprintf(o->records_addr, sizeof o->records_addr, "%s", AX_CAPTURE_DEFAULT_RECORDS);
	snprintf(o->policy_addr, sizeof o->policy_addr, "%s", AX_CAPTURE_DEFAULT_POLICY);
	o->stats_interval_ms = 5000;
	o->log_level = AX_LOG_INFO;
	o->max_pending_frames = 64;
	o->pending_max_ms = 2000;
	o->attach_retry_ms = 100;
	o->dead_after_ms = 2000;
	o->queue_cap = 2048;
}

void ax_capture_usage(FILE *out, const char *prog)
{
	fprintf(out,
		"Usage: %s [options]\n"
		"Attach to an inference engine's attnx shared-memory segment, compute exact top-k attention for the\n"
		"requested layers and positions, and push msgpack records to attnx-relay over nng.\n"
		"\n"
		"Engine:\n"
		"  --shm NAME            segment name (default %s)\n"
		"  --rank R              tensor-parallel rank; R > 0 attaches NAME.R (default: none)\n"
		"  --backend B           auto | cpu | cuda (default auto: cuda when the engine's buffers are in GPU\n"
		"                        memory and this build and machine have CUDA, else cpu)\n"
		"  --device N            CUDA device to run on (default: the engine's Q-ring device)\n"
		"What to capture (defaults; the relay's per-request policy overrides them):\n"
		"  --top-k N             key positions per record, 1..%d (default 5)\n"
		"  --layers SEL          last | auto (L/4, L/2, 3L/4, L-1) | all | LIST such as 0,4,8-11,-1\n"
		"                        (default last)\n"
		"  --mode M              mean_logit | mean_prob | heads (default mean_logit)\n"
		"  --heads LIST          heads mode: global query-head ids to report (default all)\n"
		"  --stride N            capture every Nth generated token (default 1)\n"
		"  --max-tokens N        generated tokens captured per request, 0 = unlimited (default 4096)\n"
		"  --prefill             capture every prompt row, not only the last one\n"
		"Running:\n"
		"  --threads N           worker threads (default nproc-1, at least 1)\n"
		"  --records ADDR        nng PUSH address to dial (default %s)\n"
		"  --policy ADDR         nng SUB address to dial for policies, '' = none (default %s)\n"
		"  --id SRC              source id in every record (default capture:<hostname>:<pid>:<rank>)\n"
		"  --stats-interval MS   period of stats records, 0 = none (default 5000)\n"
		"  --log-level L         error | warn | info | debug (default info)\n"
		"  -h, --help            this text\n"
		"\n"
		"Records that cannot be sent (relay down or slow) are dropped oldest first after a bounded wait and\n"
		"reported by a `gap` record; the capture never blocks the engine or itself on the relay.\n"
		"Exit status: 0 after SIGINT/SIGTERM, 1 on a runtime failure, 2 on invalid options.\n",
		prog, AX_SHM_DEFAULT_NAME, AX_PROTO_MAX_TOPK, AX_CAPTURE_DEFAULT_RECORDS, AX_CAPTURE_DEFAULT_POLICY);
}

/* Parse one signed integer from *p, advancing it. */
static int parse_int(const char **p, long *v)
{
	char *end;
	errno = 0;
	long x = strtol(*p, &end, 10);
	if (end == *p || errno != 0 || x < INT32_MIN || x > INT32_MAX)
		return -EINVAL;
	*p = end;
	*v = x;
	return 0;
}

int ax_capture_parse_list(const char *s, int32_t *ids, uint32_t cap, int allow_negative)
{
	uint32_t n = 0;
	const char *p = s;
	if (s == NULL || *s == '\0')
		return -EINVAL;
	for (;;) {
		long a, b;
		if (parse_int(&p, &a) < 0 || (!allow_negative && a < 0))
			return -EINVAL;
		b = a;
		if (*p == '-' && a >= 0) { /* range "a-b"; ranges of negative ids are not supported */
			p++;
			if (parse_int(&p, &b) < 0 || b < a)
				return -EINVAL;
		}
		for (long x = a; x <= b; x++) {
			if (n >= cap)
				return -E2BIG;
			ids[n++] = (int32_t)x;
		}
		if (*p == '\0')
			return (int)n;
		if (*p != ',')
			return -EINVAL;
		p++;
	}
}

static void mask_set(uint64_t mask[2], uint32_t l) { mask[l / 64] |= 1ull << (l % 64); }

int ax_capture_resolve_layers(int sel, const int32_t *ids, uint32_t n_ids, uint32_t n_layers, uint64_t mask[2],
			      uint32_t *ignored)
{
	uint32_t bad = 0;
	mask[0] = mask[1] = 0;
	if (n_layers > AX_SHM_MAX_LAYERS)
		n_layers = AX_SHM_MAX_LAYERS;
	if (n_layers == 0)
		sel = -1;
	switch (sel) {
	case AX_LAYERS_LAST:
		mask_set(mask, n_layers - 1);
		break;
	case AX_LAYERS_AUTO: {
		uint32_t auto_l[4] = {n_layers / 4, n_layers / 2, 3 * n_layers / 4, n_layers - 1};
		for (int i = 0; i < 4; i++)
			mask_set(mask, auto_l[i]);
		break;
	}
	case AX_LAYERS_ALL:
		for (uint32_t l = 0; l < n_layers; l++)
			mask_set(mask, l);
		break;
	case AX_LAYERS_LIST:
		for (uint32_t i = 0; i < n_ids; i++) {
			int64_t l = ids[i] < 0 ? (int64_t)n_layers + ids[i] : ids[i];
			if (l < 0 || l >= (int64_t)n_layers)
				bad++;
			else
				mask_set(mask, (uint32_t)l);
		}
		break;
	default:
		break;
	}
	if (ignored)
		*ignored = bad;
	return __builtin_popcountll(mask[0]) + __builtin_popcountll(mask[1]);
}

/* Unsigned option value in [lo, hi]. */
static int opt_uint(const char *name, const char *arg, uint32_t lo, uint32_t hi, uint32_t *out, FILE *err)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(arg, &end, 10);
	if (*arg == '\0' || *arg == '-' || *end != '\0' || errno != 0 || v < lo || v > hi) {
		fprintf(err, "attnx-capture: --%s: expected an integer in %u..%u, got '%s'\n", name, lo, hi, arg);
		return -EINVAL;
	}
	*out = (uint32_t)v;
	return 0;
}

static int opt_string(const char *name, const char *arg, char *dst, size_t cap, FILE *err)
{
	if (strlen(arg) >= cap) {
		fprintf(err, "attnx-capture: --%s: longer than %zu characters\n", name, cap - 1);
		return -EINVAL;
	}
	memcpy(dst, arg, strlen(arg) + 1);
	return 0;
}

static int opt_layers(ax_capture_opts *o, const char *arg, FILE *err)
{
	static const struct { const char *name; int sel; } words[] = {
		{"last", AX_LAYERS_LAST}, {"auto", AX_LAYERS_AUTO}, {"all", AX_LAYERS_ALL}};
	for (size_t i = 0; i < AX_ARRAY_LEN(words); i++)
		if (strcmp(arg, words[i].name) == 0) {
			o->layer_sel = words[i].sel;
			o->n_layer_ids = 0;
			return 0;
		}
	int n = ax_capture_parse_list(arg, o->layer_ids, AX_PROTO_MAX_LIST, 1);
	if (n < 0) {
		fprintf(err, "attnx-capture: --layers: expected last, auto, all or a list like 0,4,8-11,-1; got '%s'\n",
			arg);
		return -EINVAL;
	}
	o->layer_sel = AX_LAYERS_LIST;
	o->n_layer_ids = (uint32_t)n;
	return 0;
}

static int opt_log_level(ax_capture_opts *o, const char *arg, FILE *err)
{
	static const char *names[] = {"error", "warn", "info", "debug"};
	for (int i = 0; i < 4; i++)
		if (strcmp(arg, names[i]) == 0 || (arg[0] == '0' + i && arg[1] == '\0')) {
			o->log_level = i;
			return 0;
		}
	fprintf(err, "attnx-capture: --log-level: expected error, warn, info or debug; got '%s'\n", arg);
	return -EINVAL;
}

static int opt_backend(ax_capture_opts *o, const char *arg, FILE *err)
{
	static const struct { const char *name; int b; } names[] = {
		{"auto", AX_BACKEND_AUTO}, {"cpu", AX_BACKEND_CPU}, {"cuda", AX_BACKEND_CUDA}};
	for (size_t i = 0; i < AX_ARRAY_LEN(names); i++)
		if (strcmp(arg, names[i].name) == 0) {
			o->backend = names[i].b;
			return 0;
		}
	fprintf(err, "attnx-capture: --backend: expected auto, cpu or cuda; got '%s'\n", arg);
	return -EINVAL;
}

static int opt_shm(ax_capture_opts *o, const char *arg, FILE *err)
{
	/* POSIX shm names start with '/'; accept "attnx.engine" too. Leave room for ".<rank>". */
	const char *slash = arg[0] == '/' ? "" : "/";
	if (arg[0] == '\0' || strchr(arg + 1, '/') != NULL || strlen(arg) + strlen(slash) + 8 > AX_SHM_NAME_MAX) {
		fprintf(err, "attnx-capture: --shm: expected a segment name like %s (at most %d characters)\n",
			AX_SHM_DEFAULT_NAME, AX_SHM_NAME_MAX - 9);
		return -EINVAL;
	}
	snprintf(o->shm_name, sizeof o->shm_name, "%s%s", slash, arg);
	return 0;
}

enum {
	OPT_SHM = 256, OPT_RANK, OPT_BACKEND, OPT_TOPK, OPT_LAYERS, OPT_MODE, OPT_HEADS, OPT_STRIDE, OPT_MAXTOK,
	OPT_PREFILL, OPT_THREADS, OPT_RECORDS, OPT_POLICY, OPT_ID, OPT_STATS, OPT_LOGLEVEL, OPT_DEVICE,
};

static const struct option long_opts[] = {
	{"shm", required_argument, NULL, OPT_SHM},
	{"rank", required_argument, NULL, OPT_RANK},
	{"backend", required_argument, NULL, OPT_BACKEND},
	{"device", required_argument, NULL, OPT_DEVICE},
	{"top-k", required_argument, NULL, OPT_TOPK},
	{"layers", required_argument, NULL, OPT_LAYERS},
	{"mode", required_argument, NULL, OPT_MODE},
	{"heads", required_argument, NULL, OPT_HEADS},
	{"stride", required_argument, NULL, OPT_STRIDE},
	{"max-tokens", required_argument, NULL, OPT_MAXTOK},
	{"prefill", no_argument, NULL, OPT_PREFILL},
	{"threads", required_argument, NULL, OPT_THREADS},
	{"records", required_argument, NULL, OPT_RECORDS},
	{"policy", required_argument, NULL, OPT_POLICY},
	{"id", required_argument, NULL, OPT_ID},
	{"stats-interval", required_argument, NULL, OPT_STATS},
	{"log-level", required_argument, NULL, OPT_LOGLEVEL},
	{"help", no_argument, NULL, 'h'},
	{NULL, 0, NULL, 0},
};

/* One option; returns 0 or -EINVAL (message printed). */
static int apply_opt(ax_capture_opts *o, int c, const char *arg, FILE *err)
{
	uint32_t u;
	int n;
	switch (c) {
	case OPT_SHM: return opt_shm(o, arg, err);
	case OPT_RANK:
		if (opt_uint("rank", arg, 0, 65535, &u, err) < 0)
			return -EINVAL;
		o->rank = (int32_t)u;
		return 0;
	case OPT_BACKEND: return opt_backend(o, arg, err);
	case OPT_DEVICE:
		if (opt_uint("device", arg, 0, 1023, &u, err) < 0)
			return -EINVAL;
		o->device = (int32_t)u;
		return 0;
	case OPT_TOPK: return opt_uint("top-k", arg, 1, AX_PROTO_MAX_TOPK, &o->top_k, err);
	case OPT_LAYERS: return opt_layers(o, arg, err);
	case OPT_MODE:
		if ((n = ax_mode_parse(arg)) < 0) {
			fprintf(err, "attnx-capture: --mode: expected mean_logit, mean_prob or heads; got '%s'\n", arg);
			return -EINVAL;
		}
		o->mode = (uint32_t)n;
		return 0;
	case OPT_HEADS:
		if ((n = ax_capture_parse_list(arg, o->head_ids, AX_PROTO_MAX_LIST, 0)) < 0) {
			fprintf(err, "attnx-capture: --heads: expected a list of head ids like 0,3,8-15; got '%s'\n", arg);
			return -EINVAL;
		}
		o->n_head_ids = (uint32_t)n;
		return 0;
	case OPT_STRIDE: return opt_uint("stride", arg, 1, 1u << 30, &o->stride, err);
	case OPT_MAXTOK: return opt_uint("max-tokens", arg, 0, UINT32_MAX, &o->max_tokens, err);
	case OPT_PREFILL: o->prefill = 1; return 0;
	case OPT_THREADS: return opt_uint("threads", arg, 1, 1024, &o->threads, err);
	case OPT_RECORDS: return opt_string("records", arg, o->records_addr, sizeof o->records_addr, err);
	case OPT_POLICY: return opt_string("policy", arg, o->policy_addr, sizeof o->policy_addr, err);
	case OPT_ID: return opt_string("id", arg, o->src, sizeof o->src, err);
	case OPT_STATS: return opt_uint("stats-interval", arg, 0, 86400000, &o->stats_interval_ms, err);
	case OPT_LOGLEVEL: return opt_log_level(o, arg, err);
	default: return -EINVAL;
	}
}

/* Name of the option getopt just complained about, for the message. */
static void report_getopt_error(int argc, char **argv, FILE *err)
{
	const char *bad = (optind > 0 && optind <= argc) ? argv[optind - 1] : "?";
	if (optopt != 0 && optopt < 256)
		fprintf(err, "attnx-capture: invalid option or missing value: -%c\n", optopt);
	else
		fprintf(err, "attnx-capture: unknown option or missing value: %s\n", bad);
	fprintf(err, "Try 'attnx-capture --help'.\n");
}

int ax_capture_opts_parse(ax_capture_opts *o, int argc, char **argv, FILE *out, FILE *err)
{
	optind = 0; /* glibc: full re-initialisation, so the parser can run more than once (tests) */
	opterr = 0;
	for (;;) {
		int c = getopt_long(argc, argv, "h", long_opts, NULL);
		if (c == -1)
			break;
		if (c == 'h') {
			ax_capture_usage(out, "attnx-capture");
			return 1;
		}
		if (c == '?' || c == ':') {
			report_getopt_error(argc, argv, err);
			return -EINVAL;
		}
		if (apply_opt(o, c, optarg, err) < 0)
			return -EINVAL;
	}
	if (optind < argc) {
		fprintf(err, "attnx-capture: unexpected argument '%s'\nTry 'attnx-capture --help'.\n", argv[optind]);
		return -EINVAL;
	}
	if (o->rank > 0) {
		size_t len = strlen(o->shm_name);
		snprintf(o->shm_name + len, sizeof o->shm_name - len, ".%d", o->rank);
	}
	return 0;
}
