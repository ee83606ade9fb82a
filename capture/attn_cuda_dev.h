/*
 * attn_cuda_dev.h — device helpers shared by the CUDA backend's kernels (attn_cuda_fast.cu, the decode fast path,
 * and attn_cuda_prefill.cu, the prefill path): the ranking every top-k list uses (higher value, then lower
 * position), the finiteness test behind -EDOM, the online logsumexp (add one score, merge two partial sums, the
 * value), the job lookup by CTA and the checked read of an index value. Internal to capture/. Included after
 * the CUDA runtime, or after attn_cuda_fast_emu.h in the CPU emulator builds (AXF_EMU / AXP_EMU), which define
 * __device__, __forceinline__ and __expf for the host.
 */
#ifndef ATTNX_CAPTURE_ATTN_CUDA_DEV_H
#define ATTNX_CAPTURE_ATTN_CUDA_DEV_H

#include <math.h>
#include <stdint.h>

/* (a, ap) ranks before (b, bp): higher value, then lower position. */
__device__ __forceinline__ bool fb(float a, int ap, float b, int bp)
{
	return a > b || (a == b && ap < bp);
}

__device__ __forceinline__ bool finite_f(float x)
{
	return x - x == 0.0f; /* false for NaN and ±inf */
}

/* exp(x), x ≤ 0, for the logsumexps below: one ex2.approx with denormal results flushed to 0 on the GPU (a term
 * below 2^-126 of the running max's 1 is below s's resolution; __expf spends four more instructions per call on
 * them, ~5% of the heads loop's instructions: session 8, ncu of 1 × 128K heads); expf in the CPU emulators. */
__device__ __forceinline__ float lse_exp(float x)
{
#if defined(__CUDA_ARCH__)
	float y;
	asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
	return y;
#else
	return expf(x);
#endif
}

/* Online logsumexp: (m, s) holds max m and Σ exp(x - m); -inf scores add nothing. */
__device__ __forceinline__ void lse_add(float &m, float &s, float x)
{
	if (x == -INFINITY)
		return;
	if (x > m) {
		s = s * lse_exp(m - x) + 1.f;
		m = x;
	} else {
		s += lse_exp(x - m);
	}
}

/* Two scores at once (-inf: none): the max moves at most once, then both add (the heads loop's two keys per
 * column). A NaN or inf score leaves s NaN or the max inf (the callers flag non-finite scores apart). */
__device__ __forceinline__ void lse_add2(float &m, float &s, float x, float y)
{
	const float mx = fmaxf(x, y);
	if (mx == -INFINITY)
		return;
	if (mx > m) {
		s *= lse_exp(m - mx);
		m = mx;
	}
	s += lse_exp(x - m) + lse_exp(y - m);
}

__device__ __forceinline__ void lse_merge(float &m, float &s, float m2, float s2)
{
	if (m2 == -INFINITY || s2 == 0.f)
		return;
	if (m == -INFINITY) {
		m = m2;
		s = s2;
	} else if (m2 > m) {
		s = s * lse_exp(m - m2) + s2;
		m = m2;
	} else {
		s += s2 * lse_exp(m2 - m);
	}
}

__device__ __forceinline__ float lse_value(float m, float s)
{
	return (m == -INFINITY || s == 0.f) ? -INFINITY : m + logf(s);
}

/* The largest i < n with off[i] ≤ x (off[0] = 0, off increasing): which job a CTA (or a merge unit) serves. */
__device__ __forceinline__ int find_le(const uint32_t *off, uint32_t n, uint32_t x)
{
	int lo = 0, hi = (int)n;
	while (hi - lo > 1) {
		const int mid = (lo + hi) >> 1;
		if (off[mid] <= x)
			lo = mid;
		else
			hi = mid;
	}
	return lo;
}

/* Slot of index entry `at` (the value as signed, then unsigned: negative values are out of range); an
 * out-of-pool value sets bad and reads slot 0 instead, so nothing outside the pool is ever read. */
__device__ __forceinline__ uint64_t load_index(const void *index, bool i32, uint64_t at)
{
	return i32 ? (uint64_t)(int64_t)((const int32_t *)index)[at] : (uint64_t)((const int64_t *)index)[at];
}

/* load_slot's check, for a value load_index fetched earlier: checking right at the load makes the thread wait for
 * it there (the fast path's prologue loads its first stages' values before the CTA barrier and checks them after). */
__device__ __forceinline__ uint64_t check_slot(uint64_t s, uint64_t n_slots, uint32_t &bad)
{
	if (s >= n_slots) {
		bad = 1;
		s = 0;
	}
	return s;
}

__device__ __forceinline__ uint64_t load_slot(const void *index, bool i32, uint64_t at, uint64_t n_slots,
					      uint32_t &bad)
{
	return check_slot(load_index(index, i32, at), n_slots, bad);
}

#endif
