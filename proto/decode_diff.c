/*
 * decode_diff.c — differential test of the cursor decoder (unpack.c) against the previous msgpack-c decoder
 * (unpack_mpc.c): both must return the same code and deliver the same records (compared as their ax_record_pack
 * bytes), for ax_frame_decode and for ax_record_unpack.
 *
 * Inputs: every file named on the command line (directories: every file inside, e.g. the fuzz corpus
 * tests/fuzz/corpus/record or a libFuzzer output directory), every prefix of each (truncation at every byte), and
 * --mutations N seeded random edits of each (byte flips, inserted / deleted bytes, type bytes swapped for others,
 * length fields bumped). Exits 1 at the first disagreement, printing the input in hex; 0 with a summary otherwise.
 * Suite `proto`: runs on the committed corpus. Usage: decode_diff [--mutations N] [--seed S] PATH...
 */
#include "proto_internal.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

typedef int (*frame_fn)(const void *, size_t, ax_record_cb, void *);
typedef int (*one_fn)(const void *, size_t, ax_record *);

struct stats {
	unsigned long inputs, records, errors;
};

static int collect(const ax_record *r, void *arg)
{
	ax_buf *b = arg;
	uint8_t sep = 0xff; /* never the first byte of a packed map: records stay apart */
	if (ax_buf_append(b, &sep, 1) || ax_record_pack(r, b))
		return -ENOMEM;
	return 0;
}

static int run_frame(frame_fn f, const uint8_t *p, size_t n, ax_buf *out)
{
	ax_buf_reset(out);
	return f(p, n, collect, out);
}

static int run_one(one_fn f, const uint8_t *p, size_t n, ax_buf *out)
{
	ax_record r;
	ax_buf_reset(out);
	int rc = f(p, n, &r);
	if (rc == 0 && ax_record_pack(&r, out))
		rc = -12345; /* a decoded record the encoder refuses: reported as a difference */
	ax_record_fini(&r);
	return rc;
}

static void dump(const char *what, const uint8_t *p, size_t n, int a, int b)
{
	fprintf(stderr, "decode_diff: %s differs: cursor %d, msgpack-c %d; input (%zu bytes):", what, a, b, n);
	for (size_t i = 0; i < n; i++)
		fprintf(stderr, "%s%02x", i % 32 ? " " : "\n  ", p[i]);
	fprintf(stderr, "\n");
}

/* 0 same, 1 different. */
static int compare(const uint8_t *p, size_t n, struct stats *st)
{
	ax_buf a, b;
	ax_buf_init(&a);
	ax_buf_init(&b);
	int ra = run_frame(ax_frame_decode, p, n, &a), rb = run_frame(ax__frame_decode_mpc, p, n, &b);
	int bad = ra != rb || a.len != b.len || (a.len && memcmp(a.data, b.data, a.len));
	if (bad)
		dump("ax_frame_decode", p, n, ra, rb);
	st->records += ra > 0 ? (unsigned long)ra : 0;
	st->errors += ra < 0;
	if (!bad) {
		ra = run_one(ax_record_unpack, p, n, &a);
		rb = run_one(ax__record_unpack_mpc, p, n, &b);
		bad = ra != rb || a.len != b.len || (a.len && memcmp(a.data, b.data, a.len));
		if (bad)
			dump("ax_record_unpack", p, n, ra, rb);
	}
	st->inputs++;
	ax_buf_fini(&a);
	ax_buf_fini(&b);
	return bad;
}

static uint64_t rnd(uint64_t *s)
{
	*s ^= *s << 13, *s ^= *s >> 7, *s ^= *s << 17;
	return *s;
}

/* One random edit of `in` into `out`. */
static void mutate(const uint8_t *in, size_t n, ax_buf *out, uint64_t *seed)
{
	static const uint8_t heads[] = {0xc0, 0xc1, 0xc2, 0xca, 0xcb, 0xcc, 0xcd, 0xce, 0xcf, 0xd0, 0xd1, 0xd2, 0xd3,
					0xd4, 0xd9, 0xda, 0xdb, 0xdc, 0xdd, 0xde, 0xdf, 0xc4, 0xc7, 0x80, 0x90,
					0xa0, 0xa1, 0xff, 0x00, 0x7f};
	ax_buf_reset(out);
	ax_buf_append(out, in, n);
	int edits = 1 + (int)(rnd(seed) % 3);
	for (int e = 0; e < edits && out->len; e++) {
		size_t at = rnd(seed) % out->len;
		switch (rnd(seed) % 5) {
		case 0: out->data[at] ^= (uint8_t)(1u << (rnd(seed) % 8)); break;
		case 1: out->data[at] = heads[rnd(seed) % sizeof heads]; break;
		case 2: out->data[at] += (uint8_t)(1 + rnd(seed) % 3); break;
		case 3: /* delete a byte */
			memmove(out->data + at, out->data + at + 1, out->len - at - 1);
			out->len--;
			break;
		default: { /* insert a byte */
			uint8_t x = (uint8_t)rnd(seed);
			if (ax_buf_reserve(out, 1) == 0) {
				memmove(out->data + at + 1, out->data + at, out->len - at);
				out->data[at] = x;
				out->len++;
			}
		}
		}
	}
}

static int check_input(const uint8_t *p, size_t n, long mutations, uint64_t *seed, struct stats *st)
{
	ax_buf m;
	int bad = 0;
	for (size_t cut = 0; cut <= n && !bad; cut++)
		bad = compare(p, cut, st);
	ax_buf_init(&m);
	for (long i = 0; i < mutations && !bad; i++) {
		mutate(p, n, &m, seed);
		bad = compare(m.data, m.len, st);
	}
	ax_buf_fini(&m);
	return bad;
}

static int read_path(const char *path, ax_buf *b)
{
	FILE *f = fopen(path, "rb");
	uint8_t chunk[65536];
	size_t got;
	if (!f)
		return -errno;
	ax_buf_reset(b);
	while ((got = fread(chunk, 1, sizeof chunk, f)) > 0)
		if (ax_buf_append(b, chunk, got)) {
			fclose(f);
			return -ENOMEM;
		}
	fclose(f);
	return 0;
}

static int check_path(const char *path, long mutations, uint64_t *seed, struct stats *st)
{
	struct stat sb;
	if (stat(path, &sb) < 0) {
		perror(path);
		return 1;
	}
	if (S_ISDIR(sb.st_mode)) {
		DIR *d = opendir(path);
		struct dirent *de;
		int bad = 0;
		while (d && !bad && (de = readdir(d))) {
			char sub[4096];
			if (de->d_name[0] == '.')
				continue;
			snprintf(sub, sizeof sub, "%s/%s", path, de->d_name);
			bad = check_path(sub, mutations, seed, st);
		}
		if (d)
			closedir(d);
		return bad;
	}
	ax_buf b;
	ax_buf_init(&b);
	int bad = read_path(path, &b) < 0;
	if (bad)
		perror(path);
	else if (check_input(b.data, b.len, mutations, seed, st))
		bad = (fprintf(stderr, "decode_diff: from %s\n", path), 1);
	ax_buf_fini(&b);
	return bad;
}

int main(int argc, char **argv)
{
	long mutations = 200;
	uint64_t seed = 0x9e3779b97f4a7c15ull;
	struct stats st = {0};
	int i = 1, bad = 0;
	for (; i + 1 < argc && argv[i][0] == '-'; i += 2) {
		if (!strcmp(argv[i], "--mutations"))
			mutations = strtol(argv[i + 1], NULL, 10);
		else if (!strcmp(argv[i], "--seed"))
			seed = strtoull(argv[i + 1], NULL, 0) | 1;
		else
			break;
	}
	if (i >= argc) {
		fprintf(stderr, "usage: decode_diff [--mutations N] [--seed S] PATH...\n");
		return 2;
	}
	for (; i < argc && !bad; i++)
		bad = check_path(argv[i], mutations, &seed, &st);
	printf("decode_diff: %lu inputs, %lu records decoded, %lu rejected, %s\n", st.inputs, st.records, st.errors,
	       bad ? "DIFFERENCE" : "no difference");
	return bad;
}
