/*
 * gen_corpus.c — writes the seed corpus of tests/fuzz/fuzz_record: one valid frame per record type (and variant),
 * a mixed frame, and a few broken frames (truncated, trailing byte, wrong root, huge length claims, a missing
 * field). Usage: proto_gen_corpus DIR. A dev tool; its output is committed under tests/fuzz/corpus/record/.
 */
#include "attnx_proto.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

static int write_file(const char *dir, const char *name, const void *p, size_t n)
{
	char path[512];
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	FILE *f = fopen(path, "wb");
	if (!f || fwrite(p, 1, n, f) != n) {
		perror(path);
		if (f)
			fclose(f);
		return -EIO;
	}
	return fclose(f) ? -EIO : 0;
}

static void base(ax_record *r, int type, const char *rid)
{
	ax_record_init(r, type);
	strcpy(r->src, "capture:gen:1:0");
	r->seq = 7;
	r->ts_ns = 1700000000000000000ull;
	if (rid)
		strcpy(r->rid, rid);
}

static void make(ax_record *r, int which)
{
	static int32_t prompt[6] = {1, 2, 300, 70000, 5, 0};
	switch (which) {
	case 0:
		base(r, AX_REC_HELLO, NULL);
		strcpy(r->u.hello.engine, "attnx-engine"), strcpy(r->u.hello.model, "tiny"), strcpy(r->u.hello.backend, "cpu");
		r->u.hello.world_size = 1, r->u.hello.n_layers = 4, r->u.hello.n_q_heads = 4, r->u.hello.n_kv_heads = 2;
		r->u.hello.head_dim = 64, r->u.hello.top_k = 5, r->u.hello.mode = AX_MODE_MEAN_LOGIT;
		r->u.hello.n_layer_ids = 1, r->u.hello.layer_ids[0] = 3, r->u.hello.generation = 99;
		break;
	case 1:
		base(r, AX_REC_REQ, "ax-00000000000000aa");
		r->u.req.prompt = prompt, r->u.req.prompt_len = 6;
		break;
	case 2: case 3: {
		base(r, AX_REC_ATTN, "ax-00000000000000aa");
		ax_rec_attn *a = &r->u.attn;
		a->position = 6, a->decode_step = 1, a->token_id = 5, a->layer_id = 3, a->k = 3;
		a->mode = which == 2 ? AX_MODE_MEAN_LOGIT : AX_MODE_HEADS, a->head_id = which == 2 ? -1 : 2;
		a->prefill = which == 3;
		static const float l[3] = {2.0f, 1.0f, 1.0f}, s[3] = {0.5761169f, 0.21194156f, 0.21194156f};
		static const int64_t p[3] = {0, 1, 6};
		for (int i = 0; i < 3; i++)
			a->topk_logits[i] = l[i], a->attention_scores[i] = s[i], a->token_positions[i] = p[i];
		a->logsumexp_all = 3.0, a->topk_mass = 0.6;
		break;
	}
	case 4:
		base(r, AX_REC_END, "ax-00000000000000aa");
		strcpy(r->u.end.reason, "stop"), r->u.end.tokens = 9;
		break;
	case 5:
		base(r, AX_REC_GAP, "ax-00000000000000aa");
		strcpy(r->u.gap.what, "records"), strcpy(r->u.gap.reason, "send_full");
		r->u.gap.count = 3, r->u.gap.from_seq = 4, r->u.gap.to_seq = 7;
		break;
	case 6:
		base(r, AX_REC_STATS, NULL);
		r->u.stats.n = 2, strcpy(r->u.stats.kv[0].name, "sent"), r->u.stats.kv[0].value = 10;
		strcpy(r->u.stats.kv[1].name, "dropped"), r->u.stats.kv[1].value = 1;
		break;
	case 7:
		base(r, AX_REC_POLICY, "ax-00000000000000aa");
		r->u.policy.top_k = 10, r->u.policy.mode = AX_MODE_HEADS, r->u.policy.stride = 1, r->u.policy.prompt = 1;
		r->u.policy.n_layer_ids = 2, r->u.policy.layer_ids[0] = 0, r->u.policy.layer_ids[1] = 3;
		r->u.policy.n_head_ids = 1, r->u.policy.head_ids[0] = 2, r->u.policy.ttl_ms = 60000;
		break;
	}
}

static const char *const names[] = {"hello", "req", "attn", "attn_heads", "end", "gap", "stats", "policy"};

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: %s DIR\n", argv[0]);
		return 2;
	}
	const char *dir = argv[1];
	ax_batch all;
	ax_batch_init(&all);
	int rc = 0;
	for (int w = 0; w < 8 && rc == 0; w++) {
		ax_record r;
		ax_batch one;
		const uint8_t *p;
		size_t n;
		char name[64];
		make(&r, w);
		ax_batch_init(&one);
		if (ax_batch_add(&one, &r) < 0 || ax_batch_add(&all, &r) < 0)
			return 1;
		ax_batch_finish(&one, &p, &n);
		snprintf(name, sizeof(name), "valid_%s", names[w]);
		rc = write_file(dir, name, p, n);
		if (w == 2 && rc == 0) {
			rc = write_file(dir, "broken_truncated_attn", p, n - 3);
			uint8_t t[1024];
			memcpy(t, p, n), t[n] = 0xc0;
			rc = rc ? rc : write_file(dir, "broken_trailing_byte", t, n + 1);
			rc = rc ? rc : write_file(dir, "broken_map_root", p + 1, n - 1);
		}
		ax_batch_fini(&one);
	}
	const uint8_t *p;
	size_t n;
	ax_batch_finish(&all, &p, &n);
	rc = rc ? rc : write_file(dir, "valid_mixed", p, n);
	rc = rc ? rc : write_file(dir, "broken_huge_array", "\xdd\xff\xff\xff\xff\x80", 6);
	rc = rc ? rc : write_file(dir, "broken_huge_str", "\x91\x81\xa1t\xdb\xff\xff\xff\xff", 9);
	rc = rc ? rc : write_file(dir, "broken_no_tokens", "\x91\x85\xa1t\xa3" "end\xa1v\x01\xa3src\xa1s\xa3seq\x01\xa3rid\xa1r", 28);
	ax_batch_fini(&all);
	return rc ? 1 : 0;
}
