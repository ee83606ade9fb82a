/*
 * engine_e2e_test.c — end to end on the real reference engine: attnx-engine (the shipped model) → attnx-capture
 * (CPU, heads mode, layers 0, 2 and the last, top-5) → attnx-relay → an OpenAI client (libcurl) and attnx-tail.
 *
 * The reference is independent of every program under test: ref_model.c recomputes the model's query and key rows
 * from the checkpoint in float64 (its own forward, no code shared with the engine's), and every attention value
 * that reaches a client is compared with the brute force over those rows. The engine runs in float32, so the
 * rows differ from float64 by rounding that grows through the layers (relative ~1e-6 per layer, measured worst
 * below); TOL = 1e-4 relative (absolute below 1) bounds that with margin while still catching any real error
 * (a wrong key, position, head, scale or layer moves values by 1e-2 and more). Top-k sets are compared up to that
 * tolerance: each reported position's reference logit must equal the reported logit, and the i-th reported logit
 * must equal the i-th largest reference logit, which pins the exact order wherever the reference has no near-tie.
 * Generation must be unchanged by capture: the test loads the engine library in-process with export off and runs
 * the same prompt greedily; the relayed stream must carry the same tokens and text. The float64 model's greedy
 * choice must agree with each generated token wherever its top-2 margin exceeds 1e-3.
 *
 * Cases, in order:
 *   stream_chat_pair     two concurrent streamed chat requests (greedy; one with logprobs) with
 *                        return_attention_tokens: chunk of token i (i ≥ 1) carries position P+i-1 complete with
 *                        every layer × head, the first chunk's prompt_attention carries P-1, token_id / text /
 *                        decode_step of every entry agree with the stream and the in-process generation, every
 *                        value equals the reference; attnx-tail's attn records of each rid cover the same
 *                        (position, layer, head) set and are equally exact;
 *   nonstream_completion a non-streamed /v1/completions request: attention_tokens positions P..P+n-2,
 *                        prompt_attention with P-1, values exact;
 *   policy_other_layers  requests asking for what the capture does not compute by default (mean_logit on layers
 *                        1 and 3 with every prompt row; mean_prob on layer 4): the relay waits for the capture to
 *                        acknowledge the policy, so every row from 0 (or P-1) on carries exactly those, exact;
 *   clean_shutdown       SIGTERM: capture, relay, engine and tail exit 0; the engine removed its segment.
 * Prompt ids come from the engine's /v1/tokenize (its tokenizer is checked against Hugging Face's in
 * engine/model_test.c). When a request ends on a stop token, the row that sampled it (P+n-1) is checked where it
 * appears but not required. Positions are those of notes/wiring.md: row p has the token AT p as its query.
 * argv: engine relay capture tail model-dir. Exits 77 (skip) when a binary is missing. Logs are in
 * /tmp/attnx-ee2e-<pid>/ (printed on failure; removed after a clean run).
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <curl/curl.h>
#include <jansson.h>

#include "attnx_engine.h"
#include "e2e_util.h"
#include "ref_model.h"

#define TOPK 5
#define TOL 1e-4
#define MAX_GEN 96
#define MAX_LAYERS 64
#define MAX_HEADS 64

enum { P_ENGINE, P_RELAY, P_CAPTURE, P_TAIL, P_N };

static struct {
	const char *bin[P_N], *model_dir;
	char dir[128], shm[64], rec[160], pol[160], feed[160];
	int eng_port, relay_port;
	ex_proc p[P_N];
	ref_model *ref;
	int layers[3], n_layers; /* the capture's layers: 0, 2, last */
	int heads;
	double worst;            /* worst relative deviation from the reference seen */
} W = {.p = {{.name = "engine"}, {.name = "relay"}, {.name = "capture"}, {.name = "tail"}}};

/* ---- one request: what is sent, the in-process generation, what came back ------------------------------------- */

typedef struct ereq {
	const char *tag, *content;
	int chat, stream, logprobs, max_tokens;
	const char *mode;       /* attention_mode asked for */
	int layers[8], n_layers; /* attention_capture_layer_ids asked for */
	int prompt_rows;        /* include_prompt_attention: every prompt row, not only P-1 */
	char rid[64];
	/* reference */
	int32_t seq[1024];      /* prompt + generated ids (in-process engine, export off) */
	int P, n_gen, stop;     /* n_gen shown tokens; stop: ended on a stop token */
	char gen_text[8192];    /* their text (special tokens skipped, as the server does) */
	char *tok_text[MAX_GEN]; /* each shown token's text */
	/* response */
	long status;
	ex_buf body;
	json_t *chunks;
	int done;
	char text_out[8192];
	int n_tok;
	/* entries: seen[p * MAX_LAYERS + layer] = bitmask of heads (bit 0 outside heads mode) */
	uint64_t *seen;
	int bad, misaligned, late, checked, foreign, texts;
} ereq;

static void ereq_init(ereq *r, const char *tag, const char *content, int chat, int stream, int max_tokens)
{
	memset(r, 0, sizeof *r);
	r->tag = tag;
	r->content = content;
	r->chat = chat;
	r->stream = stream;
	r->max_tokens = max_tokens;
	r->mode = "heads";
	memcpy(r->layers, W.layers, sizeof W.layers);
	r->n_layers = W.n_layers;
	snprintf(r->rid, sizeof r->rid, "ee2e-%d-%s", (int)getpid(), tag);
	ex_buf_init(&r->body);
	r->chunks = json_array();
}

static size_t seen_size(const ereq *r)
{
	return (size_t)(r->P + r->max_tokens + 2) * MAX_LAYERS * sizeof *r->seen;
}

static void ereq_fini(ereq *r)
{
	for (int i = 0; i < MAX_GEN; i++)
		free(r->tok_text[i]);
	ex_buf_fini(&r->body);
	json_decref(r->chunks);
	free(r->seen);
}

/* Prompt ids as the engine tokenizes them (chat template applied for chat). */
static void prompt_ids(ereq *r)
{
	char url[128];
	json_t *body = r->chat ? json_pack("{s:[{s:s,s:s}]}", "messages", "role", "user", "content", r->content)
			       : json_pack("{s:s}", "prompt", r->content);
	snprintf(url, sizeof url, "http://127.0.0.1:%d/v1/tokenize", W.eng_port);
	json_t *j = ex_http_json(url, body, 5000), *t = json_object_get(j, "tokens"), *v;
	size_t i;

	json_decref(body);
	assert_non_null(j);
	r->P = (int)json_array_size(t);
	assert_true(r->P > 0 && r->P + r->max_tokens + 1 < (int)(sizeof r->seq / sizeof r->seq[0]) &&
		    r->max_tokens <= MAX_GEN);
	json_array_foreach(t, i, v)
		r->seq[i] = (int32_t)json_integer_value(v);
	json_decref(j);
	r->seen = calloc(1, seen_size(r));
}

/* Greedy generation of the prompt by the engine library in this process, export off: what the served engine must
 * produce whatever the capture does. */
static void generate_in_process(ereq *r)
{
	ax_engine_config cfg = {.model_dir = W.model_dir, .threads = 1, .max_batch = 1, .ctx = 512, .no_export = 1};
	ax_gen_params gp = {.max_tokens = r->max_tokens, .sp = {.temperature = 0, .top_p = 1}};
	ax_engine *e;
	ax_req *q;
	ax_gen_event ev;
	char buf[256];

	assert_int_equal(ax_engine_open(&e, &cfg), 0);
	const ax_tok *tok = ax_engine_tok(e);
	assert_int_equal(ax_engine_submit(e, r->rid, r->seq, r->P, &gp, &q), 0);
	for (int fin = 0; !fin && ax_req_next(q, &ev, 30000) == 1;) {
		fin = ev.finish;
		if (ev.token < 0)
			continue;
		if (ev.stop_token) {
			r->stop = 1;
			r->seq[r->P + r->n_gen] = ev.token; /* the query token of no further row, kept for the f64 run */
			continue;
		}
		r->seq[r->P + r->n_gen++] = ev.token;
		int n = ax_tok_token_bytes(tok, ev.token, buf, sizeof buf);
		if (!r->stream || !r->logprobs)
			assert_false(ax_tok_is_special(tok, ev.token)); /* text chunks count tokens: none may be empty */
		size_t have = strlen(r->gen_text);
		if (n > (int)sizeof buf - 1)
			n = (int)sizeof buf - 1;
		buf[n > 0 ? n : 0] = 0;
		if (r->n_gen <= MAX_GEN)
			r->tok_text[r->n_gen - 1] = strdup(buf);
		if (n > 0 && !ax_tok_is_special(tok, ev.token) && have + (size_t)n < sizeof r->gen_text) {
			memcpy(r->gen_text + have, buf, (size_t)n);
			r->gen_text[have + (size_t)n] = 0;
		}
	}
	ax_req_release(q);
	ax_engine_close(e);
	assert_true(r->n_gen >= 2);
}

static char *req_body(const ereq *r)
{
	json_t *ls = json_array();
	json_t *b = json_pack("{s:s,s:i,s:b,s:f,s:s,s:b,s:i,s:s,s:b,s:b}", "model", "attnx-tiny", "max_tokens",
			      r->max_tokens, "stream", r->stream, "temperature", 0.0, "rid", r->rid,
			      "return_attention_tokens", 1, "top_k_attention", TOPK, "attention_mode", r->mode, "logprobs",
			      r->logprobs, "include_prompt_attention", r->prompt_rows);
	for (int i = 0; i < r->n_layers; i++)
		json_array_append_new(ls, json_integer(r->layers[i]));
	json_object_set_new(b, "attention_capture_layer_ids", ls);
	if (r->chat)
		json_object_set_new(b, "messages", json_pack("[{s:s,s:s}]", "role", "user", "content", r->content));
	else
		json_object_set_new(b, "prompt", json_string(r->content));
	if (!r->chat)
		json_object_del(b, "logprobs");
	char *s = json_dumps(b, JSON_COMPACT);
	json_decref(b);
	return s;
}

static void *req_run(void *arg)
{
	ereq *r = arg;
	char url[128], *body = req_body(r);

	snprintf(url, sizeof url, "http://127.0.0.1:%d/v1/%s", W.relay_port, r->chat ? "chat/completions" : "completions");
	r->status = ex_http(url, body, &r->body, 120000);
	free(body);
	return NULL;
}

/* ---- comparing one (layer, head) value set with the reference ------------------------------------------------- */

static double rel_err(double got, double want)
{
	return fabs(got - want) / fmax(1.0, fabs(want));
}

static int close_to(double got, double want)
{
	double e = rel_err(got, want);
	if (e > W.worst)
		W.worst = e;
	return e <= TOL;
}

/* The top-k reference values, best first (ties by lower position, as the capture breaks them). */
static void ref_topk(const double *s, int n, int k, double *top)
{
	int taken[TOPK] = {0};

	for (int i = 0; i < k; i++) {
		int best = -1;
		for (int j = 0; j < n; j++) {
			int used = 0;
			for (int t = 0; t < i; t++)
				used |= taken[t] == j;
			if (!used && (best < 0 || s[j] > s[best]))
				best = j;
		}
		taken[i] = best;
		top[i] = s[best];
	}
}

static int mode_of(const char *m)
{
	return !m ? -1 : !strcmp(m, "heads") ? REF_HEADS : !strcmp(m, "mean_prob") ? REF_MEAN_PROB
						  : !strcmp(m, "mean_logit") ? REF_MEAN_LOGIT : -1;
}

/* Check values v (token_positions, topk_logits, attention_scores, logsumexp_all, topk_mass) of query position p,
 * layer l, head h (-1 unless heads mode) against the reference. Returns 0 or -1 with a message. */
static int check_values(json_t *v, int p, int l, int mode, int h, const char *where)
{
	json_t *tp = json_object_get(v, "token_positions"), *lg = json_object_get(v, "topk_logits");
	json_t *sc = json_object_get(v, "attention_scores");
	double *s = malloc((size_t)(p + 1) * sizeof *s), lse, top[TOPK], zk = 0, mass = 0;
	int k = p + 1 < TOPK ? p + 1 : TOPK, rc = -1;
	const ref_shape *sh = ref_model_shape(W.ref);

	if (mode < 0 || l < 0 || l >= sh->layers || (mode == REF_HEADS && (h < 0 || h >= sh->heads))) {
		fprintf(stderr, "%s: position %d: bad layer %d / head %d / mode\n", where, p, l, h);
		goto out;
	}
	ref_scores(W.ref, l, p, mode, h, s, &lse);
	ref_topk(s, p + 1, k, top);
	if ((int)json_array_size(tp) != k || (int)json_array_size(lg) != k || (int)json_array_size(sc) != k) {
		fprintf(stderr, "%s: position %d layer %d head %d: %zu positions, expected %d\n", where, p, l, h,
			json_array_size(tp), k);
		goto out;
	}
	for (int i = 0; i < k; i++) {
		int64_t pos = json_integer_value(json_array_get(tp, (size_t)i));
		double gl = json_number_value(json_array_get(lg, (size_t)i));
		for (int t = 0; t < i; t++)
			if (json_integer_value(json_array_get(tp, (size_t)t)) == pos)
				pos = -1;
		if (pos < 0 || pos > p || !close_to(gl, s[pos]) || !close_to(gl, top[i])) {
			fprintf(stderr, "%s: position %d layer %d head %d rank %d: (pos %lld, logit %.9g); reference "
					"logit there %.9g, reference rank-%d logit %.9g\n",
				where, p, l, h, i, (long long)pos, gl, pos >= 0 && pos <= p ? s[pos] : NAN, i, top[i]);
			goto out;
		}
		zk += exp(s[pos] - top[0]);
		mass += exp(s[pos] - lse);
	}
	for (int i = 0; i < k; i++) {
		double want = exp(s[json_integer_value(json_array_get(tp, (size_t)i))] - top[0]) / zk;
		if (!close_to(json_number_value(json_array_get(sc, (size_t)i)), want)) {
			fprintf(stderr, "%s: position %d layer %d head %d: score %d is %.9g, reference %.9g\n", where, p, l,
				h, i, json_number_value(json_array_get(sc, (size_t)i)), want);
			goto out;
		}
	}
	if (!close_to(json_number_value(json_object_get(v, "logsumexp_all")), lse) ||
	    (json_object_get(v, "topk_mass") && !close_to(json_number_value(json_object_get(v, "topk_mass")), mass))) {
		fprintf(stderr, "%s: position %d layer %d head %d: logsumexp_all %.9g (ref %.9g), topk_mass %.9g (ref "
				"%.9g)\n",
			where, p, l, h, json_number_value(json_object_get(v, "logsumexp_all")), lse,
			json_number_value(json_object_get(v, "topk_mass")), mass);
		goto out;
	}
	rc = 0;
out:
	free(s);
	return rc;
}

/* ---- entries of a response --------------------------------------------------------------------------------------- */

/* Note a checked value; one of a layer the request did not ask for, or of another mode, is foreign. */
static void mark(ereq *r, int p, int l, int mode, int h)
{
	int asked = mode == mode_of(r->mode);

	for (int i = 0; asked && i < r->n_layers && r->layers[i] != l; i++)
		asked = i + 1 < r->n_layers;
	if (!asked && r->foreign++ < 3)
		fprintf(stderr, "%s: a value of layer %d, mode %d at position %d was not asked for\n", r->rid, l, mode, p);
	if (p >= 0 && p < r->P + r->max_tokens + 2 && l >= 0 && l < MAX_LAYERS && h >= 0 && h < 64)
		r->seen[(size_t)p * MAX_LAYERS + l] |= 1ull << h;
}

/* One layer's part of an entry (with its `heads` list in heads mode). */
static void check_layer(ereq *r, json_t *lv, int p, int layer_dflt, const char *where)
{
	json_t *heads = json_object_get(lv, "heads"), *hv;
	int l = json_is_integer(json_object_get(lv, "layer_id")) ? (int)json_integer_value(json_object_get(lv, "layer_id"))
								 : layer_dflt;
	int mode = mode_of(json_string_value(json_object_get(lv, "mode")));
	size_t i;

	if (mode == REF_HEADS && !json_is_array(heads)) { /* a single head's record (the feed) */
		int h = (int)json_integer_value(json_object_get(lv, "head_id"));
		r->checked++;
		if (check_values(lv, p, l, mode, h, where))
			r->bad++;
		else
			mark(r, p, l, mode, h);
		return;
	}
	if (mode != REF_HEADS) {
		r->checked++;
		if (check_values(lv, p, l, mode, -1, where))
			r->bad++;
		else
			mark(r, p, l, mode, 0);
		return;
	}
	json_array_foreach(heads, i, hv) {
		int h = (int)json_integer_value(json_object_get(hv, "head_id"));
		r->checked++;
		if (check_values(hv, p, l, mode, h, where))
			r->bad++;
		else
			mark(r, p, l, mode, h);
	}
}

/* Token id, text and decode_step of the entry at position p. */
static void check_identity(ereq *r, json_t *e, int p, const char *where)
{
	int64_t id = json_integer_value(json_object_get(e, "token_id"));
	json_t *ds = json_object_get(e, "decode_step");

	if (!json_is_integer(json_object_get(e, "token_id")) || id != r->seq[p]) {
		fprintf(stderr, "%s: position %d: token_id %lld, the token there is %d\n", where, p, (long long)id,
			r->seq[p]);
		r->bad++;
	}
	json_t *text = json_object_get(e, "text");
	r->texts += p >= r->P && json_is_string(text);
	if (p >= r->P && json_is_string(text) && strcmp(json_string_value(text), r->tok_text[p - r->P])) {
		fprintf(stderr, "%s: position %d: text '%s', the token there is '%s'\n", where, p,
			json_string_value(text), r->tok_text[p - r->P]);
		r->bad++;
	}
	if (json_is_integer(ds) && json_integer_value(ds) != (p < r->P ? 0 : p - r->P + 1)) {
		fprintf(stderr, "%s: position %d: decode_step %lld, expected %d\n", where, p, json_integer_value(ds),
			p < r->P ? 0 : p - r->P + 1);
		r->bad++;
	}
}

/* An entry (one position): every layer (the `layers` map, or the top level) and head against the reference. */
static void check_entry(ereq *r, json_t *e, const char *where)
{
	json_t *pos = json_object_get(e, "position"), *layers = json_object_get(e, "layers"), *lv;
	const char *key;
	int p = (int)json_integer_value(pos);
	int last = r->P + r->n_gen - (r->stop ? 1 : 2); /* the last row a forward ran for (it sampled the last token) */

	int first = r->prompt_rows ? 0 : r->P - 1;

	if (!json_is_integer(pos) || p < first || p > last) {
		fprintf(stderr, "%s: entry at position %lld, outside [%d, %d]\n", where, json_integer_value(pos), first,
			last);
		r->bad++;
		return;
	}
	check_identity(r, e, p, where);
	if (!json_is_object(layers)) {
		check_layer(r, e, p, -1, where);
		return;
	}
	json_object_foreach(layers, key, lv)
		check_layer(r, lv, p, atoi(key), where);
}

/* entries: a list. want: the position the chunk must carry (-1: any). */
static void check_entries(ereq *r, json_t *arr, const char *where, int want)
{
	size_t i;
	json_t *e;

	json_array_foreach(arr, i, e) {
		int p = (int)json_integer_value(json_object_get(e, "position"));
		if (want >= 0 && p != want) {
			fprintf(stderr, "%s: entry for position %d in the chunk of position %d\n", where, p, want);
			r->misaligned++;
		}
		check_entry(r, e, where);
	}
}

/* 1 when position p holds every layer (× head in heads mode) the request asked for. */
static int complete(const ereq *r, int p)
{
	int heads = mode_of(r->mode) == REF_HEADS ? W.heads : 1;
	uint64_t all = heads >= 64 ? ~0ull : (1ull << heads) - 1;

	for (int i = 0; i < r->n_layers; i++)
		if ((r->seen[(size_t)p * MAX_LAYERS + r->layers[i]] & all) != all)
			return 0;
	return 1;
}

/* Tokens of one streamed chunk: its logprobs entries when asked for (each token string must be the in-process
 * token's), else 1 when it has text. */
static int chunk_tokens(ereq *r, json_t *t, json_t *c0, const char **text)
{
	json_t *lp = json_object_get(json_object_get(c0, "logprobs"), "content"), *v;
	size_t i;

	*text = json_string_value(json_object_get(t, r->chat ? "content" : "text"));
	if (!r->logprobs)
		return *text && (*text)[0];
	json_array_foreach(lp, i, v) {
		const char *tok = json_string_value(json_object_get(v, "token"));
		int k = r->n_tok + (int)i;
		if (k >= r->n_gen || !tok || strcmp(tok, r->tok_text[k])) {
			fprintf(stderr, "%s: logprobs token %d is '%s', the engine's '%s'\n", r->rid, k, tok ? tok : "?",
				k < r->n_gen ? r->tok_text[k] : "(none)");
			r->bad++;
		}
	}
	return (int)json_array_size(lp);
}

/* Walk the chunks in order: the chunk of token i (i ≥ 1) must carry position P+i-1, complete; token 0's chunk
 * carries prompt_attention with P-1. Chunks without a token carry only late entries. */
static void check_stream(ereq *r)
{
	size_t i;
	json_t *c;

	json_array_foreach(r->chunks, i, c) {
		json_t *c0 = json_array_get(json_object_get(c, "choices"), 0);
		json_t *t = r->chat ? json_object_get(c0, "delta") : c0;
		const char *text;
		int n = chunk_tokens(r, t, c0, &text);
		json_t *pa = json_object_get(t, "prompt_attention"), *at = json_object_get(t, "attention_tokens");
		check_entries(r, pa, "prompt_attention", n && r->n_tok == 0 && !r->prompt_rows ? r->P - 1 : -1);
		check_entries(r, at, "attention_tokens", n == 1 && r->n_tok > 0 ? r->P + r->n_tok - 1 : -1);
		for (int p = r->prompt_rows ? 0 : r->P - 1; n && r->n_tok == 0 && p < r->P; p++)
			r->late += !complete(r, p);
		for (int k = 0; k < n; k++, r->n_tok++)
			if (r->n_tok > 0 && !complete(r, r->P + r->n_tok - 1))
				r->late++; /* its chunk left without the entry */
		if (text)
			strncat(r->text_out, text, sizeof r->text_out - strlen(r->text_out) - 1);
	}
}

static void check_whole(ereq *r)
{
	json_t *j = json_loads(r->body.p ? r->body.p : "", 0, NULL);
	json_t *c0 = json_array_get(json_object_get(j, "choices"), 0);
	const char *text = json_string_value(r->chat ? json_object_get(json_object_get(c0, "message"), "content")
						     : json_object_get(c0, "text"));

	assert_non_null(c0);
	check_entries(r, json_object_get(c0, "prompt_attention"), "prompt_attention", -1);
	check_entries(r, json_object_get(c0, "attention_tokens"), "attention_tokens", -1);
	r->n_tok = (int)json_integer_value(json_object_get(json_object_get(j, "usage"), "completion_tokens")) - r->stop;
	snprintf(r->text_out, sizeof r->text_out, "%s", text ? text : "");
	json_decref(j);
}

/* Every row (0 or P-1) .. P+n-2 complete; returns how many are not. */
static int missing_rows(const ereq *r)
{
	int missing = 0;

	for (int p = r->prompt_rows ? 0 : r->P - 1; p <= r->P + r->n_gen - 2; p++)
		if (!complete(r, p)) {
			if (missing++ < 5)
				fprintf(stderr, "%s: position %d lacks layers or heads\n", r->rid, p);
		}
	return missing;
}

/* attnx-tail's attn records of this rid: each exact, and together every (position, layer, head) of the rows. */
static void check_tail(ereq *r)
{
	char path[300];
	json_t *recs, *rec;
	size_t i;
	int n = 0;

	usleep(300000); /* the last frames reach the tail */
	snprintf(path, sizeof path, "%s/tail.jsonl", W.dir);
	recs = ex_jsonl_read(path);
	memset(r->seen, 0, seen_size(r));
	json_array_foreach(recs, i, rec) {
		const char *t = json_string_value(json_object_get(rec, "t")), *rid = json_string_value(json_object_get(rec, "rid"));
		if (!t || strcmp(t, "attn") || !rid || strcmp(rid, r->rid))
			continue;
		n++;
		check_entry(r, rec, "tail record");
	}
	json_decref(recs);
	int missing = missing_rows(r);
	fprintf(stderr, "%s: attnx-tail: %d attn records, %d rows incomplete, %d wrong\n", r->rid, n, missing, r->bad);
	if (missing || r->bad || r->foreign)
		fail_msg("%s: attnx-tail's records: %d rows incomplete, %d differ from the reference, %d not asked for",
			 r->rid, missing, r->bad, r->foreign);
}

/* The float64 model on the generated sequence; its greedy choice must be the engine's where it is decisive. */
static void reference_run(ereq *r)
{
	const ref_shape *sh = ref_model_shape(W.ref);
	int n = r->P + r->n_gen + r->stop, decided = 0;
	double *logits = malloc((size_t)n * sh->vocab * sizeof *logits);

	assert_int_equal(ref_model_run(W.ref, r->seq, n, logits), 0);
	for (int t = r->P - 1; t < n - 1; t++) {
		const double *lg = logits + (size_t)t * sh->vocab;
		int best = 0, second = -1;
		for (int v = 1; v < sh->vocab; v++)
			if (lg[v] > lg[best]) {
				second = best;
				best = v;
			} else if (second < 0 || lg[v] > lg[second]) {
				second = v;
			}
		if (lg[best] - lg[second] > 1e-3) {
			decided++;
			if (best != r->seq[t + 1])
				fail_msg("%s: position %d: the float64 model picks %d (margin %.3g), the engine %d", r->rid,
					 t, best, lg[best] - lg[second], r->seq[t + 1]);
		}
	}
	fprintf(stderr, "%s: P %d, %d tokens (%s); float64 greedy agrees on %d decisive positions\n", r->rid, r->P,
		r->n_gen, r->stop ? "stop" : "length", decided);
	free(logits);
}

static void prepare(ereq *r)
{
	prompt_ids(r);
	generate_in_process(r);
}

/* Everything about one finished request; the reference must be run for it first. */
static void verify(ereq *r)
{
	assert_int_equal(r->status, 200);
	if (r->stream) {
		int done;
		json_decref(r->chunks);
		r->chunks = ex_sse_parse(r->body.p, &done);
		r->done = done;
		check_stream(r);
		assert_true(r->done);
	} else {
		check_whole(r);
	}
	if (strcmp(r->text_out, r->gen_text) || r->n_tok != r->n_gen)
		fail_msg("%s: relayed text (%d tokens) '%s' differs from the in-process generation (%d tokens) '%s'",
			 r->rid, r->n_tok, r->text_out, r->n_gen, r->gen_text);
	int missing = missing_rows(r);
	fprintf(stderr, "%s: %d values checked, worst relative deviation %.2e; %d entry texts checked\n", r->rid,
		r->checked, W.worst, r->texts);
	if (r->bad || r->misaligned || r->late || missing || r->foreign) {
		ex_dump_logs(W.p, P_N, W.dir);
		fail_msg("%s: %d values differ from the reference, %d entries misaligned, %d chunks left without their "
			 "entry, %d rows incomplete, %d values not asked for",
			 r->rid, r->bad, r->misaligned, r->late, missing, r->foreign);
	}
}

/* ---- set-up and cases ------------------------------------------------------------------------------------------- */

static int start(int which, char **argv)
{
	ex_argv_free(W.p[which].argv);
	W.p[which].argv = argv;
	return ex_spawn(&W.p[which], W.dir) > 0 ? 0 : -1;
}

/* The capture computes exactly the layers and mode the requests ask for, so that a policy reaching it after the
 * request's prefill (policies travel over nng while the request goes to the engine over HTTP) changes nothing. */
static int start_capture(void)
{
	char layers[64];

	snprintf(layers, sizeof layers, "%d,%d,%d", W.layers[0], W.layers[1], W.layers[2]);
	if (start(P_CAPTURE, ex_argv(W.bin[P_CAPTURE], "--shm", W.shm, "--records", W.rec, "--policy", W.pol, "--backend",
				     "cpu", "--top-k", "5", "--layers", layers, "--mode", "heads", "--threads", "1",
				     NULL)))
		return -1;
	for (int i = 0; i < 300 && ex_alive(&W.p[P_CAPTURE]); i++) {
		if (ex_shm_consumer_ready(W.shm)) {
			usleep(800000); /* its SUB socket joins the policy feed */
			return 0;
		}
		usleep(100000);
	}
	return -1;
}

static int start_all(void)
{
	char url[160], listen[64], upstream[96];

	snprintf(listen, sizeof listen, "127.0.0.1:%d", W.eng_port);
	snprintf(upstream, sizeof upstream, "http://127.0.0.1:%d", W.eng_port);
	if (start(P_ENGINE, ex_argv(W.bin[P_ENGINE], "--model", W.model_dir, "--listen", listen, "--shm", W.shm,
				    "--threads", "1", "--max-batch", "4", "--ctx", "512", NULL)))
		return -1;
	snprintf(url, sizeof url, "http://%s/health", listen);
	if (ex_wait_http(url, 60))
		return -1;
	snprintf(listen, sizeof listen, "127.0.0.1:%d", W.relay_port);
	if (start(P_RELAY, ex_argv(W.bin[P_RELAY], "--listen", listen, "--upstream", upstream, "--records", W.rec,
				   "--policy", W.pol, "--feed", W.feed, "--attention-wait-ms", "5000", "--policy-wait-ms", "5000",
				   NULL)))
		return -1;
	snprintf(url, sizeof url, "http://%s/healthz", listen);
	if (ex_wait_http(url, 60))
		return -1;
	if (start(P_TAIL, ex_argv(W.bin[P_TAIL], "--feed", W.feed, "--type", "attn", NULL)))
		return -1;
	return start_capture();
}

static int setup(void **state)
{
	const ref_shape *sh;
	int me = (int)getpid();

	snprintf(W.dir, sizeof W.dir, "/tmp/attnx-ee2e-%d", me);
	mkdir(W.dir, 0755);
	snprintf(W.shm, sizeof W.shm, "/attnx.ee2e%d", me);
	snprintf(W.rec, sizeof W.rec, "ipc://%s/records.sock", W.dir);
	snprintf(W.pol, sizeof W.pol, "ipc://%s/policy.sock", W.dir);
	snprintf(W.feed, sizeof W.feed, "ipc://%s/feed.sock", W.dir);
	snprintf(W.p[P_TAIL].out, sizeof W.p[P_TAIL].out, "%s/tail.jsonl", W.dir);
	W.eng_port = ex_free_port();
	W.relay_port = ex_free_port();
	if (W.eng_port < 0 || W.relay_port < 0 || W.eng_port == W.relay_port) {
		fprintf(stderr, "engine e2e set-up: no two free ports (%d, %d)\n", W.eng_port, W.relay_port);
		return -1;
	}
	if (ref_model_open(&W.ref, W.model_dir)) {
		fprintf(stderr, "cannot load %s\n", W.model_dir);
		return -1;
	}
	sh = ref_model_shape(W.ref);
	W.layers[0] = 0, W.layers[1] = 2, W.layers[2] = sh->layers - 1, W.n_layers = 3;
	W.heads = sh->heads;
	if (sh->layers < 4 || sh->heads > MAX_HEADS || start_all()) {
		fprintf(stderr, "engine e2e set-up failed\n");
		ex_dump_logs(W.p, P_N, W.dir);
		return -1;
	}
	return 0;
}

static int teardown(void **state)
{
	for (int i = P_N - 1; i >= 0; i--)
		ex_proc_forget(&W.p[i]);
	shm_unlink(W.shm);
	ref_model_close(W.ref);
	W.ref = NULL;
	return 0;
}

/* Two streamed chats at once (the engine batches them); one counts tokens by text, one by logprobs. */
static void test_stream_chat_pair(void **state)
{
	ereq a, b;
	pthread_t ta, tb;

	ereq_init(&a, "add", "What is 347 + 586?", 1, 1, 64);
	ereq_init(&b, "sort", "Sort: 5 2 9 1", 1, 1, 64);
	b.logprobs = 1;
	prepare(&a);
	prepare(&b);
	pthread_create(&ta, NULL, req_run, &a);
	pthread_create(&tb, NULL, req_run, &b);
	pthread_join(ta, NULL);
	pthread_join(tb, NULL);
	ereq *both[2] = {&a, &b};
	for (int i = 0; i < 2; i++) {
		reference_run(both[i]);
		verify(both[i]);
		both[i]->bad = both[i]->foreign = 0;
		check_tail(both[i]);
	}
	ereq_fini(&a);
	ereq_fini(&b);
}

/* Policies acknowledged before the request goes upstream: requests asking for modes and layers the capture does
 * not compute by default (mean_logit on layers 1 and 3 with every prompt row; mean_prob on layer 4) get exactly
 * those from their first row on, and nothing else. */
static void test_policy_other_layers(void **state)
{
	ereq a, b;

	ereq_init(&a, "policy-ml", "What is 25 + 17?", 1, 1, 32);
	a.mode = "mean_logit";
	a.layers[0] = 1, a.layers[1] = 3, a.n_layers = 2;
	a.prompt_rows = 1;
	prepare(&a);
	req_run(&a);
	reference_run(&a);
	verify(&a);
	a.bad = a.foreign = 0;
	check_tail(&a);
	ereq_init(&b, "policy-mp", "Sort: 8 3 6", 1, 1, 32);
	b.mode = "mean_prob";
	b.layers[0] = 4, b.n_layers = 1;
	prepare(&b);
	req_run(&b);
	reference_run(&b);
	verify(&b);
	ereq_fini(&a);
	ereq_fini(&b);
}

static void test_nonstream_completion(void **state)
{
	ereq r;

	ereq_init(&r, "cmpl", "In the morning, the", 0, 0, 24);
	prepare(&r);
	req_run(&r);
	reference_run(&r);
	verify(&r);
	ereq_fini(&r);
}

static void test_clean_shutdown(void **state)
{
	char path[128];

	assert_int_equal(ex_stop(&W.p[P_CAPTURE], SIGTERM), 0);
	assert_int_equal(ex_stop(&W.p[P_RELAY], SIGTERM), 0);
	assert_int_equal(ex_stop(&W.p[P_ENGINE], SIGTERM), 0);
	assert_int_equal(ex_stop(&W.p[P_TAIL], SIGTERM), 0);
	snprintf(path, sizeof path, "/dev/shm%s", W.shm);
	assert_int_equal(access(path, F_OK), -1); /* the engine unlinked its segment */
	fprintf(stderr, "worst relative deviation from the float64 reference: %.2e (tolerance %.0e)\n", W.worst, TOL);
}

int main(int argc, char **argv)
{
	static const char *const role[P_N] = {"engine", "relay", "capture", "tail"};
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_stream_chat_pair),
		cmocka_unit_test(test_nonstream_completion),
		cmocka_unit_test(test_policy_other_layers),
		cmocka_unit_test(test_clean_shutdown),
	};
	if (argc < 6) {
		fprintf(stderr, "usage: engine_e2e_test ENGINE RELAY CAPTURE TAIL MODEL_DIR\n");
		return 2;
	}
	for (int i = 0; i < P_N; i++) {
		W.bin[i] = argv[1 + i];
		if (access(W.bin[i], X_OK)) {
			fprintf(stderr, "engine e2e: %s not built (%s): skipping\n", role[i], W.bin[i]);
			return 77;
		}
	}
	W.model_dir = argv[5];
	signal(SIGPIPE, SIG_IGN);
	curl_global_init(CURL_GLOBAL_DEFAULT);
	int rc = cmocka_run_group_tests(tests, setup, teardown);
	if (rc == 0) { /* the logs are kept only for a failed run */
		char cmd[200];
		snprintf(cmd, sizeof cmd, "rm -rf %s", W.dir);
		if (system(cmd)) {
		}
	}
	curl_global_cleanup();
	return rc;
}
