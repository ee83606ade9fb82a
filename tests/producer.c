/*
 * producer.c — attnx-test-producer: a test fixture that plays an inference engine, with values a test can recompute.
 *
 * It creates the engine's shm segment through libattnx-export (one host K pool per layer [slots, H_kv, D], a
 * token-level index table [rows, max_ctx] of i32 slot numbers, one Q ring [rows, H_q, D]) and serves a minimal
 * OpenAI API with civetweb: GET /v1/models, GET /health, POST /v1/chat/completions and /v1/completions (streamed as
 * SSE, one chunk per token, or not), POST /v1/tokenize and /v1/detokenize (a toy tokenizer: the words of qk_gen.h,
 * else bytes). The body's "rid" is the request id (the relay injects it), "seed" the request seed.
 *
 * Like an engine, one scheduler thread owns the export handle (libattnx-export is single-producer) and runs one
 * batched step per tick (1 / --tokens-per-s): it admits waiting requests (prefill: K rows of every prompt position,
 * BEGIN, one FORWARD carrying the last prompt row — or every prompt row when the capture asks for prefill — which
 * samples token 0), then gives every running request one decode FORWARD at position P+i (query token g_i, samples
 * g_{i+1}) until max_tokens tokens exist, then END. K slots come from a LIFO free list, so a finished request's
 * slots are recycled by the next one. Q rows are written only for the layers the capture wants (ax_export_wanted).
 * Values and tokens come from qk_gen.h. HTTP handlers run on civetweb worker threads and wait on their request's
 * condition variable for tokens; a client that disconnects aborts its request (END reason abort).
 */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <civetweb.h>
#include <jansson.h>

#include "attnx_common.h"
#include "attnx_shm.h"
#include "qk_gen.h"

#define TAG "producer"
#define MAX_BODY (1u << 20)

typedef struct opts {
	const char *listen, *shm, *model;
	uint32_t layers, q_heads, kv_heads, head_dim, dtype;
	uint32_t slots, max_ctx, max_running, q_rows, threads;
	double tokens_per_s;
} opts;

/* One request, shared by its HTTP handler and the scheduler (refcounted under g.mu). */
typedef struct preq {
	struct preq *next;         /* pending queue / running list link (g.mu) */
	int refs;
	pthread_cond_t cv;         /* signalled when tokens arrive or the request finishes */
	/* immutable after submission */
	char rid[AX_SHM_RID_MAX];
	uint64_t seed;
	int32_t *prompt;           /* [P] */
	uint32_t P, max_tokens;
	/* scheduler only */
	uint64_t req_id;           /* export id, 0 if not exported */
	uint32_t row;              /* index-table row */
	int32_t *slots;            /* [P + max_tokens] K slot of each position */
	/* shared (g.mu) */
	int32_t *out;              /* [max_tokens] generated tokens */
	uint32_t n_out;
	int finished, cancelled;
	const char *finish_reason;
} preq;

static struct {
	opts o;
	ax_export *ex;
	uint32_t qbuf, ibuf;
	uint8_t *kpool[AX_SHM_MAX_LAYERS];
	int32_t *index;            /* [max_running, max_ctx] */
	pthread_mutex_t mu;
	pthread_cond_t work;       /* scheduler wakes on new requests */
	preq *pending, *running;
	int32_t *free_slots;       /* LIFO stack */
	uint32_t n_free_slots, reserved_slots;
	uint32_t *free_rows;
	uint32_t n_free_rows;
	uint64_t rid_counter;
	volatile sig_atomic_t stop;
	int sched_done;
	pthread_t sched;
} g = {.mu = PTHREAD_MUTEX_INITIALIZER, .work = PTHREAD_COND_INITIALIZER};

/* ---- toy tokenizer ---------------------------------------------------------------------------------------- */

static uint32_t tokenize(const char *s, size_t n, int32_t *out, uint32_t cap)
{
	uint32_t k = 0;

	for (size_t i = 0; i < n && k < cap;) {
		int best = -1;
		size_t best_len = 0;
		for (int w = 0; w < AX_QK_N_WORDS; w++) {
			size_t len = strlen(ax_qk_words[w]);
			if (len > best_len && len <= n - i && !memcmp(s + i, ax_qk_words[w], len)) {
				best = w;
				best_len = len;
			}
		}
		out[k++] = best >= 0 ? AX_QK_WORD_BASE + best : (uint8_t)s[i];
		i += best >= 0 ? best_len : 1;
	}
	return k;
}

/* Text of one token into buf (NUL-terminated); unknown ids render as nothing. */
static void token_text(int32_t id, char *buf, size_t cap)
{
	if (id >= 0 && id < 256 && cap > 1) {
		buf[0] = (char)id;
		buf[1] = 0;
	} else if (id >= AX_QK_WORD_BASE && id < AX_QK_WORD_BASE + AX_QK_N_WORDS) {
		snprintf(buf, cap, "%s", ax_qk_words[id - AX_QK_WORD_BASE]);
	} else {
		buf[0] = 0;
	}
}

/* ---- engine side: slots, K/Q rows, steps ------------------------------------------------------------------ */

static size_t elem_size(void) { return g.o.dtype == AX_DTYPE_BF16 ? 2 : 4; }

/* Store `n` floats (exact in bf16 by construction, see qk_gen.h) as the producer's dtype. */
static void store_row(uint8_t *dst, const float *v, uint32_t n)
{
	if (g.o.dtype == AX_DTYPE_F32) {
		memcpy(dst, v, n * sizeof *v);
		return;
	}
	for (uint32_t i = 0; i < n; i++) {
		uint32_t u;
		memcpy(&u, &v[i], 4);
		uint16_t h = (uint16_t)(u >> 16);
		memcpy(dst + 2 * i, &h, 2);
	}
}

static void write_k(const preq *r, uint64_t pos, int32_t slot)
{
	float row[1024];
	size_t es = elem_size(), D = g.o.head_dim;

	for (uint32_t l = 0; l < g.o.layers; l++)
		for (uint32_t h = 0; h < g.o.kv_heads; h++) {
			ax_qk_row(row, g.o.head_dim, r->seed, AX_QK_K, l, pos, h);
			store_row(g.kpool[l] + (((size_t)slot * g.o.kv_heads + h) * D) * es, row, g.o.head_dim);
		}
}

static uint32_t popcount2(const uint64_t m[2])
{
	return (uint32_t)(__builtin_popcountll(m[0]) + __builtin_popcountll(m[1]));
}

/* Q rows of positions pos0..pos0+n-1 for the wanted layers, token-major, layer-minor. */
static int write_q(const preq *r, uint64_t pos0, uint32_t n, const uint64_t layers[2], uint64_t *q_row)
{
	uint32_t nl = popcount2(layers);
	size_t es = elem_size(), row_elems = (size_t)g.o.q_heads * g.o.head_dim;
	float v[1024];
	uint8_t *p;
	int rc;

	*q_row = 0;
	if (!nl)
		return 0;
	rc = ax_export_q_reserve(g.ex, g.qbuf, n * nl, q_row, (void **)&p);
	if (rc)
		return rc;
	for (uint32_t t = 0; t < n; t++)
		for (uint32_t l = 0; l < g.o.layers; l++) {
			if (!(layers[l / 64] >> (l % 64) & 1))
				continue;
			for (uint32_t h = 0; h < g.o.q_heads; h++) {
				ax_qk_row(v, g.o.head_dim, r->seed, AX_QK_Q, l, pos0 + t, h);
				store_row(p + h * (size_t)g.o.head_dim * es, v, g.o.head_dim);
			}
			p += row_elems * es;
		}
	return 0;
}

static int32_t slot_take(void) { return g.free_slots[--g.n_free_slots]; }

/* The K row, index entry of one position. */
static void place(preq *r, uint64_t pos)
{
	int32_t slot = slot_take();

	r->slots[pos] = slot;
	write_k(r, pos, slot);
	g.index[(size_t)r->row * g.o.max_ctx + pos] = slot;
}

static void token_at(const preq *r, uint64_t pos, int32_t *tok)
{
	*tok = pos < r->P ? r->prompt[pos] : ax_qk_token(r->seed, pos);
}

/* Publish FORWARD for query positions pos0..pos0+n-1 (K already placed). */
static void forward(preq *r, uint64_t pos0, uint32_t n, int prefill, const uint64_t want[2])
{
	ax_shm_step s = {0};
	int32_t toks[1];
	int32_t *tk = n == 1 ? toks : malloc(n * sizeof *tk);
	uint64_t layers[2] = {want[0], want[1]};
	int rc;

	if (!tk)
		return;
	for (uint32_t t = 0; t < n; t++)
		token_at(r, pos0 + t, &tk[t]);
	if (write_q(r, pos0, n, layers, &s.q_row) < 0)
		layers[0] = layers[1] = 0; /* Q ring too small for this step: publish the step without Q */
	s.req_id = r->req_id;
	s.n_tokens = n;
	s.pos0 = pos0;
	s.seq_len = pos0 + n;
	s.index_buf = g.ibuf;
	s.index_row = r->row;
	s.decode_step = prefill ? 0 : (uint32_t)(pos0 + 1 - r->P);
	s.layers[0] = layers[0];
	s.layers[1] = layers[1];
	s.flags = prefill ? AX_STEP_F_PREFILL : 0;
	rc = ax_export_step(g.ex, &s, tk);
	if (rc && rc != -EAGAIN)
		ax_log(AX_LOG_WARN, TAG, "step %s pos %llu: %s", r->rid, (unsigned long long)pos0, ax_strerror(rc));
	if (tk != toks)
		free(tk);
}

static void emit_token(preq *r, int32_t tok)
{
	pthread_mutex_lock(&g.mu);
	r->out[r->n_out++] = tok;
	pthread_cond_broadcast(&r->cv);
	pthread_mutex_unlock(&g.mu);
}

static void prefill(preq *r, const uint64_t want[2], int want_prefill)
{
	int rc = ax_export_request_begin(g.ex, r->rid, r->prompt, r->P, &r->req_id);

	if (rc && rc != -EAGAIN) {
		ax_log(AX_LOG_WARN, TAG, "request %s not exported: %s", r->rid, ax_strerror(rc));
		r->req_id = 0;
	}
	for (uint32_t p = 0; p < r->P; p++)
		place(r, p);
	if (r->req_id) {
		uint32_t n = want_prefill && (uint64_t)r->P * popcount2(want) <= g.o.q_rows ? r->P : 1;
		forward(r, r->P - n, n, 1, want);
	}
	emit_token(r, ax_qk_token(r->seed, r->P));
}

static void decode(preq *r, const uint64_t want[2])
{
	uint64_t pos = r->P + r->n_out - 1; /* n_out is stable: only the scheduler appends */

	place(r, pos);
	if (r->req_id)
		forward(r, pos, 1, 0, want);
	emit_token(r, ax_qk_token(r->seed, pos + 1));
}

static void preq_unref(preq *r);

/* END, free the slots (pushed back in reverse so the lowest are reused first) and the row. g.mu held. */
static void finish_locked(preq *r, const char *reason)
{
	uint32_t used = r->P + r->n_out - 1;

	if (r->req_id)
		ax_export_request_end(g.ex, r->req_id, !strcmp(reason, "abort") ? AX_END_ABORT : AX_END_LENGTH);
	if (r->n_out == 0)
		used = 0;
	for (uint32_t i = used; i-- > 0;)
		g.free_slots[g.n_free_slots++] = r->slots[i];
	g.reserved_slots -= r->P + r->max_tokens;
	g.free_rows[g.n_free_rows++] = r->row;
	r->finished = 1;
	r->finish_reason = reason;
	pthread_cond_broadcast(&r->cv);
}

/* Move admissible pending requests to `admitted` (their rows and slot budgets reserved). g.mu held. */
static preq *admit_locked(void)
{
	preq *admitted = NULL, **pp = &g.pending;

	while (*pp) {
		preq *r = *pp;
		uint32_t need = r->P + r->max_tokens;
		if (!g.n_free_rows || g.reserved_slots + need > g.o.slots)
			break; /* FIFO: wait for room */
		*pp = r->next;
		r->row = g.free_rows[--g.n_free_rows];
		g.reserved_slots += need;
		r->next = admitted;
		admitted = r;
	}
	return admitted;
}

/* One batched step over the running requests, then the new ones' prefill. */
static void tick(void)
{
	uint64_t want[2] = {0, 0};
	int want_prefill = 0;
	preq *admitted, *r, **pp;

	if (ax_export_wanted(g.ex, want, &want_prefill) != 1)
		want[0] = want[1] = 0, want_prefill = 0;
	pthread_mutex_lock(&g.mu);
	admitted = admit_locked();
	pthread_mutex_unlock(&g.mu);
	for (r = g.running; r; r = r->next)
		if (!r->cancelled && r->n_out < r->max_tokens)
			decode(r, want);
	pthread_mutex_lock(&g.mu);
	for (pp = &g.running; (r = *pp);) {
		if (r->cancelled || r->n_out >= r->max_tokens) {
			*pp = r->next;
			finish_locked(r, r->cancelled ? "abort" : "length");
			preq_unref(r);
		} else {
			pp = &r->next;
		}
	}
	pthread_mutex_unlock(&g.mu);
	while ((r = admitted)) {
		admitted = r->next;
		prefill(r, want, want_prefill);
		pthread_mutex_lock(&g.mu);
		r->next = g.running;
		g.running = r;
		pthread_mutex_unlock(&g.mu);
	}
	ax_export_heartbeat(g.ex);
}

static void sleep_until(uint64_t t_ns)
{
	struct timespec ts = {.tv_sec = (time_t)(t_ns / 1000000000ull), .tv_nsec = (long)(t_ns % 1000000000ull)};
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR && !g.stop)
		;
}

/* Idle: wait for work up to 100 ms (heartbeat keeps going). */
static void wait_work(void)
{
	struct timespec ts;

	pthread_mutex_lock(&g.mu);
	if (!g.pending && !g.running && !g.stop) {
		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_nsec += 100000000;
		if (ts.tv_nsec >= 1000000000) {
			ts.tv_sec++;
			ts.tv_nsec -= 1000000000;
		}
		pthread_cond_timedwait(&g.work, &g.mu, &ts);
	}
	pthread_mutex_unlock(&g.mu);
}

static void abort_all(void)
{
	preq *r;

	pthread_mutex_lock(&g.mu);
	while ((r = g.running)) {
		g.running = r->next;
		r->cancelled = 1;
		finish_locked(r, "abort");
		preq_unref(r);
	}
	while ((r = g.pending)) {
		g.pending = r->next;
		r->finished = 1;
		r->finish_reason = "abort";
		pthread_cond_broadcast(&r->cv);
		preq_unref(r);
	}
	g.sched_done = 1;
	pthread_mutex_unlock(&g.mu);
}

static void *scheduler(void *arg)
{
	uint64_t tick_ns = (uint64_t)(1e9 / g.o.tokens_per_s), next = ax_now_ns();

	while (!g.stop) {
		pthread_mutex_lock(&g.mu);
		int busy = g.pending || g.running;
		pthread_mutex_unlock(&g.mu);
		if (!busy) {
			ax_export_heartbeat(g.ex);
			wait_work();
			next = ax_now_ns();
			continue;
		}
		tick();
		next += tick_ns;
		uint64_t now = ax_now_ns();
		if (next < now)
			next = now; /* fell behind: do not burst */
		sleep_until(next);
	}
	abort_all();
	return NULL;
}

/* ---- requests ----------------------------------------------------------------------------------------------- */

static void preq_free(preq *r)
{
	pthread_cond_destroy(&r->cv);
	free(r->prompt);
	free(r->slots);
	free(r->out);
	free(r);
}

/* g.mu held. */
static void preq_unref(preq *r)
{
	if (--r->refs == 0)
		preq_free(r);
}

static preq *preq_new(const char *rid, uint64_t seed, int32_t *prompt, uint32_t P, uint32_t max_tokens)
{
	preq *r = calloc(1, sizeof *r);

	if (!r)
		return NULL;
	r->slots = malloc((P + max_tokens) * sizeof *r->slots);
	r->out = malloc(max_tokens * sizeof *r->out);
	if (!r->slots || !r->out) {
		free(r->slots);
		free(r->out);
		free(r);
		return NULL;
	}
	pthread_cond_init(&r->cv, NULL);
	snprintf(r->rid, sizeof r->rid, "%s", rid);
	r->seed = seed;
	r->prompt = prompt;
	r->P = P;
	r->max_tokens = max_tokens;
	r->refs = 2; /* handler + scheduler */
	return r;
}

/* Queue a request (takes ownership of `prompt`). Returns it or NULL (out of memory / stopping). */
static preq *submit(const char *rid, uint64_t seed, int32_t *prompt, uint32_t P, uint32_t max_tokens)
{
	preq *r = preq_new(rid, seed, prompt, P, max_tokens), **pp;

	if (!r) {
		free(prompt);
		return NULL;
	}
	pthread_mutex_lock(&g.mu);
	if (g.sched_done) {
		pthread_mutex_unlock(&g.mu);
		r->refs = 1;
		preq_free(r);
		return NULL;
	}
	for (pp = &g.pending; *pp; pp = &(*pp)->next)
		;
	*pp = r;
	pthread_cond_signal(&g.work);
	pthread_mutex_unlock(&g.mu);
	return r;
}

/* Wait for tokens beyond `have` (copied into out[]) or the end. Returns new count; *fin set when finished. */
static uint32_t wait_tokens(preq *r, uint32_t have, int32_t *out, int *fin)
{
	uint32_t n;

	pthread_mutex_lock(&g.mu);
	while (r->n_out == have && !r->finished)
		pthread_cond_wait(&r->cv, &g.mu);
	n = r->n_out;
	memcpy(out + have, r->out + have, (n - have) * sizeof *out);
	*fin = r->finished && n == r->n_out;
	pthread_mutex_unlock(&g.mu);
	return n;
}

static void release(preq *r, int cancel)
{
	pthread_mutex_lock(&g.mu);
	if (cancel && !r->finished)
		r->cancelled = 1;
	preq_unref(r);
	pthread_mutex_unlock(&g.mu);
}

/* ---- HTTP ----------------------------------------------------------------------------------------------------- */

static const char *status_text(int status)
{
	switch (status) {
	case 200: return "OK";
	case 404: return "Not Found";
	case 503: return "Service Unavailable";
	default: return "Bad Request";
	}
}

static int send_json(struct mg_connection *c, int status, json_t *j)
{
	char *s = json_dumps(j, JSON_COMPACT);
	size_t n = s ? strlen(s) : 0;

	json_decref(j);
	mg_printf(c,
		  "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n"
		  "Connection: close\r\n\r\n",
		  status, status_text(status), n);
	if (s)
		mg_write(c, s, n);
	free(s);
	return status;
}

static int send_error(struct mg_connection *c, int status, const char *msg)
{
	return send_json(c, status,
			 json_pack("{s:{s:s,s:s,s:i}}", "error", "message", msg, "type",
				   status == 404 ? "not_found" : "invalid_request_error", "code", status));
}

static json_t *read_body(struct mg_connection *c)
{
	const struct mg_request_info *ri = mg_get_request_info(c);
	long long len = ri->content_length;
	char *buf;
	json_t *j;
	size_t got = 0;

	if (len < 0 || len > MAX_BODY)
		return NULL;
	buf = malloc((size_t)len + 1);
	if (!buf)
		return NULL;
	while (got < (size_t)len) {
		int n = mg_read(c, buf + got, (size_t)len - got);
		if (n <= 0)
			break;
		got += (size_t)n;
	}
	j = got == (size_t)len ? json_loadb(buf, got, 0, NULL) : NULL;
	free(buf);
	if (j && !json_is_object(j)) {
		json_decref(j);
		j = NULL;
	}
	return j;
}

/* Toy chat template: "<|role|>content\n" per message, then "<|assistant|>". Returns malloc'd text or NULL. */
static char *chat_text(json_t *messages)
{
	size_t i, len = 0;
	json_t *m;
	char *s;

	if (!json_is_array(messages) || !json_array_size(messages))
		return NULL;
	json_array_foreach(messages, i, m) {
		const char *role = json_string_value(json_object_get(m, "role"));
		const char *content = json_string_value(json_object_get(m, "content"));
		if (!role || !content)
			return NULL;
		len += strlen(role) + strlen(content) + 8;
	}
	s = malloc(len + 16);
	if (!s)
		return NULL;
	s[0] = 0;
	json_array_foreach(messages, i, m) {
		strcat(s, "<|");
		strcat(s, json_string_value(json_object_get(m, "role")));
		strcat(s, "|>");
		strcat(s, json_string_value(json_object_get(m, "content")));
		strcat(s, "\n");
	}
	strcat(s, "<|assistant|>");
	return s;
}

/* The prompt of a body as token ids (chat: messages through the template; completions: string or ids). */
static int body_prompt(json_t *body, int chat, int32_t **ids, uint32_t *P, uint64_t *text_seed)
{
	json_t *pr = json_object_get(body, chat ? "messages" : "prompt");
	char *text = chat ? chat_text(pr) : (json_is_string(pr) ? strdup(json_string_value(pr)) : NULL);
	size_t i;
	json_t *v;

	if (text) {
		size_t n = strlen(text);
		*ids = malloc((n + 1) * sizeof **ids);
		*P = *ids ? tokenize(text, n, *ids, (uint32_t)n) : 0;
		*text_seed = ax_qk_text_seed(text, n);
		free(text);
		return *ids ? 0 : -ENOMEM;
	}
	if (chat || !json_is_array(pr) || !json_array_size(pr))
		return -EINVAL;
	*ids = malloc(json_array_size(pr) * sizeof **ids);
	if (!*ids)
		return -ENOMEM;
	*text_seed = 0xa77e;
	json_array_foreach(pr, i, v) {
		if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= 1 << 20) {
			free(*ids);
			return -EINVAL;
		}
		(*ids)[i] = (int32_t)json_integer_value(v);
		*text_seed = ax_qk_mix(*text_seed ^ (uint64_t)(*ids)[i]);
	}
	*P = (uint32_t)json_array_size(pr);
	return 0;
}

typedef struct gen_req {
	int chat, stream, usage;
	char rid[AX_SHM_RID_MAX];
	uint64_t seed;
	int32_t *prompt;
	uint32_t P, max_tokens;
	long created;
} gen_req;

static const char *parse_gen(json_t *body, int chat, gen_req *q)
{
	json_t *v;
	uint64_t text_seed;
	const char *rid = json_string_value(json_object_get(body, "rid"));
	json_int_t mt = 16;

	q->chat = chat;
	q->stream = json_is_true(json_object_get(body, "stream"));
	q->usage = json_is_true(json_object_get(json_object_get(body, "stream_options"), "include_usage"));
	if ((v = json_object_get(body, "max_tokens")) || (v = json_object_get(body, "max_completion_tokens"))) {
		if (!json_is_integer(v) || json_integer_value(v) < 1)
			return "max_tokens must be a positive integer";
		mt = json_integer_value(v);
	}
	if (body_prompt(body, chat, &q->prompt, &q->P, &text_seed))
		return chat ? "messages must be a non-empty array of {role, content} strings"
			    : "prompt must be a string or an array of token ids";
	if (!q->P || mt > g.o.max_ctx || q->P + mt > g.o.max_ctx || q->P + mt > g.o.slots) {
		free(q->prompt);
		return "prompt + max_tokens exceed the context length";
	}
	q->max_tokens = (uint32_t)mt;
	v = json_object_get(body, "seed");
	q->seed = json_is_integer(v) ? (uint64_t)json_integer_value(v) : text_seed;
	if (rid && rid[0] && strlen(rid) < sizeof q->rid) {
		snprintf(q->rid, sizeof q->rid, "%s", rid);
	} else {
		pthread_mutex_lock(&g.mu);
		snprintf(q->rid, sizeof q->rid, "prod-%d-%llu", (int)getpid(), (unsigned long long)++g.rid_counter);
		pthread_mutex_unlock(&g.mu);
	}
	q->created = (long)time(NULL);
	return NULL;
}

static json_t *usage_json(const gen_req *q, uint32_t n)
{
	return json_pack("{s:i,s:i,s:i}", "prompt_tokens", (json_int_t)q->P, "completion_tokens", (json_int_t)n,
			 "total_tokens", (json_int_t)(q->P + n));
}

/* One streamed chunk: token text (or NULL for the final chunk with finish_reason). */
static json_t *chunk_json(const gen_req *q, const char *text, int first, const char *finish)
{
	json_t *choice;

	if (q->chat) {
		json_t *delta = json_object();
		if (first)
			json_object_set_new(delta, "role", json_string("assistant"));
		if (text)
			json_object_set_new(delta, "content", json_string(text));
		choice = json_pack("{s:i,s:o}", "index", 0, "delta", delta);
	} else {
		choice = json_pack("{s:i,s:s,s:n}", "index", 0, "text", text ? text : "", "logprobs");
	}
	json_object_set_new(choice, "finish_reason", finish ? json_string(finish) : json_null());
	return json_pack("{s:s+,s:s,s:i,s:s,s:[o]}", "id", q->chat ? "chatcmpl-" : "cmpl-", q->rid, "object",
			 q->chat ? "chat.completion.chunk" : "text_completion", "created", (json_int_t)q->created,
			 "model", g.o.model, "choices", choice);
}

static int sse_send(struct mg_connection *c, json_t *j)
{
	char *s = json_dumps(j, JSON_COMPACT);
	int ok = s && mg_printf(c, "data: %s\n\n", s) > 0;

	free(s);
	json_decref(j);
	return ok ? 0 : -EPIPE;
}

static int stream_tokens(struct mg_connection *c, const gen_req *q, preq *r)
{
	int32_t *toks = malloc(q->max_tokens * sizeof *toks);
	uint32_t have = 0, n;
	int fin = 0, rc = 0;
	char text[64];

	if (!toks)
		return -ENOMEM;
	mg_printf(c, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
		     "Connection: close\r\n\r\n");
	while (!fin && !rc) {
		n = wait_tokens(r, have, toks, &fin);
		for (; have < n && !rc; have++) {
			token_text(toks[have], text, sizeof text);
			rc = sse_send(c, chunk_json(q, text, have == 0, NULL));
		}
	}
	if (!rc) {
		json_t *last = chunk_json(q, NULL, 0, r->finish_reason ? r->finish_reason : "length");
		json_object_set_new(last, "usage", usage_json(q, have));
		rc = sse_send(c, last);
	}
	if (!rc && q->usage) {
		json_t *u = chunk_json(q, NULL, 0, NULL);
		json_object_set_new(u, "choices", json_array());
		json_object_set_new(u, "usage", usage_json(q, have));
		rc = sse_send(c, u);
	}
	if (!rc)
		rc = mg_printf(c, "data: [DONE]\n\n") > 0 ? 0 : -EPIPE;
	free(toks);
	return rc;
}

static int whole_response(struct mg_connection *c, const gen_req *q, preq *r)
{
	int32_t *toks = malloc(q->max_tokens * sizeof *toks);
	uint32_t have = 0;
	int fin = 0;
	char *text, piece[64];

	if (!toks)
		return -ENOMEM;
	while (!fin)
		have = wait_tokens(r, have, toks, &fin);
	text = calloc(have * 16 + 1, 1);
	for (uint32_t i = 0; text && i < have; i++) {
		token_text(toks[i], piece, sizeof piece);
		strcat(text, piece); /* words are < 16 bytes: room was sized for that */
	}
	json_t *choice = q->chat ? json_pack("{s:i,s:{s:s,s:s}}", "index", 0, "message", "role", "assistant", "content",
					     text ? text : "")
				 : json_pack("{s:i,s:s,s:n}", "index", 0, "text", text ? text : "", "logprobs");
	json_object_set_new(choice, "finish_reason", json_string(r->finish_reason ? r->finish_reason : "length"));
	send_json(c, 200,
		  json_pack("{s:s+,s:s,s:i,s:s,s:[o],s:o}", "id", q->chat ? "chatcmpl-" : "cmpl-", q->rid, "object",
			    q->chat ? "chat.completion" : "text_completion", "created", (json_int_t)q->created, "model",
			    g.o.model, "choices", choice, "usage", usage_json(q, have)));
	free(text);
	free(toks);
	return 0;
}

static int handle_generate(struct mg_connection *c, int chat)
{
	json_t *body = read_body(c);
	gen_req q = {0};
	const char *err;
	preq *r;
	int rc;

	if (!body)
		return send_error(c, 400, "body must be a JSON object");
	err = parse_gen(body, chat, &q);
	json_decref(body);
	if (err)
		return send_error(c, 400, err);
	r = submit(q.rid, q.seed, q.prompt, q.P, q.max_tokens);
	if (!r)
		return send_error(c, 503, "shutting down");
	rc = q.stream ? stream_tokens(c, &q, r) : whole_response(c, &q, r);
	release(r, rc != 0);
	return 200;
}

static int handle_tokenize(struct mg_connection *c)
{
	json_t *body = read_body(c), *arr;
	const char *text;
	char *chat = NULL;
	int32_t *ids;
	uint32_t n;

	if (!body)
		return send_error(c, 400, "body must be a JSON object");
	text = json_string_value(json_object_get(body, "prompt"));
	if (!text)
		text = json_string_value(json_object_get(body, "text"));
	if (!text && (chat = chat_text(json_object_get(body, "messages"))))
		text = chat;
	if (!text) {
		json_decref(body);
		return send_error(c, 400, "prompt must be a string (or messages an array)");
	}
	ids = malloc((strlen(text) + 1) * sizeof *ids);
	n = ids ? tokenize(text, strlen(text), ids, (uint32_t)strlen(text)) : 0;
	arr = json_array();
	for (uint32_t i = 0; i < n; i++)
		json_array_append_new(arr, json_integer(ids[i]));
	free(ids);
	free(chat);
	json_decref(body);
	return send_json(c, 200, json_pack("{s:o,s:i,s:i}", "tokens", arr, "count", (json_int_t)n, "max_model_len",
					   (json_int_t)g.o.max_ctx));
}

static int handle_detokenize(struct mg_connection *c)
{
	json_t *body = read_body(c), *toks, *v;
	size_t i;
	char piece[64];
	char *text;

	toks = body ? json_object_get(body, "tokens") : NULL;
	if (!json_is_array(toks)) {
		json_decref(body);
		return send_error(c, 400, "tokens must be an array of token ids");
	}
	text = calloc(json_array_size(toks) * 16 + 1, 1);
	json_array_foreach(toks, i, v) {
		if (!json_is_integer(v) || !text) {
			json_decref(body);
			free(text);
			return send_error(c, 400, "tokens must be an array of token ids");
		}
		token_text((int32_t)json_integer_value(v), piece, sizeof piece);
		strcat(text, piece);
	}
	json_decref(body);
	send_json(c, 200, json_pack("{s:s}", "text", text));
	free(text);
	return 200;
}

static int handle_models(struct mg_connection *c)
{
	return send_json(c, 200,
			 json_pack("{s:s,s:[{s:s,s:s,s:i,s:s,s:i}]}", "object", "list", "data", "id", g.o.model,
				   "object", "model", "created", (json_int_t)0, "owned_by", "attnx",
				   "max_model_len", (json_int_t)g.o.max_ctx));
}

static int on_request(struct mg_connection *c, void *arg)
{
	const struct mg_request_info *ri = mg_get_request_info(c);
	const char *m = ri->request_method, *u = ri->local_uri;
	int post = !strcmp(m, "POST");

	if (!strcmp(m, "GET") && !strcmp(u, "/v1/models"))
		return handle_models(c);
	if (!strcmp(m, "GET") && !strcmp(u, "/health"))
		return send_json(c, 200, json_pack("{s:s}", "status", "ok"));
	if (post && !strcmp(u, "/v1/chat/completions"))
		return handle_generate(c, 1);
	if (post && !strcmp(u, "/v1/completions"))
		return handle_generate(c, 0);
	if (post && !strcmp(u, "/v1/tokenize"))
		return handle_tokenize(c);
	if (post && !strcmp(u, "/v1/detokenize"))
		return handle_detokenize(c);
	return send_error(c, 404, "no such endpoint");
}

/* ---- set-up ------------------------------------------------------------------------------------------------- */

static int add_buffer(uint32_t kind, int32_t layer, uint32_t dtype, const uint64_t *dim, uint32_t ndim,
		      void **ptr, uint32_t *index)
{
	ax_shm_buffer b = {.kind = kind, .loc = AX_LOC_HOST, .dtype = dtype, .layer = layer, .ndim = ndim,
			   .device = -1, .scale = 1.0f};
	uint64_t stride = 1;

	for (int d = (int)ndim - 1; d >= 0; d--) {
		b.dim[d] = dim[d];
		b.stride[d] = stride;
		stride *= dim[d];
	}
	b.bytes = stride * ax_dtype_size(dtype);
	return ax_export_add_host_buffer(g.ex, &b, ptr, index);
}

static int export_open(void)
{
	const opts *o = &g.o;
	size_t es = elem_size();
	uint64_t kbytes = (uint64_t)o->slots * o->kv_heads * o->head_dim * es;
	uint64_t qbytes = (uint64_t)o->q_rows * o->q_heads * o->head_dim * es;
	uint64_t ibytes = (uint64_t)o->max_running * o->max_ctx * 4;
	ax_export_config cfg = {
		.name = o->shm, .engine = "attnx-test-producer", .model = o->model, .world_size = 1,
		.n_layers = o->layers, .n_q_heads = o->q_heads, .n_kv_heads = o->kv_heads,
		.n_q_heads_total = o->q_heads, .head_dim = o->head_dim, .q_dtype = o->dtype, .k_dtype = o->dtype,
		.scale = (float)(1.0 / sqrt((double)o->head_dim)), .max_ctx = o->max_ctx,
		.data_size = kbytes * o->layers + qbytes + ibytes + 64ull * (o->layers + 4) + 4096,
	};
	void *p;
	uint32_t idx;
	int rc = ax_export_open(&g.ex, &cfg);

	if (rc)
		return rc;
	for (uint32_t l = 0; l < o->layers; l++) {
		uint64_t dim[3] = {o->slots, o->kv_heads, o->head_dim};
		if ((rc = add_buffer(AX_BUF_K_POOL, (int32_t)l, o->dtype, dim, 3, &p, &idx)))
			return rc;
		g.kpool[l] = p;
	}
	uint64_t qdim[3] = {o->q_rows, o->q_heads, o->head_dim};
	if ((rc = add_buffer(AX_BUF_Q_RING, -1, o->dtype, qdim, 3, &p, &g.qbuf)))
		return rc;
	uint64_t idim[2] = {o->max_running, o->max_ctx};
	if ((rc = add_buffer(AX_BUF_INDEX_TOKEN, -1, AX_DTYPE_I32, idim, 2, &p, &g.ibuf)))
		return rc;
	g.index = p;
	return 0;
}

static int pools_init(void)
{
	g.free_slots = malloc(g.o.slots * sizeof *g.free_slots);
	g.free_rows = malloc(g.o.max_running * sizeof *g.free_rows);
	if (!g.free_slots || !g.free_rows)
		return -ENOMEM;
	for (uint32_t i = 0; i < g.o.slots; i++) /* top of the stack is slot 0 */
		g.free_slots[g.n_free_slots++] = (int32_t)(g.o.slots - 1 - i);
	for (uint32_t i = 0; i < g.o.max_running; i++)
		g.free_rows[g.n_free_rows++] = g.o.max_running - 1 - i;
	return 0;
}

static void usage(FILE *f)
{
	fprintf(f, "usage: attnx-test-producer [options]  (a test fixture that plays an inference engine)\n"
		   "  --listen HOST:PORT   OpenAI API address (default 127.0.0.1:8000)\n"
		   "  --shm NAME           shm segment (default " AX_SHM_DEFAULT_NAME ")\n"
		   "  --layers N (4)  --q-heads N (8)  --kv-heads N (2)  --head-dim N (64)  --dtype f32|bf16 (f32)\n"
		   "  --tokens-per-s R     decode steps per second (default 50)\n"
		   "  --slots N (16384)  --max-ctx N (4096)  --max-running N (64)  --q-rows N (8192)\n"
		   "  --threads N          HTTP worker threads = concurrent requests served (default 128)\n"
		   "  --model NAME         model id served by /v1/models (default attnx-test)\n"
		   "  -v                   debug logging\n");
}

static int parse_u32(const char *s, uint32_t lo, uint32_t hi, uint32_t *out)
{
	char *end;
	unsigned long v = strtoul(s, &end, 10);

	if (end == s || *end || v < lo || v > hi)
		return -EINVAL;
	*out = (uint32_t)v;
	return 0;
}

static int parse_opts(int argc, char **argv)
{
	static const struct option lo[] = {
		{"listen", 1, 0, 'L'}, {"shm", 1, 0, 's'}, {"layers", 1, 0, 'l'}, {"q-heads", 1, 0, 'q'},
		{"kv-heads", 1, 0, 'k'}, {"head-dim", 1, 0, 'd'}, {"dtype", 1, 0, 't'}, {"tokens-per-s", 1, 0, 'r'},
		{"slots", 1, 0, 'S'}, {"max-ctx", 1, 0, 'c'}, {"max-running", 1, 0, 'R'}, {"q-rows", 1, 0, 'Q'},
		{"threads", 1, 0, 'T'}, {"model", 1, 0, 'm'}, {"help", 0, 0, 'h'}, {0, 0, 0, 0}};
	opts *o = &g.o;
	int c, rc = 0;

	*o = (opts){"127.0.0.1:8000", AX_SHM_DEFAULT_NAME, "attnx-test", 4, 8, 2, 64, AX_DTYPE_F32,
		    16384, 4096, 64, 8192, 128, 50.0};
	while (!rc && (c = getopt_long(argc, argv, "vh", lo, NULL)) != -1) {
		switch (c) {
		case 'L': o->listen = optarg; break;
		case 's': o->shm = optarg; break;
		case 'm': o->model = optarg; break;
		case 'l': rc = parse_u32(optarg, 1, AX_SHM_MAX_LAYERS, &o->layers); break;
		case 'q': rc = parse_u32(optarg, 1, 256, &o->q_heads); break;
		case 'k': rc = parse_u32(optarg, 1, 256, &o->kv_heads); break;
		case 'd': rc = parse_u32(optarg, 1, 1024, &o->head_dim); break;
		case 'S': rc = parse_u32(optarg, 16, 1u << 24, &o->slots); break;
		case 'c': rc = parse_u32(optarg, 2, 1u << 20, &o->max_ctx); break;
		case 'R': rc = parse_u32(optarg, 1, 4096, &o->max_running); break;
		case 'Q': rc = parse_u32(optarg, 16, 1u << 22, &o->q_rows); break;
		case 'T': rc = parse_u32(optarg, 2, 1024, &o->threads); break;
		case 't':
			o->dtype = !strcmp(optarg, "f32") ? AX_DTYPE_F32 : !strcmp(optarg, "bf16") ? AX_DTYPE_BF16 : 0;
			rc = o->dtype ? 0 : -EINVAL;
			break;
		case 'r':
			o->tokens_per_s = strtod(optarg, NULL);
			rc = o->tokens_per_s > 0 && o->tokens_per_s <= 1e6 ? 0 : -EINVAL;
			break;
		case 'v': ax_log_set_level(AX_LOG_DEBUG); break;
		case 'h': usage(stdout); return 1;
		default: rc = -EINVAL;
		}
	}
	if (!rc && (o->q_heads % o->kv_heads || optind < argc))
		rc = -EINVAL;
	if (rc)
		usage(stderr);
	return rc;
}

static void on_signal(int sig) { g.stop = 1; }

static struct mg_context *http_start(void)
{
	char threads[16];
	const char *options[] = {"listening_ports", g.o.listen, "num_threads", threads, "request_timeout_ms",
				 "600000", NULL};
	struct mg_callbacks cb = {0};
	struct mg_context *ctx;

	snprintf(threads, sizeof threads, "%u", g.o.threads);
	ctx = mg_start(&cb, NULL, options);
	if (ctx)
		mg_set_request_handler(ctx, "/", on_request, NULL);
	return ctx;
}

int main(int argc, char **argv)
{
	struct sigaction sa = {.sa_handler = on_signal};
	struct mg_context *ctx = NULL;
	int rc = parse_opts(argc, argv);

	if (rc)
		return rc > 0 ? 0 : 2;
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	if ((rc = export_open()) || (rc = pools_init())) {
		ax_log(AX_LOG_ERROR, TAG, "segment %s: %s", g.o.shm, ax_strerror(rc));
		goto out;
	}
	if (pthread_create(&g.sched, NULL, scheduler, NULL)) {
		rc = -EAGAIN;
		goto out;
	}
	mg_init_library(0);
	ctx = http_start();
	if (!ctx) {
		ax_log(AX_LOG_ERROR, TAG, "cannot listen on %s", g.o.listen);
		g.stop = 1;
		rc = -EADDRINUSE;
	} else {
		ax_log(AX_LOG_INFO, TAG, "serving %s on http://%s, segment %s (%u layers, %u/%u heads, D %u, %s)",
		       g.o.model, g.o.listen, g.o.shm, g.o.layers, g.o.q_heads, g.o.kv_heads, g.o.head_dim,
		       ax_dtype_name(g.o.dtype));
	}
	while (!g.stop)
		usleep(50000);
	pthread_join(g.sched, NULL); /* aborts every request, so handlers return */
	if (ctx)
		mg_stop(ctx);
	mg_exit_library();
out:
	ax_export_close(g.ex);
	free(g.free_slots);
	free(g.free_rows);
	return rc ? 1 : 0;
}
