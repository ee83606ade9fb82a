/*
 * reqparse_test.c — request parsing and policy building: every attnx field, the rid rules, and the bodies a
 * client gets a 400 for (bad JSON, not an object, wrong types, out-of-range values, duplicate keys).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "relay_int.h"

static int parse(const char *body, ax_reqinfo *info, json_t **out)
{
	char *up = NULL, err[256] = "";
	size_t n = 0;
	int rc = ax__req_parse(AX_RK_CHAT, body, strlen(body), "ax-gen", info, &up, &n, err, sizeof err);
	if (rc == 0) {
		assert_non_null(up);
		assert_int_equal(n, strlen(up));
		*out = json_loads(up, 0, NULL);
		assert_non_null(*out);
	} else {
		assert_null(up);
		assert_true(strlen(err) > 0); /* the client is told why */
	}
	free(up);
	return rc;
}

static void full_policy(void **state)
{
	ax_reqinfo in;
	json_t *o;
	const char *b = "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"stream\":true,"
			"\"return_attention_tokens\":true,\"top_k_attention\":10,\"attention_capture_layer_ids\":[3,7],"
			"\"attention_capture_head_ids\":[0,1,2],\"attention_mode\":\"heads\","
			"\"include_prompt_attention\":true,\"attention_tokens_stride\":2,\"attention_tokens_max\":100}";
	assert_int_equal(parse(b, &in, &o), 0);
	assert_true(in.stream);
	assert_true(in.attention);
	assert_string_equal(in.rid, "ax-gen");
	assert_int_equal(in.policy.top_k, 10);
	assert_int_equal(in.policy.n_layer_ids, 2);
	assert_int_equal(in.policy.layer_ids[1], 7);
	assert_int_equal(in.policy.n_head_ids, 3);
	assert_int_equal(in.policy.mode, AX_MODE_HEADS);
	assert_int_equal(in.policy.prompt, 1);
	assert_int_equal(in.policy.stride, 2);
	assert_int_equal(in.policy.max_tokens, 100);
	/* the upstream body keeps every field and gains the rid */
	assert_string_equal(json_string_value(json_object_get(o, "rid")), "ax-gen");
	assert_true(json_is_true(json_object_get(o, "return_attention_tokens")));
	assert_int_equal(json_array_size(json_object_get(o, "messages")), 1);
	json_decref(o);
}

static void defaults_and_single_layer(void **state)
{
	ax_reqinfo in;
	json_t *o;
	assert_int_equal(parse("{\"prompt\":\"x\",\"attention_capture_layer_id\":3}", &in, &o), 0);
	assert_false(in.stream);
	assert_false(in.attention);
	assert_int_equal(in.policy.top_k, 0); /* capture default */
	assert_int_equal(in.policy.mode, 0);
	assert_int_equal(in.policy.n_layer_ids, 1);
	assert_int_equal(in.policy.layer_ids[0], 3);
	json_decref(o);
}

static void client_rid(void **state)
{
	ax_reqinfo in;
	json_t *o;
	assert_int_equal(parse("{\"rid\":\"mine-1\"}", &in, &o), 0);
	assert_string_equal(in.rid, "mine-1");
	json_decref(o);
	/* unusable rids (not a string, empty, spaces, too long) are replaced */
	const char *bad[] = {"{\"rid\":5}", "{\"rid\":\"\"}", "{\"rid\":\"a b\"}",
			     "{\"rid\":\"0123456789012345678901234567890123456789012345678901234567890123456789"
			     "01234567890123456789012345678\"}"};
	for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
		assert_int_equal(parse(bad[i], &in, &o), 0);
		assert_string_equal(in.rid, "ax-gen");
		assert_string_equal(json_string_value(json_object_get(o, "rid")), "ax-gen");
		json_decref(o);
	}
}

static const struct {
	const char *body;
	int rc;
} bad_cases[] = {
	{"", -EBADMSG},
	{"{\"model\":", -EBADMSG},
	{"[1,2]", -EBADMSG},
	{"\"text\"", -EBADMSG},
	{"{\"a\":1,\"a\":2}", -EBADMSG},
	{"{\"stream\":\"yes\"}", -EINVAL},
	{"{\"return_attention_tokens\":1}", -EINVAL},
	{"{\"top_k_attention\":0}", -EINVAL},
	{"{\"top_k_attention\":65}", -EINVAL},
	{"{\"top_k_attention\":\"10\"}", -EINVAL},
	{"{\"top_k_attention\":2.5}", -EINVAL},
	{"{\"attention_capture_layer_ids\":[\"a\"]}", -EINVAL},
	{"{\"attention_capture_layer_ids\":{\"a\":1}}", -EINVAL},
	{"{\"attention_capture_layer_ids\":[-1]}", -EINVAL},
	{"{\"attention_capture_head_ids\":[-1]}", -EINVAL},
	{"{\"attention_mode\":\"max\"}", -EINVAL},
	{"{\"attention_mode\":3}", -EINVAL},
	{"{\"include_prompt_attention\":\"true\"}", -EINVAL},
	{"{\"attention_tokens_stride\":0}", -EINVAL},
	{"{\"attention_tokens_max\":-1}", -EINVAL},
};

static void bad_bodies(void **state)
{
	for (size_t i = 0; i < sizeof bad_cases / sizeof *bad_cases; i++) {
		ax_reqinfo in;
		json_t *o = NULL;
		int rc = parse(bad_cases[i].body, &in, &o);
		if (rc != bad_cases[i].rc)
			fail_msg("case %zu (%s): rc %d, want %d", i, bad_cases[i].body, rc, bad_cases[i].rc);
	}
}

static void too_many_layers(void **state)
{
	char b[2048] = "{\"attention_capture_layer_ids\":[";
	for (int i = 0; i < 129; i++)
		strcat(b, i ? ",1" : "1");
	strcat(b, "]}");
	ax_reqinfo in;
	json_t *o;
	assert_int_equal(parse(b, &in, &o), -EINVAL);
}

static void rids_unique(void **state)
{
	char a[AX_PROTO_STR], b[AX_PROTO_STR];
	ax__rid_new(a);
	ax__rid_new(b);
	assert_int_equal(strlen(a), 19);
	assert_memory_equal(a, "ax-", 3);
	assert_string_not_equal(a, b);
}

/* Non-streamed attention requests get logprobs upstream (for the entries' token texts) unless the client asked;
 * streams and plain requests are left alone. */
static const struct {
	int kind;
	const char *body;
	int added;
	const char *lp; /* the upstream body's "logprobs", as JSON */
} lp_cases[] = {
	{AX_RK_CHAT, "{\"return_attention_tokens\":true}", 1, "true"},
	{AX_RK_CHAT, "{\"return_attention_tokens\":true,\"logprobs\":false}", 1, "true"},
	{AX_RK_CHAT, "{\"return_attention_tokens\":true,\"logprobs\":true,\"top_logprobs\":2}", 0, "true"},
	{AX_RK_CHAT, "{\"return_attention_tokens\":true,\"stream\":true}", 0, NULL},
	{AX_RK_CHAT, "{\"stream\":false}", 0, NULL},
	{AX_RK_COMPLETION, "{\"return_attention_tokens\":true,\"prompt\":\"x\"}", 1, "0"},
	{AX_RK_COMPLETION, "{\"return_attention_tokens\":true,\"logprobs\":null}", 1, "0"},
	{AX_RK_COMPLETION, "{\"return_attention_tokens\":true,\"logprobs\":3}", 0, "3"},
};

static void logprobs_for_texts(void **state)
{
	for (size_t i = 0; i < sizeof lp_cases / sizeof *lp_cases; i++) {
		ax_reqinfo in;
		char *up = NULL, err[128];
		size_t n;
		const char *b = lp_cases[i].body;
		assert_int_equal(ax__req_parse(lp_cases[i].kind, b, strlen(b), "ax-gen", &in, &up, &n, err, sizeof err), 0);
		json_t *o = json_loads(up, 0, NULL), *lp = json_object_get(o, "logprobs");
		assert_non_null(o);
		if (in.lp_added != lp_cases[i].added)
			fail_msg("case %zu (%s): lp_added %d", i, b, in.lp_added);
		if (!lp_cases[i].lp) {
			assert_true(!lp || json_is_false(lp) || json_is_null(lp));
		} else {
			char *got = json_dumps(lp, JSON_ENCODE_ANY);
			if (!got || strcmp(got, lp_cases[i].lp))
				fail_msg("case %zu (%s): logprobs %s, want %s", i, b, got ? got : "?", lp_cases[i].lp);
			free(got);
		}
		json_decref(o);
		free(up);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(full_policy),     cmocka_unit_test(defaults_and_single_layer),
		cmocka_unit_test(client_rid),      cmocka_unit_test(bad_bodies),
		cmocka_unit_test(too_many_layers), cmocka_unit_test(rids_unique),
		cmocka_unit_test(logprobs_for_texts),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
