/*
 * tail.c — attnx-tail: the relay's record feed as JSON lines, msgpack, or a recording.
 *
 * It dials the relay's nng PUB feed with a SUB socket (subscribed to everything), decodes every frame with proto
 * (ax_frame_decode), tracks `seq` holes per source over ALL records (tail_core.c), then prints the records that
 * pass the filters: one JSON object per line (ax_record_json), or with --raw a msgpack stream on stdout. Output
 * is collected per frame and written with one write(2), so a fast feed costs one system call per frame, not per
 * line. --record FILE appends every received frame verbatim (the file is a plain concatenation of msgpack arrays);
 * --replay FILE reads such a file instead of the socket. The main loop receives with a 100 ms timeout so signals,
 * --timeout and the hole grace period are checked without threads.
 *
 * Exit status: 0 done (signal, --count reached, end of replay, or idle --timeout without --count), 1 runtime
 * error, 2 usage error, 3 --timeout before --count records were shown.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nng/nng.h>
#include <nng/protocol/pubsub0/sub.h>

#include "attnx_common.h"
#include "attnx_proto.h"
#include "tail_core.h"

#define DEFAULT_FEED "ipc:///tmp/attnx-feed.sock"
#define OUT_FLUSH (256u << 10) /* write stdout when this much is pending, and after every frame */

typedef struct tail {
	/* options */
	const char *feed, *record_path, *replay_path;
	int raw, stats, verbose;
	uint64_t count_max;   /* 0 = unlimited */
	uint64_t timeout_ms;  /* idle timeout, 0 = none */
	ax_tail_filter filter;
	/* state */
	ax_tail_seq seq;
	ax_buf out;           /* pending stdout bytes */
	ax_buf body;          /* --raw with filters: records packed for the current frame */
	uint32_t body_count;
	FILE *record;
	uint64_t shown, frames, bad_frames, bad_records;
	uint64_t frame_ns;    /* ax_now_ns() when the current frame arrived (one clock read per frame) */
	int out_dead;         /* stdout closed (EPIPE) */
	int err;              /* first fatal error */
} tail;

static volatile sig_atomic_t g_stop;

static void on_signal(int sig) { g_stop = sig; }

static void usage(FILE *f)
{
	fprintf(f,
		"usage: attnx-tail [options]\n"
		"Print the attnx record feed as JSON lines (one record per line).\n"
		"  --feed ADDR      nng address of the relay's PUB feed (default " DEFAULT_FEED ")\n"
		"  --rid R          only records of request R (repeatable)\n"
		"  --layer N        only attn records of layer N (repeatable)\n"
		"  --type T         only records of type T: hello req attn end gap stats policy (repeatable)\n"
		"  --raw            write a msgpack stream (concatenated frames) to stdout instead of JSON\n"
		"  --record FILE    append every received frame to FILE (a msgpack stream; replay with --replay)\n"
		"  --replay FILE    read frames from FILE ('-' = stdin) instead of the feed\n"
		"  --count N        exit after N records were shown\n"
		"  --timeout MS     exit when no frame arrived for MS ms (status 3 if --count was not reached)\n"
		"  --stats          print per-source seq accounting on stderr at exit\n"
		"  -v, --verbose    log connection and decode errors\n"
		"  -h, --help\n"
		"Filters apply to what is shown; --record keeps whole frames. seq holes that no gap record covers\n"
		"are reported on stderr.\n");
}

static int parse_u64(const char *s, uint64_t *out)
{
	char *end;

	errno = 0;
	*out = strtoull(s, &end, 10);
	return (errno || end == s || *end || s[0] == '-') ? -EINVAL : 0;
}

static int parse_args(tail *t, int argc, char **argv)
{
	static const struct option opts[] = {
		{"feed", 1, 0, 'f'}, {"rid", 1, 0, 'r'}, {"layer", 1, 0, 'l'}, {"type", 1, 0, 't'},
		{"raw", 0, 0, 'R'}, {"record", 1, 0, 'o'}, {"replay", 1, 0, 'p'}, {"count", 1, 0, 'n'},
		{"timeout", 1, 0, 'T'}, {"stats", 0, 0, 's'}, {"verbose", 0, 0, 'v'}, {"help", 0, 0, 'h'},
		{0, 0, 0, 0}};
	int c, rc = 0;

	while ((c = getopt_long(argc, argv, "vh", opts, NULL)) != -1) {
		switch (c) {
		case 'f': t->feed = optarg; break;
		case 'r': rc = ax_tail_filter_add_rid(&t->filter, optarg); break;
		case 'l': rc = ax_tail_filter_add_layer(&t->filter, optarg); break;
		case 't': rc = ax_tail_filter_add_type(&t->filter, optarg); break;
		case 'R': t->raw = 1; break;
		case 'o': t->record_path = optarg; break;
		case 'p': t->replay_path = optarg; break;
		case 'n': rc = parse_u64(optarg, &t->count_max); break;
		case 'T': rc = parse_u64(optarg, &t->timeout_ms); break;
		case 's': t->stats = 1; break;
		case 'v': t->verbose = 1; break;
		case 'h': usage(stdout); return 1;
		default: return -EINVAL;
		}
		if (rc) {
			fprintf(stderr, "attnx-tail: bad option value '%s': %s\n", optarg, ax_strerror(rc));
			return rc;
		}
	}
	if (optind < argc) {
		fprintf(stderr, "attnx-tail: unexpected argument '%s'\n", argv[optind]);
		return -EINVAL;
	}
	return 0;
}

/* ---- output ------------------------------------------------------------------------------------------------ */

static int write_all(int fd, const uint8_t *p, size_t n)
{
	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0)
			return -errno;
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

static void out_flush(tail *t)
{
	if (t->out.len && !t->out_dead && write_all(STDOUT_FILENO, t->out.data, t->out.len) < 0)
		t->out_dead = 1; /* reader went away (EPIPE): stop */
	ax_buf_reset(&t->out);
}

/* --raw with filters or --count: the shown records of a frame become a new frame. */
static int raw_frame_end(tail *t)
{
	int rc = 0;

	if (t->body_count)
		rc = ax_tail_frame_wrap(&t->body, t->body_count, &t->out);
	ax_buf_reset(&t->body);
	t->body_count = 0;
	return rc;
}

static int repack_raw(const tail *t)
{
	return t->raw && (ax_tail_filter_active(&t->filter) || t->count_max);
}

static int show(tail *t, const ax_record *r)
{
	int rc;

	if (t->raw) {
		if (!repack_raw(t))
			return 0;
		rc = ax_record_pack(r, &t->body);
		t->body_count += rc == 0;
		return rc;
	}
	rc = ax_record_json(r, &t->out);
	if (!rc)
		rc = ax_buf_append(&t->out, "\n", 1);
	if (!rc && t->out.len >= OUT_FLUSH)
		out_flush(t);
	return rc;
}

static int on_record(const ax_record *r, void *arg)
{
	tail *t = arg;
	int rc;

	if (ax_tail_seq_observe(&t->seq, r, t->frame_ns) < 0)
		return -ENOMEM;
	if (t->count_max && t->shown >= t->count_max)
		return 0; /* keep accounting seqs of the rest of the frame */
	if (!ax_tail_filter_match(&t->filter, r))
		return 0;
	rc = show(t, r);
	if (rc == -EINVAL) {
		t->bad_records++; /* the decoder accepted it but the encoder refuses it: count, keep going */
		return 0;
	}
	if (rc)
		return rc;
	t->shown++;
	return 0;
}

static void handle_frame(tail *t, const void *data, size_t len)
{
	int rc;

	t->frames++;
	t->frame_ns = ax_now_ns();
	if (t->record && fwrite(data, 1, len, t->record) != len) {
		fprintf(stderr, "attnx-tail: writing %s: %s\n", t->record_path, strerror(errno));
		t->err = -EIO;
	}
	rc = ax_frame_decode(data, len, on_record, t);
	if (rc == -ENOMEM) {
		t->err = rc;
	} else if (rc < 0) {
		t->bad_frames++;
		fprintf(stderr, "attnx-tail: bad frame %llu (%zu bytes): %s\n", (unsigned long long)t->frames, len,
			ax_strerror(rc));
	}
	if (t->raw && !repack_raw(t) && rc >= 0)
		ax_buf_append(&t->out, data, len);
	if (t->raw && raw_frame_end(t) < 0)
		t->err = -ENOMEM;
	out_flush(t);
}

static int done(const tail *t)
{
	return g_stop || t->err || t->out_dead || (t->count_max && t->shown >= t->count_max);
}

static void on_hole(const char *src, uint64_t from, uint64_t to, void *arg)
{
	fprintf(stderr, "attnx-tail: hole: src %s seq %llu..%llu (%llu records lost, no gap record)\n", src,
		(unsigned long long)from, (unsigned long long)(to - 1), (unsigned long long)(to - from));
}

/* ---- sources ----------------------------------------------------------------------------------------------- */

static int read_file(const char *path, ax_buf *b)
{
	int fd = strcmp(path, "-") ? open(path, O_RDONLY | O_CLOEXEC) : STDIN_FILENO;
	uint8_t chunk[1 << 16];
	ssize_t n;
	int rc = 0;

	if (fd < 0)
		return -errno;
	while ((n = read(fd, chunk, sizeof chunk)) != 0) {
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 || ax_buf_append(b, chunk, (size_t)n)) {
			rc = n < 0 ? -errno : -ENOMEM;
			break;
		}
	}
	if (fd != STDIN_FILENO)
		close(fd);
	return rc;
}

static int run_replay(tail *t)
{
	ax_buf file;
	size_t off = 0, n;
	int rc;

	ax_buf_init(&file);
	rc = read_file(t->replay_path, &file);
	if (rc) {
		fprintf(stderr, "attnx-tail: %s: %s\n", t->replay_path, ax_strerror(rc));
		goto fail;
	}
	while (!done(t) && (rc = ax_tail_next_frame(file.data + off, file.len - off, &n)) == 1) {
		handle_frame(t, file.data + off, n);
		off += n;
	}
	if (rc < 0 || (rc == 0 && off < file.len)) {
		fprintf(stderr, "attnx-tail: %s: %s at byte %zu\n", t->replay_path,
			rc < 0 ? ax_strerror(rc) : "truncated recording", off);
		rc = rc < 0 ? rc : -EBADMSG;
		goto fail;
	}
	rc = 0;
fail:
	ax_buf_fini(&file);
	return rc;
}

static int sub_open(nng_socket *s, const char *addr)
{
	int rv;

	if ((rv = nng_sub0_open(s)) != 0)
		return -ENOMEM;
	if ((rv = nng_socket_set(*s, NNG_OPT_SUB_SUBSCRIBE, "", 0)) != 0 ||
	    (rv = nng_socket_set_ms(*s, NNG_OPT_RECVTIMEO, 100)) != 0 ||
	    (rv = nng_socket_set_int(*s, NNG_OPT_RECVBUF, 8192)) != 0 ||
	    (rv = nng_socket_set_size(*s, NNG_OPT_RECVMAXSZ, AX_PROTO_MAX_FRAME)) != 0 ||
	    (rv = nng_dial(*s, addr, NULL, NNG_FLAG_NONBLOCK)) != 0) {
		fprintf(stderr, "attnx-tail: %s: %s\n", addr, nng_strerror(rv));
		nng_close(*s);
		return -EINVAL;
	}
	return 0;
}

static int run_live(tail *t, int *timed_out)
{
	nng_socket s;
	uint64_t last = ax_now_ns();
	int rc = sub_open(&s, t->feed);

	if (rc)
		return rc;
	while (!done(t)) {
		nng_msg *m;
		int rv = nng_recvmsg(s, &m, 0);
		uint64_t now = ax_now_ns();
		if (rv == 0) {
			handle_frame(t, nng_msg_body(m), nng_msg_len(m));
			nng_msg_free(m);
			last = now;
		} else if (rv != NNG_ETIMEDOUT && rv != NNG_EINTR) {
			fprintf(stderr, "attnx-tail: receive: %s\n", nng_strerror(rv));
			rc = -EIO;
			break;
		}
		ax_tail_seq_expire(&t->seq, now, 0);
		if (t->timeout_ms && now - last >= t->timeout_ms * 1000000ull) {
			*timed_out = 1;
			break;
		}
	}
	nng_close(s);
	return rc;
}

static void print_stats(const tail *t)
{
	for (uint32_t i = 0; i < t->seq.n; i++) {
		const ax_tail_src *s = &t->seq.srcs[i];
		fprintf(stderr,
			"attnx-tail: stats: src %s records %llu first %llu next %llu holes %llu lost %llu covered %llu "
			"late %llu dups %llu restarts %llu gaps %llu\n",
			s->src, (unsigned long long)s->records, (unsigned long long)s->first_seq,
			(unsigned long long)s->next, (unsigned long long)s->holes, (unsigned long long)s->lost,
			(unsigned long long)s->covered, (unsigned long long)s->late, (unsigned long long)s->dups,
			(unsigned long long)s->restarts, (unsigned long long)s->gaps);
	}
	fprintf(stderr, "attnx-tail: stats: frames %llu shown %llu bad_frames %llu bad_records %llu\n",
		(unsigned long long)t->frames, (unsigned long long)t->shown, (unsigned long long)t->bad_frames,
		(unsigned long long)t->bad_records);
}

static void install_signals(void)
{
	struct sigaction sa = {.sa_handler = on_signal};

	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
}

int main(int argc, char **argv)
{
	tail t = {.feed = DEFAULT_FEED};
	int rc, timed_out = 0;

	rc = parse_args(&t, argc, argv);
	if (rc) {
		if (rc < 0)
			usage(stderr);
		return rc < 0 ? 2 : 0;
	}
	install_signals();
	ax_tail_seq_init(&t.seq, on_hole, &t);
	ax_buf_init(&t.out);
	ax_buf_init(&t.body);
	if (t.record_path && !(t.record = fopen(t.record_path, "ab"))) {
		fprintf(stderr, "attnx-tail: %s: %s\n", t.record_path, strerror(errno));
		rc = -errno;
		goto out;
	}
	rc = t.replay_path ? run_replay(&t) : run_live(&t, &timed_out);
	if (!rc)
		rc = t.err;
	out_flush(&t);
	ax_tail_seq_expire(&t.seq, ax_now_ns(), 1);
	if (t.stats)
		print_stats(&t);
out:
	if (t.record && fclose(t.record) && !rc)
		rc = -EIO;
	ax_buf_fini(&t.body);
	ax_buf_fini(&t.out);
	ax_tail_seq_fini(&t.seq);
	if (rc)
		return 1;
	return timed_out && t.count_max && t.shown < t.count_max ? 3 : 0;
}
