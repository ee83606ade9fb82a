/*
 * tail_test.c — unit tests of attnx-tail's logic (tail_core.c): filters, seq hole detection with gap records, and
 * the recording format (a msgpack stream of frames) round trip; then, when given the attnx-tail binary as argv[1],
 * the binary itself: --replay of a recording prints the same records as JSON lines, --raw reproduces the recording
 * byte for byte, filters and --count narrow it, and a truncated recording is an error.
 */
#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include "attnx_common.h"
#include "attnx_proto.h"
#include "tail_core.h"

static const char *g_tail_bin;

/* ---- helpers ---------------------------------------------------------------------------------------------- */

static void mk_attn(ax_record *r, const char *src, uint64_t seq, const char *rid, int layer, int64_t pos)
{
	ax_record_init(r, AX_REC_ATTN);
	r->v = AX_PROTO_VERSION;
	snprintf(r->src, sizeof r->src, "%s", src);
	snprintf(r->rid, sizeof r->rid, "%s", rid);
	r->seq = seq;
	ax_rec_attn *a = &r->u.attn;
	a->position = pos;
	a->decode_step = 1;
	a->token_id = 42;
	a->layer_id = layer;
	a->mode = AX_MODE_MEAN_LOGIT;
	a->head_id = -1;
	a->k = 3;
	double z = 0;
	for (uint32_t i = 0; i < a->k; i++) {
		a->token_positions[i] = pos - (int64_t)i;
		a->topk_logits[i] = 2.0f - (float)i;
		z += exp(a->topk_logits[i]);
	}
	for (uint32_t i = 0; i < a->k; i++)
		a->attention_scores[i] = (float)(exp(a->topk_logits[i]) / z);
	a->logsumexp_all = log(z) + 0.5;
	a->topk_mass = z / exp(a->logsumexp_all);
}

static void mk_simple(ax_record *r, int type, const char *src, uint64_t seq)
{
	ax_record_init(r, type);
	r->v = AX_PROTO_VERSION;
	snprintf(r->src, sizeof r->src, "%s", src);
	r->seq = seq;
	if (type == AX_REC_END) {
		snprintf(r->rid, sizeof r->rid, "r1");
		snprintf(r->u.end.reason, sizeof r->u.end.reason, "stop");
	}
}

static void mk_gap(ax_record *r, const char *src, uint64_t seq, const char *what, uint64_t count, uint64_t from,
		   uint64_t to)
{
	mk_simple(r, AX_REC_GAP, src, seq);
	snprintf(r->u.gap.what, sizeof r->u.gap.what, "%s", what);
	snprintf(r->u.gap.reason, sizeof r->u.gap.reason, "send_full");
	r->u.gap.count = count;
	r->u.gap.from_seq = from;
	r->u.gap.to_seq = to;
}

/* ---- filters ---------------------------------------------------------------------------------------------- */

typedef struct filter_case {
	const char *name;
	const char *rids[3], *layers[3], *types[3];
	int rec_type;       /* record to match: attn (rid r1, layer 5) or another type */
	int expect;
} filter_case;

static const filter_case filter_cases[] = {
	{"no filter passes attn", {0}, {0}, {0}, AX_REC_ATTN, 1},
	{"no filter passes hello", {0}, {0}, {0}, AX_REC_HELLO, 1},
	{"rid match", {"r1"}, {0}, {0}, AX_REC_ATTN, 1},
	{"rid second value matches", {"r0", "r1"}, {0}, {0}, AX_REC_ATTN, 1},
	{"rid mismatch", {"r2"}, {0}, {0}, AX_REC_ATTN, 0},
	{"rid filter passes records without rid", {"r1"}, {0}, {0}, AX_REC_HELLO, 1},
	{"rid filter keeps end of that rid", {"r1"}, {0}, {0}, AX_REC_END, 1},
	{"layer match", {0}, {"5"}, {0}, AX_REC_ATTN, 1},
	{"layer mismatch", {0}, {"4"}, {0}, AX_REC_ATTN, 0},
	{"layer filter passes non-attn", {0}, {"5"}, {0}, AX_REC_END, 1},
	{"layer filter with type attn drops end", {0}, {"5"}, {"attn"}, AX_REC_END, 0},
	{"type match", {0}, {0}, {"attn"}, AX_REC_ATTN, 1},
	{"type one of two", {0}, {0}, {"gap", "end"}, AX_REC_END, 1},
	{"type mismatch", {0}, {0}, {"gap"}, AX_REC_ATTN, 0},
	{"all kinds match", {"r1"}, {"3", "5"}, {"attn"}, AX_REC_ATTN, 1},
	{"all kinds, rid fails", {"r9"}, {"5"}, {"attn"}, AX_REC_ATTN, 0},
};

static void test_filter_cases(void **state)
{
	for (size_t i = 0; i < AX_ARRAY_LEN(filter_cases); i++) {
		const filter_case *c = &filter_cases[i];
		ax_tail_filter f;
		ax_record r;
		memset(&f, 0, sizeof f);
		for (int j = 0; j < 3; j++) {
			if (c->rids[j])
				assert_int_equal(ax_tail_filter_add_rid(&f, c->rids[j]), 0);
			if (c->layers[j])
				assert_int_equal(ax_tail_filter_add_layer(&f, c->layers[j]), 0);
			if (c->types[j])
				assert_int_equal(ax_tail_filter_add_type(&f, c->types[j]), 0);
		}
		if (c->rec_type == AX_REC_ATTN)
			mk_attn(&r, "s", 0, "r1", 5, 10);
		else
			mk_simple(&r, c->rec_type, "s", 0);
		if (ax_tail_filter_match(&f, &r) != c->expect)
			fail_msg("filter case '%s': expected %d", c->name, c->expect);
		assert_int_equal(ax_tail_filter_active(&f), c->rids[0] || c->layers[0] || c->types[0]);
	}
}

static void test_filter_bad_values(void **state)
{
	ax_tail_filter f;
	char longrid[AX_PROTO_STR + 8];
	static const char *bad_layers[] = {"", "x", "-1", "3x", "99999999999"};

	memset(&f, 0, sizeof f);
	for (size_t i = 0; i < AX_ARRAY_LEN(bad_layers); i++)
		assert_int_equal(ax_tail_filter_add_layer(&f, bad_layers[i]), -EINVAL);
	assert_int_equal(ax_tail_filter_add_type(&f, "bogus"), -EINVAL);
	assert_int_equal(ax_tail_filter_add_rid(&f, ""), -EINVAL);
	memset(longrid, 'a', sizeof longrid - 1);
	longrid[sizeof longrid - 1] = 0;
	assert_int_equal(ax_tail_filter_add_rid(&f, longrid), -EINVAL);
	for (int i = 0; i < AX_TAIL_MAX_FILTER; i++)
		assert_int_equal(ax_tail_filter_add_layer(&f, "1"), 0);
	assert_int_equal(ax_tail_filter_add_layer(&f, "1"), -ENOSPC);
	assert_int_equal(ax_tail_filter_active(&f), 1);
}

/* ---- seq holes -------------------------------------------------------------------------------------------- */

typedef struct hole_log {
	int n;
	uint64_t from[16], to[16];
	char src[16][16];
} hole_log;

static void log_hole(const char *src, uint64_t from, uint64_t to, void *arg)
{
	hole_log *l = arg;
	if (l->n < 16) {
		snprintf(l->src[l->n], sizeof l->src[0], "%s", src);
		l->from[l->n] = from;
		l->to[l->n] = to;
	}
	l->n++;
}

/* One event of a scenario: a record (attn with seq, or a gap) at time t_ms, or an expiry at t_ms. */
enum { EV_REC = 1, EV_GAP, EV_GAPN, EV_EXPIRE, EV_FLUSH };
typedef struct seq_ev {
	int kind;
	const char *src;
	uint64_t seq, from, to; /* EV_GAP: seq of the gap record, range [from, to); EV_GAPN: `from` = count */
	uint64_t t_ms;
} seq_ev;

typedef struct seq_case {
	const char *name;
	seq_ev ev[12];
	int holes;                 /* reported holes expected */
	uint64_t from0, to0;       /* first reported hole */
	uint64_t covered, late, dups, restarts; /* counters of source "a" */
} seq_case;

static const seq_case seq_cases[] = {
	{"in order",
	 {{EV_REC, "a", 5}, {EV_REC, "a", 6}, {EV_REC, "a", 7}, {EV_FLUSH}}, 0, 0, 0, 0, 0, 0, 0},
	{"hole reported after grace",
	 {{EV_REC, "a", 0}, {EV_REC, "a", 3, .t_ms = 10}, {EV_EXPIRE, .t_ms = 500}, {EV_EXPIRE, .t_ms = 1011}},
	 1, 1, 3, 0, 0, 0, 0},
	{"hole not reported before grace",
	 {{EV_REC, "a", 0}, {EV_REC, "a", 3, .t_ms = 10}, {EV_EXPIRE, .t_ms = 900}}, 0, 0, 0, 0, 0, 0, 0},
	{"gap range covers hole",
	 {{EV_REC, "a", 0}, {EV_REC, "a", 3}, {EV_GAP, "a", 4, 1, 3}, {EV_FLUSH}}, 0, 0, 0, 2, 0, 0, 0},
	{"gap range covers part",
	 {{EV_REC, "a", 0}, {EV_REC, "a", 5}, {EV_GAP, "a", 6, 1, 3}, {EV_FLUSH}}, 1, 3, 5, 2, 0, 0, 0},
	{"gap range in the middle splits",
	 {{EV_REC, "a", 0}, {EV_REC, "a", 9}, {EV_GAP, "a", 10, 3, 5}, {EV_FLUSH}}, 2, 1, 3, 2, 0, 0, 0},
	{"gap count covers oldest",
	 {{EV_REC, "a", 0}, {EV_REC, "a", 3}, {EV_REC, "a", 6}, {EV_GAPN, "a", 7, 3}, {EV_FLUSH}}, 1, 5, 6, 3, 0, 0,
	 0},
	{"gap of another source covers nothing",
	 {{EV_REC, "a", 0}, {EV_REC, "a", 3}, {EV_REC, "b", 0}, {EV_GAP, "b", 1, 1, 3}, {EV_FLUSH}}, 1, 1, 3, 0, 0,
	 0, 0},
	{"late record fills hole",
	 {{EV_REC, "a", 0}, {EV_REC, "a", 2}, {EV_REC, "a", 1}, {EV_FLUSH}}, 0, 0, 0, 0, 1, 0, 0},
	{"late record splits hole",
	 {{EV_REC, "a", 0}, {EV_REC, "a", 4}, {EV_REC, "a", 2}, {EV_FLUSH}}, 2, 1, 2, 0, 1, 0, 0},
	{"duplicate",
	 {{EV_REC, "a", 0}, {EV_REC, "a", 1}, {EV_REC, "a", 1}, {EV_FLUSH}}, 0, 0, 0, 0, 0, 1, 0},
	{"restart re-bases",
	 {{EV_REC, "a", 100000}, {EV_REC, "a", 0}, {EV_REC, "a", 1}, {EV_FLUSH}}, 0, 0, 0, 0, 0, 0, 1},
	{"sources independent",
	 {{EV_REC, "a", 0}, {EV_REC, "b", 7}, {EV_REC, "a", 1}, {EV_REC, "b", 8}, {EV_FLUSH}}, 0, 0, 0, 0, 0, 0, 0},
	{"first record mid-stream is no hole", {{EV_REC, "a", 12345}, {EV_FLUSH}}, 0, 0, 0, 0, 0, 0, 0},
};

static void run_seq_case(const seq_case *c)
{
	ax_tail_seq t;
	hole_log log = {0};
	ax_record r;

	ax_tail_seq_init(&t, log_hole, &log);
	for (int i = 0; i < 12 && c->ev[i].kind; i++) {
		const seq_ev *e = &c->ev[i];
		uint64_t now = e->t_ms * 1000000ull;
		switch (e->kind) {
		case EV_REC: mk_attn(&r, e->src, e->seq, "r", 0, 3); break;
		case EV_GAP: mk_gap(&r, e->src, e->seq, "records", e->to - e->from, e->from, e->to); break;
		case EV_GAPN: mk_gap(&r, e->src, e->seq, "records", e->from, 0, 0); break;
		}
		if (e->kind <= EV_GAPN)
			assert_int_equal(ax_tail_seq_observe(&t, &r, now), 0);
		else
			ax_tail_seq_expire(&t, now, e->kind == EV_FLUSH);
	}
	if (log.n != c->holes)
		fail_msg("seq case '%s': %d holes reported, expected %d", c->name, log.n, c->holes);
	if (c->holes && (log.from[0] != c->from0 || log.to[0] != c->to0))
		fail_msg("seq case '%s': first hole [%llu,%llu), expected [%llu,%llu)", c->name,
			 (unsigned long long)log.from[0], (unsigned long long)log.to[0], (unsigned long long)c->from0,
			 (unsigned long long)c->to0);
	const ax_tail_src *a = ax_tail_seq_find(&t, "a");
	assert_non_null(a);
	if (a->covered != c->covered || a->late != c->late || a->dups != c->dups || a->restarts != c->restarts)
		fail_msg("seq case '%s': covered %llu late %llu dups %llu restarts %llu", c->name,
			 (unsigned long long)a->covered, (unsigned long long)a->late, (unsigned long long)a->dups,
			 (unsigned long long)a->restarts);
	assert_int_equal(a->holes, (uint64_t)c->holes);
	ax_tail_seq_fini(&t);
}

static void test_seq_cases(void **state)
{
	for (size_t i = 0; i < AX_ARRAY_LEN(seq_cases); i++)
		run_seq_case(&seq_cases[i]);
}

/* More holes than the pending table holds: the oldest are reported early, none is lost from the accounting. */
static void test_seq_pending_full(void **state)
{
	ax_tail_seq t;
	hole_log log = {0};
	ax_record r;
	uint64_t seq = 0;

	ax_tail_seq_init(&t, log_hole, &log);
	for (int i = 0; i < AX_TAIL_MAX_PENDING + 5; i++) {
		mk_attn(&r, "a", seq, "r", 0, 3);
		assert_int_equal(ax_tail_seq_observe(&t, &r, 0), 0);
		seq += 2; /* every other seq missing */
	}
	assert_int_equal(log.n, 4); /* 69 records open 68 holes; 64 fit the pending table */
	ax_tail_seq_expire(&t, 0, 1);
	const ax_tail_src *a = ax_tail_seq_find(&t, "a");
	assert_int_equal(a->holes, AX_TAIL_MAX_PENDING + 4);
	assert_int_equal(a->lost, AX_TAIL_MAX_PENDING + 4);
	assert_int_equal(a->records, AX_TAIL_MAX_PENDING + 5);
	ax_tail_seq_fini(&t);
}

/* ---- recordings ------------------------------------------------------------------------------------------- */

/* Three frames of 2, 3 and 1 records, concatenated: the recording format. */
static void build_stream(ax_buf *stream, int *n_records)
{
	ax_batch b;
	const uint8_t *data;
	size_t len;
	static const int per_frame[] = {2, 3, 1};
	uint64_t seq = 0;
	ax_record r;

	ax_batch_init(&b);
	for (size_t f = 0; f < AX_ARRAY_LEN(per_frame); f++) {
		for (int i = 0; i < per_frame[f]; i++) {
			if (seq == 4)
				mk_simple(&r, AX_REC_END, "cap", seq);
			else
				mk_attn(&r, "cap", seq, "r1", (int)(seq % 2), (int64_t)(10 + seq));
			seq++;
			assert_true(ax_batch_add(&b, &r) >= 0);
		}
		assert_int_equal(ax_batch_finish(&b, &data, &len), per_frame[f]);
		assert_int_equal(ax_buf_append(stream, data, len), 0);
	}
	*n_records = (int)seq;
	ax_batch_fini(&b);
}

typedef struct collect {
	int n;
	uint64_t seq[16];
	int type[16];
	int64_t pos[16];
} collect;

static int collect_cb(const ax_record *r, void *arg)
{
	collect *c = arg;
	if (c->n < 16) {
		c->seq[c->n] = r->seq;
		c->type[c->n] = r->type;
		c->pos[c->n] = r->type == AX_REC_ATTN ? r->u.attn.position : -1;
	}
	c->n++;
	return 0;
}

static void test_recording_round_trip(void **state)
{
	ax_buf s;
	collect c = {0};
	size_t off = 0, n;
	int frames = 0, total;

	ax_buf_init(&s);
	build_stream(&s, &total);
	while (ax_tail_next_frame(s.data + off, s.len - off, &n) == 1) {
		assert_true(ax_frame_decode(s.data + off, n, collect_cb, &c) > 0);
		off += n;
		frames++;
	}
	assert_int_equal(off, s.len);
	assert_int_equal(frames, 3);
	assert_int_equal(c.n, total);
	for (int i = 0; i < c.n; i++) {
		assert_int_equal(c.seq[i], (uint64_t)i);
		assert_int_equal(c.type[i], i == 4 ? AX_REC_END : AX_REC_ATTN);
		if (i != 4)
			assert_int_equal(c.pos[i], 10 + i);
	}
	ax_buf_fini(&s);
}

static void test_recording_truncated_and_garbage(void **state)
{
	ax_buf s;
	size_t n, first;
	int total;
	static const uint8_t garbage[] = {0xc1, 0x00, 0x01}; /* 0xc1 is never valid msgpack */

	ax_buf_init(&s);
	build_stream(&s, &total);
	assert_int_equal(ax_tail_next_frame(s.data, s.len, &first), 1);
	/* every strict prefix of the first frame is incomplete, never an error and never a frame */
	for (size_t cut = 0; cut < first; cut++)
		assert_int_equal(ax_tail_next_frame(s.data, cut, &n), 0);
	assert_int_equal(ax_tail_next_frame(garbage, sizeof garbage, &n), -EBADMSG);
	ax_buf_fini(&s);
}

static void test_frame_wrap(void **state)
{
	ax_buf body, frame;
	ax_record r;
	collect c = {0};

	ax_buf_init(&body);
	ax_buf_init(&frame);
	for (int i = 0; i < 20; i++) { /* 20 > 15: needs the array16 header, not a fixarray */
		mk_attn(&r, "x", (uint64_t)i, "r", 1, 100);
		assert_int_equal(ax_record_pack(&r, &body), 0);
	}
	assert_int_equal(ax_tail_frame_wrap(&body, 20, &frame), 0);
	assert_int_equal(ax_frame_decode(frame.data, frame.len, collect_cb, &c), 20);
	assert_int_equal(c.seq[15], 15);
	ax_buf_reset(&frame);
	ax_buf_reset(&body);
	assert_int_equal(ax_tail_frame_wrap(&body, 0, &frame), 0);
	assert_int_equal(ax_frame_decode(frame.data, frame.len, collect_cb, &c), 0);
	ax_buf_fini(&frame);
	ax_buf_fini(&body);
}

/* ---- the binary ------------------------------------------------------------------------------------------- */

static char *write_stream_file(const ax_buf *s, size_t len)
{
	char *path = strdup("/tmp/attnx-tail-test-XXXXXX");
	int fd = mkstemp(path);
	assert_true(fd >= 0);
	assert_int_equal(write(fd, s->data, len), (ssize_t)len);
	close(fd);
	return path;
}

/* Run attnx-tail with `args`; capture stdout into *out; return the exit status. */
static int run_tail(const char *args, ax_buf *out)
{
	char cmd[1024];
	char chunk[4096];
	size_t n;

	snprintf(cmd, sizeof cmd, "'%s' %s 2>/dev/null", g_tail_bin, args);
	FILE *p = popen(cmd, "r");
	assert_non_null(p);
	while ((n = fread(chunk, 1, sizeof chunk, p)) > 0)
		assert_int_equal(ax_buf_append(out, chunk, n), 0);
	int st = pclose(p);
	return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static int count_lines_check(const ax_buf *out, int want_type)
{
	int n = 0;
	size_t start = 0;

	for (size_t i = 0; i < out->len; i++) {
		if (out->data[i] != '\n')
			continue;
		json_error_t err;
		json_t *j = json_loadb((const char *)out->data + start, i - start, 0, &err);
		if (!j)
			fail_msg("line %d is not JSON: %s", n, err.text);
		const char *t = json_string_value(json_object_get(j, "t"));
		assert_non_null(t);
		if (want_type)
			assert_string_equal(t, ax_rec_type_name(want_type));
		assert_true(json_is_integer(json_object_get(j, "seq")));
		json_decref(j);
		start = i + 1;
		n++;
	}
	assert_int_equal(start, out->len); /* every line ends with a newline */
	return n;
}

typedef struct bin_case {
	const char *name;
	const char *args;  /* after --replay FILE */
	int status;
	int lines;         /* JSON lines expected, -1 = raw (output must equal the recording) */
	int type;          /* every line's type, 0 = any */
} bin_case;

static const bin_case bin_cases[] = {
	{"replay prints every record", "", 0, 6, 0},
	{"type filter", "--type end", 0, 1, AX_REC_END},
	{"layer filter", "--layer 1", 0, 4, 0},
	{"layer and type filter", "--layer 1 --type attn", 0, 3, AX_REC_ATTN},
	{"rid filter", "--rid r1 --type attn", 0, 5, AX_REC_ATTN},
	{"count", "--count 2", 0, 2, 0},
	{"raw is the recording", "--raw", 0, -1, 0},
	{"bad option", "--layer x", 2, 0, 0},
};

static void test_binary(void **state)
{
	ax_buf s, out;
	int total;

	if (!g_tail_bin)
		skip();
	ax_buf_init(&s);
	build_stream(&s, &total);
	char *path = write_stream_file(&s, s.len);
	for (size_t i = 0; i < AX_ARRAY_LEN(bin_cases); i++) {
		const bin_case *c = &bin_cases[i];
		char args[512];
		ax_buf_init(&out);
		snprintf(args, sizeof args, "--replay %s %s", path, c->args);
		int st = run_tail(args, &out);
		if (st != c->status)
			fail_msg("binary case '%s': status %d, expected %d", c->name, st, c->status);
		if (c->lines < 0) {
			assert_int_equal(out.len, s.len);
			assert_memory_equal(out.data, s.data, s.len);
		} else if (c->status == 0) {
			int n = count_lines_check(&out, c->type);
			if (n != c->lines)
				fail_msg("binary case '%s': %d lines, expected %d", c->name, n, c->lines);
		}
		ax_buf_fini(&out);
	}
	unlink(path);
	free(path);
	/* a recording cut in the middle of its last frame: the complete frames print, then status 1 */
	path = write_stream_file(&s, s.len - 3);
	char args[512];
	snprintf(args, sizeof args, "--replay %s", path);
	ax_buf_init(&out);
	assert_int_equal(run_tail(args, &out), 1);
	assert_int_equal(count_lines_check(&out, 0), 5);
	ax_buf_fini(&out);
	unlink(path);
	free(path);
	ax_buf_fini(&s);
}

int main(int argc, char **argv)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_filter_cases),
		cmocka_unit_test(test_filter_bad_values),
		cmocka_unit_test(test_seq_cases),
		cmocka_unit_test(test_seq_pending_full),
		cmocka_unit_test(test_recording_round_trip),
		cmocka_unit_test(test_recording_truncated_and_garbage),
		cmocka_unit_test(test_frame_wrap),
		cmocka_unit_test(test_binary),
	};
	g_tail_bin = argc > 1 ? argv[1] : NULL;
	return cmocka_run_group_tests(tests, NULL, NULL);
}
