/*
 * fmt.c — numbers as JSON text without printf: integers, and floats as the shortest decimal that reads back as the
 * same float (float64: strtod; float32: strtod then a cast to float, which is how JSON readers get a float32).
 *
 * Floats use the Schubfach method (R. Giulietti, "The Schubfach way to render doubles", 2020; this is our own
 * code after the paper). A finite v = c·2^q has a rounding interval R = [c−½, c+½]·2^q (the lower half is ¼ at a
 * power of two; the ends belong to R when c is even). With k = ⌊log10 2^q⌋, R scaled by 10^−k is between 1 and 10
 * units wide, so it holds one or two integers s, s+1 (the candidates of n digits) and at most one multiple of 10
 * (the only candidate of fewer digits: n−1 digits, then trailing zeros are dropped). Which of them lie in R is
 * decided on 4·v·10^−k and the ends of R, computed as c·2^q times g ≈ 10^−k·2^r, a 126-bit (float64) or 63-bit
 * (float32) upper approximation of 10^−k, and rounded to odd: the result is the floor with its lowest bit set when
 * anything was cut off (above the approximation's own error), so comparing it with a multiple of 4 gives the same
 * answer as the exact value would. The
 * paper proves these precisions sufficient for every double and float; proto/fmt_sweep checks all 2^32 floats
 * and a sample of doubles against strtod. Among two n-digit candidates the one closer to v wins (ties: even).
 *
 * The g table (617 entries, 10^−324..10^292) is computed once, on first use, from exact big-integer arithmetic:
 * 10^n by repeated multiplication for n ≥ 0, and ⌊2^M / 10^n⌋ by repeated division (⌊⌊x/10⌋/10⌋ = ⌊x/100⌋) for
 * negative powers; its top 126 bits plus one is g.
 *
 * Text: like printf's %g with precision max(n, 6) for float32 and max(n, 15) for float64 (what the previous
 * printf-based writer produced), so fixed notation for decimal exponents −5 < x < precision, else d.ddde±XX;
 * negative zero is "-0.0" so it stays a negative real (a JSON "-0" reads back as the integer 0).
 */
#include "proto_internal.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef unsigned __int128 u128;

#define K_MIN (-324) /* ⌊log10 2^q⌋ for the smallest double exponent, q = −1074 */
#define K_MAX 292    /* ... for the largest, q = 971 */

static u128 g_tab[K_MAX - K_MIN + 1]; /* g(k) at [k − K_MIN] */
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

/* ⌊q·log10 2⌋, ⌊log10(¾·2^q)⌋, ⌊e·log2 10⌋ by fixed-point multiplication (checked against long double logarithms
 * for |q|, |e| ≤ 2000; doubles need |q| ≤ 1075). */
static inline int flog10pow2(int q) { return (int)(((int64_t)q * 661971961083LL) >> 41); }
static inline int flog10_3q_pow2(int q) { return (int)(((int64_t)q * 661971961083LL - 274743187321LL) >> 41); }
static inline int flog2pow10(int e) { return (int)(((int64_t)e * 913124641741LL) >> 38); }

/* ---- the g table --------------------------------------------------------------------------------------------- */

#define LIMBS 40 /* 32-bit limbs: 1280 bits, more than 2^1216 needs */
#define M_BITS 1216

/* ⌊x / 2^shift⌋ (shift ≥ 0) or x·2^−shift (shift < 0, x < 2^128), low 128 bits. */
static u128 bits_at(const uint32_t *x, int shift)
{
	u128 lo = 0;
	int li = shift < 0 ? 0 : shift / 32, b = shift < 0 ? 0 : shift % 32;
	for (int i = 3; i >= 0; i--)
		lo = (lo << 32) | (li + i < LIMBS ? x[li + i] : 0);
	if (shift < 0)
		return lo << -shift;
	uint32_t extra = li + 4 < LIMBS ? x[li + 4] : 0;
	return b ? (lo >> b) | ((u128)extra << (128 - b)) : lo;
}

static void mul10(uint32_t *x)
{
	uint64_t carry = 0;
	for (int i = 0; i < LIMBS; i++) {
		uint64_t t = (uint64_t)x[i] * 10 + carry;
		x[i] = (uint32_t)t;
		carry = t >> 32;
	}
}

static void div10(uint32_t *x)
{
	uint64_t rem = 0;
	for (int i = LIMBS - 1; i >= 0; i--) {
		uint64_t t = (rem << 32) | x[i];
		x[i] = (uint32_t)(t / 10);
		rem = t % 10;
	}
}

static void build_table(void)
{
	uint32_t x[LIMBS];
	/* k ≤ 0: 10^−k = 10^n exactly; g = ⌊10^n · 2^(125 − e10)⌋ + 1 */
	memset(x, 0, sizeof x);
	x[0] = 1;
	for (int n = 0; n <= -K_MIN; n++) {
		int e10 = flog2pow10(n);
		g_tab[-n - K_MIN] = bits_at(x, e10 - 125) + 1;
		mul10(x);
	}
	/* k > 0: 10^−k = 1/10^k; g = ⌊2^(125 − e10) / 10^k⌋ + 1 = ⌊(⌊2^M / 10^k⌋) / 2^(M − 125 + e10)⌋ + 1 */
	memset(x, 0, sizeof x);
	x[M_BITS / 32] = 1u << (M_BITS % 32);
	for (int k = 1; k <= K_MAX; k++) {
		div10(x);
		int e10 = flog2pow10(-k);
		g_tab[k - K_MIN] = bits_at(x, M_BITS - 125 + e10) + 1;
	}
}

static inline u128 g_of(int k)
{
	pthread_once(&g_once, build_table);
	return g_tab[k - K_MIN];
}

/* ---- round to odd ---------------------------------------------------------------------------------------------- */

/* ⌊cp·g / 2^127⌋ with its lowest bit set if bits 64..126 of the product are not all zero (g < 2^126,
 * cp < 2^64). The low 64 bits are left out on purpose: g exceeds 10^−k·2^r by less than 1, so cp·g exceeds the
 * exact product by less than 2^64, and that excess must not read as "something was cut off" (the paper's rop). */
static inline uint64_t rop64(u128 g, uint64_t cp)
{
	u128 lo = (u128)(uint64_t)g * cp, hi = (u128)(uint64_t)(g >> 64) * cp;
	u128 mid = hi + (lo >> 64); /* the product >> 64 */
	return (uint64_t)(mid >> 63) | (((uint64_t)mid & ((1ull << 63) - 1)) != 0);
}

/* ⌊cp·g / 2^95⌋ rounded to odd over bits 64..94 (g < 2^63, cp < 2^64), likewise. *near is set when cp·g / 2^95
 * lies within 2^−21 of an integer (its error from g is below 2^−31): see dec32. */
static inline uint32_t rop32(uint64_t g, uint64_t cp, int *near)
{
	u128 p = (u128)g * cp, frac = p & (((u128)1 << 95) - 1), tol = (u128)1 << (95 - 21);
	uint64_t hi = (uint64_t)(p >> 64);
	*near |= frac < tol || frac > ((u128)1 << 95) - tol;
	return (uint32_t)(hi >> 31) | ((hi & ((1ull << 31) - 1)) != 0);
}

/* ---- Schubfach ------------------------------------------------------------------------------------------------ */

/* The decimal of v = c·2^q: *f digits (no trailing-zero guarantee), value *f · 10^*e. */
static void dec64(int q, uint64_t c, int c_is_min, uint64_t *f, int *e)
{
	uint64_t out = c & 1, cb = c << 2, cbr = cb + 2, cbl;
	int k;
	if (!c_is_min) {
		cbl = cb - 2;
		k = flog10pow2(q);
	} else {
		cbl = cb - 1;
		k = flog10_3q_pow2(q);
	}
	int h = q + flog2pow10(-k) + 2;
	u128 g = g_of(k);
	uint64_t vb = rop64(g, cb << h), vbl = rop64(g, cbl << h), vbr = rop64(g, cbr << h);
	uint64_t s = vb >> 2;
	if (s >= 10) {
		uint64_t sp10 = s / 10 * 10, tp10 = sp10 + 10;
		int upin = vbl + out <= sp10 << 2, wpin = (tp10 << 2) + out <= vbr;
		if (upin != wpin) {
			*f = upin ? sp10 : tp10;
			*e = k;
			return;
		}
	}
	uint64_t t = s + 1;
	int uin = vbl + out <= s << 2, win = (t << 2) + out <= vbr;
	*e = k;
	if (uin != win) {
		*f = uin ? s : t;
		return;
	}
	int64_t cmp = (int64_t)(vb - ((s + t) << 1));
	*f = cmp < 0 || (cmp == 0 && (s & 1) == 0) ? s : t;
}

/* Returns 1 when the float32 text may not survive JSON's double-then-float reading: see ax__fmt_f32. */
static int dec32(int q, uint32_t c, int c_is_min, uint32_t *f, int *e)
{
	uint64_t out = c & 1, cb = (uint64_t)c << 2, cbr = cb + 2, cbl;
	int k;
	if (!c_is_min) {
		cbl = cb - 2;
		k = flog10pow2(q);
	} else {
		cbl = cb - 1;
		k = flog10_3q_pow2(q);
	}
	int h = q + flog2pow10(-k) + 33;
	uint64_t g = (uint64_t)(g_of(k) >> 63) + 1;
	int near = 0, ignore = 0;
	uint32_t vb = rop32(g, cb << h, &ignore), vbl = rop32(g, cbl << h, &near), vbr = rop32(g, cbr << h, &near);
	if (q >= 0 && k <= 0) /* 2^q and 10^−k are integers: the ends of R are exact integers, never "just off" one */
		near = 0;
	uint32_t s = vb >> 2;
	if (s >= 10) {
		uint32_t sp10 = s / 10 * 10, tp10 = sp10 + 10;
		int upin = vbl + out <= (uint64_t)sp10 << 2, wpin = ((uint64_t)tp10 << 2) + out <= vbr;
		if (upin != wpin) {
			*f = upin ? sp10 : tp10;
			*e = k;
			return near;
		}
	}
	uint32_t t = s + 1;
	int uin = vbl + out <= (uint64_t)s << 2, win = ((uint64_t)t << 2) + out <= vbr;
	*e = k;
	if (uin != win) {
		*f = uin ? s : t;
		return near;
	}
	int64_t cmp = (int64_t)vb - (int64_t)(((uint64_t)s + t) << 1);
	*f = cmp < 0 || (cmp == 0 && (s & 1) == 0) ? s : t;
	return near;
}

/* ---- text ------------------------------------------------------------------------------------------------------- */

static const char pairs[201] = "00010203040506070809101112131415161718192021222324252627282930313233343536373839"
			       "40414243444546474849505152535455565758596061626364656667686970717273747576777879"
			       "8081828384858687888990919293949596979899";

/* Decimal digits of v at the END of buf[0..20): returns the first digit's index. */
static inline int digits_back(uint64_t v, char *buf)
{
	int i = 20;
	while (v >= 100) {
		unsigned r = (unsigned)(v % 100);
		v /= 100;
		buf[--i] = pairs[2 * r + 1];
		buf[--i] = pairs[2 * r];
	}
	if (v >= 10) {
		buf[--i] = pairs[2 * v + 1];
		buf[--i] = pairs[2 * v];
	} else {
		buf[--i] = (char)('0' + v);
	}
	return i;
}

/* Copies of a fixed 20 bytes (the widest digit string) compile to a few moves instead of a memcpy call; the
 * bytes past the digits are scratch in the caller's room (AX__FMT_ROOM). */
size_t ax__fmt_u64(uint64_t v, char *out)
{
	char buf[40];
	int i = digits_back(v, buf);
	memcpy(out, buf + i, 20);
	return (size_t)(20 - i);
}

size_t ax__fmt_i64(int64_t v, char *out)
{
	if (v >= 0)
		return ax__fmt_u64((uint64_t)v, out);
	out[0] = '-';
	return 1 + ax__fmt_u64(-(uint64_t)v, out + 1);
}

/* f·10^e (f > 0) as %g would print it with precision max(digits, min_prec). */
static size_t put_dec(int neg, uint64_t f, int e, int min_prec, char *out)
{
	char buf[40], d[40];
	char *o = out;
	while (f % 10 == 0) {
		f /= 10;
		e++;
	}
	int i = digits_back(f, buf), n = 20 - i;
	memcpy(d, buf + i, 20); /* digits at d[0..n), scratch after: fixed-size copies below */
	int x = e + n - 1, prec = n > min_prec ? n : min_prec;
	if (neg)
		*o++ = '-';
	if (x < -4 || x >= prec) { /* d.ddde±XX */
		*o++ = d[0];
		if (n > 1) {
			*o++ = '.';
			memcpy(o, d + 1, 19);
			o += n - 1;
		}
		*o++ = 'e';
		*o++ = x < 0 ? '-' : '+';
		unsigned ax = (unsigned)(x < 0 ? -x : x);
		if (ax >= 100)
			*o++ = (char)('0' + ax / 100);
		*o++ = pairs[2 * (ax % 100)];
		*o++ = pairs[2 * (ax % 100) + 1];
	} else if (x < 0) { /* 0.000ddd */
		*o++ = '0';
		*o++ = '.';
		memset(o, '0', 4); /* x ≥ −5 here */
		o += -x - 1;
		memcpy(o, d, 20);
		o += n;
	} else if (x + 1 >= n) { /* ddd000: an integer */
		memcpy(o, d, 20);
		o += n;
		memset(o, '0', (size_t)(x + 1 - n)); /* fewer than 17 */
		o += x + 1 - n;
	} else { /* dd.ddd */
		memcpy(o, d, 20);
		o += x + 1;
		*o++ = '.';
		memcpy(o, d + x + 1, 20);
		o += n - x - 1;
	}
	return (size_t)(o - out);
}

size_t ax__fmt_f64(double v, char *out)
{
	uint64_t bits;
	memcpy(&bits, &v, 8);
	int neg = (int)(bits >> 63), bq = (int)(bits >> 52) & 0x7ff;
	uint64_t t = bits & ((1ull << 52) - 1), c, f;
	int q, e;
	if (bq == 0 && t == 0) {
		memcpy(out, "-0.0", 4);
		return neg ? 4 : (out[0] = '0', 1);
	}
	if (bq) {
		c = t | (1ull << 52);
		q = bq - 1075;
		if (q < 0 && q > -53 && (c & ((1ull << -q) - 1)) == 0) /* an integer below 2^53: exact */
			return put_dec(neg, c >> -q, 0, 15, out);
	} else {
		c = t;
		q = -1074;
	}
	dec64(q, c, t == 0 && bq > 1, &f, &e);
	return put_dec(neg, f, e, 15, out);
}

/*
 * JSON readers get a float32 by parsing a double and narrowing it. That double rounding can move a decimal that
 * lies inside v's rounding interval, but within half a double ulp of one of its ends, onto that end, and the
 * narrowing then rounds to even, maybe away from v (7.038531e-26 is such a case: strtof reads it as v,
 * (float)strtod does not). dec32 flags every value whose interval ends it computed within 2^−21 units of an
 * integer (about 2^−20 of all floats; the hazard needs less than 2^−23): those take this path, the previous
 * writer's search, with both readings checked (9 digits always pass: the rounding error is far inside the
 * interval).
 */
static size_t f32_careful(float v, int neg, char *out)
{
	char t[48];
	int prec;
	for (prec = 1; prec < 9; prec++) {
		snprintf(t, sizeof t, "%.*e", prec - 1, (double)v);
		if ((float)strtod(t, NULL) == v && strtof(t, NULL) == v)
			break;
	}
	snprintf(t, sizeof t, "%.*e", prec - 1, (double)v);
	uint64_t f = 0;
	const char *p = t + neg;
	for (; *p != 'e'; p++)
		if (*p != '.')
			f = f * 10 + (uint64_t)(*p - '0');
	return put_dec(neg, f, atoi(p + 1) - (prec - 1), 6, out);
}

size_t ax__fmt_f32(float v, char *out)
{
	uint32_t bits, f;
	memcpy(&bits, &v, 4);
	int neg = (int)(bits >> 31), bq = (int)(bits >> 23) & 0xff, q, e;
	uint32_t t = bits & ((1u << 23) - 1), c;
	if (bq == 0 && t == 0) {
		memcpy(out, "-0.0", 4);
		return neg ? 4 : (out[0] = '0', 1);
	}
	if (bq) {
		c = t | (1u << 23);
		q = bq - 150;
		if (q < 0 && q > -24 && (c & ((1u << -q) - 1)) == 0)
			return put_dec(neg, c >> -q, 0, 6, out);
	} else {
		c = t;
		q = -149;
	}
	if (dec32(q, c, t == 0 && bq > 1, &f, &e))
		return f32_careful(v, neg, out);
	return put_dec(neg, f, e, 6, out);
}
