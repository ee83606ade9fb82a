/*
 * fmt_sweep.c — checks fmt.c's shortest float text against the C library, over many values; a dev tool (minutes
 * for the full float32 sweep), not a CI test (proto_test checks a fixed sample of the same properties).
 *
 * For every value v it checks that the text (1) reads back as v: strtof(text) == v and, for float32,
 * (float)strtod(text) == v (JSON readers parse a double, then narrow); (2) is not longer than needed: printf's
 * correctly rounded decimal with one digit fewer (%.{n-1}e) does not read back as v; (3) says how often it differs
 * from the previous writer (printf %.{6..9}g / %.{15..17}g, the first that reads back): same digits expected except
 * where a shorter candidate exists (subnormals, which the previous writer printed with at least 6 / 15 digits, and
 * powers of two, where the rounding interval is lopsided); this third check runs on every 16th value.
 *
 * Usage: fmt_sweep f32 [STEP [THREADS [FROM TO]]]  every STEP-th float32 bit pattern in [FROM, TO) (default all
 *                                        2^32; STEP 1 = every one; default 97)
 *        fmt_sweep f64 [N [THREADS]]     N random doubles: random bit patterns and values of typical magnitude
 * Prints counts; exits 1 on any failure of (1) or (2).
 */
#include "proto_internal.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct job {
	int f64;
	uint64_t from, to, step; /* f32: bit patterns [from, to) by step; f64: sample indexes */
	uint64_t seed;
	uint64_t checked, bad_read, bad_short, compared, differ, shorter;
	char first_bad[160];
};

static int digits_of(const char *t)
{
	int n = 0, lead = 1;
	for (; *t && *t != 'e'; t++) {
		if (*t < '0' || *t > '9')
			continue;
		if (lead && *t == '0')
			continue;
		lead = 0;
		n++;
	}
	/* trailing zeros of an integer text do not count as significant */
	return n;
}

static int sig_digits(const char *t)
{
	char m[40];
	size_t i = 0;
	for (; t[i] && t[i] != 'e' && i < sizeof m - 1; i++)
		m[i] = t[i];
	m[i] = 0;
	if (!strchr(m, '.')) /* integer text: drop trailing zeros */
		while (i > 1 && m[i - 1] == '0')
			m[--i] = 0;
	return digits_of(m);
}

static void note(struct job *j, const char *what, const char *t, double v)
{
	if (!j->first_bad[0])
		snprintf(j->first_bad, sizeof j->first_bad, "%s: text '%s' for %.17g", what, t, v);
}

static void check_f32(struct job *j, float v, int compare)
{
	char t[AX__FMT_ROOM], r[40];
	size_t n = ax__fmt_f32(v, t);
	t[n] = 0;
	float a = strtof(t, NULL), b = (float)strtod(t, NULL);
	j->checked++;
	if (memcmp(&a, &v, 4) || memcmp(&b, &v, 4)) {
		j->bad_read++;
		note(j, "f32 does not read back", t, v);
		return;
	}
	int d = sig_digits(t);
	if (d > 1) {
		snprintf(r, sizeof r, "%.*e", d - 2, (double)v);
		if ((float)strtod(r, NULL) == v && strtof(r, NULL) == v) {
			j->bad_short++;
			note(j, "f32 not shortest", t, v);
		}
	}
	if (v == 0 || !compare)
		return;
	j->compared++;
	for (int prec = 6; prec <= 9; prec++) { /* the previous writer */
		snprintf(r, sizeof r, "%.*g", prec, (double)v);
		if ((float)strtod(r, NULL) == v)
			break;
	}
	if (strcmp(r, t)) {
		j->differ++;
		j->shorter += sig_digits(t) < sig_digits(r);
	}
}

static void check_f64(struct job *j, double v, int compare)
{
	char t[AX__FMT_ROOM], r[40];
	size_t n = ax__fmt_f64(v, t);
	t[n] = 0;
	double a = strtod(t, NULL);
	j->checked++;
	if (memcmp(&a, &v, 8)) {
		j->bad_read++;
		note(j, "f64 does not read back", t, v);
		return;
	}
	int d = sig_digits(t);
	if (d > 1) {
		snprintf(r, sizeof r, "%.*e", d - 2, v);
		if (strtod(r, NULL) == v) {
			j->bad_short++;
			note(j, "f64 not shortest", t, v);
		}
	}
	if (v == 0 || !compare)
		return;
	j->compared++;
	for (int prec = 15; prec <= 17; prec++) {
		snprintf(r, sizeof r, "%.*g", prec, v);
		if (strtod(r, NULL) == v)
			break;
	}
	if (strcmp(r, t)) {
		j->differ++;
		j->shorter += sig_digits(t) < sig_digits(r);
	}
}

static uint64_t rnd(uint64_t *s)
{
	*s ^= *s << 13, *s ^= *s >> 7, *s ^= *s << 17;
	return *s;
}

static void *run(void *arg)
{
	struct job *j = arg;
	for (uint64_t i = j->from; i < j->to; i += j->step) {
		if (!j->f64) {
			uint32_t bits = (uint32_t)i;
			float v;
			memcpy(&v, &bits, 4);
			if (isfinite(v))
				check_f32(j, v, (i / j->step) % 16 == 0);
			continue;
		}
		uint64_t bits = rnd(&j->seed);
		double v;
		if (i % 2) { /* typical magnitudes: logits, probabilities, logsumexps */
			v = ldexp((double)(bits >> 11), -53) * pow(10, (double)(int)(rnd(&j->seed) % 12) - 6);
			if (bits & 1)
				v = -v;
		} else {
			memcpy(&v, &bits, 8);
		}
		if (isfinite(v))
			check_f64(j, v, i % 16 == 0);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc < 2 || (strcmp(argv[1], "f32") && strcmp(argv[1], "f64"))) {
		fprintf(stderr, "usage: fmt_sweep f32 [STEP [THREADS]] | f64 [N [THREADS]]\n");
		return 2;
	}
	int f64 = !strcmp(argv[1], "f64");
	uint64_t arg = argc > 2 ? strtoull(argv[2], NULL, 10) : (f64 ? 10000000 : 97);
	int nt = argc > 3 ? atoi(argv[3]) : 1;
	if (nt < 1 || nt > 256 || arg == 0)
		return 2;
	struct job *jobs = calloc((size_t)nt, sizeof *jobs);
	pthread_t *th = calloc((size_t)nt, sizeof *th);
	uint64_t total = f64 ? arg : (1ull << 32), base = 0;
	if (!f64 && argc > 5) {
		base = strtoull(argv[4], NULL, 0);
		total = strtoull(argv[5], NULL, 0) - base;
	}
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (int i = 0; i < nt; i++) {
		struct job *j = &jobs[i];
		j->f64 = f64;
		j->step = f64 ? 1 : arg;
		j->from = base + total / (uint64_t)nt * (uint64_t)i;
		j->to = base + (i == nt - 1 ? total : total / (uint64_t)nt * (uint64_t)(i + 1));
		if (!f64) /* keep the sample on the global STEP grid */
			j->from = (j->from + arg - 1) / arg * arg;
		j->seed = 0x9e3779b97f4a7c15ull * (uint64_t)(i + 1) | 1;
		pthread_create(&th[i], NULL, run, j);
	}
	struct job sum = {0};
	for (int i = 0; i < nt; i++) {
		pthread_join(th[i], NULL);
		sum.checked += jobs[i].checked, sum.bad_read += jobs[i].bad_read, sum.bad_short += jobs[i].bad_short;
		sum.differ += jobs[i].differ, sum.shorter += jobs[i].shorter, sum.compared += jobs[i].compared;
		if (!sum.first_bad[0])
			memcpy(sum.first_bad, jobs[i].first_bad, sizeof sum.first_bad);
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	printf("fmt_sweep %s: %llu values checked in %.1f s (%d threads): %llu do not read back, %llu not shortest; "
	       "of %llu compared with the printf writer (every 16th), %llu differ (%llu of them shorter)\n",
	       argv[1], (unsigned long long)sum.checked,
	       (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9, nt,
	       (unsigned long long)sum.bad_read, (unsigned long long)sum.bad_short, (unsigned long long)sum.compared,
	       (unsigned long long)sum.differ,
	       (unsigned long long)sum.shorter);
	if (sum.first_bad[0])
		printf("first failure: %s\n", sum.first_bad);
	free(jobs);
	free(th);
	return sum.bad_read || sum.bad_short;
}
