/*
 * attn_cuda_prefill.cu — the CUDA backend's prefill path (attn_cuda_prefill.h): a block of up to R query rows of
 * one request and layer (consecutive positions) scored against its keys in one pass, on the tensor cores.
 *
 * How a split CTA works (one split of one pass-block, 8 warps, 256 threads). It loads the block's Q rows once
 * (checked: NaN/inf flags the row -EDOM) into shared memory as per-warp columns: warp w owns KV head w and its
 * R·G columns (row r, group head g → column r·G + g, query head w·G + g). Then per stage of AXP_TS = 16 keys:
 * every thread loads part of the 16 key rows (each index value checked against n_slots first: outside, the rows
 * that see that key are flagged -ERANGE and slot 0 is read instead, so nothing outside the pool is read) into
 * the stage buffer; warp w multiplies its KV head's 16 × 128 keys (mma.sync m16n8k16, keys as A) by its Q
 * columns, 8 at a time (n-tiles, Q as B), in f32, scales and writes the scores to shared memory as one 16-key
 * row per (row, query head) list; in the mean modes 16·R threads then sum each row's H scores per key (mean_prob:
 * Σ exp(s − lse_h), logsumexps from pass A); finally thread l owns list l (heads: l = r·H + h; mean: l = r) and
 * walks the 16 keys in position order, skipping those its row does not see (causality, window), checking each
 * value, updating its online logsumexp and its sorted top-k (a per-thread array: entries move only when a key
 * beats the k-th, ties to the lower position since keys come in order). At the end each list writes its partial
 * row (logsumexp, K entries) and the CTA ORs its rows' flags into the global row flags. The merge launch gives
 * one warp per list: logsumexp over the splits, then a K-round k-way merge of the splits' sorted lists (each
 * lane owns up to 8 splits' heads; the warp's best by (value desc, position asc) is taken each round), exact.
 * Passes: A = heads, mean_logit and mean_prob's per-(row, head) logsumexps (heads with K 0, written to the lse
 * buffer by its merge); B = mean_prob's probability pass; each pass is a split launch and a merge launch.
 *
 * Simpler than the decode fast path on purpose (plain loads and CTA barriers rather than a bulk-copy ring; lists
 * per thread rather than warp lists): the saving here is that R rows share each key's load and its mma.
 *
 * What has run where: the kernels under the CPU SIMT emulator (attn_cuda_prefill_emu_test.cc, AXP_EMU: mma
 * fragments, shuffles, barriers from attn_cuda_fast_emu.h) against float64, ax_attn_cpu and the emulated generic
 * path; the host half in attn_cuda_prefill_test.c. On an H200 (scripts/gpu-test's prefill stage,
 * attn_cuda_prefill_gpu.cu): the first design at 59d905b and this one at afc542f (run 10, capture/README.md
 * "Prefill rows"): every row against ax_attn_cpu, float64 and the existing path, memcheck and racecheck clean.
 * Not run on a GPU: the min_rows gate (4ee2cca, host grouping only) and the shared helpers of attn_cuda_dev.h
 * (8848d67 → the next commit: the PTX of both .cu files is identical before and after).
 */
#ifdef AXP_EMU
#include "attn_cuda_fast_emu.h" /* the CPU's SIMT emulator (attn_cuda_prefill_emu_test.cc): kernels only */
#define AXP_DYN_SMEM(name) AXF_DYN_SMEM(name)
#else
#include <cuda_runtime.h>
#define AXP_DYN_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "attn.h"
}
#include "attn_cuda.h"
#include "attn_cuda_prefill.h"
#include "attn_cuda_dev.h" /* fb, finite_f, lse_add / lse_merge / lse_value (shared with the fast path) */

#define AXP_FULLM 0xffffffffu

/* ---- device helpers ------------------------------------------------------------------------------------------- */

#ifndef AXP_EMU
template <int F16>
__device__ __forceinline__ void axp_mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
					uint32_t b1)
{
	if (F16)
		asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
			     "{%8,%9}, {%0,%1,%2,%3};\n"
			     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
			     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
	else
		asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
			     "{%8,%9}, {%0,%1,%2,%3};\n"
			     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
			     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
#else
template <int F16>
static inline void axp_mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1)
{
	mma16816<F16>(c, a0, a1, a2, a3, b0, b1);
}
#endif

/* 1 if any of the 8 16-bit elements of v is NaN or infinite (exponent all ones). */
__device__ __forceinline__ uint32_t axp_nonfinite8(uint4 v, uint32_t f16)
{
	const uint32_t e = f16 ? 0x7c007c00u : 0x7f807f80u;
	const uint32_t w[4] = {v.x, v.y, v.z, v.w};
	uint32_t bad = 0;
	for (int i = 0; i < 4; i++)
		bad |= ((w[i] & 0xffffu & e) == (e & 0xffffu)) | ((w[i] & 0xffff0000u & e) == (e & 0xffff0000u));
	return bad;
}

/* Key j (offset from lo) has an out-of-pool slot: flag every row of the block that sees it. */
__device__ __forceinline__ void axp_flag_range(uint32_t *rfl, const axp_blk &b, uint32_t j)
{
	for (uint32_t r = 0; r < b.R; r++) {
		const uint64_t pos = b.p0 + r;
		if (b.lo + j <= pos && b.lo + j >= axp_first_key(pos, b.window))
			atomicOr(&rfl[r], AXF_F_RANGE);
	}
}

/* ---- the split kernel ------------------------------------------------------------------------------------------- */

/* The block's Q rows into per-warp columns (checked: NaN/inf flags the row), mean_prob's logsumexps, zeroed row
 * flags. Column layout: warp g's columns at qs + (g·ncol + col)·AXP_QS, col = r·G + (h − g·G). */
__device__ __forceinline__ void axp_load_q(const axp_args &a, const axp_blk &b, unsigned char *qs, float *lse_s,
					   uint32_t *rfl)
{
	const int tid = threadIdx.x, R = (int)b.R, H = (int)b.H, G = (int)b.G, ncol = R * G;
	for (int r = tid; r < R; r += AXP_NT)
		rfl[r] = 0;
	__syncthreads();
	const int n = R * H * 16;
	for (int u0 = tid; u0 < n; u0 += 8 * AXP_NT) { /* 8 units' loads in flight per thread, then their stores */
		uint4 v[8];
#pragma unroll
		for (int q = 0; q < 8; ++q) {
			const int u = u0 + q * AXP_NT, r = u / (H * 16), rem = u - r * H * 16;
			v[q] = u < n ? ((const uint4 *)a.qptr[b.row0 + r])[rem] : make_uint4(0, 0, 0, 0);
		}
#pragma unroll
		for (int q = 0; q < 8; ++q) {
			const int u = u0 + q * AXP_NT, r = u / (H * 16), rem = u - r * H * 16, h = rem >> 4, c16 = rem & 15;
			if (u >= n)
				continue;
			if (axp_nonfinite8(v[q], b.f16))
				atomicOr(&rfl[r], AXF_F_DOM);
			const int g = h / G, col = r * G + (h - g * G);
			*(uint4 *)(qs + (size_t)(g * ncol + col) * AXP_QS + (size_t)c16 * 16) = v[q];
		}
	}
	if (b.mode == AXF_M_PROB)
		for (int u = tid; u < R * H; u += AXP_NT)
			lse_s[u] = a.lse[b.lse_in + u];
}

/* 16-byte units of a stage's key rows per thread: 16 keys × H_kv·256 bytes over 256 threads (H_kv ≤ 8). Unit
 * i of a thread is u = tid + 256·i: key u / (H_kv·16), bytes (u mod H_kv·16)·16 .. +16 of its row — the same for
 * every stage, so each thread computes its units' key and offset once (axp_units). */
#define AXP_KU (AXP_TS * AXF_MAX_HKV * 16 / AXP_NT)

struct axp_units {
	int kk[AXP_KU];   /* key of unit i within the stage, or AXP_TS (no unit: H_kv < 8) */
	uint32_t off[AXP_KU]; /* byte offset of unit i within a key row (= within the stage row) */
};

__device__ __forceinline__ void axp_units_init(axp_units &U, int Hkv)
{
	const int per = Hkv * 16;
#pragma unroll
	for (int i = 0; i < AXP_KU; ++i) {
		const int u = (int)threadIdx.x + i * AXP_NT, kk = u / per;
		U.kk[i] = kk < AXP_TS ? kk : AXP_TS;
		U.off[i] = (uint32_t)(u - kk * per) * 16;
	}
}

/* Fetch keys [tile, tile + nv) of the block into registers; every slot is checked before its row is read (outside
 * the pool: the rows that see the key are flagged -ERANGE and slot 0 is read instead). Keys past nv are zero. */
__device__ __forceinline__ void axp_fetch_keys(const axp_blk &b, const axp_units &U, uint4 (&v)[AXP_KU],
					       uint32_t *rfl, uint32_t tile, int nv)
{
	const bool i32 = b.idt == AX_DTYPE_I32;
#pragma unroll
	for (int i = 0; i < AXP_KU; ++i) {
		v[i] = make_uint4(0, 0, 0, 0);
		if (U.kk[i] < nv) {
			uint32_t bad = 0;
			const uint64_t slot = load_slot(b.index, i32, b.lo + tile + (uint32_t)U.kk[i], b.n_slots, bad);
			if (bad && U.off[i] == 0)
				axp_flag_range(rfl, b, tile + (uint32_t)U.kk[i]);
			v[i] = *(const uint4 *)((const char *)b.k + slot * b.s0 * 2 + U.off[i]);
		}
	}
}

/* The fetched units into the stage buffer (row kk at kk·AXF_ROWS_SM). */
__device__ __forceinline__ void axp_store_keys(const axp_units &U, const uint4 (&v)[AXP_KU], unsigned char *kbuf)
{
#pragma unroll
	for (int i = 0; i < AXP_KU; ++i)
		if (U.kk[i] < AXP_TS)
			*(uint4 *)(kbuf + (size_t)U.kk[i] * AXF_ROWS_SM + U.off[i]) = v[i];
}

/* Two n-tiles (Q columns col0 and col1 of this lane's group; past ncol: zero) against the A fragments of all 128
 * dims: four independent accumulator chains (n-tile × even/odd 32-dim chunk), summed at the end. */
template <int F16>
__device__ __forceinline__ void axp_tile_pair(const uint4 (&ka)[4], const uint4 (&kb)[4], const unsigned char *qw,
					      int col0, int col1, int ncol, float (&o0)[4], float (&o1)[4])
{
	const int t = threadIdx.x & 3;
	float a0[4] = {0.f, 0.f, 0.f, 0.f}, a1[4] = {0.f, 0.f, 0.f, 0.f};
	float b0[4] = {0.f, 0.f, 0.f, 0.f}, b1[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
	for (int c = 0; c < 4; ++c) {
		const uint4 q0 = col0 < ncol ? *(const uint4 *)(qw + (size_t)col0 * AXP_QS + c * 64 + t * 16)
					     : make_uint4(0, 0, 0, 0);
		const uint4 q1 = col1 < ncol ? *(const uint4 *)(qw + (size_t)col1 * AXP_QS + c * 64 + t * 16)
					     : make_uint4(0, 0, 0, 0);
		float(&x)[4] = (c & 1) ? a1 : a0;
		float(&y)[4] = (c & 1) ? b1 : b0;
		axp_mma<F16>(x, ka[c].x, kb[c].x, ka[c].y, kb[c].y, q0.x, q0.y);
		axp_mma<F16>(y, ka[c].x, kb[c].x, ka[c].y, kb[c].y, q1.x, q1.y);
		axp_mma<F16>(x, ka[c].z, kb[c].z, ka[c].w, kb[c].w, q0.z, q0.w);
		axp_mma<F16>(y, ka[c].z, kb[c].z, ka[c].w, kb[c].w, q1.z, q1.w);
	}
#pragma unroll
	for (int e = 0; e < 4; ++e)
		o0[e] = a0[e] + a1[e], o1[e] = b0[e] + b1[e];
}

/* Warp w (< H_kv): the stage's 16 keys of KV head w (A, loaded once) times its ncol = R·G Q columns (B), two
 * n-tiles of 8 columns at a time; scaled scores into sc in column order: score row w·ncol + col (no division). */
template <int F16>
__device__ __forceinline__ void axp_scores(int ncol, float scale, const unsigned char *kbuf, const unsigned char *qs,
					   float *sc)
{
	const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, grow = lane >> 2, t = lane & 3;
	const int NT = (ncol + 7) / 8;
	const unsigned char *qw = qs + (size_t)w * ncol * AXP_QS;
	float *sw = sc + (size_t)w * ncol * AXP_SCS;
	uint4 ka[4], kb[4];
#pragma unroll
	for (int c = 0; c < 4; ++c) {
		ka[c] = *(const uint4 *)(kbuf + (size_t)grow * AXF_ROWS_SM + w * 256 + c * 64 + t * 16);
		kb[c] = *(const uint4 *)(kbuf + (size_t)(grow + 8) * AXF_ROWS_SM + w * 256 + c * 64 + t * 16);
	}
	for (int nt = 0; nt < NT; nt += 2) {
		float o[2][4];
		axp_tile_pair<F16>(ka, kb, qw, nt * 8 + grow, (nt + 1) * 8 + grow, ncol, o[0], o[1]);
#pragma unroll
		for (int q = 0; q < 2; ++q)
#pragma unroll
			for (int e = 0; e < 4; ++e) { /* o[q][e]: key grow (+8 for e ≥ 2), column (nt+q)·8 + 2t + (e & 1) */
				const int cc = (nt + q) * 8 + 2 * t + (e & 1);
				if (cc < ncol)
					sw[(size_t)cc * AXP_SCS + grow + (e >> 1) * 8] = o[q][e] * scale;
			}
	}
}

/* A (sub-)list's top-k lives in shared memory, unsorted while it fills (entry e of thread t at e·AXP_NT + t); its
 * scalars — online logsumexp (m, s), count, bar (the worst entry once K are held, at index bi; (-inf, INT_MAX)
 * before: every value passes), error bit — in registers of the owning thread. */
struct axp_own {
	float m, s, bx;
	int cnt, bp, bi;
	uint32_t bad;
};

/* Offer (x, j): appended while fewer than K are held, else it replaces the bar; then the new bar is the worst of
 * the K entries (one pass of independent loads: no shifting chain). A value equal to the bar's comes later, so it
 * ranks after it and is refused: ties keep the lower position. */
__device__ __forceinline__ void axp_offer(axp_own &L, float *lx, int *lp, int K, float x, int j)
{
	if (!fb(x, j, L.bx, L.bp))
		return;
	const int at = L.cnt < K ? L.cnt++ : L.bi;
	lx[at * AXP_NT] = x;
	lp[at * AXP_NT] = j;
	if (L.cnt < K)
		return;
	float wx = lx[0];
	int wp = lp[0], wi = 0;
	for (int e = 1; e < K; ++e) {
		const float ex = lx[e * AXP_NT];
		const int ep = lp[e * AXP_NT];
		if (fb(wx, wp, ex, ep)) /* e ranks after the worst so far */
			wx = ex, wp = ep, wi = e;
	}
	L.bx = wx, L.bp = wp, L.bi = wi;
}

/* Sort a list's cnt entries best first (once, at the end of the split). */
__device__ __forceinline__ void axp_sort(float *lx, int *lp, int cnt)
{
	for (int i = 1; i < cnt; ++i) {
		const float x = lx[i * AXP_NT];
		const int p = lp[i * AXP_NT];
		int at = i;
		while (at > 0 && fb(x, p, lx[(at - 1) * AXP_NT], lp[(at - 1) * AXP_NT])) {
			lx[at * AXP_NT] = lx[(at - 1) * AXP_NT];
			lp[at * AXP_NT] = lp[(at - 1) * AXP_NT];
			at--;
		}
		lx[at * AXP_NT] = x;
		lp[at * AXP_NT] = p;
	}
}

/* Heads mode: the owner of list (row, head) takes the stage's 16 scores its row sees: the stage maximum first,
 * then the exponentials (independent: no serial chain through the running maximum), then the top-k offers. */
__device__ __forceinline__ void axp_take_heads(axp_own &L, float *lx, int *lp, const float *vals, uint32_t tile,
					       int nv, uint32_t rs, uint32_t re, int K)
{
	float x[AXP_TS], mx = -INFINITY;
	uint32_t vis = 0;
#pragma unroll
	for (int kk = 0; kk < AXP_TS; ++kk) {
		const uint32_t j = tile + (uint32_t)kk;
		x[kk] = vals[kk];
		if (kk < nv && j >= rs && j <= re) {
			if (finite_f(x[kk]))
				vis |= 1u << kk, mx = fmaxf(mx, x[kk]);
			else
				L.bad = 1;
		}
	}
	if (!vis)
		return;
	if (mx > L.m) {
		L.s = L.m == -INFINITY ? 0.f : L.s * __expf(L.m - mx);
		L.m = mx;
	}
	float add = 0.f;
#pragma unroll
	for (int kk = 0; kk < AXP_TS; ++kk)
		if (vis >> kk & 1)
			add += __expf(x[kk] - L.m);
	L.s += add;
	if (K)
#pragma unroll
		for (int kk = 0; kk < AXP_TS; ++kk)
			if ((vis >> kk & 1) && fb(x[kk], (int)(tile + (uint32_t)kk), L.bx, L.bp))
				axp_offer(L, lx, lp, K, x[kk], (int)(tile + (uint32_t)kk));
}

/* Mean modes: the owner of sub-list (row r, key slot kk) takes key tile + kk if its row sees it: the mean over
 * heads of its scores (score rows w·ncol + r·G + g; mean_prob: log of the mean of exp(s − lse_h)); a non-finite
 * sum flags the row (mean_prob's log 0 = -inf is a value). */
__device__ __forceinline__ void axp_take_mean(axp_own &L, float *lx, int *lp, const axp_blk &b, const float *sc,
					      const float *lse_s, int r, int kk, uint32_t tile, int nv, uint32_t rs,
					      uint32_t re, int K)
{
	const uint32_t j = tile + (uint32_t)kk;
	if (kk >= nv || j < rs || j > re)
		return;
	const int G = (int)b.G, Hkv = (int)b.Hkv, ncol = (int)b.R * G;
	float v4[4] = {0.f, 0.f, 0.f, 0.f}; /* four chains */
	for (int w = 0; w < Hkv; ++w) {
		const float *col = sc + ((size_t)w * ncol + (size_t)r * G) * AXP_SCS + kk;
		if (b.mode == AXF_M_LOGIT)
			for (int g = 0; g < G; ++g)
				v4[g & 3] += col[(size_t)g * AXP_SCS];
		else
			for (int g = 0; g < G; ++g)
				v4[g & 3] += __expf(col[(size_t)g * AXP_SCS] - lse_s[r * (int)b.H + w * G + g]);
	}
	const float v = (v4[0] + v4[1]) + (v4[2] + v4[3]);
	if (!finite_f(v)) {
		L.bad = 1;
		return;
	}
	const float x = b.mode == AXF_M_LOGIT ? v * b.inv_h : logf(v * b.inv_h);
	lse_add(L.m, L.s, x);
	if (K)
		axp_offer(L, lx, lp, K, x, (int)j);
}

__global__ void __launch_bounds__(AXP_NT, 1) axp_split_kernel(const __grid_constant__ axp_args a)
{
	AXP_DYN_SMEM(smem);
	const int tid = threadIdx.x, w = tid >> 5;
	const int bi = find_le(a.so, a.nb, blockIdx.x);
	const axp_blk b = a.blk[bi]; /* a copy: its fields in registers, not reloaded from global memory */
	const uint32_t sl = blockIdx.x - a.so[bi], a0 = sl * b.chunk, a1 = min(b.n, a0 + b.chunk);
	const int nst = (int)((a1 - a0 + AXP_TS - 1) / AXP_TS), K = (int)b.K, nq = (int)(b.R * b.H);
	const int ncol = (int)(b.R * b.G), Hkv = (int)b.Hkv;
	const bool heads = b.mode == AXF_M_HEADS;
	const int sub = heads ? 1 : AXP_SUB, per = heads ? (int)b.H : AXP_SUB; /* owners per row */
	unsigned char *kbuf = smem, *qs = smem + axp_off_qs(b.K);
	float *lx = (float *)(smem + axp_off_list()) + tid;
	int *lp = (int *)(smem + axp_off_list()) + (size_t)AXP_NT * b.K + tid;
	float *sc = (float *)(smem + axp_off_sc(b.K, nq));
	float *lse_s = (float *)(smem + axp_off_lse(b.K, nq));
	uint32_t *rfl = (uint32_t *)(smem + axp_off_fl(b.K, nq));

	axp_load_q(a, b, qs, lse_s, rfl); /* ends with a barrier after zeroing rfl; Q is covered by the loop's first */
	/* Owners. Heads: thread tid owns score row tid (column order: KV head tid / ncol, column tid mod ncol = row r,
	 * group head g), i.e. list r·H + h with h = (tid / ncol)·G + g — consecutive threads read consecutive rows
	 * (conflict-free). Mean modes: thread tid owns sub-list (row tid / 16, key slot tid mod 16). */
	const bool own = tid < (int)b.R * per;
	int orow = 0, okk = 0, hl = 0; /* row; key slot (mean); list (heads) */
	if (heads && own) {
		const int wq = tid / ncol, col = tid - wq * ncol;
		orow = col / (int)b.G;
		hl = orow * (int)b.H + wq * (int)b.G + (col - orow * (int)b.G);
	} else if (own) {
		orow = tid / per, okk = tid - orow * per;
	}
	const uint64_t opos = b.p0 + (uint64_t)orow;
	const uint32_t rs = (uint32_t)(axp_first_key(opos, b.window) - b.lo), re = (uint32_t)(opos - b.lo);
	const float *vals = sc + (size_t)tid * AXP_SCS; /* heads: this owner's score row */
	axp_own L;
	L.m = -INFINITY, L.s = 0.f, L.bx = -INFINITY, L.cnt = 0, L.bp = INT_MAX, L.bi = 0, L.bad = 0;
	axp_units U;
	axp_units_init(U, Hkv);
	uint4 kv[AXP_KU];
	if (nst > 0)
		axp_fetch_keys(b, U, kv, rfl, a0, (int)min((uint32_t)AXP_TS, a1 - a0));
	for (int i = 0; i < nst; ++i) {
		const uint32_t tile = a0 + (uint32_t)i * AXP_TS;
		const int nv = (int)min((uint32_t)AXP_TS, a1 - tile);
		axp_store_keys(U, kv, kbuf);
		__syncthreads(); /* keys staged (the first time: Q too); every owner is done with the last scores */
		if (i + 1 < nst) /* the next stage's loads in flight while this one computes */
			axp_fetch_keys(b, U, kv, rfl, tile + AXP_TS, (int)min((uint32_t)AXP_TS, a1 - tile - AXP_TS));
		if (w < Hkv && b.f16) /* warp-uniform */
			axp_scores<1>(ncol, b.scale, kbuf, qs, sc);
		else if (w < Hkv)
			axp_scores<0>(ncol, b.scale, kbuf, qs, sc);
		__syncthreads(); /* scores ready; the stage buffer is free */
		if (own && heads)
			axp_take_heads(L, lx, lp, vals, tile, nv, rs, re, K);
		else if (own)
			axp_take_mean(L, lx, lp, b, sc, lse_s, orow, okk, tile, nv, rs, re, K);
	}

	if (own) { /* this split's partial (sub-)list: list l = orow·H + head (heads) or orow, sub-list okk (mean) */
		const uint64_t l = heads ? (uint64_t)hl : (uint64_t)orow;
		const uint64_t pr = (l * b.S + sl) * sub + (heads ? 0 : okk), e0 = b.ent0 + pr * (uint64_t)K;
		a.part_lse[b.part0 + pr] = lse_value(L.m, L.s);
		axp_sort(lx, lp, L.cnt);
		for (int e = 0; e < K; ++e) {
			a.part_s[e0 + e] = e < L.cnt ? lx[e * AXP_NT] : -INFINITY;
			a.part_p[e0 + e] = e < L.cnt ? lp[e * AXP_NT] : -1;
		}
		if (L.bad)
			atomicOr(&rfl[orow], AXF_F_DOM);
	}
	__syncthreads();
	for (int r = tid; r < (int)b.R; r += AXP_NT)
		if (rfl[r])
			atomicOr(&a.rflags[b.row0 + r], rfl[r]);
}

/* ---- the merge kernel ------------------------------------------------------------------------------------------- */

/* Warp w of CTA c merges list c·8 + w of the pass: logsumexp over its S splits, then K rounds of a k-way merge
 * of the splits' sorted lists (lane owns splits lane, lane + 32, ...; ptr[u]: its next entry in each). */
__global__ void __launch_bounds__(AXP_NT, 1) axp_merge_kernel(const __grid_constant__ axp_args a)
{
	const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
	const uint32_t g = blockIdx.x * AXP_NW + (uint32_t)w;
	if (g >= a.mo[a.nb]) /* warp-uniform; no CTA barrier in this kernel */
		return;
	const int bi = find_le(a.mo, a.nb, g);
	const axp_blk &b = a.blk[bi];
	const uint32_t l = g - a.mo[bi];
	const int S = (int)(b.S * axp_subs(&b)), K = (int)b.K; /* the list's partial lists: splits × sub-lists */
	const uint64_t pr0 = b.part0 + (uint64_t)l * S, e0 = b.ent0 + (uint64_t)l * S * K;
	float m = -INFINITY, s = 0.f;
	for (int i = lane; i < S; i += 32) {
		const float x = a.part_lse[pr0 + i];
		if (x != -INFINITY)
			lse_merge(m, s, x, 1.f);
	}
	for (int o = 16; o; o >>= 1) {
		const float m2 = __shfl_xor_sync(AXP_FULLM, m, o), s2 = __shfl_xor_sync(AXP_FULLM, s, o);
		lse_merge(m, s, m2, s2);
	}
	const float lse = lse_value(m, s);
	if (b.res0 < 0) {
		if (lane == 0)
			a.lse[b.lse_out + l] = lse;
		return;
	}
	if (lane == 0)
		a.res_lse[b.res0 + l] = b.mode == AXF_M_PROB ? 0.f : lse;
	int ptr[AXP_MAX_SPLITS * AXP_SUB / 32];
	for (int u = 0; u < AXP_MAX_SPLITS * AXP_SUB / 32; ++u)
		ptr[u] = 0;
	axf_ent *out = a.res_ent + b.rent0 + (uint64_t)l * K;
	for (int e = 0; e < K; ++e) {
		float bx = -INFINITY;
		int bp = INT_MAX, bu = -1;
		for (int u = 0; u * 32 + lane < S; ++u) {
			if (ptr[u] >= K)
				continue;
			const uint64_t q = e0 + (uint64_t)(u * 32 + lane) * K + ptr[u];
			const float x = a.part_s[q];
			const int p = a.part_p[q];
			if (p >= 0 && fb(x, p, bx, bp))
				bx = x, bp = p, bu = u;
		}
		float wx = bx;
		int wp = bp;
		for (int o = 16; o; o >>= 1) {
			const float ox = __shfl_xor_sync(AXP_FULLM, wx, o);
			const int op = __shfl_xor_sync(AXP_FULLM, wp, o);
			if (fb(ox, op, wx, wp))
				wx = ox, wp = op;
		}
		if (bu >= 0 && bp == wp) /* positions are distinct across splits: one lane took it */
			ptr[bu]++;
		if (lane == 0)
			out[e] = axf_ent{wx, wp == INT_MAX ? -1 : wp};
	}
}

/* ---- the driver ----------------------------------------------------------------------------------------------------- */
#ifndef AXP_EMU

struct ax_attn_prefill {
	int device;
	uint32_t sms, occ;
	cudaStream_t stream;    /* the context's */
	cudaEvent_t ev[2];      /* around the launches, when timing is on */
	int timing;
	float kernel_ms;
	cudaError_t err;
	char *dbuf;             /* device scratch */
	size_t dcap;
	char *hbuf;             /* pinned staging: tables up, flags and results down */
	size_t hcap;
	axp_plan *plan;
	uint32_t last_rows;
	uint32_t threads;       /* host threads of the expansion (AX_PREFILL_THREADS, default 4; below 8192 rows: 1) */
	ax_attn_job *sj;        /* the other jobs of a mixed batch, compacted */
	size_t sj_cap;
	uint32_t *si;
	size_t si_cap;
	ax_attn_result *sout;
	size_t sout_cap;
	int *src;
	size_t src_cap;
};

static int pf_fail(ax_attn_prefill *f, cudaError_t e)
{
	f->err = e;
	return e == cudaErrorMemoryAllocation ? -ENOMEM : -EIO;
}

static uint32_t env_u32(const char *name, uint32_t dflt, uint32_t lo, uint32_t hi)
{
	const char *v = getenv(name);
	char *end = NULL;
	if (!v || !*v)
		return dflt;
	unsigned long x = strtoul(v, &end, 10);
	return *end == '\0' && v[0] != '-' && x >= lo && x <= hi ? (uint32_t)x : dflt;
}

/* The kernels' shared-memory opt-in and occupancy (once); *occ = 0 when the path cannot run here. */
static void pf_setup(int device, int *occ, int *sms)
{
	int major = 0;
	*occ = 0;
	if (cudaSetDevice(device) != cudaSuccess ||
	    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
	    cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || major < 9) {
		cudaGetLastError();
		return;
	}
	const int smem = (int)AXP_SMEM_MAX;
	cudaFuncAttributes fa;
	int o = 0;
	if (cudaFuncGetAttributes(&fa, (const void *)axp_split_kernel) != cudaSuccess || fa.binaryVersion < 90 ||
	    cudaFuncGetAttributes(&fa, (const void *)axp_merge_kernel) != cudaSuccess ||
	    cudaFuncSetAttribute((const void *)axp_split_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) !=
		    cudaSuccess ||
	    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&o, (const void *)axp_split_kernel, AXP_NT, smem) !=
		    cudaSuccess) {
		cudaGetLastError();
		return;
	}
	*occ = o;
}

int ax__attn_prefill_new(ax_attn_prefill **out, int device, void *stream)
{
	if (!out)
		return -EINVAL;
	*out = NULL;
	const char *env = getenv("AX_ATTN_CUDA_PREFILL");
	if (env && strcmp(env, "0") == 0)
		return 0;
	int occ = 0, sms = 0;
	pf_setup(device, &occ, &sms);
	if (occ <= 0 || sms <= 0)
		return 0;
	ax_attn_prefill *f = (ax_attn_prefill *)calloc(1, sizeof *f);
	axp_plan *p = (axp_plan *)calloc(1, sizeof *p);
	if (!f || !p) {
		free(f);
		free(p);
		return -ENOMEM;
	}
	f->device = device;
	f->sms = (uint32_t)sms, f->occ = (uint32_t)occ;
	f->stream = (cudaStream_t)stream;
	f->kernel_ms = -1.f;
	f->plan = p;
	p->kn.rows = env_u32("AX_PREFILL_ROWS", AXP_ROWS_DEFAULT, 2, AXP_MAX_ROWS);
	p->kn.min_keys = env_u32("AX_PREFILL_MIN_KEYS", AXP_MIN_KEYS_DEFAULT, AXP_TS, 1u << 30);
	p->kn.min_rows = env_u32("AX_PREFILL_MIN_ROWS", AXP_MIN_ROWS_DEFAULT, 1, AXP_MAX_ROWS);
	p->kn.target = f->sms * f->occ * env_u32("AX_PREFILL_WAVES", 8, 1, 1024);
	f->threads = env_u32("AX_PREFILL_THREADS", 4, 1, AXP_MAX_THREADS);
	*out = f;
	return 0;
}

void ax__attn_prefill_free(ax_attn_prefill *f)
{
	if (!f)
		return;
	cudaStreamSynchronize(f->stream);
	if (f->ev[0])
		cudaEventDestroy(f->ev[0]);
	if (f->ev[1])
		cudaEventDestroy(f->ev[1]);
	cudaFree(f->dbuf);
	cudaFreeHost(f->hbuf);
	axp_plan_free(f->plan);
	free(f->sj);
	free(f->si);
	free(f->sout);
	free(f->src);
	free(f);
}

int ax__attn_prefill_take_error(ax_attn_prefill *f)
{
	if (!f)
		return 0;
	int e = (int)f->err;
	f->err = cudaSuccess;
	return e;
}

int ax__attn_prefill_timing(ax_attn_prefill *f, int on)
{
	if (!f)
		return -EINVAL;
	if (on && !f->ev[0]) {
		cudaError_t e = cudaEventCreate(&f->ev[0]);
		if (e == cudaSuccess)
			e = cudaEventCreate(&f->ev[1]);
		if (e != cudaSuccess)
			return pf_fail(f, e);
	}
	f->timing = on != 0;
	return 0;
}

float ax__attn_prefill_kernel_us(const ax_attn_prefill *f)
{
	return f && f->kernel_ms >= 0 ? f->kernel_ms * 1e3f : -1.f;
}

uint32_t ax__attn_prefill_last_rows(const ax_attn_prefill *f)
{
	return f ? f->last_rows : 0;
}

/* Grow the device scratch and the pinned staging to the plan's layout (contents not kept). */
static int pf_reserve(ax_attn_prefill *f, const axp_layout *y)
{
	cudaError_t e;
	if (y->total > AX_ATTN_CUDA_MAX_SCRATCH)
		return -ENOMEM;
	if (y->total > f->dcap) {
		cudaStreamSynchronize(f->stream);
		cudaFree(f->dbuf);
		f->dbuf = NULL, f->dcap = 0;
		if ((e = cudaMalloc((void **)&f->dbuf, y->total)) != cudaSuccess)
			return pf_fail(f, e);
		f->dcap = y->total;
	}
	if (y->down > f->hcap) {
		cudaStreamSynchronize(f->stream);
		cudaFreeHost(f->hbuf);
		f->hbuf = NULL, f->hcap = 0;
		if ((e = cudaMallocHost((void **)&f->hbuf, y->down)) != cudaSuccess)
			return pf_fail(f, e);
		f->hcap = y->down;
	}
	return 0;
}

/* A pass's split launch and merge launch (nothing when the pass is empty). */
static cudaError_t pf_launch(ax_attn_prefill *f, int ps)
{
	const axp_plan *p = f->plan;
	if (p->ctas[ps] == 0)
		return cudaSuccess;
	axp_args a = axp_plan_args(p, f->dbuf, ps);
	void *argv[] = {&a};
	cudaError_t e = cudaLaunchKernel((const void *)axp_split_kernel, dim3(p->ctas[ps]), dim3(AXP_NT), argv,
					 a.smem, f->stream);
	if (e == cudaSuccess)
		e = cudaLaunchKernel((const void *)axp_merge_kernel, dim3((p->lists[ps] + AXP_NW - 1) / AXP_NW),
				     dim3(AXP_NT), argv, 0, f->stream);
	return e;
}

/* Run the planned blocks (f->plan built): tables up, flags zeroed, passes A and B, flags and results down. */
static int pf_run(ax_attn_prefill *f, const ax_attn_job *jobs, ax_attn_result *out, int *rc)
{
	axp_plan *p = f->plan;
	if (!f->timing)
		f->kernel_ms = -1.f;
	cudaError_t e = cudaSetDevice(f->device);
	if (e != cudaSuccess)
		return pf_fail(f, e);
	int r = pf_reserve(f, &p->lay);
	if (r)
		return r;
	axp_plan_tables(p, f->hbuf);
	e = cudaMemcpyAsync(f->dbuf, f->hbuf, p->lay.up, cudaMemcpyHostToDevice, f->stream);
	if (e == cudaSuccess)
		e = cudaMemsetAsync(f->dbuf + p->lay.rflags, 0, p->nrows * sizeof(uint32_t), f->stream);
	if (e == cudaSuccess && f->timing)
		e = cudaEventRecord(f->ev[0], f->stream);
	if (e == cudaSuccess)
		e = pf_launch(f, 0);
	if (e == cudaSuccess)
		e = pf_launch(f, 1);
	if (e == cudaSuccess && f->timing)
		e = cudaEventRecord(f->ev[1], f->stream);
	if (e == cudaSuccess)
		e = cudaMemcpyAsync(f->hbuf + p->lay.rflags, f->dbuf + p->lay.rflags, p->lay.down - p->lay.rflags,
				    cudaMemcpyDeviceToHost, f->stream);
	if (e == cudaSuccess) { /* host work while the GPU runs */
		axp_make_empty(p);
		axp_expand_par(p, jobs, out, NULL, NULL, f->threads);
	}
	cudaError_t se = cudaStreamSynchronize(f->stream); /* also: the next run rewrites the staging */
	if (e == cudaSuccess)
		e = se;
	if (e == cudaSuccess && f->timing)
		e = cudaEventElapsedTime(&f->kernel_ms, f->ev[0], f->ev[1]);
	if (e != cudaSuccess)
		return pf_fail(f, e);
	axp_codes(p, f->hbuf, rc);
	axp_expand_par(p, jobs, out, f->hbuf, rc, f->threads);
	return 0;
}

/* The jobs not placed in blocks through `rest`, compacted, codes and rows scattered back. */
static int pf_rest(ax_attn_prefill *f, const ax_attn_job *jobs, uint32_t n, ax_attn_result *out, int *rc,
		   axf_runner rest, void *rctx)
{
	const axp_plan *p = f->plan;
	uint32_t m = 0;
	uint64_t rows = 0;
	if (axc_grow((void **)&f->sj, &f->sj_cap, n, sizeof *f->sj) ||
	    axc_grow((void **)&f->si, &f->si_cap, n, sizeof *f->si) ||
	    axc_grow((void **)&f->src, &f->src_cap, n, sizeof *f->src))
		return -ENOMEM;
	for (uint32_t i = 0; i < n; i++)
		if (!p->in[i]) {
			f->sj[m] = jobs[i];
			f->si[m++] = i;
			rows += axc_out_rows(&jobs[i]);
		}
	if (axc_grow((void **)&f->sout, &f->sout_cap, rows ? rows : 1, sizeof *f->sout))
		return -ENOMEM;
	int r = rest(rctx, f->sj, m, f->sout, f->src);
	if (r)
		return r;
	uint64_t o = 0;
	for (uint32_t k = 0; k < m; k++) {
		const uint32_t i = f->si[k], nr = axc_out_rows(&jobs[i]);
		rc[i] = f->src[k];
		if (rc[i] == 0)
			memcpy(out + p->roff[i], f->sout + o, nr * sizeof *out);
		o += nr;
	}
	return 0;
}

int ax__attn_prefill_dispatch(ax_attn_prefill *f, const ax_attn_job *jobs, uint32_t n, ax_attn_result *out, int *rc,
			      axf_runner rest, void *rctx)
{
	if (!f || n == 0)
		return rest(rctx, jobs, n, out, rc);
	axp_plan *p = f->plan;
	int r = axp_plan_build(p, jobs, n, rc);
	if (r)
		return r;
	f->last_rows = p->nrows;
	if (p->nrows == 0)
		return rest(rctx, jobs, n, out, rc);
	if ((r = pf_run(f, jobs, out, rc)) != 0)
		return r;
	return p->nrows == n ? 0 : pf_rest(f, jobs, n, out, rc, rest, rctx);
}
#endif /* AXP_EMU */
