/*
 * server.c — the OpenAI-compatible HTTP front end of attnx-engine (civetweb).
 *
 * Each HTTP request runs on a civetweb worker thread: the body is read (capped), parsed with jansson and checked;
 * anything malformed gets a 4xx JSON error in the OpenAI shape ({"error": {"message", "type", "param", "code"}}).
 * A generation request is tokenized (chat messages through the model's chat template), submitted to the engine,
 * and the thread then consumes the request's event queue: the text of each token is appended (byte-level tokens
 * concatenate to the decoded text), stop strings are searched, and for streams an SSE chunk is written per token
 * — only whole UTF-8 characters, holding back a possible stop-string prefix. A failed write (client gone) cancels
 * the request. Endpoints: GET /v1/models, POST /v1/chat/completions, /v1/completions, /v1/tokenize,
 * /v1/detokenize, GET /health.
 */
#include "attnx_engine.h"

#include "attnx_common.h"

#include <civetweb.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_BODY (8u << 20)
#define MAX_STOPS 4
#define MAX_STOP_LEN 256

struct ax_server {
	struct mg_context *mg;
	ax_engine *e;
	time_t created;
};

/* ---- HTTP helpers ------------------------------------------------------------------------------------ */

static const char *status_text(int st)
{
	switch (st) {
	case 200: return "OK";
	case 400: return "Bad Request";
	case 404: return "Not Found";
	case 405: return "Method Not Allowed";
	case 413: return "Payload Too Large";
	case 500: return "Internal Server Error";
	case 503: return "Service Unavailable";
	default: return "Error";
	}
}

static int send_json(struct mg_connection *c, int st, json_t *j)
{
	char *body = json_dumps(j, JSON_COMPACT);
	json_decref(j);
	if (!body)
		return 500;
	size_t n = strlen(body);
	mg_printf(c,
		  "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n"
		  "Access-Control-Allow-Origin: *\r\n\r\n",
		  st, status_text(st), n);
	mg_write(c, body, n);
	free(body);
	return st;
}

static int send_error(struct mg_connection *c, int st, const char *msg, const char *param)
{
	const char *type = st == 404 ? "not_found_error" : st >= 500 ? "server_error" : "invalid_request_error";
	json_t *e = json_pack("{s:s,s:s,s:o,s:i}", "message", msg, "type", type, "param",
			      param ? json_string(param) : json_null(), "code", st);
	return send_json(c, st, json_pack("{s:o}", "error", e));
}

/* Read the whole body (≤ MAX_BODY). Returns a malloc'd NUL-terminated buffer or NULL (*st set). */
static char *read_body(struct mg_connection *c, size_t *len, int *st)
{
	const struct mg_request_info *ri = mg_get_request_info(c);
	long long cl = ri->content_length;
	if (cl > (long long)MAX_BODY) {
		*st = 413;
		return NULL;
	}
	size_t cap = cl >= 0 ? (size_t)cl + 1 : 65536, n = 0;
	char *buf = malloc(cap);
	while (buf) {
		if (n + 1 >= cap) {
			if (cap > MAX_BODY) {
				free(buf);
				*st = 413;
				return NULL;
			}
			char *nb = realloc(buf, cap * 2);
			if (!nb)
				break;
			buf = nb;
			cap *= 2;
		}
		int r = mg_read(c, buf + n, cap - n - 1);
		if (r <= 0)
			break;
		n += (size_t)r;
	}
	if (!buf) {
		*st = 500;
		return NULL;
	}
	buf[n] = 0;
	*len = n;
	return buf;
}

/* Replace invalid UTF-8 by U+FFFD so jansson accepts the text; a NUL byte stays (JSON strings carry it as \u0000,
 * as tokenizers' decode gives it) unless keep_nul is 0 (object keys: jansson's are C strings). Returns a malloc'd
 * string. */
static char *utf8_clean(const char *s, size_t n, size_t *out_len, int keep_nul)
{
	char *o = malloc(n * 3 + 1);
	size_t k = 0;
	for (size_t i = 0; o && i < n;) {
		unsigned char b = (unsigned char)s[i];
		int cl = b < 0x80 ? 1 : (b & 0xe0) == 0xc0 ? 2 : (b & 0xf0) == 0xe0 ? 3 : (b & 0xf8) == 0xf0 ? 4 : 0;
		int ok = cl > 0 && i + (size_t)cl <= n && !(cl == 2 && b < 0xc2);
		for (int j = 1; ok && j < cl; j++)
			ok = ((unsigned char)s[i + j] & 0xc0) == 0x80;
		if (ok && (b != 0 || keep_nul)) {
			memcpy(o + k, s + i, (size_t)cl);
			k += (size_t)cl;
			i += (size_t)cl;
		} else {
			memcpy(o + k, "\xef\xbf\xbd", 3);
			k += 3;
			i++;
		}
	}
	if (o)
		o[k] = 0;
	*out_len = k;
	return o;
}

static json_t *jstr_bytes(const char *s, size_t n)
{
	size_t k;
	char *c = utf8_clean(s, n, &k, 1);
	json_t *j = c ? json_stringn(c, k) : json_string("");
	free(c);
	return j;
}

/* Length of the longest prefix of s[0..n) that ends on a UTF-8 character boundary. */
static size_t utf8_complete(const char *s, size_t n)
{
	size_t i = n;
	int back = 0;
	while (i > 0 && back < 4 && ((unsigned char)s[i - 1] & 0xc0) == 0x80) {
		i--;
		back++;
	}
	if (i == 0)
		return n;
	unsigned char b = (unsigned char)s[i - 1];
	int cl = b < 0x80 ? 1 : (b & 0xe0) == 0xc0 ? 2 : (b & 0xf0) == 0xe0 ? 3 : (b & 0xf8) == 0xf0 ? 4 : 1;
	return (size_t)back + 1 >= (size_t)cl ? n : i - 1;
}

/* ---- request parsing --------------------------------------------------------------------------------- */

typedef struct gen_req {
	ax_gen_params gp;
	int chat, stream, include_usage, skip_special, echo;
	int lp_chat;              /* chat: logprobs true */
	int lp_ids;               /* return_tokens_as_token_ids (vLLM): logprobs tokens as "token_id:N" */
	char rid[96];
	char *stops[MAX_STOPS];
	int n_stops;
	int32_t *prompt;
	int n_prompt;
} gen_req;

static void gen_req_free(gen_req *g)
{
	for (int i = 0; i < g->n_stops; i++)
		free(g->stops[i]);
	free(g->prompt);
}

/* Number field with range check. Returns 0, or -1 after sending an error. */
static int num_field(struct mg_connection *c, json_t *b, const char *k, double lo, double hi, double *out)
{
	json_t *v = json_object_get(b, k);
	if (!v || json_is_null(v))
		return 0;
	if (!json_is_number(v) || json_number_value(v) < lo || json_number_value(v) > hi || isnan(json_number_value(v))) {
		char msg[160];
		snprintf(msg, sizeof msg, "'%s' must be a number in [%g, %g]", k, lo, hi);
		send_error(c, 400, msg, k);
		return -1;
	}
	*out = json_number_value(v);
	return 0;
}

static int parse_stops(struct mg_connection *c, json_t *b, gen_req *g)
{
	json_t *st = json_object_get(b, "stop");
	if (!st || json_is_null(st))
		return 0;
	json_t *one = json_is_string(st) ? st : NULL;
	size_t n = one ? 1 : json_is_array(st) ? json_array_size(st) : (size_t)-1;
	if (n == (size_t)-1 || n > MAX_STOPS)
		return send_error(c, 400, "'stop' must be a string or a list of at most 4 strings", "stop"), -1;
	for (size_t i = 0; i < n; i++) {
		json_t *s = one ? one : json_array_get(st, i);
		if (!json_is_string(s) || json_string_length(s) == 0 || json_string_length(s) > MAX_STOP_LEN)
			return send_error(c, 400, "'stop' entries must be non-empty strings of at most 256 bytes", "stop"), -1;
		g->stops[g->n_stops++] = strdup(json_string_value(s));
	}
	return 0;
}

static int parse_sampling(struct mg_connection *c, json_t *b, gen_req *g)
{
	double v;
	g->gp.max_tokens = 256;
	g->gp.sp.temperature = 1.0f;
	g->gp.sp.top_p = 1.0f;
	g->skip_special = 1;
	const char *mt = json_object_get(b, "max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
	v = 256;
	if (num_field(c, b, mt, 1, 1e9, &v))
		return -1;
	g->gp.max_tokens = (int)v;
	v = 1.0;
	if (num_field(c, b, "temperature", 0, 100, &v))
		return -1;
	g->gp.sp.temperature = (float)v;
	v = 1.0;
	if (num_field(c, b, "top_p", 1e-9, 1, &v))
		return -1;
	g->gp.sp.top_p = (float)v;
	v = -1;
	if (num_field(c, b, "top_k", -1, 1e9, &v))
		return -1;
	g->gp.sp.top_k = (int)v;
	json_t *seed = json_object_get(b, "seed");
	if (json_is_integer(seed)) {
		g->gp.seed = (uint64_t)json_integer_value(seed);
		g->gp.has_seed = 1;
	} else if (seed && !json_is_null(seed)) {
		return send_error(c, 400, "'seed' must be an integer", "seed"), -1;
	}
	v = 1;
	if (num_field(c, b, "n", 1, 1, &v))
		return -1;
	g->gp.ignore_eos = json_is_true(json_object_get(b, "ignore_eos"));
	if (json_is_false(json_object_get(b, "skip_special_tokens")))
		g->skip_special = 0;
	g->stream = json_is_true(json_object_get(b, "stream"));
	g->include_usage = json_is_true(json_object_get(json_object_get(b, "stream_options"), "include_usage"));
	json_t *rid = json_object_get(b, "rid");
	if (!rid)
		rid = json_object_get(b, "request_id");
	if (rid && !json_is_null(rid)) {
		if (!json_is_string(rid) || json_string_length(rid) == 0 || json_string_length(rid) >= 96)
			return send_error(c, 400, "'rid' must be a string of 1 to 95 bytes", "rid"), -1;
		snprintf(g->rid, sizeof g->rid, "%s", json_string_value(rid));
	}
	/* logprobs: chat uses a bool + top_logprobs, completions an integer */
	json_t *lp = json_object_get(b, "logprobs");
	if (g->chat) {
		g->lp_chat = json_is_true(lp);
		v = 0;
		if (num_field(c, b, "top_logprobs", 0, AX_MAX_TOP_LOGPROBS, &v))
			return -1;
		g->gp.top_logprobs = g->lp_chat ? (int)v : 0;
		g->gp.logprobs = g->lp_chat;
	} else if (lp && !json_is_null(lp)) {
		if (!json_is_integer(lp) || json_integer_value(lp) < 0 || json_integer_value(lp) > AX_MAX_TOP_LOGPROBS)
			return send_error(c, 400, "'logprobs' must be an integer in [0, 20]", "logprobs"), -1;
		g->gp.logprobs = 1;
		g->gp.top_logprobs = (int)json_integer_value(lp);
	}
	g->echo = !g->chat && json_is_true(json_object_get(b, "echo"));
	g->lp_ids = json_is_true(json_object_get(b, "return_tokens_as_token_ids"));
	return parse_stops(c, b, g);
}

/* Message content: a string, or a list of {"type": "text", "text": ...} parts (joined). malloc'd. */
static char *message_text(json_t *content)
{
	if (json_is_string(content))
		return strdup(json_string_value(content));
	if (!json_is_array(content))
		return NULL;
	size_t total = 1, i;
	json_t *part;
	json_array_foreach(content, i, part)
	{
		json_t *t = json_object_get(part, "text");
		if (!json_is_string(t))
			return NULL;
		total += json_string_length(t);
	}
	char *s = malloc(total);
	if (!s)
		return NULL;
	s[0] = 0;
	json_array_foreach(content, i, part) strcat(s, json_string_value(json_object_get(part, "text")));
	return s;
}

/* Render chat messages to token ids. Returns n or -1 after sending an error. */
static int chat_ids(struct mg_connection *c, ax_server *sv, json_t *b, int32_t **ids)
{
	json_t *msgs = json_object_get(b, "messages");
	if (!json_is_array(msgs) || json_array_size(msgs) == 0 || json_array_size(msgs) > 4096)
		return send_error(c, 400, "'messages' must be a non-empty list", "messages"), -1;
	size_t n = json_array_size(msgs);
	ax_chat_msg *m = calloc(n, sizeof *m);
	char **texts = calloc(n, sizeof *texts);
	int rc = m && texts ? 0 : -ENOMEM;
	for (size_t i = 0; !rc && i < n; i++) {
		json_t *e = json_array_get(msgs, i);
		texts[i] = message_text(json_object_get(e, "content"));
		m[i].role = json_string_value(json_object_get(e, "role"));
		m[i].content = texts[i];
		if (!m[i].role || !texts[i])
			rc = -EINVAL;
	}
	json_t *kw = json_object_get(b, "chat_template_kwargs");
	int thinking = !json_is_false(json_object_get(kw, "enable_thinking"));
	json_t *agp = json_object_get(b, "add_generation_prompt");
	char *txt = NULL;
	if (!rc)
		rc = ax_chat_render(ax_chat_style_for(ax_engine_tok(sv->e)), m, n, agp ? json_is_true(agp) : 1, thinking,
				    &txt);
	int out = -1;
	if (rc >= 0) {
		out = ax_tok_encode(ax_engine_tok(sv->e), txt, (size_t)rc, 1, ids);
		if (out < 0)
			send_error(c, 400, "messages are not valid UTF-8", "messages");
	} else {
		send_error(c, 400, "each message needs a known 'role' and a text 'content'", "messages");
	}
	free(txt);
	for (size_t i = 0; texts && i < n; i++)
		free(texts[i]);
	free(texts);
	free(m);
	return out;
}

/* Completions prompt: a string, a list of token ids, or a list holding one string. */
static int prompt_ids(struct mg_connection *c, ax_server *sv, json_t *b, int32_t **ids)
{
	json_t *p = json_object_get(b, "prompt");
	if (json_is_array(p) && json_array_size(p) == 1 && json_is_string(json_array_get(p, 0)))
		p = json_array_get(p, 0);
	if (json_is_string(p)) { /* with the post-processor's BOS (Llama 3), as vLLM's add_special_tokens default */
		int n = ax_tok_encode_prompt(ax_engine_tok(sv->e), json_string_value(p), json_string_length(p), ids);
		if (n < 0)
			send_error(c, 400, "'prompt' is not valid UTF-8", "prompt");
		return n < 0 ? -1 : n;
	}
	if (json_is_array(p) && json_array_size(p) > 0) {
		size_t n = json_array_size(p);
		*ids = malloc(n * sizeof **ids);
		int vocab = ax_engine_model_cfg(sv->e)->vocab;
		for (size_t i = 0; *ids && i < n; i++) {
			json_t *v = json_array_get(p, i);
			if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= vocab) {
				free(*ids);
				*ids = NULL;
				return send_error(c, 400, "'prompt' token ids must be integers within the vocabulary", "prompt"),
				       -1;
			}
			(*ids)[i] = (int32_t)json_integer_value(v);
		}
		return *ids ? (int)n : -1;
	}
	return send_error(c, 400, "'prompt' must be a string or a list of token ids", "prompt"), -1;
}

/* ---- generation -------------------------------------------------------------------------------------- */

typedef struct gen_out {
	char *text;          /* generated text so far */
	size_t len, cap;
	size_t sent;         /* bytes already streamed */
	int n_tokens;        /* sampled tokens (the stop token included) */
	const char *finish;
	json_t *lp_content;  /* chat: logprobs.content */
	json_t *lp_tokens, *lp_vals, *lp_top, *lp_off; /* completions */
} gen_out;

static int append(gen_out *o, const char *s, size_t n)
{
	if (o->len + n + 1 > o->cap) {
		size_t nc = (o->cap + n + 1) * 2;
		char *nt = realloc(o->text, nc);
		if (!nt)
			return -ENOMEM;
		o->text = nt;
		o->cap = nc;
	}
	memcpy(o->text + o->len, s, n);
	o->len += n;
	o->text[o->len] = 0;
	return 0;
}

static json_t *bytes_array(const char *s, int n)
{
	json_t *a = json_array();
	for (int i = 0; i < n; i++)
		json_array_append_new(a, json_integer((unsigned char)s[i]));
	return a;
}

/* The logprobs text of token id: its bytes (at most cap - 1), or "token_id:<id>" when as_id (vLLM's
 * return_tokens_as_token_ids: exact where the bytes are not valid UTF-8 on their own). Returns the length. */
static int lp_text(const ax_tok *t, int32_t id, int as_id, char *buf, int cap)
{
	if (as_id)
		return snprintf(buf, (size_t)cap, "token_id:%d", id);
	int n = ax_tok_token_bytes(t, id, buf, (size_t)cap - 1);
	return n < 0 ? 0 : n > cap - 1 ? cap - 1 : n;
}

/* Chat logprobs entry of one token, or the completions columns. */
static json_t *lp_entry(const ax_tok *t, const ax_gen_event *ev, const gen_req *g, gen_out *o, size_t offset)
{
	char buf[256];
	int n = lp_text(t, ev->token, g->lp_ids, buf, sizeof buf), chat = g->chat;
	if (chat) {
		json_t *top = json_array();
		for (int i = 0; i < ev->n_top; i++) {
			char tb[256];
			int k = lp_text(t, ev->top_ids[i], g->lp_ids, tb, sizeof tb);
			json_array_append_new(top, json_pack("{s:o,s:f,s:o}", "token", jstr_bytes(tb, (size_t)k), "logprob",
							     (double)ev->top_lps[i], "bytes", bytes_array(tb, k)));
		}
		return json_pack("{s:o,s:f,s:o,s:o}", "token", jstr_bytes(buf, (size_t)n), "logprob", (double)ev->logprob,
				 "bytes", bytes_array(buf, n), "top_logprobs", top);
	}
	json_array_append_new(o->lp_tokens, jstr_bytes(buf, (size_t)n));
	json_array_append_new(o->lp_vals, json_real(ev->logprob));
	json_t *top = json_object();
	for (int i = 0; i < ev->n_top; i++) {
		char tb[256];
		int k = lp_text(t, ev->top_ids[i], g->lp_ids, tb, sizeof tb);
		size_t cl;
		char *key = utf8_clean(tb, (size_t)k, &cl, 0);
		if (key)
			json_object_set_new(top, key, json_real(ev->top_lps[i]));
		free(key);
	}
	json_array_append_new(o->lp_top, top);
	json_array_append_new(o->lp_off, json_integer((json_int_t)offset));
	return NULL;
}

/* First stop-string match at or after `from`; returns its offset or -1. */
static long find_stop(const gen_req *g, const gen_out *o, size_t from)
{
	long best = -1;
	for (int i = 0; i < g->n_stops; i++) {
		const char *p = memmem(o->text + from, o->len - from, g->stops[i], strlen(g->stops[i]));
		if (p && (best < 0 || p - o->text < best))
			best = p - o->text;
	}
	return best;
}

static const char *finish_name(int f)
{
	return f == AX_FINISH_STOP ? "stop" : f == AX_FINISH_LENGTH ? "length" : f == AX_FINISH_ABORT ? "abort" : "error";
}

typedef struct gen_ctx {
	struct mg_connection *c;
	ax_server *sv;
	gen_req *g;
	ax_req *r;
	char id[128];
	time_t created;
} gen_ctx;

static int sse(struct mg_connection *c, json_t *j)
{
	char *s = json_dumps(j, JSON_COMPACT);
	json_decref(j);
	if (!s)
		return -1;
	int rc = mg_printf(c, "data: %s\n\n", s);
	free(s);
	return rc > 0 ? 0 : -1;
}

static json_t *usage(const gen_ctx *x, const gen_out *o)
{
	return json_pack("{s:i,s:i,s:i}", "prompt_tokens", x->g->n_prompt, "completion_tokens", o->n_tokens,
			 "total_tokens", x->g->n_prompt + o->n_tokens);
}

static json_t *chunk(const gen_ctx *x, const char *delta, size_t n, int first, const char *finish, json_t *lp)
{
	json_t *ch;
	if (x->g->chat) {
		json_t *d = json_object();
		if (first)
			json_object_set_new(d, "role", json_string("assistant"));
		if (n || first)
			json_object_set_new(d, "content", jstr_bytes(delta, n));
		ch = json_pack("{s:i,s:o,s:o,s:o}", "index", 0, "delta", d, "logprobs",
			       lp ? json_pack("{s:[o]}", "content", lp) : json_null(), "finish_reason",
			       finish ? json_string(finish) : json_null());
	} else {
		ch = json_pack("{s:i,s:o,s:o,s:o}", "index", 0, "text", jstr_bytes(delta, n), "logprobs", lp ? lp : json_null(),
			       "finish_reason", finish ? json_string(finish) : json_null());
	}
	return json_pack("{s:s,s:s,s:I,s:s,s:[o]}", "id", x->id, "object",
			 x->g->chat ? "chat.completion.chunk" : "text_completion", "created", (json_int_t)x->created,
			 "model", ax_engine_model_cfg(x->sv->e)->name, "choices", ch);
}

/* How many bytes of o->text may be streamed now: whole characters, minus a possible stop-string prefix. */
static size_t streamable(const gen_req *g, const gen_out *o, int final)
{
	size_t end = o->len;
	if (!final)
		for (int i = 0; i < g->n_stops; i++) {
			size_t sl = strlen(g->stops[i]);
			for (size_t k = sl - 1; k > 0; k--)
				if (k <= o->len && !memcmp(o->text + o->len - k, g->stops[i], k)) {
					if (o->len - k < end)
						end = o->len - k;
					break;
				}
		}
	if (end < o->sent)
		end = o->sent;
	return final ? end : o->sent + utf8_complete(o->text + o->sent, end - o->sent);
}

/* Consume events until the request finishes. Streams chunks when asked. Returns 0, or -1 if the client left. */
static int consume(gen_ctx *x, gen_out *o)
{
	const ax_tok *t = ax_engine_tok(x->sv->e);
	int first = 1;
	for (;;) {
		ax_gen_event ev;
		int rc = ax_req_next(x->r, &ev, 1000);
		if (rc == 0)
			continue;
		if (rc < 0) {
			o->finish = o->finish ? o->finish : "error";
			break;
		}
		json_t *lp = NULL;
		size_t before = o->len;
		if (ev.token >= 0) {
			o->n_tokens++;
			if (!ev.stop_token && !(x->g->skip_special && ax_tok_is_special(t, ev.token))) {
				char buf[256];
				int n = ax_tok_token_bytes(t, ev.token, buf, sizeof buf);
				if (n > 0 && append(o, buf, (size_t)(n < 256 ? n : 256)))
					ev.finish = AX_FINISH_ERROR;
			}
			if (x->g->gp.logprobs && !ev.stop_token) {
				lp = lp_entry(t, &ev, x->g, o, before);
				if (x->g->chat && !x->g->stream)
					json_array_append(o->lp_content, lp);
			}
		}
		if (x->g->n_stops && o->len > before) {
			size_t from = before >= MAX_STOP_LEN ? before - MAX_STOP_LEN : 0;
			long at = find_stop(x->g, o, from);
			if (at >= 0) {
				o->len = (size_t)at;
				o->text[o->len] = 0;
				ev.finish = AX_FINISH_STOP;
				ax_req_cancel(x->r);
			}
		}
		if (ev.finish)
			o->finish = finish_name(ev.finish);
		if (x->g->stream) {
			size_t end = streamable(x->g, o, ev.finish != 0);
			json_t *clp = x->g->chat ? lp : NULL;
			if (!x->g->chat && x->g->gp.logprobs && ev.token >= 0 && !ev.stop_token) {
				/* this token's columns go out with its chunk; start fresh ones */
				clp = json_pack("{s:o,s:o,s:o,s:o}", "tokens", o->lp_tokens, "token_logprobs", o->lp_vals,
						"top_logprobs", o->lp_top, "text_offset", o->lp_off);
				o->lp_tokens = json_array(), o->lp_vals = json_array(), o->lp_top = json_array(),
				o->lp_off = json_array();
			}
			if (end > o->sent || first || ev.finish || clp) {
				json_t *j = chunk(x, o->text ? o->text + o->sent : "", end - o->sent, first, o->finish, clp);
				first = 0;
				o->sent = end;
				if (sse(x->c, j))
					return -1;
			}
		}
		if (x->g->chat && x->g->stream == 0 && lp)
			json_decref(lp);
		if (ev.finish)
			break;
	}
	return 0;
}

static int handle_generate(struct mg_connection *c, ax_server *sv, int chat)
{
	size_t len;
	int st = 400;
	char *body = read_body(c, &len, &st);
	if (!body)
		return send_error(c, st, st == 413 ? "request body too large" : "cannot read the request body", NULL);
	json_t *b = json_loadb(body, len, 0, NULL);
	free(body);
	if (!json_is_object(b))
		return json_decref(b), send_error(c, 400, "the body must be a JSON object", NULL);
	gen_req g = {0};
	g.chat = chat;
	int n = -1;
	if (!parse_sampling(c, b, &g))
		n = chat ? chat_ids(c, sv, b, &g.prompt) : prompt_ids(c, sv, b, &g.prompt);
	json_decref(b);
	if (n < 0) {
		gen_req_free(&g);
		return 400;
	}
	g.n_prompt = n;
	gen_ctx x = {c, sv, &g, NULL, "", time(NULL)};
	int rc = n == 0 ? -EINVAL : ax_engine_submit(sv->e, g.rid[0] ? g.rid : NULL, g.prompt, n, &g.gp, &x.r);
	if (rc) {
		gen_req_free(&g);
		if (rc == -E2BIG)
			return send_error(c, 400, "the prompt is longer than the model's context", "messages");
		if (rc == -ESHUTDOWN)
			return send_error(c, 503, "the engine is shutting down", NULL);
		return send_error(c, 400, n == 0 ? "the prompt is empty" : "invalid request parameters", NULL);
	}
	snprintf(x.id, sizeof x.id, "%s-%s", chat ? "chatcmpl" : "cmpl", ax_req_rid(x.r));
	gen_out o = {0};
	o.lp_content = json_array();
	o.lp_tokens = json_array(), o.lp_vals = json_array(), o.lp_top = json_array(), o.lp_off = json_array();
	if (g.echo && !g.stream) {
		char *pt;
		int pl = ax_tok_decode(ax_engine_tok(sv->e), g.prompt, (size_t)n, 0, &pt);
		if (pl > 0)
			append(&o, pt, (size_t)pl);
		free(pt);
		o.sent = 0;
	}
	if (g.stream)
		mg_printf(c, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
			     "Access-Control-Allow-Origin: *\r\nConnection: close\r\n\r\n");
	int gone = consume(&x, &o);
	if (gone) {
		ax_req_cancel(x.r);
	} else if (g.stream) {
		if (g.include_usage) {
			json_t *u = json_pack("{s:s,s:s,s:I,s:s,s:[],s:o}", "id", x.id, "object",
					      chat ? "chat.completion.chunk" : "text_completion", "created", (json_int_t)x.created,
					      "model", ax_engine_model_cfg(sv->e)->name, "choices", "usage", usage(&x, &o));
			sse(c, u);
		}
		mg_printf(c, "data: [DONE]\n\n");
	} else {
		json_t *choice;
		json_t *text = jstr_bytes(o.text ? o.text : "", o.len);
		if (chat)
			choice = json_pack("{s:i,s:{s:s,s:o},s:o,s:s}", "index", 0, "message", "role", "assistant", "content",
					   text, "logprobs", g.gp.logprobs ? json_pack("{s:O}", "content", o.lp_content) : json_null(),
					   "finish_reason", o.finish ? o.finish : "error");
		else
			choice = json_pack("{s:i,s:o,s:o,s:s}", "index", 0, "text", text, "logprobs",
					   g.gp.logprobs ? json_pack("{s:O,s:O,s:O,s:O}", "tokens", o.lp_tokens, "token_logprobs",
								     o.lp_vals, "top_logprobs", o.lp_top, "text_offset", o.lp_off)
							 : json_null(),
					   "finish_reason", o.finish ? o.finish : "error");
		send_json(c, 200, json_pack("{s:s,s:s,s:I,s:s,s:[o],s:o}", "id", x.id, "object",
					    chat ? "chat.completion" : "text_completion", "created", (json_int_t)x.created, "model",
					    ax_engine_model_cfg(sv->e)->name, "choices", choice, "usage", usage(&x, &o)));
	}
	/* Drain to the finish so the request is released by both sides. */
	ax_req_release(x.r);
	json_decref(o.lp_content), json_decref(o.lp_tokens), json_decref(o.lp_vals), json_decref(o.lp_top),
		json_decref(o.lp_off);
	free(o.text);
	gen_req_free(&g);
	return 200;
}

/* ---- tokenize / detokenize / models ------------------------------------------------------------------ */

static json_t *read_json(struct mg_connection *c)
{
	size_t len;
	int st = 400;
	char *body = read_body(c, &len, &st);
	if (!body) {
		send_error(c, st, "cannot read the request body", NULL);
		return NULL;
	}
	json_t *b = json_loadb(body, len, 0, NULL);
	free(body);
	if (!json_is_object(b)) {
		json_decref(b);
		send_error(c, 400, "the body must be a JSON object", NULL);
		return NULL;
	}
	return b;
}

static int handle_tokenize(struct mg_connection *c, ax_server *sv)
{
	json_t *b = read_json(c);
	if (!b)
		return 400;
	int32_t *ids = NULL;
	int n = json_object_get(b, "messages") ? chat_ids(c, sv, b, &ids) : prompt_ids(c, sv, b, &ids);
	json_decref(b);
	if (n < 0)
		return 400;
	const ax_tok *t = ax_engine_tok(sv->e);
	json_t *toks = json_array(), *strs = json_array();
	for (int i = 0; i < n; i++) {
		json_array_append_new(toks, json_integer(ids[i]));
		const char *p = ax_tok_piece(t, ids[i]);
		json_array_append_new(strs, p ? jstr_bytes(p, strlen(p)) : json_string(""));
	}
	free(ids);
	return send_json(c, 200, json_pack("{s:o,s:i,s:i,s:o}", "tokens", toks, "count", n, "max_model_len",
					   ax_engine_ctx(sv->e), "token_strs", strs));
}

static int handle_detokenize(struct mg_connection *c, ax_server *sv)
{
	json_t *b = read_json(c);
	if (!b)
		return 400;
	json_t *tk = json_object_get(b, "tokens");
	const ax_tok *t = ax_engine_tok(sv->e);
	size_t n = json_array_size(tk);
	int32_t *ids = malloc((n + 1) * sizeof *ids);
	int bad = !json_is_array(tk) || !ids;
	for (size_t i = 0; !bad && i < n; i++) {
		json_t *v = json_array_get(tk, i);
		bad = !json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= ax_tok_vocab_size(t) ||
		      !ax_tok_piece(t, (int32_t)json_integer_value(v));
		if (!bad)
			ids[i] = (int32_t)json_integer_value(v);
	}
	json_decref(b);
	char *out = NULL;
	int len = bad ? -EINVAL : ax_tok_decode(t, ids, n, 0, &out);
	free(ids);
	if (len < 0)
		return send_error(c, 400, "'tokens' must be a list of token ids within the vocabulary", "tokens");
	json_t *r = json_pack("{s:o}", "prompt", jstr_bytes(out, (size_t)len));
	free(out);
	return send_json(c, 200, r);
}

static int handle_models(struct mg_connection *c, ax_server *sv)
{
	const char *name = ax_engine_model_cfg(sv->e)->name;
	return send_json(c, 200, json_pack("{s:s,s:[{s:s,s:s,s:I,s:s,s:s,s:i}]}", "object", "list", "data", "id", name,
					   "object", "model", "created", (json_int_t)sv->created, "owned_by", "attnx",
					   "root", name, "max_model_len", ax_engine_ctx(sv->e)));
}

static int route(struct mg_connection *c, void *cbdata)
{
	ax_server *sv = cbdata;
	const struct mg_request_info *ri = mg_get_request_info(c);
	const char *u = ri->local_uri ? ri->local_uri : "";
	int post = !strcmp(ri->request_method, "POST"), get = !strcmp(ri->request_method, "GET");
	if (!strcmp(ri->request_method, "OPTIONS")) {
		mg_printf(c, "HTTP/1.1 204 No Content\r\nAccess-Control-Allow-Origin: *\r\n"
			     "Access-Control-Allow-Methods: GET, POST, OPTIONS\r\n"
			     "Access-Control-Allow-Headers: Content-Type, Authorization\r\nContent-Length: 0\r\n\r\n");
		return 204;
	}
	static const struct {
		const char *path;
		int post;
	} routes[] = {{"/v1/chat/completions", 1}, {"/v1/completions", 1}, {"/v1/tokenize", 1}, {"/tokenize", 1},
		      {"/v1/detokenize", 1}, {"/detokenize", 1}, {"/v1/models", 0}, {"/health", 0}, {"/healthz", 0}};
	for (size_t i = 0; i < sizeof routes / sizeof routes[0]; i++) {
		if (strcmp(u, routes[i].path))
			continue;
		if (routes[i].post ? !post : !get)
			return send_error(c, 405, "method not allowed", NULL);
		if (!strcmp(u, "/v1/chat/completions"))
			return handle_generate(c, sv, 1);
		if (!strcmp(u, "/v1/completions"))
			return handle_generate(c, sv, 0);
		if (strstr(u, "detokenize"))
			return handle_detokenize(c, sv);
		if (strstr(u, "tokenize"))
			return handle_tokenize(c, sv);
		if (!strcmp(u, "/v1/models"))
			return handle_models(c, sv);
		return send_json(c, 200, json_pack("{s:s}", "status", "ok"));
	}
	return send_error(c, 404, "no such endpoint", NULL);
}

int ax_server_open(ax_server **out, ax_engine *e, const char *listen, int http_threads)
{
	ax_server *sv = calloc(1, sizeof *sv);
	if (!sv)
		return -ENOMEM;
	sv->e = e;
	sv->created = time(NULL);
	char threads[16];
	snprintf(threads, sizeof threads, "%d", http_threads > 0 ? http_threads : 32);
	const char *opts[] = {"listening_ports", listen, "num_threads", threads, "request_timeout_ms", "600000",
			      "enable_keep_alive", "no", NULL};
	mg_init_library(0);
	struct mg_callbacks cb;
	memset(&cb, 0, sizeof cb);
	sv->mg = mg_start(&cb, sv, opts);
	if (!sv->mg) {
		free(sv);
		mg_exit_library();
		return -EADDRINUSE;
	}
	mg_set_request_handler(sv->mg, "/", route, sv);
	*out = sv;
	return 0;
}

void ax_server_close(ax_server *sv)
{
	if (!sv)
		return;
	mg_stop(sv->mg);
	mg_exit_library();
	free(sv);
}
