/*
 * qk_gen.h — the deterministic world of the test producer, shared by attnx-test-producer and the end-to-end checker
 * so the checker can recompute every Q and K value (and every generated token) independently of the capture.
 *
 * Values: element d of the Q row (query head h) or K row (KV head h) of layer l at absolute position p of a request
 * with seed s is m/64 with m an integer in [-128, 127] drawn from splitmix64 of (s, what, l, p, h, d). Such values
 * are exact in f32 and bf16 alike, and with a power-of-two head_dim (scale 1/sqrt(D) a power of two for D = 4^n) and
 * a power-of-two head count every logit is exactly representable: the capture's f32 arithmetic and a float64 brute
 * force agree bit for bit on the logits, so top-k sets and orders compare exactly (ties: lower position first).
 *
 * Tokens: the token at position p ≥ P (generated) is AX_QK_WORD_BASE + pick(s, p) % AX_QK_N_WORDS; prompt tokens
 * come from the producer's toy tokenizer (bytes 0..255 and the words below). The request seed is the body's
 * integer "seed" if present, else ax_qk_text_seed(prompt text).
 * Everything here is a pure inline function: thread-safe.
 */
#ifndef ATTNX_TESTS_QK_GEN_H
#define ATTNX_TESTS_QK_GEN_H

#include <stddef.h>
#include <stdint.h>

enum { AX_QK_Q = 1, AX_QK_K = 2, AX_QK_TOKEN = 3 };

#define AX_QK_WORD_BASE 256
#define AX_QK_N_WORDS 32

/* The toy vocabulary's words (ids AX_QK_WORD_BASE + i); each starts with a space, like a BPE word token. */
static const char *const ax_qk_words[AX_QK_N_WORDS] = {
	" the", " cat", " sat", " on", " a", " mat", " and", " dog", " ran", " to", " big", " red",
	" house", " in", " sun", " was", " warm", " it", " slept", " all", " day", " then", " went", " home",
	" under", " tree", " bird", " sang", " soft", " song", " night", " fell",
};

static inline uint64_t ax_qk_mix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

/* Hash of one row: (seed, what, layer, position, head). */
static inline uint64_t ax_qk_row_key(uint64_t seed, uint32_t what, uint32_t layer, uint64_t pos, uint32_t head)
{
	uint64_t h = ax_qk_mix(seed ^ ((uint64_t)what << 48));
	h = ax_qk_mix(h ^ layer);
	h = ax_qk_mix(h ^ pos);
	return ax_qk_mix(h ^ head);
}

/* Element d of a row, as the integer m (value = m / 64). */
static inline int ax_qk_m(uint64_t row_key, uint32_t d)
{
	return (int)(ax_qk_mix(row_key + d) >> 56) - 128; /* [-128, 127] */
}

/* One row of `dim` floats: out[d] = m/64. */
static inline void ax_qk_row(float *out, uint32_t dim, uint64_t seed, uint32_t what, uint32_t layer, uint64_t pos,
			     uint32_t head)
{
	uint64_t key = ax_qk_row_key(seed, what, layer, pos, head);
	for (uint32_t d = 0; d < dim; d++)
		out[d] = (float)ax_qk_m(key, d) / 64.0f;
}

/* The generated token at absolute position pos (≥ prompt length). */
static inline int32_t ax_qk_token(uint64_t seed, uint64_t pos)
{
	return AX_QK_WORD_BASE + (int32_t)(ax_qk_mix(ax_qk_mix(seed ^ ((uint64_t)AX_QK_TOKEN << 48)) ^ pos) %
					   AX_QK_N_WORDS);
}

/* Seed of a request without an explicit "seed": FNV-1a 64 of the prompt text. */
static inline uint64_t ax_qk_text_seed(const char *s, size_t n)
{
	uint64_t h = 0xcbf29ce484222325ull;
	for (size_t i = 0; i < n; i++)
		h = (h ^ (uint8_t)s[i]) * 0x100000001b3ull;
	return h;
}

#endif
