/*
 * reqparse.c — reads an OpenAI chat/completions request body, checks the attnx fields and builds the policy the
 * relay announces to captures before it forwards the request.
 *
 * The body is parsed with jansson; it must be a JSON object. The attnx fields are optional, but when present they
 * must have the right type and range (a wrong type is the client's bug, answered with 400 rather than silently
 * ignored). The relay keeps every field in the body it forwards (attnx-engine and SGLang ignore what they do not
 * know) and adds "rid" (and, for non-streamed attention requests, "logprobs": see add_logprobs). Request ids are "ax-" + 16 hex digits from a random base plus an atomic counter.
 */
#include "relay_int.h"

#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "attnx_common.h"

static int fail(char *err, size_t errlen, int code, const char *fmt, const char *field)
{
	if (err && errlen)
		snprintf(err, errlen, fmt, field);
	return code;
}

/* Optional boolean: 0 absent, else writes *v. */
static int opt_bool(json_t *o, const char *key, int *v, char *err, size_t errlen)
{
	json_t *j = json_object_get(o, key);
	if (!j || json_is_null(j))
		return 0;
	if (!json_is_boolean(j))
		return fail(err, errlen, -EINVAL, "'%s' must be a boolean", key);
	*v = json_is_true(j);
	return 0;
}

/* Optional integer in [lo, hi]. */
static int opt_int(json_t *o, const char *key, json_int_t lo, json_int_t hi, uint32_t *v, char *err, size_t errlen)
{
	json_t *j = json_object_get(o, key);
	if (!j || json_is_null(j))
		return 0;
	if (!json_is_integer(j) || json_integer_value(j) < lo || json_integer_value(j) > hi)
		return fail(err, errlen, -EINVAL, "'%s' must be an integer in range", key);
	*v = (uint32_t)json_integer_value(j);
	return 0;
}

/* Optional int list (a single integer is a list of one). `lo` is the smallest id allowed. */
static int opt_list(json_t *o, const char *key, json_int_t lo, int32_t *ids, uint32_t *n, char *err, size_t errlen)
{
	json_t *j = json_object_get(o, key);
	if (!j || json_is_null(j))
		return 0;
	if (json_is_integer(j)) {
		if (json_integer_value(j) < lo || json_integer_value(j) > 1000000)
			return fail(err, errlen, -EINVAL, "'%s' out of range", key);
		ids[0] = (int32_t)json_integer_value(j);
		*n = 1;
		return 0;
	}
	if (!json_is_array(j) || json_array_size(j) > AX_PROTO_MAX_LIST)
		return fail(err, errlen, -EINVAL, "'%s' must be a list of at most 128 integers", key);
	size_t i;
	json_t *e;
	json_array_foreach(j, i, e) {
		if (!json_is_integer(e) || json_integer_value(e) < lo || json_integer_value(e) > 1000000)
			return fail(err, errlen, -EINVAL, "'%s' must be a list of integers in range", key);
		ids[i] = (int32_t)json_integer_value(e);
	}
	*n = (uint32_t)json_array_size(j);
	return 0;
}

static int parse_mode(json_t *o, uint32_t *mode, char *err, size_t errlen)
{
	json_t *j = json_object_get(o, "attention_mode");
	if (!j || json_is_null(j))
		return 0;
	int m = json_is_string(j) ? ax_mode_parse(json_string_value(j)) : -EINVAL;
	if (m < 0)
		return fail(err, errlen, -EINVAL, "'%s' must be one of mean_logit, mean_prob, heads", "attention_mode");
	*mode = (uint32_t)m;
	return 0;
}

/* The attnx fields → policy. Names follow the seed (top_k_attention) and its server flags
 * (--attention-tokens-stride / --attention-tokens-max). */
static int build_policy(json_t *o, ax_reqinfo *info, char *err, size_t errlen)
{
	ax_rec_policy *p = &info->policy;
	int rc, prompt = 0;
	memset(p, 0, sizeof *p);
	if ((rc = opt_int(o, "top_k_attention", 1, AX_PROTO_MAX_TOPK, &p->top_k, err, errlen)) ||
	    (rc = opt_int(o, "attention_tokens_stride", 1, 1 << 20, &p->stride, err, errlen)) ||
	    (rc = opt_int(o, "attention_stride", 1, 1 << 20, &p->stride, err, errlen)) ||
	    (rc = opt_int(o, "attention_tokens_max", 0, UINT32_MAX, &p->max_tokens, err, errlen)) ||
	    (rc = opt_int(o, "attention_max_tokens", 0, UINT32_MAX, &p->max_tokens, err, errlen)) ||
	    (rc = opt_list(o, "attention_capture_layer_id", 0, p->layer_ids, &p->n_layer_ids, err, errlen)) ||
	    (rc = opt_list(o, "attention_capture_layer_ids", 0, p->layer_ids, &p->n_layer_ids, err, errlen)) ||
	    (rc = opt_list(o, "attention_capture_head_ids", 0, p->head_ids, &p->n_head_ids, err, errlen)) ||
	    (rc = parse_mode(o, &p->mode, err, errlen)) ||
	    (rc = opt_bool(o, "include_prompt_attention", &prompt, err, errlen)))
		return rc;
	p->prompt = (uint32_t)prompt;
	return 0;
}

static int usable_rid(json_t *j)
{
	if (!json_is_string(j))
		return 0;
	const char *s = json_string_value(j);
	size_t n = strlen(s);
	if (n == 0 || n >= AX_PROTO_STR)
		return 0;
	for (size_t i = 0; i < n; i++)
		if (s[i] < 0x21 || s[i] > 0x7e)
			return 0;
	return 1;
}

/* Non-streamed attention requests need each generated token's text for their entries; the upstream's logprobs
 * carry exactly that (the engine's own token strings, one per sampled token, in order), so ask for them when the
 * client did not. A client value that already asks is left alone. */
static int add_logprobs(json_t *o, int kind, ax_reqinfo *info)
{
	json_t *lp = json_object_get(o, "logprobs");
	if (!info->attention || info->stream)
		return 0;
	if (kind == AX_RK_CHAT && !json_is_true(lp)) {
		info->lp_added = 1;
		return json_object_set_new(o, "logprobs", json_true());
	}
	if (kind == AX_RK_COMPLETION && (!lp || json_is_null(lp))) {
		info->lp_added = 1;
		return json_object_set_new(o, "logprobs", json_integer(0));
	}
	return 0;
}

int ax__req_parse(int kind, const char *body, size_t len, const char *gen_rid, ax_reqinfo *info, char **out,
		  size_t *out_len, char *err, size_t errlen)
{
	json_error_t jerr;
	memset(info, 0, sizeof *info);
	*out = NULL;
	*out_len = 0;
	json_t *o = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);
	if (!o) {
		if (err)
			snprintf(err, errlen, "invalid JSON body: %s (line %d)", jerr.text, jerr.line);
		return -EBADMSG;
	}
	int rc = -EBADMSG;
	if (!json_is_object(o)) {
		fail(err, errlen, rc, "%s", "request body must be a JSON object");
		goto done;
	}
	if ((rc = opt_bool(o, "stream", &info->stream, err, errlen)) ||
	    (rc = opt_bool(o, "return_attention_tokens", &info->attention, err, errlen)) ||
	    (rc = build_policy(o, info, err, errlen)))
		goto done;
	json_t *r = json_object_get(o, "rid");
	snprintf(info->rid, sizeof info->rid, "%s", usable_rid(r) ? json_string_value(r) : gen_rid);
	rc = -ENOMEM;
	if (json_object_set_new(o, "rid", json_string(info->rid)) || add_logprobs(o, kind, info))
		goto done;
	*out = json_dumps(o, JSON_COMPACT);
	if (!*out)
		goto done;
	*out_len = strlen(*out);
	rc = 0;
done:
	json_decref(o);
	return rc;
}

static uint64_t rid_base;
static atomic_uint_fast64_t rid_counter;

/* pthread_once needs a plain function: 8 random bytes, or time and pid when /dev/urandom is missing. */
static void rid_seed(void)
{
	int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
	if (fd < 0 || read(fd, &rid_base, sizeof rid_base) != (ssize_t)sizeof rid_base)
		rid_base = ax_wall_ns() ^ ((uint64_t)getpid() << 40);
	if (fd >= 0)
		close(fd);
}

void ax__rid_new(char out[AX_PROTO_STR])
{
	static pthread_once_t once = PTHREAD_ONCE_INIT;
	pthread_once(&once, rid_seed);
	uint64_t v = rid_base + atomic_fetch_add(&rid_counter, 1) * 0x9e3779b97f4a7c15ull;
	snprintf(out, AX_PROTO_STR, "ax-%016llx", (unsigned long long)v);
}
