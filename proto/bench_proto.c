/*
 * bench_proto.c — records per second through ax_batch (pack), ax_frame_decode (decode) and decode + ax_record_json
 * per record into one buffer per frame (what attnx-tail does), with the records the capture sends most: 5-entry
 * mean_logit attn records with computed (not round) scores, in frames of 512. Usage: bench_proto [records [FILE]]
 * (default 1,000,000; FILE: also write the frames there, a recording for `attnx-tail --replay FILE`, e.g. under
 * perf). A dev tool, not a test: it prints, it does not judge. Numbers go in proto/README.md.
 */
#include "attnx_common.h"
#include "attnx_proto.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void make_attn(ax_record *r, uint64_t i)
{
	ax_record_init(r, AX_REC_ATTN);
	strcpy(r->src, "capture:bench:1:0");
	strcpy(r->rid, "ax-0123456789abcdef");
	r->seq = i;
	r->ts_ns = 1700000000000000000ull + i;
	ax_rec_attn *a = &r->u.attn;
	a->position = 1000 + (int64_t)(i % 1000), a->decode_step = (int64_t)(i % 1000), a->token_id = 1234;
	a->layer_id = (int32_t)(i % 28), a->mode = AX_MODE_MEAN_LOGIT, a->k = 5;
	double z = 0;
	for (uint32_t j = 0; j < 5; j++)
		z += exp(-0.5 * j);
	for (uint32_t j = 0; j < 5; j++) {
		a->token_positions[j] = (int64_t)(j * 97 % 1000);
		a->topk_logits[j] = 4.0f - 0.37f * (float)j - 0.001f * (float)(i % 97);
		a->attention_scores[j] = (float)(exp(-0.5 * j) / z);
	}
	a->logsumexp_all = 7.25 + 1e-3 * (double)(i % 89), a->topk_mass = 0.3 + 1e-4 * (double)(i % 83);
}

struct frames {
	ax_buf all;     /* every frame, back to back */
	size_t *offs;   /* frame i spans offs[i]..offs[i+1] */
	size_t n;
};

static int count_cb(const ax_record *r, void *arg)
{
	*(uint64_t *)arg += (uint64_t)r->u.attn.k;
	return 0;
}

static int json_cb(const ax_record *r, void *arg)
{
	ax_buf *b = arg;
	return ax_record_json(r, b) || ax_buf_append(b, "\n", 1) ? -ENOMEM : 0;
}

int main(int argc, char **argv)
{
	uint64_t n = argc > 1 ? strtoull(argv[1], NULL, 10) : 1000000;
	ax_record r;
	ax_batch bt;
	struct frames fr = {.offs = calloc(n / 512 + 2, sizeof(size_t))};
	ax_buf_init(&fr.all);
	ax_batch_init(&bt);
	make_attn(&r, 12345); /* non-round numbers, like a real capture */
	/* frames are copied into one pre-faulted buffer, so the timing is not about growing it */
	if (ax_buf_reserve(&fr.all, n * 400 + 4096) < 0)
		return 1;
	memset(fr.all.data, 0, fr.all.cap);
	uint64_t t0 = ax_now_ns();
	for (uint64_t i = 0; i < n; i++) {
		r.seq = i;
		int full = ax_batch_add(&bt, &r);
		if (full < 0) {
			fprintf(stderr, "ax_batch_add: %s\n", ax_strerror(full));
			return 1;
		}
		if (full || i + 1 == n) {
			const uint8_t *p;
			size_t len;
			ax_batch_finish(&bt, &p, &len);
			if (ax_buf_append(&fr.all, p, len) < 0)
				return 1;
			fr.offs[++fr.n] = fr.all.len;
		}
	}
	uint64_t t1 = ax_now_ns();
	if (argc > 2) {
		FILE *rec = fopen(argv[2], "wb");
		if (!rec || fwrite(fr.all.data, 1, fr.all.len, rec) != fr.all.len || fclose(rec)) {
			perror(argv[2]);
			return 1;
		}
		t1 = ax_now_ns();
	}
	uint64_t entries = 0, got = 0;
	for (size_t f = 0; f < fr.n; f++) {
		int rc = ax_frame_decode(fr.all.data + fr.offs[f], fr.offs[f + 1] - fr.offs[f], count_cb, &entries);
		if (rc < 0) {
			fprintf(stderr, "ax_frame_decode: %s\n", ax_strerror(rc));
			return 1;
		}
		got += (uint64_t)rc;
	}
	uint64_t t2 = ax_now_ns();
	ax_buf text;
	size_t text_bytes = 0;
	ax_buf_init(&text);
	for (size_t f = 0; f < fr.n; f++) {
		ax_buf_reset(&text);
		if (ax_frame_decode(fr.all.data + fr.offs[f], fr.offs[f + 1] - fr.offs[f], json_cb, &text) < 0)
			return 1;
		text_bytes += text.len;
	}
	uint64_t t3 = ax_now_ns();
	ax_buf_fini(&text);
	printf("records %llu, frames %zu, %.1f bytes/record\n", (unsigned long long)n, fr.n, (double)fr.all.len / n);
	printf("pack   (ax_batch_add + finish): %.0f records/s\n", n / ((t1 - t0) / 1e9));
	printf("decode (ax_frame_decode):       %.0f records/s (%llu records, %llu entries)\n", got / ((t2 - t1) / 1e9),
	       (unsigned long long)got, (unsigned long long)entries);
	printf("decode + ax_record_json:        %.0f records/s (%.1f bytes of JSON/record)\n", got / ((t3 - t2) / 1e9),
	       (double)text_bytes / (double)got);
	ax_batch_fini(&bt);
	ax_buf_fini(&fr.all);
	free(fr.offs);
	return got == n ? 0 : 1;
}
