/*
 * bench_sender.c — a capture-shaped record sender for the feed benchmarks (scripts/bench-feed,
 * scripts/bench-relay-latency); not a test.
 *
 * It dials the relay's records address with nng PUSH, like attnx-capture, and sends `attn` records with 5 entries
 * (src "bench:<pid>", seq 0, 1, 2, ... so subscribers can count losses), batched into frames with proto's ax_batch.
 * Two modes: as fast as possible (--rate 0: frames of --batch records, blocking sends, so the relay's backpressure
 * paces it), or paced (--rate R records/s: every 100 µs the records that are due are created with `ts` = the wall
 * clock at that moment and sent at once as one frame, so `ts` is the time the record left the sender).
 * Prints what it sent and its own rate on stdout as one JSON line.
 */
#include <errno.h>
#include <math.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <nng/nng.h>
#include <nng/protocol/pipeline0/push.h>

#include "attnx_common.h"
#include "attnx_proto.h"

typedef struct sender {
	const char *addr;
	uint64_t count, rate, seq;
	uint32_t batch;
	double warmup_s;
	char src[64];
	nng_socket s;
	ax_batch b;
} sender;

static void make_record(sender *x, ax_record *r, uint64_t ts)
{
	ax_record_init(r, AX_REC_ATTN);
	r->v = AX_PROTO_VERSION;
	snprintf(r->src, sizeof r->src, "%s", x->src);
	snprintf(r->rid, sizeof r->rid, "bench-%llu", (unsigned long long)(x->seq / 1000));
	r->seq = x->seq++;
	r->ts_ns = ts;
	ax_rec_attn *a = &r->u.attn;
	a->position = 1000 + (int64_t)(r->seq % 1000);
	a->decode_step = a->position - 999;
	a->token_id = 300;
	a->layer_id = 31;
	a->mode = AX_MODE_MEAN_LOGIT;
	a->head_id = -1;
	a->k = 5;
	static const float logits[5] = {3.5f, 2.25f, 1.5f, 1.0f, 0.5f};
	double z = 0;
	for (int i = 0; i < 5; i++) {
		a->token_positions[i] = a->position - 1 - i * 7;
		a->topk_logits[i] = logits[i];
	}
	for (int i = 0; i < 5; i++)
		z += exp(logits[i]);
	for (int i = 0; i < 5; i++)
		a->attention_scores[i] = (float)(exp(logits[i]) / z);
	a->logsumexp_all = log(z) + 1.0;
	a->topk_mass = z / exp(a->logsumexp_all);
}

static int send_frame(sender *x)
{
	const uint8_t *data;
	size_t len;
	int n = ax_batch_finish(&x->b, &data, &len), rv;

	if (n <= 0)
		return n;
	if ((rv = nng_send(x->s, (void *)data, len, 0)) != 0) {
		fprintf(stderr, "bench_sender: send: %s\n", nng_strerror(rv));
		return -EIO;
	}
	return n;
}

static int run_fast(sender *x)
{
	ax_record r;
	int rc;

	while (x->seq < x->count) {
		make_record(x, &r, 0);
		rc = ax_batch_add(&x->b, &r);
		if (rc < 0)
			return rc;
		if ((rc == 1 || x->seq == x->count) && send_frame(x) < 0)
			return -EIO;
	}
	return 0;
}

static int run_paced(sender *x)
{
	uint64_t t0 = ax_now_ns();
	ax_record r;

	while (x->seq < x->count) {
		uint64_t now = ax_now_ns(), due = (uint64_t)((double)(now - t0) * 1e-9 * (double)x->rate);
		uint64_t wall = ax_wall_ns();
		while (x->seq < due && x->seq < x->count) {
			make_record(x, &r, wall);
			if (ax_batch_add(&x->b, &r) == 1 && send_frame(x) < 0)
				return -EIO;
		}
		if (send_frame(x) < 0)
			return -EIO;
		usleep(100);
	}
	return 0;
}

int main(int argc, char **argv)
{
	static const struct option lo[] = {{"addr", 1, 0, 'a'}, {"count", 1, 0, 'n'}, {"rate", 1, 0, 'r'},
					   {"batch", 1, 0, 'b'}, {"warmup", 1, 0, 'w'}, {0, 0, 0, 0}};
	sender x = {.addr = "ipc:///tmp/attnx-records.sock", .count = 1000000, .batch = 512, .warmup_s = 0.5};
	int c, rv, rc;

	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		switch (c) {
		case 'a': x.addr = optarg; break;
		case 'n': x.count = strtoull(optarg, NULL, 10); break;
		case 'r': x.rate = strtoull(optarg, NULL, 10); break;
		case 'b': x.batch = (uint32_t)strtoul(optarg, NULL, 10); break;
		case 'w': x.warmup_s = strtod(optarg, NULL); break;
		default:
			fprintf(stderr, "usage: bench_sender [--addr A] [--count N] [--rate R/s (0 = max)] [--batch B] "
					"[--warmup S]\n");
			return 2;
		}
	}
	snprintf(x.src, sizeof x.src, "bench:%d", (int)getpid());
	ax_batch_init(&x.b);
	x.b.max_records = x.batch ? x.batch : 512;
	if ((rv = nng_push0_open(&x.s)) != 0 || (rv = nng_socket_set_int(x.s, NNG_OPT_SENDBUF, 16)) != 0 ||
	    (rv = nng_dial(x.s, x.addr, NULL, 0)) != 0) {
		fprintf(stderr, "bench_sender: %s: %s\n", x.addr, nng_strerror(rv));
		return 1;
	}
	usleep((useconds_t)(x.warmup_s * 1e6)); /* let subscribers down the line connect */
	uint64_t t0 = ax_now_ns();
	rc = x.rate ? run_paced(&x) : run_fast(&x);
	double s = (double)(ax_now_ns() - t0) * 1e-9;
	printf("{\"sent\":%llu,\"seconds\":%.3f,\"records_per_s\":%.0f}\n", (unsigned long long)x.seq, s,
	       (double)x.seq / s);
	fflush(stdout);
	usleep(1000000); /* nng drops frames still queued at close: give the pipe time to drain */
	nng_close(x.s);
	ax_batch_fini(&x.b);
	return rc ? 1 : 0;
}
