/*
 * policy_e2e_test.c — the policy race through the real binaries. attnx-relay and attnx-capture (argv[1], argv[2])
 * run as processes; the engine is played in this process: an ax_export segment (host K pools, a token-level index
 * table, a Q ring of random f32 values) and a one-connection-at-a-time HTTP server that prefills the moment a request
 * arrives, writing Q rows only for the layers the segment asks for (ax_export_wanted) — the fastest engine there can
 * be. The capture keeps its default --layers last; each request asks for layers 0 and 2, so the engine exports them
 * only if the capture asked for them before the prefill, which the relay guarantees by holding the request until the
 * capture acknowledged its policy. Every request must get prompt_attention with both layers on its first token's
 * chunk (and, with include_prompt_attention, every prompt row), and the relay must count no ack timeout.
 *
 * Without the hold (--policy-wait-ms 0) the same requests lose the race: the prefill row has no Q for layers 0 and
 * 2, the first chunk waits for the capture's `end` and carries no prompt_attention.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <curl/curl.h>
#include <jansson.h>

#include "attnx_common.h"
#include "attnx_shm.h"

#define NL 4       /* layers; the capture's default is the last */
#define HQ 4
#define HKV 2
#define HD 16
#define CTX 64     /* index-table context */
#define IROWS 8    /* index-table rows (one per request in flight) */
#define SLOTS (IROWS * CTX)
#define QROWS 256
#define P 6        /* prompt length */
#define N_TOK 3    /* generated tokens: A B C */

static const char *relay_bin, *capture_bin;

typedef struct eng {
	ax_export *ex;
	uint32_t ibuf, qbuf;
	uint64_t rng;
	int lfd, port;
	pthread_t th;
	atomic_int stop;
	uint32_t next_row;
} eng;

static struct {
	eng e;
	char shm[64], rec[128], pol[128], feed[128], logs[2][128];
	int relay_port;
	pid_t pid[2]; /* relay, capture */
	int passed;
} G;

static uint64_t rnd(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}
static float rndf(uint64_t *s) { return (float)((rnd(s) >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f; }

/* ---- the engine ----------------------------------------------------------------------------------------------- */

static void eng_open(eng *e)
{
	e->rng = 0x5eed;
	ax_export_config cfg = {.name = G.shm, .engine = "policy-e2e", .model = "random", .rank = 0, .world_size = 1,
				.n_layers = NL, .n_q_heads = HQ, .n_kv_heads = HKV, .head_offset = 0,
				.n_q_heads_total = HQ, .head_dim = HD, .q_dtype = AX_DTYPE_F32, .k_dtype = AX_DTYPE_F32,
				.max_ctx = CTX, .req_cap = 16, .arena_cap = 1 << 16,
				.data_size = (uint64_t)NL * SLOTS * HKV * HD * 4 + IROWS * CTX * 4 + QROWS * HQ * HD * 4 + 4096};
	assert_int_equal(ax_export_open(&e->ex, &cfg), 0);
	for (int32_t l = 0; l < NL; l++) {
		ax_shm_buffer b = {.kind = AX_BUF_K_POOL, .loc = AX_LOC_HOST, .dtype = AX_DTYPE_F32, .layer = l, .ndim = 3,
				   .dim = {SLOTS, HKV, HD}, .scale = 1};
		float *k;
		assert_int_equal(ax_export_add_host_buffer(e->ex, &b, (void **)&k, NULL), 0);
		for (size_t i = 0; i < (size_t)SLOTS * HKV * HD; i++)
			k[i] = rndf(&e->rng);
	}
	ax_shm_buffer ib = {.kind = AX_BUF_INDEX_TOKEN, .loc = AX_LOC_HOST, .dtype = AX_DTYPE_I32, .layer = -1,
			    .ndim = 2, .dim = {IROWS, CTX}, .scale = 1};
	int32_t *index;
	assert_int_equal(ax_export_add_host_buffer(e->ex, &ib, (void **)&index, &e->ibuf), 0);
	for (int i = 0; i < IROWS * CTX; i++)
		index[i] = i; /* row r uses slots r*CTX .. r*CTX+CTX-1 */
	ax_shm_buffer qb = {.kind = AX_BUF_Q_RING, .loc = AX_LOC_HOST, .dtype = AX_DTYPE_F32, .layer = -1,
			    .ndim = 3, .dim = {QROWS, HQ, HD}, .scale = 1};
	assert_int_equal(ax_export_add_host_buffer(e->ex, &qb, NULL, &e->qbuf), 0);
}

/* One FORWARD over positions [pos0, pos0+n), Q rows for the layers the capture wants right now (none: no step). */
static void forward(eng *e, uint64_t req_id, uint32_t row, const int32_t *tok, uint32_t pos0, uint32_t n, int prefill)
{
	uint64_t want[2] = {0, 0};
	if (ax_export_wanted(e->ex, want, NULL) != 1)
		return;
	uint64_t mask = want[0] & ((1u << NL) - 1);
	uint32_t nl = (uint32_t)__builtin_popcountll(mask);
	uint64_t q_row;
	float *q;
	if (nl == 0 || ax_export_q_reserve(e->ex, e->qbuf, n * nl, &q_row, (void **)&q) != 0)
		return;
	for (size_t i = 0; i < (size_t)n * nl * HQ * HD; i++)
		q[i] = rndf(&e->rng);
	ax_shm_step s = {.req_id = req_id, .n_tokens = n, .pos0 = pos0, .seq_len = pos0 + n, .index_buf = e->ibuf,
			 .index_row = row, .decode_step = prefill ? 0 : pos0 - P + 1, .q_row = q_row,
			 .layers = {mask, 0}, .flags = prefill ? AX_STEP_F_PREFILL : 0};
	ax_export_step(e->ex, &s, tok + pos0);
}

static void send_all(int fd, const char *p)
{
	size_t n = strlen(p);
	while (n) {
		ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
		if (w <= 0)
			return;
		p += w;
		n -= (size_t)w;
	}
}

static void chunk(int fd, const char *text)
{
	char b[512];
	snprintf(b, sizeof b,
		 "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":"
		 "\"%s\"},\"finish_reason\":null}]}\n\n",
		 text);
	send_all(fd, b);
}

/* Read one HTTP request and return its JSON body (NULL on a bad request). */
static json_t *read_body(int fd)
{
	char buf[16384];
	size_t n = 0;
	char *end = NULL;
	while (!end && n < sizeof buf - 1) {
		ssize_t r = recv(fd, buf + n, sizeof buf - 1 - n, 0);
		if (r <= 0)
			return NULL;
		n += (size_t)r;
		buf[n] = '\0';
		end = strstr(buf, "\r\n\r\n");
	}
	const char *cl = end ? strcasestr(buf, "Content-Length:") : NULL;
	size_t len = cl ? strtoul(cl + 15, NULL, 10) : 0, have = end ? n - (size_t)(end + 4 - buf) : 0;
	while (end && have < len && n < sizeof buf - 1) {
		ssize_t r = recv(fd, buf + n, sizeof buf - 1 - n, 0);
		if (r <= 0)
			return NULL;
		n += (size_t)r;
		have += (size_t)r;
	}
	return end ? json_loadb(end + 4, have, 0, NULL) : NULL;
}

/* Prefill at once, then one decode per generated token; a chunk per token as soon as it is sampled. */
static void serve(eng *e, int fd)
{
	json_t *j = read_body(fd);
	const char *rid = json_string_value(json_object_get(j, "rid"));
	int32_t tok[P + N_TOK];
	uint64_t req_id;
	uint32_t row = e->next_row++ % IROWS;
	int want_prefill = 0;
	for (int i = 0; i < P + N_TOK; i++)
		tok[i] = (int32_t)(rnd(&e->rng) % 1000);
	if (!rid || ax_export_request_begin(e->ex, rid, tok, P, &req_id) != 0) {
		send_all(fd, "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
		json_decref(j);
		return;
	}
	uint64_t want[2];
	ax_export_wanted(e->ex, want, &want_prefill);
	forward(e, req_id, row, tok, want_prefill ? 0 : P - 1, want_prefill ? P : 1, 1); /* samples A */
	send_all(fd, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n");
	chunk(fd, "A");
	for (uint32_t i = 0; i + 1 < N_TOK; i++) {
		usleep(5000);
		forward(e, req_id, row, tok, P + i, 1, 0); /* query token g_i at P+i samples g_{i+1} */
		chunk(fd, i == 0 ? "B" : "C");
	}
	ax_export_request_end(e->ex, req_id, AX_END_STOP);
	send_all(fd, "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n"
		     "data: [DONE]\n\n");
	json_decref(j);
}

static void *eng_main(void *arg)
{
	eng *e = arg;
	while (!atomic_load(&e->stop)) {
		struct pollfd p = {.fd = e->lfd, .events = POLLIN};
		ax_export_heartbeat(e->ex);
		if (poll(&p, 1, 100) != 1)
			continue;
		int fd = accept(e->lfd, NULL, NULL);
		if (fd < 0)
			continue;
		serve(e, fd);
		close(fd);
	}
	return NULL;
}

/* ---- processes ------------------------------------------------------------------------------------------------ */

static int listen_any(int *port)
{
	int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t al = sizeof a;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (bind(fd, (struct sockaddr *)&a, sizeof a) || listen(fd, 16))
		return -1;
	getsockname(fd, (struct sockaddr *)&a, &al);
	*port = ntohs(a.sin_port);
	return fd;
}

static pid_t spawn(char *const argv[], const char *log)
{
	pid_t pid = fork();
	if (pid == 0) {
		int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
		if (fd >= 0) {
			dup2(fd, 1);
			dup2(fd, 2);
		}
		execv(argv[0], argv);
		_exit(127);
	}
	return pid;
}

static void stop_proc(pid_t pid)
{
	int st;
	if (pid <= 0)
		return;
	kill(pid, SIGTERM);
	for (int i = 0; i < 300 && waitpid(pid, &st, WNOHANG) == 0; i++)
		usleep(10000);
	if (waitpid(pid, &st, WNOHANG) == 0) {
		kill(pid, SIGKILL);
		waitpid(pid, &st, 0);
	}
}

/* ---- HTTP client ---------------------------------------------------------------------------------------------- */

typedef struct buf {
	char *p;
	size_t n;
} buf;

static size_t on_data(char *p, size_t sz, size_t n, void *arg)
{
	buf *b = arg;
	b->p = realloc(b->p, b->n + sz * n + 1);
	memcpy(b->p + b->n, p, sz * n);
	b->n += sz * n;
	b->p[b->n] = '\0';
	return sz * n;
}

static long http(const char *method, const char *path, const char *body, buf *out)
{
	char url[256];
	long status = 0;
	snprintf(url, sizeof url, "http://127.0.0.1:%d%s", G.relay_port, path);
	CURL *c = curl_easy_init();
	struct curl_slist *h = curl_slist_append(NULL, "Content-Type: application/json");
	curl_easy_setopt(c, CURLOPT_URL, url);
	curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
	curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
	curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_data);
	curl_easy_setopt(c, CURLOPT_WRITEDATA, out);
	curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 20000L);
	if (body)
		curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
	if (curl_easy_perform(c) == CURLE_OK)
		curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
	curl_slist_free_all(h);
	curl_easy_cleanup(c);
	if (!out->p)
		out->p = calloc(1, 1);
	return status;
}

/* Wait until the relay lists a capture that said hello. */
static int capture_listed(void)
{
	for (int i = 0; i < 300; i++) {
		buf b = {0};
		int ok = http("GET", "/v1/attention/capabilities", NULL, &b) == 200 && strstr(b.p, "\"engine\":\"policy-e2e\"");
		free(b.p);
		if (ok)
			return 1;
		usleep(20000);
	}
	return 0;
}

static long long metric(const char *name)
{
	buf b = {0};
	char key[128];
	long long v = -1;
	http("GET", "/metrics", NULL, &b);
	snprintf(key, sizeof key, "\nattnx_relay_%s ", name);
	const char *p = strstr(b.p, key);
	if (p)
		v = strtoll(p + strlen(key), NULL, 10);
	free(b.p);
	return v;
}

static void dump_logs(void)
{
	for (int i = 0; i < 2; i++) {
		char cmd[256];
		fprintf(stderr, "---- %s\n", G.logs[i]);
		snprintf(cmd, sizeof cmd, "tail -n 30 %s >&2", G.logs[i]);
		if (system(cmd) != 0)
			fprintf(stderr, "(no log)\n");
	}
}

/* ---- set-up and cases ----------------------------------------------------------------------------------------- */

static int setup(void **state)
{
	int me = (int)getpid(), lfd;
	char pwait[16], listen[64], up[64];
	snprintf(G.shm, sizeof G.shm, "/attnx.policy-e2e.%d", me);
	snprintf(G.rec, sizeof G.rec, "ipc:///tmp/attnx-pe2e-%d-rec.sock", me);
	snprintf(G.pol, sizeof G.pol, "ipc:///tmp/attnx-pe2e-%d-pol.sock", me);
	snprintf(G.feed, sizeof G.feed, "ipc:///tmp/attnx-pe2e-%d-feed.sock", me);
	snprintf(G.logs[0], sizeof G.logs[0], "/tmp/attnx-pe2e-%d-relay.log", me);
	snprintf(G.logs[1], sizeof G.logs[1], "/tmp/attnx-pe2e-%d-capture.log", me);
	eng_open(&G.e);
	G.e.lfd = listen_any(&G.e.port);
	if (G.e.lfd < 0 || (lfd = listen_any(&G.relay_port)) < 0)
		return -1;
	close(lfd); /* the relay binds it next */
	if (pthread_create(&G.e.th, NULL, eng_main, &G.e))
		return -1;
	snprintf(listen, sizeof listen, "127.0.0.1:%d", G.relay_port);
	snprintf(up, sizeof up, "http://127.0.0.1:%d", G.e.port);
	snprintf(pwait, sizeof pwait, "%d", 2000); /* generous on a loaded machine; the ack takes a few ms */
	char *rargv[] = {(char *)relay_bin, "--listen", listen, "--upstream", up, "--records", G.rec, "--policy", G.pol,
			 "--feed", G.feed, "--attention-wait-ms", "3000", "--policy-wait-ms", pwait, "--web", "",
			 "--log-level", "warn", NULL};
	char *cargv[] = {(char *)capture_bin, "--shm", G.shm, "--records", G.rec, "--policy", G.pol, "--backend", "cpu",
			 "--top-k", "3", "--threads", "1", "--log-level", "warn", NULL};
	G.pid[0] = spawn(rargv, G.logs[0]);
	G.pid[1] = spawn(cargv, G.logs[1]);
	if (!capture_listed()) {
		fprintf(stderr, "the relay never listed the capture\n");
		return -1;
	}
	return 0;
}

static int teardown(void **state)
{
	stop_proc(G.pid[1]);
	stop_proc(G.pid[0]);
	atomic_store(&G.e.stop, 1);
	pthread_join(G.e.th, NULL);
	close(G.e.lfd);
	ax_export_close(G.e.ex);
	if (!G.passed)
		dump_logs();
	unlink(G.logs[0]);
	unlink(G.logs[1]);
	return 0;
}

static json_t *delta_of(json_t *ev)
{
	return json_object_get(json_array_get(json_object_get(ev, "choices"), 0), "delta");
}

/* The entry carries layers 0 and 2 and nothing else. */
static void check_layers(json_t *entry, const char *what)
{
	json_t *layers = json_object_get(entry, "layers");
	if (!json_object_get(layers, "0") || !json_object_get(layers, "2") || json_object_size(layers) != 2)
		fail_msg("%s: entry at position %lld has layers %s, want 0 and 2", what,
			 (long long)json_integer_value(json_object_get(entry, "position")),
			 layers ? json_dumps(layers, JSON_COMPACT) : "(none)");
}

/* One streamed request for layers 0 and 2; the chunk of A carries prompt_attention with both. */
static void one_request(int prompt_rows)
{
	char body[512];
	buf b = {0};
	snprintf(body, sizeof body,
		 "{\"model\":\"m\",\"stream\":true,\"return_attention_tokens\":true,\"top_k_attention\":3,"
		 "\"attention_capture_layer_ids\":[0,2],\"include_prompt_attention\":%s,"
		 "\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}",
		 prompt_rows ? "true" : "false");
	assert_int_equal(http("POST", "/v1/chat/completions", body, &b), 200);
	int seen_a = 0, seen_b = 0;
	for (const char *p = b.p; (p = strstr(p, "data: "));) {
		p += 6;
		const char *e = strstr(p, "\n\n");
		json_t *ev = json_loadb(p, e ? (size_t)(e - p) : strlen(p), 0, NULL);
		json_t *d = delta_of(ev);
		const char *content = json_string_value(json_object_get(d, "content"));
		if (content && strcmp(content, "A") == 0) {
			json_t *pa = json_object_get(d, "prompt_attention"), *x;
			size_t i;
			seen_a = 1;
			if (json_array_size(pa) != (prompt_rows ? P : 1))
				fail_msg("first chunk has %zu prompt_attention entries, want %d: %s", json_array_size(pa),
					 prompt_rows ? P : 1, b.p);
			json_array_foreach(pa, i, x) {
				assert_int_equal(json_integer_value(json_object_get(x, "position")), prompt_rows ? (int)i : P - 1);
				check_layers(x, "prompt_attention");
			}
		} else if (content && strcmp(content, "B") == 0) {
			json_t *at = json_object_get(d, "attention_tokens");
			seen_b = 1;
			assert_int_equal(json_array_size(at), 1);
			assert_int_equal(json_integer_value(json_object_get(json_array_get(at, 0), "position")), P);
			check_layers(json_array_get(at, 0), "attention_tokens");
		}
		json_decref(ev);
		p = e ? e : p + strlen(p);
	}
	assert_true(seen_a && seen_b);
	assert_non_null(strstr(b.p, "data: [DONE]"));
	free(b.p);
}

static void first_chunk_has_requested_layers(void **state)
{
	for (int i = 0; i < 4; i++)
		one_request(i == 3);
	assert_int_equal(metric("policy_ack_timeouts_total"), 0);
	assert_int_equal(metric("policy_waits_total"), 4);
	assert_int_equal(metric("policy_acks_total"), 4); /* re-publications after a request's end are not acked */
	G.passed = 1;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: %s ATTNX-RELAY ATTNX-CAPTURE\n", argv[0]);
		return 2;
	}
	relay_bin = argv[1];
	capture_bin = argv[2];
	signal(SIGPIPE, SIG_IGN);
	ax_log_set_level(AX_LOG_WARN);
	curl_global_init(CURL_GLOBAL_DEFAULT);
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(first_chunk_has_requested_layers),
	};
	int rc = cmocka_run_group_tests(tests, setup, teardown);
	curl_global_cleanup();
	return rc;
}
