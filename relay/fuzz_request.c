/*
 * fuzz_request.c — libFuzzer target for everything the relay parses from clients and the upstream: request bodies
 * (ax__req_parse), WebSocket subscribe messages (ax__filter_parse), upstream SSE streams fed through the merge
 * (split at a fuzzer-chosen point, with a few attention records), and non-streamed upstream bodies.
 * The first input byte picks the parser. Seed corpus: relay/fuzz_corpus/request/.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "relay_int.h"

static int sink(int what, const char *text, size_t len, void *arg)
{
	(void)what, (void)text, (void)len, (void)arg;
	return 0;
}

static int to_merge(const char *d, size_t n, void *arg)
{
	return ax__merge_chunk(arg, d, n, 0) < 0;
}

static void merge_inputs(ax_merge *m)
{
	for (int64_t p = 3; p < 8; p++) {
		ax_rec_attn a;
		memset(&a, 0, sizeof a);
		a.position = p;
		a.layer_id = (int32_t)(p & 1);
		a.head_id = -1;
		a.mode = AX_MODE_MEAN_LOGIT;
		a.k = 1;
		a.attention_scores[0] = 1;
		ax__merge_add(m, &a);
	}
}

static void fuzz_stream(const uint8_t *d, size_t n, int kind)
{
	ax_merge_cfg cfg = {.kind = kind, .stream = 1, .expected = 2, .wait_ns = 10};
	ax_merge *m = ax__merge_new(&cfg);
	ax_sse s;
	size_t cut = n ? d[0] % (n + 1) : 0;
	if (!m)
		return;
	ax__sse_init(&s);
	merge_inputs(m);
	ax__sse_feed(&s, (const char *)d, cut, to_merge, m);
	ax__merge_poll(m, 5, sink, NULL);
	ax__merge_set_prompt_len(m, 4);
	ax__sse_feed(&s, (const char *)d + cut, n - cut, to_merge, m);
	ax__sse_finish(&s, to_merge, m);
	ax__merge_upstream_done(m, 6);
	ax__merge_poll(m, 100, sink, NULL);
	ax__sse_fini(&s);
	ax__merge_free(m);
}

static void fuzz_body(const uint8_t *d, size_t n)
{
	ax_merge_cfg cfg = {.kind = AX_RK_CHAT, .expected = 1, .wait_ns = 10};
	ax_merge *m = ax__merge_new(&cfg);
	char *out = NULL;
	size_t len;
	uint64_t dl;
	if (!m)
		return;
	merge_inputs(m);
	if (ax__merge_body(m, (const char *)d, n, 0, 0) == 0 && ax__merge_body_take(m, 100, &out, &len, &dl) > 0)
		free(out);
	ax__merge_free(m);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 1)
		return 0;
	const char *p = (const char *)data + 1;
	size_t n = size - 1;
	char err[256], *out = NULL;
	size_t olen;
	ax_reqinfo info;
	ax_filter f;
	switch (data[0] % 5) {
	case 0:
		if (ax__req_parse(data[0] & 8 ? AX_RK_CHAT : AX_RK_COMPLETION, p, n, "ax-fuzz", &info, &out, &olen, err,
				  sizeof err) == 0)
			free(out);
		break;
	case 1:
		ax__filter_parse(p, n, &f, err, sizeof err);
		break;
	case 2:
		fuzz_stream(data + 1, n, AX_RK_CHAT);
		break;
	case 3:
		fuzz_stream(data + 1, n, AX_RK_COMPLETION);
		break;
	default:
		fuzz_body(data + 1, n);
	}
	return 0;
}
