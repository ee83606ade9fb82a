/*
 * attn_cuda_fast.h — the CUDA backend's fast path (attn_cuda_fast.cu): the kernel lab's v8/v9 design
 * (capture/dev/topk_attn.cu) behind attn_cuda.h's contract, for the common decode shape: bf16 (or f16) keys and
 * queries, head_dim 128, a contiguous [slots, H_kv, 128] pool, H_kv ≤ 8, GQA group ≤ 8, no logit cap, no head
 * list. Internal to capture/: attn_cuda.cu's dispatch hook, the GPU test and the CPU test include it.
 *
 * This header is the fast path's host half in plain C (also valid C++), so attn_cuda_fast_test.c runs it on a
 * machine without a GPU: which jobs are eligible (axf_eligible), the plan of a run (pass-jobs, launches, one
 * wave of split CTAs per launch, partial rows, result rows, scratch layout: axf_plan_build), the per-job codes
 * from the flags the kernels wrote and the rows (axf_plan_prefill while the kernels run, axf_plan_finish after; on
 * several host threads with axf_pool), and the split of a mixed batch between the fast and the generic path
 * (axf_dispatch, with the two runners as callbacks). The kernels and the driver are in attn_cuda_fast.cu.
 *
 * How a run works (details in attn_cuda_fast.cu): every user job becomes one pass-job (mean_prob: two, a
 * per-head logsumexp pass-job and the probability pass-job); pass-jobs are grouped by kernel instance (mode,
 * key dtype, lists per warp) into launches, heads launches first (mean_prob's logsumexps come from them), then
 * mean_logit, then mean_prob's second pass. Each launch is planned as one wave of `resident` CTAs (SMs × CTAs
 * per SM): the shortest base split (a multiple of AXF_TS keys) whose CTAs fit, each pass-job's split raised to
 * its own floor (axf_knobs: least keys per split, most splits per pass-job, separately for heads lists, whose
 * merge costs H_q times more), at least one split per pass-job; with knob tail the last share of a pass-job's
 * stages is handed out at run time in blocks to the CTAs that finish their static share first (axf_plan_tail). A CTA streams its split through a ring of
 * shared-memory stages (one cp.async.bulk per key row), scores on the tensor cores, keeps per-split top-k lists
 * and logsumexps as partial rows in device scratch; the last CTA of a pass-job (atomic ticket) merges them, or,
 * for heads lists with ≥ merge_heads splits (the default: always), a separate merge launch right after the
 * split launch merges every row in parallel (one row per CTA, its 8 warps working on it, or, with ≤ merge_warp
 * splits, one row per warp), or — a mean_logit pass-job (session 6) or mean_prob's probability pass-job (session
 * 13) alone in its launch, with at most knob host_merge splits — the host, from partial rows the CTAs write straight
 * into the mapped staging (axf_hmerge_job: no ticket, no merge on the GPU; 1 × 4K mean_logit 23.5 → 20.9 µs, 128K
 * 90.0 → 85.8 µs end to end, H200 run 25). (Dynamic
 * splits — blocks of keys handed out from a counter — were tried in session 4 and removed in session 5: slower
 * wherever they acted, and their loop bookkeeping cost the static heads loop ~9%; capture/dev/RESULTS.md runs 10
 * and 12.)
 * Errors: each CTA writes its split's flag word (no zeroing needed); the merger ORs them into its pass-job's
 * flag word. Results are written compactly (a float logsumexp per row,
 * kout (logit, offset) entries per row, a flag word per pass-job) straight into the pinned host staging (mapped:
 * no download); the host writes each result row's frame while the kernels run (axf_plan_prefill) and only the
 * results once they are in (axf_plan_finish), as the generic path writes them — or, when the caller's rows are in
 * one of the state's mapped buffers (ax__attn_fast_results_alloc, session 18), the merges write the results into
 * those rows themselves and the host only their frame (axf_plan.zc).
 *
 * A call costs the launches and one wait (a stream synchronisation, or with knob spin a completion word the last
 * unit writes), plus one upload of the tables when a launch has more than one pass-job (a launch of one pass-job
 * carries it in the kernel's parameters); the tickets live in a device buffer zeroed once, each pass-job's last
 * CTA resetting its own. The knobs are read from the environment once per state (axf_knobs_env).
 *
 * Positions inside the kernels are 32-bit offsets from the pass-job's first visible key (eligibility bounds the
 * visible keys by AXF_MAX_N); results carry start + offset in 64 bits.
 */
#ifndef ATTNX_CAPTURE_ATTN_CUDA_FAST_H
#define ATTNX_CAPTURE_ATTN_CUDA_FAST_H

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "attn.h"
#include "attn_cuda_logic.h" /* axc_check_job, axc_visible, axc_out_rows: the generic path's validation */
#include "attn_cuda_plan.h"  /* axc_grow */

#define AXF_D 128                 /* head_dim of the fast path */
#define AXF_TS 16                 /* keys per stage (the m16n8k16 M dimension) */
#define AXF_NS 3                  /* ring stages (v9) */
#define AXF_NW 8                  /* warps per CTA: warp w scores KV head w */
#define AXF_MINB 2                /* CTAs per SM the kernels are built for (v9) */
#define AXF_MAX_HKV 8
#define AXF_MAX_G 8
#define AXF_ROW_MAX (AXF_MAX_HKV * AXF_D * 2)  /* bytes of a key row (all KV heads), at most */
#define AXF_ROWS_SM (AXF_ROW_MAX + 64)         /* stage row stride: ≡ 64 mod 128, fragment loads conflict-free */
#define AXF_MAX_SPLITS 1024       /* splits per pass-job (the merge stages ≥ 1 entry per split per warp) */
#define AXF_FEW_ENTS 64           /* a row-per-warp merge whose S·K is at most this sorts the entries whole */
/* The merge kernel's instances (axf_merge_kernel<KIND>): heads lists, raw scores (axf_job.raw), few lists (S·K ≤
 * AXF_FEW_ENTS, a row per warp: axf_launch.few) */
#define AXF_MK_LISTS 0
#define AXF_MK_RAW 1
#define AXF_MK_FEW 2
#define AXF_MAX_N (1u << 30)      /* visible keys per job */
#define AXF_N_INST 17             /* kernel instances: see axf_inst */
#define AXF_KMAX (2 * AXF_N_INST) /* kernels of a run at most: a split and a merge launch per instance */
#define AXF_GSLOTS 8              /* CUDA graphs a fast state keeps (knob graph) */
#define AXF_SCB 8                 /* knob prob_scores: keys a block of scores (one bulk copy of 32·scw bytes) */
#define AXF_SC_MAX_MIB 512        /* knob prob_scores at most: half the context's device scratch (attn_cuda.h's
				   * AX_ATTN_CUDA_MAX_SCRATCH, 1 GiB), so scores never make a run's scratch too big */

/* Candidate buffers of heads lists (session 7: KB 1, ≤ 4 lists a warp): AXF_LBUF (value, offset) entries per list. */
#define AXF_LBUF 32
#define AXF_LBUF_BYTES ((size_t)AXF_NW * 4 * AXF_LBUF * 8)
/* Bytes of dynamic shared memory of a fast CTA: the ring, 3 mbarriers per stage, [NS][NW][TS] partial sums,
 * per-warp 64-entry survivor scratch, the last-CTA flag, the lists' candidate buffers [NW][4][2][AXF_LBUF]. One
 * expression, used by the kernel and the launch (2 CTAs per SM: 2 × (115288 + 1 KB reserved) of sm_90's 228 KB). */
#define AXF_SMEM                                                                                              \
	((size_t)AXF_NS * AXF_TS * AXF_ROWS_SM + (size_t)AXF_NS * 8 * 3 + (size_t)AXF_NS * AXF_NW * AXF_TS * 4 + \
	 (size_t)AXF_NW * 64 * 8 + 16 + AXF_LBUF_BYTES)
/* Survivor staging entries per warp in the merge (the idle ring, 8 bytes an entry). */
#define AXF_MERGE_CAP ((uint32_t)((size_t)AXF_NS * AXF_TS * AXF_ROWS_SM / AXF_NW / 8))
/* Where the CTA-wide merge keeps a row's per-split values: its staging of list entries (AXF_MERGE_CAPM entries),
 * then the splits' logsumexps and k-th entries (AXF_MAX_SPLITS each); all in the idle ring. */
#define AXF_MERGE_CAPM ((int)AXF_MERGE_CAP * AXF_NW - 2 * AXF_MAX_SPLITS)

/* Planner knobs (attn_cuda_fast.h's planner; 0 = the lab's one-wave planner for that knob). "lists" = heads
 * pass-jobs with top-k lists (K > 0), whose merge reads H_q lists per split. */
typedef struct axf_knobs {
	uint32_t ctas_per_sm;      /* wave target per SM (0: the kernels' occupancy); more than it: several waves */
	uint32_t min_keys;         /* least keys per split, mean modes and logsumexp passes */
	uint32_t max_splits;       /* most splits per pass-job, same (capped at AXF_MAX_SPLITS) */
	uint32_t min_keys_heads;   /* least keys per split, heads lists */
	uint32_t max_splits_heads; /* most splits per pass-job, heads lists */
	uint32_t merge_heads;      /* heads lists with ≥ this many splits merge in a separate launch (0: never) */
	uint32_t ctas_per_sm_heads; /* wave target per SM of launches with heads lists (0: ctas_per_sm's) */
	/* How a run ends (session 4; the planner does not read these): */
	uint32_t spin;             /* 1: the host waits by spinning on the run's completion word, written by the
				    * last unit (attn_cuda_fast.cu: signal_done), not in cudaStreamSynchronize */
	uint32_t pdl;              /* 1: merge launches and mean_prob's second pass use programmatic dependent
				    * launch (they start while the launch before them drains and wait for it on the GPU) */
	uint32_t merge_warp;       /* a merge launch whose pass-jobs have at most this many splits merges a row per
				    * warp (8 rows per CTA), else a row per CTA (all 8 warps on it) */
	uint32_t threads;          /* host threads for a run's rows when it has ≥ AXF_POOL_MIN_ROWS (0, 1: the
				    * calling thread only; at most AXF_POOL_MAX): axf_pool */
	/* Session 6: */
	uint32_t host_merge;       /* a mean_logit pass-job, or mean_prob's probability pass-job (session 13), alone
				    * in its launch with at most this many splits (and
				    * spin off) writes its partial rows into the mapped staging and the host merges
				    * them (axf_hmerge): no ticket, no GPU merge (0: never) */
	/* Session 8: */
	uint32_t graph;            /* a run's kernels go to the GPU as one CUDA graph launch (a chain of kernel
				    * nodes, programmatic edges where pdl has a kernel wait on the GPU, whose parameters
				    * are updated each run; AXF_GSLOTS chains kept) instead of a launch call each:
				    * 0 never, 1 every run, N > 1 runs that stream at most N keys (axf_plan_keys: the
				    * sum over their pass-jobs, both passes of mean_prob) — session 10 */
	/* Session 9: */
	uint32_t tail;             /* percent (0 .. 90) of a pass-job's stages handed out at run time: its splits
				    * stream the rest in equal static shares, then take blocks of the tail from a
				    * counter until none is left, so CTAs that stream faster take more (capture/dev/
				    * RESULTS.md run 56: the static shares end 14-57 µs apart). Pass-jobs with at least
				    * AXF_TAIL_MIN stages a split only; 0: off */
	uint32_t tail_blk;         /* stages (of AXF_TS keys) of a tail block (0: 1); at most the tail's stages per
				    * split (session 17: axf_plan_tail) */
	/* Session 11: */
	uint32_t raw_heads;        /* a heads launch whose pass-jobs all keep lists of k ≤ AXF_TS over at most this
				    * many keys, and fit one wave in splits of AXF_TS keys, streams them in such
				    * splits of one stage that write their raw scores as partial lists (no list and no
				    * sorting in the split kernel; the merge scans the scores): axf_plan_raw
				    * (0: never) */
	/* Session 14: */
	uint32_t prob_scores;      /* MiB of device scratch (at most AXF_SC_MAX_MIB) a run may give mean_prob jobs'
				    * scores (0: none): the logsumexp pass of a job that fits writes every key's
				    * scaled scores (all heads, axf_sc_floats), and its probability pass reads them in
				    * place of K — K streamed once instead of twice (axf_plan_build; attn_cuda_fast.cu:
				    * DUMP, FROMS). Session 15, H200 (RESULTS run 82): 1 × 1M mean_prob 1056 → 728 µs,
				    * 64 × 4K 318 → 249, 1 × 4K 31.7 → 33.8 (hence prob_scores_min) */
	/* Session 15: */
	uint32_t prob_scores_min;  /* knob prob_scores only for runs whose mean_prob jobs stream at least this many
				    * keys together (their visible keys): below, the two passes over K are as fast
				    * or faster (a short split's stage of scores is one long chain of work) */
} axf_knobs;

#define AXF_TAIL_MIN 8 /* least stages per split (on average) of a pass-job with a tail */

/* The defaults, from the H100 sweep of run 7 (capture/dev/RESULTS.md): CTAs per SM = the occupancy (3, 4, 8
 * were 3-30% slower at 128K and 1M), mean splits ≥ 32 keys (1 × 4K: 23.5 µs; 16: 26.3, 256: 42.7), heads-list
 * splits ≥ 64 keys (1 × 4K: 37 µs, 256: 73; within 2% of the best at 128K, 1M, 64 × 4K), no split caps (8 or 32
 * splits: up to 17× slower at 1M), heads lists always merged by the separate merge launch (4K 86 → 37 µs, 128K
 * 200 → 150, 1M 878 → 817, 64 × 4K 251 → 241), heads launches on the same wave size. merge_warp 32: run 7's
 * merge kernel (a row per warp) had 64 × 4K heads (4 splits per row) at 241 µs, run 8's (a row per CTA) 275 µs,
 * while 128K (264 splits) went 150 → 142 µs the other way. From session 4's H200 runs (RESULTS.md, run 9b): heads-list
 * splits ≥ 32 keys (1 × 4K heads 39.0 → 31.6 µs end to end, the same elsewhere), pdl on (merge launches and
 * mean_prob's second pass: 1-4 µs off every heads and mean_prob shape), spin off (±0.5 µs at 1 × 4K, +7 µs at
 * 64 × 4K heads: a system-scope fence per merge CTA). threads 4 since session 6 (session 4 had it off: a core per
 * helper spins through the kernels): it only acts on runs of ≥ AXF_POOL_MIN_ROWS rows, where the finish after the
 * GPU is the host's largest share (run 17, H200: 64 × 4K heads 306 → 260 µs end to end; the three helpers spin for
 * the ~0.2 ms of such a run's kernels). threads 6 since session 7 (RESULTS run 35, H200: 64 × 4K heads 203.0 → 195.3
 * µs end to end, 8 threads 194.9; capped at half the online CPUs by the state, ax__attn_fast_new). tail 15 in blocks
 * of 4 stages since session 9 (RESULTS runs 58-59, H100: 1 × 128K heads 126.9 → 122.3 µs, mean_logit 116.5 →
 * 112.6, 1M 3.6-4.6% faster in every mode, 64 × 4K mean modes 3-4%; 1 × 4K has no tail). graph 16384 since
 * session 10: a graph launch takes 1-2 µs off a 1 × 4K request on both cards (RESULTS runs 60 and 63) but cost
 * 1 × 128K mean_prob 2.6% on an H200 (run 63), so only short runs go as one. */
#define AXF_KNOBS_DEFAULT {0, 32, 0, 32, 0, 1, 0, 0, 1, 32, 6, 256, 16384, 15, 4, 4096, 512, 16384}

#define AXF_F_RANGE 1u            /* same bits as the generic path's flags */
#define AXF_F_DOM 2u

/* Kernel modes (the lab's): mean_logit, mean_prob's probability pass, heads (and mean_prob's logsumexp pass). */
enum axf_mode { AXF_M_LOGIT = 1, AXF_M_PROB = 2, AXF_M_HEADS = 3 };

/* One pass-job (device table). Pointers are device addresses. */
typedef struct axf_job {
	const void *q;          /* [H, 128] query row, dtype = key dtype, 16-byte aligned */
	const void *k;          /* pool base, 16-byte aligned; row of slot s: H_kv·128 elements at s·s0 */
	const void *index;      /* index row, dtype idt: slot of position start + j at index[start + j] */
	uint64_t s0;            /* slot stride in elements (s0·2 a multiple of 16) */
	uint64_t n_slots;
	uint64_t start;         /* first visible position */
	uint64_t part0;         /* first partial row: logsumexp partial s of row r at part0 + r·(S + tblk) + s (the
				 * S splits', then the tail blocks'); flags and lists per split */
	uint64_t ent0;          /* first partial list entry: row r of split s at ent0 + (r·S + s)·K (raw: the
				 * split's AXF_TS scores at ent0 + (r·S + s)·AXF_TS, ent0 a multiple of 4, no
				 * offsets: key e of split s is offset s·AXF_TS + e, none past n) */
	uint64_t rent;          /* first result entry: entry e of result row r at rent + r·kout + e */
	uint64_t pf0;           /* first split flag word: split s's at part_f[pf0 + s] */
	uint32_t n;             /* visible keys (1 .. AXF_MAX_N) */
	uint32_t chunk;         /* keys per split, a multiple of AXF_TS */
	uint32_t S;             /* splits */
	uint32_t tss, tail0;    /* with a tail (tblk > 0): split s streams stages [s·tss, (s+1)·tss), the tail is
				 * stages [tail0 = S·tss, ⌈n / AXF_TS⌉) */
	uint32_t tblk, tbase;   /* tail blocks (of knob tail_blk stages; 0: no tail) and this run's base of the
				 * pass-job's tail counter: block b is taken by the CTA whose atomicAdd returns tbase + b
				 * (each split CTA takes until it draws a b ≥ tblk: tblk + S draws a run, which the driver
				 * adds to the base for the next; attn_cuda_fast.cu) */
	uint32_t tstg;          /* stages of a tail block */
	uint32_t H, Hkv, G, K;  /* query heads, KV heads, group size, list length (0: logsumexp only) */
	uint32_t idt;           /* AX_DTYPE_I32 / AX_DTYPE_I64 */
	uint32_t flag;          /* flag word of the user job */
	uint32_t kout;          /* entries of a result row: min(K, n) */
	int32_t res;            /* first result row (its logsumexp at rlse[res + r]), or -1 (logsumexp pass) */
	int32_t lse_out;        /* 0: mean_prob's logsumexp pass (no merge: its probability pass reduces its partials,
				 * session 22; until then lse_out / lse_in named slots of a logsumexp buffer); else -1 */
	uint32_t head_offset;   /* heads mode: head_id = head_offset + h */
	uint32_t ticket;        /* this pass-job's index in the plan: its ticket word and flag word (pflags) */
	uint32_t sepm;          /* 1: merged by the separate merge launch (heads lists), not by its last CTA */
	uint32_t hm;            /* 1: merged by the host (knob host_merge): partial rows in the host staging's
				 * hm regions (part0, ent0, pf0 count from their starts) */
	uint32_t raw;           /* 1 (knob raw_heads): splits of one stage (chunk AXF_TS) whose partial lists are
				 * their raw scores, merged by the merge launch a row per CTA (sepm, mrpc 1) */
	float scale;            /* softmax scale (|scale| ≤ 1) */
	float inv_h;            /* 1 / H */
	uint64_t sc0;           /* knob prob_scores: the job's scores in axf_args.sc (scw 0: none), in blocks of
				 * AXF_SCB keys, head-major in a block (axf_sc_floats says where key j's head h is);
				 * written by its logsumexp pass, read by its probability pass a block a copy */
	uint32_t scw, sc_pad;   /* floats a key's scores take: H rounded up to a multiple of 4 */
	/* A probability pass: its logsumexp pass-job's partials, which it reduces itself (session 22: that pass has no
	 * merge), and its split flag words, which its split 0 ORs into that pass-job's flag word: */
	uint64_t lpart0;        /* first partial row (row r at lpart0 + r·lS: a logsumexp pass has no tail) */
	uint64_t lpf0;          /* first split flag word */
	uint32_t lS;            /* its splits */
	uint32_t lticket;       /* its flag word */
} axf_job;

/* One launch: pass-jobs [j0, j0 + nj) of one instance; CTAs of pass-job i: so[so0 + i] .. so[so0 + i + 1] - 1.
 * mg > 0: a merge launch follows, nj·mg CTAs, CTA b merging rows (b mod mg)·mrpc .. + mrpc - 1 of pass-job b / mg
 * (those with sepm; mg·mrpc ≥ the most rows of any): mrpc 1, a row per CTA, or AXF_NW, a row per warp. */
typedef struct axf_launch {
	uint32_t inst, j0, nj, so0, ctas, mg, mrpc;
	uint32_t hm;                /* its (one) pass-job is merged by the host: the partials go to the staging */
	uint32_t raw;               /* its pass-jobs are raw (axf_plan_raw): the instance's raw kernel runs it */
	uint32_t few;               /* its merge launch merges a row per warp (mrpc AXF_NW) and every pass-job it merges
				     * (sepm) has 1 ≤ K and S·K ≤ AXF_FEW_ENTS: the few-list merge kernel runs it (all
				     * entries loaded in one round and sorted whole; session 12) */
} axf_launch;

/* A compact result entry: the logit and the position as an offset from the pass-job's first visible key
 * (-1: empty). */
typedef struct axf_ent {
	float x;
	int32_t p;
} axf_ent;

/* Everything a launch's kernel reads (by value; a __grid_constant__ parameter). */
typedef struct axf_args {
	const axf_job *jobs;        /* this launch's pass-jobs (device table; unused when inl) */
	const uint32_t *split_off;  /* [nj + 1] (unused when inl) */
	uint32_t nj;
	uint32_t inl;               /* 1: one pass-job, `one` (no table: nothing uploaded for this launch) */
	axf_job one;
	float *part_s;              /* [entries] partial list values */
	int32_t *part_p;            /* [entries] partial list offsets, -1 = empty */
	float *part_lse;            /* [partial rows] */
	uint32_t *part_f;           /* [split flag words] AXF_F_* of each split (every CTA writes its own) */
	const float *lpart_lse;     /* the device's partial rows and split flag words (part_lse, part_f of a launch not
				    * host-merged): a probability pass reads its logsumexp pass's there even when its own
				    * go to the host (session 22) */
	const uint32_t *lpart_f;
	uint32_t *tickets;          /* per pass-job, 0 before the launch (the last CTA resets its own) */
	uint32_t *pflags;           /* per pass-job (host staging): AXF_F_* of all its splits, by the merger */
	float *rlse;                /* per result row (host staging): its logsumexp */
	axf_ent *rent;              /* result entries (host staging; axf_job.rent) */
	uint32_t mg;                /* merge launch: CTAs per pass-job */
	uint32_t mrpc;              /* merge launch: rows per CTA (1: all warps on one row; AXF_NW: a row per warp) */
	/* The completion word (knob spin; NULL when off): every unit of the run — the last CTA of a pass-job that
	 * merges in its split launch, every CTA of a merge launch — counts itself in *done_cnt after its writes;
	 * the one that makes it `units` resets it and writes `seq` into *done (host staging, mapped). */
	uint32_t *done_cnt;         /* device word, 0 between runs */
	uint32_t *done;             /* host staging (mapped) */
	uint32_t units, seq;
	uint32_t pdl;               /* 1: this kernel was launched as a programmatic dependent (waits on the GPU) */
	uint32_t *tailc;            /* tail counters (device), one per pass-job of the plan (index = ticket) */
	unsigned long long *trace;  /* diagnostics (ax__attn_fast_trace): AXF_TR_ALL global-timer ns slots, NULL = off */
	float *sc;                  /* mean_prob jobs' scores (knob prob_scores; axf_job.sc0) */
	ax_attn_result *zout;       /* NULL, or the caller's result rows themselves (session 18: a buffer from
				     * ax__attn_fast_results_alloc, mapped; its device address): the merges write each
				     * row's first kout entries and logsumexp there, row jb.res + r, and the host's
				     * prefill the rest (axf_prefill_range) — no staging, no finish copy */
} axf_args;

/* Trace slots (ns of the GPU's global timer, by thread 0 of CTAs; first = atomicMin, last = atomicMax). */
enum axf_trace_slot {
	AXF_TR_START0, AXF_TR_START1,   /* split CTAs start: first, last */
	AXF_TR_DATA0, AXF_TR_DATA1,     /* first stage's keys arrived in a CTA: first, last */
	AXF_TR_LOOP0, AXF_TR_LOOP1,     /* a CTA's streaming loop ended: first, last */
	AXF_TR_MERGE0, AXF_TR_MERGE1,   /* a last-CTA merge starts (after the ticket): first, last */
	AXF_TR_MDONE1,                  /* a last-CTA merge ended: last */
	AXF_TR_MK0, AXF_TR_MK1,         /* merge-kernel CTAs start: first, last */
	AXF_TR_MKGO,                    /* merge-kernel CTAs past griddepcontrol.wait (pdl) or start: last */
	AXF_TR_MKDONE,                  /* merge-kernel CTAs done: last */
	AXF_TR_MLOAD,                   /* a row merge's (merge_row, merge_row_cta) loads staged: last */
	AXF_TR_MBAR,                    /* a row merge's bar set: last */
	AXF_TR_MSCAN,                   /* a row merge's survivors counted, before the sort and the writes: last */
	AXF_TR_WLOOP1,                  /* any warp of a split CTA past its loop (and its lists' last flush): last */
	AXF_TR_EPI1,                    /* a split CTA past its epilogue's barrier (partial rows written): last */
	AXF_TR_N
};
/* After the AXF_TR_N slots, one per split CTA (blockIdx mod AXF_TR_CTAS, session 9): when its last warp left the
 * loop (atomicMax; a run with several split launches keeps the later), for the spread of the splits' ends. */
#define AXF_TR_CTAS 2048
#define AXF_TR_ALL (AXF_TR_N + AXF_TR_CTAS)

/* Byte offsets: the host staging holds [0, off_dev) — the tables, uploaded ([0, up)) when p->upload, and the
 * results the kernels write into it ([pflags, off_dev)); the device scratch uses the same offsets for the tables
 * and [off_dev, total) for its own regions. */
typedef struct axf_layout {
	size_t jobs, so;            /* tables */
	size_t pflags, rlse, rent;  /* results, host staging only */
	size_t hlse, hps, hpp, hpf; /* partial rows of host-merged pass-jobs (lse, list values, offsets, flags) */
	size_t up, off_dev;
	size_t part_lse, part_s, part_p, part_f, sc; /* device only */
	size_t total;
} axf_layout;

typedef struct axf_plan {
	axf_job *jb;
	size_t jb_cap;
	uint32_t *so;
	size_t so_cap;
	uint32_t *roff;             /* [n] first result row of each user job */
	size_t roff_cap;
	uint32_t *ljb;              /* [n] mean_prob jobs: their logsumexp pass-job (set when its launch is planned) */
	size_t ljb_cap;
	uint64_t *eoff;             /* [n] first result entry of each user job */
	size_t eoff_cap;
	uint32_t *lo;               /* planning scratch: each pass-job's least split of a launch */
	size_t lo_cap;
	uint32_t *nk;               /* planning scratch: visible keys of a launch's pass-jobs */
	size_t nk_cap;
	uint32_t *uf;               /* [n] finish scratch: flags of each user job */
	size_t uf_cap;
	uint8_t *planned;           /* [n] 1: job i runs here (its rc was 0 after planning) */
	size_t planned_cap;
	uint32_t *ord;              /* planning scratch: pass-jobs (2·job + pass) grouped by instance in launch order */
	size_t ord_cap;
	uint64_t *scoff;            /* [n] mean_prob jobs given scores (knob prob_scores): their first float in the
				     * scores region; UINT64_MAX: none (two passes over K) */
	size_t scoff_cap;
	uint8_t *hmj;               /* [n] 1: job i's rows come from a host merge (its result pass-job's hm) */
	size_t hmj_cap;
	uint32_t zc;                /* set by the driver before the prefill: 1 when the kernels write the rows of the
				     * jobs without hmj straight into the caller's (axf_args.zout); the prefill then
				     * writes only the rest of those rows and the finish skips them */
	ax_attn_result empty;       /* an empty row (k 0, every entry (-1, -inf)): expansion starts from it */
	int empty_ok;
	uint32_t n, njb, nso;
	uint32_t upload;            /* 1: some launch has a table (more than one pass-job) */
	uint32_t res_lists;         /* set by the owner: CTAs a launch with heads lists is planned for (0: resident) */
	uint64_t rows, parts, entries, rents, pfl;
	uint64_t units;             /* units of the run (axf_args.units): non-sepm pass-jobs + merge CTAs */
	uint64_t hparts, hents;     /* partial rows and entries of host-merged pass-jobs (hparts: also flag words) */
	uint64_t scs;               /* floats of the scores region (knob prob_scores) */
	axf_knobs kn;               /* set by the owner; all 0 = the lab's planner */
	axf_launch L[AXF_N_INST];
	uint32_t nl;
	axf_layout lay;
} axf_plan;

/* ---- eligibility ------------------------------------------------------------------------------------------------ */

/* Why a job is not eligible (0: eligible). For tests and the README's table. */
enum axf_why {
	AXF_OK = 0,
	AXF_NO_INVALID,     /* the generic path's validation fails: it reports the code */
	AXF_NO_DTYPE,       /* keys not bf16/f16, or Q not the keys' dtype */
	AXF_NO_DIM,         /* head_dim ≠ 128 */
	AXF_NO_HEADS,       /* H_kv > 8 or group > 8 */
	AXF_NO_LAYOUT,      /* KV heads not contiguous in a slot, or a row/pointer not 16-byte aligned */
	AXF_NO_CAP,         /* a logit cap */
	AXF_NO_LIST,        /* heads mode with a head list */
	AXF_NO_SCALE,       /* |scale| > 1 (the fast path applies it after the dot product) */
	AXF_NO_LONG,        /* more than AXF_MAX_N visible keys */
};

static inline int axf_why_not(const ax_attn_job *j)
{
	if (axc_check_job(j) != 0)
		return AXF_NO_INVALID;
	if ((j->k_dtype != AX_DTYPE_BF16 && j->k_dtype != AX_DTYPE_F16) || j->q_dtype != j->k_dtype)
		return AXF_NO_DTYPE;
	if (j->head_dim != AXF_D)
		return AXF_NO_DIM;
	if (j->n_kv_heads > AXF_MAX_HKV || j->n_q_heads / j->n_kv_heads > AXF_MAX_G)
		return AXF_NO_HEADS;
	if ((j->n_kv_heads > 1 && j->k_stride[1] != AXF_D) || (uintptr_t)j->k % 16 || (uintptr_t)j->q % 16 ||
	    j->k_stride[0] * 2 % 16)
		return AXF_NO_LAYOUT;
	if (j->logit_cap != 0)
		return AXF_NO_CAP;
	if (j->mode == AX_MODE_HEADS && j->heads)
		return AXF_NO_LIST;
	if (!(fabsf(j->scale) <= 1.0f))
		return AXF_NO_SCALE;
	uint64_t start, n;
	axc_visible(j, &start, &n);
	if (n > AXF_MAX_N)
		return AXF_NO_LONG;
	return AXF_OK;
}

static inline int axf_eligible(const ax_attn_job *j)
{
	return axf_why_not(j) == AXF_OK;
}

/* ---- instances and launches ------------------------------------------------------------------------------------- */

/* Knob prob_scores: floats of a job's scores (n keys, H heads): whole blocks of AXF_SCB keys (the probability
 * pass copies a block whole, also the last one past n), scw = H rounded up to 4 floats a key. In a block the
 * scores are head-major (head h's AXF_SCB keys in a row): the logsumexp pass's stores of a head fill whole
 * 32-byte sectors, and the probability pass, a thread a key, reads its keys' scores without bank conflicts
 * (attn_cuda_fast.cu, FROMS). Key j's head h is at float sc0 + (j - j mod AXF_SCB)·scw + h·AXF_SCB + j mod
 * AXF_SCB. */
static inline uint64_t axf_sc_floats(uint64_t n, uint32_t H)
{
	return (n + AXF_SCB - 1) / AXF_SCB * AXF_SCB * ((H + 3) & ~3u);
}

/* Instance of a pass-job with lists of K entries: 0/1 mean_logit, 2/3 heads with ≤ 4 lists per warp, 4/5 heads
 * with ≤ 8, 6/7 mean_prob (bf16 / f16); heads pass-jobs with K ≤ 32 (mean_prob's logsumexp pass: K 0) take
 * 8/9 (≤ 4 lists) and 10/11 (≤ 8), built for lists of at most 32 entries (fewer registers: attn_cuda_fast.cu's
 * wl_insert). sc (knob prob_scores): the two passes of a mean_prob job given scores — the logsumexp pass that
 * writes them, 12/13 (groups of ≤ 4 heads) and 14/15 (≤ 8), and the probability pass that reads them,
 * 16 (no keys read, so no key dtype). axf_launch_order lists them in launch order (every heads instance before
 * mean_prob's second pass). */
static inline uint32_t axf_inst(uint32_t mode, uint32_t kdt, uint32_t G, uint32_t K, int sc)
{
	uint32_t f = kdt == AX_DTYPE_F16;
	if (mode == AXF_M_LOGIT)
		return f;
	if (mode == AXF_M_PROB)
		return sc ? 16 : 6 + f;
	return (sc ? 12 : K <= 32 ? 8 : 2) + (G <= 4 ? 0 : 2) + f;
}

static const uint32_t axf_launch_order[AXF_N_INST] = {8, 9, 10, 11, 12, 13, 14, 15, 2, 3, 4, 5, 0, 1, 6, 7, 16};

static inline uint32_t axf_inst_mode(uint32_t inst)
{
	return inst < 2 ? AXF_M_LOGIT : inst == 6 || inst == 7 || inst == 16 ? AXF_M_PROB : AXF_M_HEADS;
}

/* Splits of n keys at chunk keys each (at least 1). */
static inline uint64_t axf_splits(uint64_t n, uint64_t chunk)
{
	uint64_t s = (n + chunk - 1) / chunk;
	return s ? s : 1;
}

/* Entries of a result row of a valid job: min(top_k, visible keys). */
static inline uint32_t axf_kout(const ax_attn_job *j)
{
	uint64_t start, n;
	axc_visible(j, &start, &n);
	return j->top_k < n ? j->top_k : (uint32_t)n;
}

/* Whether a pass-job of kernel mode `mode` with list length K keeps heads lists (H_q lists per split to merge). */
static inline int axf_lists(uint32_t mode, uint32_t K)
{
	return mode == AXF_M_HEADS && K > 0;
}

/* The least split of a pass-job of n keys under the knobs, a multiple of AXF_TS: at least min_keys, at most
 * max_splits splits (and never more than AXF_MAX_SPLITS), never longer than n rounded up (one split). */
static inline uint32_t axf_lo_chunk(const axf_knobs *kn, uint64_t n, int lists)
{
	uint64_t mink = lists ? kn->min_keys_heads : kn->min_keys;
	uint64_t maxs = lists ? kn->max_splits_heads : kn->max_splits;
	if (maxs == 0 || maxs > AXF_MAX_SPLITS)
		maxs = AXF_MAX_SPLITS;
	uint64_t lo = (n + maxs - 1) / maxs, one = (n + AXF_TS - 1) / AXF_TS * AXF_TS;
	lo = lo > mink ? lo : mink;
	lo = (lo + AXF_TS - 1) / AXF_TS * AXF_TS;
	lo = lo < one ? lo : one;
	return (uint32_t)(lo > AXF_TS ? lo : AXF_TS);
}

/* Σ_i splits of n_i keys at max(chunk, lo_i) keys each. */
static inline uint64_t axf_total_splits_lo(const uint32_t *nk, const uint32_t *lo, uint32_t nj, uint64_t chunk)
{
	uint64_t t = 0;
	const uint32_t c = chunk < UINT32_MAX ? (uint32_t)chunk : UINT32_MAX;
	for (uint32_t i = 0; i < nj; i++) { /* 32-bit divisions (n < 2^31, the planner's hot loop) */
		const uint32_t d = c > lo[i] ? c : lo[i];
		t += nk[i] / d + (nk[i] % d != 0) + (nk[i] == 0); /* axf_splits: at least 1 */
	}
	return t;
}

/* The base split of a launch: the shortest multiple of AXF_TS with Σ_i splits(n_i, max(base, lo_i)) ≤ resident
 * (the sum only falls as the base grows); when even one split each is more, the longest job's length (every
 * pass-job in one split). Pass-job i then splits at max(base, lo_i).
 *
 * The search (session 16: the plan of 64 × 4K took ~8 rounds over 64 divisions, ~15% of the plan) brackets the
 * answer first, in stages c of AXF_TS keys, with N = Σ n_i and R = resident: a c whose keys reach every lo_i
 * gives splits ≥ N / (c·AXF_TS), so such a c with c·AXF_TS·R < N fails, and so does every shorter one; and
 * splits ≤ Σ (n_i / (c·AXF_TS) + 1) = N / (c·AXF_TS) + nj, so c ≥ N / ((R − nj)·AXF_TS) fits when R > nj. It
 * then steps up from the lower end by doubling steps (equal or similar jobs: the answer is a stage or two
 * above it) and bisects the last step. */
static inline uint32_t axf_plan_base(const uint32_t *nk, const uint32_t *lo, uint32_t nj, uint32_t resident)
{
	uint64_t mx = 0, tot = 0, mlo = 0;
	for (uint32_t i = 0; i < nj; i++) {
		mx = nk[i] > mx ? nk[i] : mx;
		mlo = lo[i] > mlo ? lo[i] : mlo;
		tot += nk[i];
	}
	uint64_t hi = (mx + AXF_TS - 1) / AXF_TS, l = 1;
	hi = hi ? hi : 1;
	if (nj > resident || nj == 0) /* one split each is already more (or nothing to split): the longest */
		return (uint32_t)(hi * AXF_TS);
	const uint64_t per = (uint64_t)resident * AXF_TS, c1 = (tot + per - 1) / per - 1; /* c1·AXF_TS·R < N */
	if (c1 >= 1 && c1 * AXF_TS >= mlo)
		l = c1 + 1 < hi ? c1 + 1 : hi;
	if (resident > nj) {
		const uint64_t pf = (uint64_t)(resident - nj) * AXF_TS, c2 = (tot + pf - 1) / pf;
		hi = c2 < hi ? (c2 > l ? c2 : l) : hi;
	}
	/* f(l - 1) fails (or l = 1), f(hi) fits */
	uint64_t step = 1;
	while (l < hi) {
		if (axf_total_splits_lo(nk, lo, nj, l * AXF_TS) <= resident)
			return (uint32_t)(l * AXF_TS);
		const uint64_t c = l + step < hi ? l + step : hi;
		if (axf_total_splits_lo(nk, lo, nj, c * AXF_TS) <= resident) {
			hi = c, l = l + 1;
			break;
		}
		l = c + 1, step *= 2;
	}
	while (l < hi) {
		uint64_t mid = l + (hi - l) / 2;
		if (axf_total_splits_lo(nk, lo, nj, mid * AXF_TS) <= resident)
			hi = mid;
		else
			l = mid + 1;
	}
	return (uint32_t)(l * AXF_TS);
}

/* The knobs from the environment (each unset or unparsable variable keeps *kn's value): AX_FAST_CTAS_PER_SM,
 * AX_FAST_MIN_SPLIT_KEYS, AX_FAST_MAX_SPLITS, AX_FAST_MIN_SPLIT_KEYS_HEADS, AX_FAST_MAX_SPLITS_HEADS,
 * AX_FAST_MERGE_HEADS, AX_FAST_CTAS_PER_SM_HEADS, AX_FAST_SPIN, AX_FAST_PDL, AX_FAST_MERGE_WARP,
 * AX_FAST_THREADS, AX_FAST_HOST_MERGE, AX_FAST_GRAPH, AX_FAST_TAIL, AX_FAST_TAIL_BLK, AX_FAST_RAW_HEADS,
 * AX_FAST_PROB_SCORES, AX_FAST_PROB_SCORES_MIN (decimal, 0 .. 2^30). */
static inline void axf_knobs_env(axf_knobs *kn)
{
	static const char *const names[18] = {"AX_FAST_CTAS_PER_SM",         "AX_FAST_MIN_SPLIT_KEYS",
					      "AX_FAST_MAX_SPLITS",          "AX_FAST_MIN_SPLIT_KEYS_HEADS",
					      "AX_FAST_MAX_SPLITS_HEADS",    "AX_FAST_MERGE_HEADS",
					      "AX_FAST_CTAS_PER_SM_HEADS",   "AX_FAST_SPIN",
					      "AX_FAST_PDL",                 "AX_FAST_MERGE_WARP",
					      "AX_FAST_THREADS",             "AX_FAST_HOST_MERGE",
					      "AX_FAST_GRAPH",               "AX_FAST_TAIL",
					      "AX_FAST_TAIL_BLK",            "AX_FAST_RAW_HEADS",
					      "AX_FAST_PROB_SCORES",         "AX_FAST_PROB_SCORES_MIN"};
	uint32_t *f[18] = {&kn->ctas_per_sm,    &kn->min_keys,         &kn->max_splits,
			   &kn->min_keys_heads, &kn->max_splits_heads, &kn->merge_heads,
			   &kn->ctas_per_sm_heads, &kn->spin,           &kn->pdl,
			   &kn->merge_warp,     &kn->threads,          &kn->host_merge,
			   &kn->graph,          &kn->tail,             &kn->tail_blk,
			   &kn->raw_heads,      &kn->prob_scores,      &kn->prob_scores_min};
	for (int i = 0; i < 18; i++) {
		const char *v = getenv(names[i]);
		char *end = NULL;
		if (!v || !*v)
			continue;
		unsigned long long x = strtoull(v, &end, 10);
		if (*end == '\0' && v[0] != '-' && x <= (1ull << 30))
			*f[i] = (uint32_t)x;
	}
}

/* ---- the plan --------------------------------------------------------------------------------------------------- */

static inline void axf_plan_free(axf_plan *p)
{
	if (!p)
		return;
	free(p->jb);
	free(p->so);
	free(p->roff);
	free(p->ljb);
	free(p->eoff);
	free(p->hmj);
	free(p->lo);
	free(p->uf);
	free(p->planned);
	free(p->ord);
	free(p->scoff);
	free(p->nk);
	free(p);
}

/* List length K of user job j's pass-job of kernel mode `mode` (axf_job_fields: mean_prob's logsumexp pass has
 * none). */
static inline uint32_t axf_pass_k(const ax_attn_job *j, uint32_t mode)
{
	return j->mode == AX_MODE_MEAN_PROB && mode == AXF_M_HEADS ? 0 : j->top_k;
}

/* The pass-job of user job i in kernel mode `mode` (partials and splits are set by axf_plan_launch). */
static inline void axf_job_fields(axf_plan *p, axf_job *jb, const ax_attn_job *j, uint32_t i, uint32_t mode)
{
	uint64_t start, n;
	axc_visible(j, &start, &n);
	memset(jb, 0, sizeof *jb);
	jb->q = j->q, jb->k = j->k, jb->index = j->index;
	jb->s0 = j->k_stride[0], jb->n_slots = j->n_slots, jb->start = start, jb->n = (uint32_t)n;
	jb->H = j->n_q_heads, jb->Hkv = j->n_kv_heads, jb->G = jb->H / jb->Hkv;
	jb->idt = j->index_dtype, jb->flag = i, jb->head_offset = j->head_offset;
	jb->scale = j->scale, jb->inv_h = 1.0f / (float)jb->H;
	jb->res = (int32_t)p->roff[i], jb->lse_out = -1, jb->rent = p->eoff[i];
	jb->K = axf_pass_k(j, mode);
	if (j->mode == AX_MODE_MEAN_PROB && mode == AXF_M_HEADS) /* the logsumexp pass */
		jb->res = -1, jb->lse_out = 0, jb->rent = 0;
	jb->kout = jb->K < jb->n ? jb->K : jb->n;
	if (j->mode == AX_MODE_MEAN_PROB && p->scoff[i] != UINT64_MAX) /* both passes: the job's scores */
		jb->sc0 = p->scoff[i], jb->scw = (jb->H + 3) & ~3u;
}

/* Kernel mode of user job j's pass-job number `pass` (0, or 1 for mean_prob's second), or 0 for none. */
static inline uint32_t axf_pass_mode(const ax_attn_job *j, int pass)
{
	if (j->mode == AX_MODE_MEAN_LOGIT)
		return pass == 0 ? AXF_M_LOGIT : 0;
	if (j->mode == AX_MODE_HEADS)
		return pass == 0 ? AXF_M_HEADS : 0;
	return pass == 0 ? AXF_M_HEADS : AXF_M_PROB;
}

/* Partial rows of a pass-job per split. */
static inline uint32_t axf_prows(const axf_job *jb, uint32_t mode)
{
	return mode == AXF_M_HEADS ? jb->H : 1;
}

/* A pass-job's tail (knob tail): static shares of tss stages a split, the rest in blocks of tstg stages; none
 * (tblk 0) below AXF_TAIL_MIN stages a split or when the shares would leave no tail, and none for mean_prob's
 * logsumexp pass (lse_out ≥ 0): its uneven ends let the probability pass's CTAs (programmatic dependents) take the
 * SMs they free and start their first copies early; balanced, they all free them at the end (RESULTS run 64, H200:
 * 1 × 128K mean_prob 181.1 µs with a tail in both passes, 173.5 with none, 169.9 with the second pass's alone);
 * and since session 18 none for its probability pass (mode AXF_M_PROB) either: streaming the scores the first
 * pass wrote (knob prob_scores), the tail made it slower (RESULTS runs 101 and 105, H200: 1 × 32K mean_prob −8 %
 * without, 128K −5 %, 64 × 4K −4 %, 8 × 128K −4 %). tbase is the driver's. */
static inline void axf_plan_tail(const axf_knobs *kn, axf_job *jb, uint32_t mode)
{
	const uint32_t nst = (jb->n + AXF_TS - 1) / AXF_TS, pct = kn->tail < 90 ? kn->tail : 90;
	jb->tss = jb->tail0 = jb->tblk = jb->tbase = 0;
	jb->tstg = kn->tail_blk ? kn->tail_blk : 1;
	if (!pct || jb->lse_out >= 0 || mode == AXF_M_PROB || nst < (uint64_t)AXF_TAIL_MIN * jb->S ||
	    jb->S >= AXF_MAX_SPLITS)
		return;
	const uint32_t tss = (uint32_t)((uint64_t)nst * (100 - pct) / 100 / jb->S);
	if (tss == 0 || (uint64_t)tss * jb->S >= nst)
		return;
	jb->tss = tss;
	jb->tail0 = tss * jb->S;
	/* blocks no longer than the tail's share of a split (session 17: 1 × 32K heads had 256 splits of 6 static
	 * stages and 128 blocks of 4 for them — half the CTAs took one and ended ~40% after the others), but long
	 * enough that S + tblk ≤ AXF_MAX_SPLITS (the merges stage one logsumexp partial each) */
	const uint32_t rest = nst - jb->tail0, room = AXF_MAX_SPLITS - jb->S, least = (rest + room - 1) / room;
	const uint32_t share = rest / jb->S ? rest / jb->S : 1;
	jb->tstg = jb->tstg < share ? jb->tstg : share;
	jb->tstg = jb->tstg > least ? jb->tstg : least;
	jb->tstg = jb->tstg < rest ? jb->tstg : rest; /* no longer than the tail (one split: the whole tail in one
						       * block; the kernel's 32-bit block ends stay below n) */
	jb->tblk = (rest + jb->tstg - 1) / jb->tstg;
}

/*
 * Whether launch L of kernel mode `mode` goes raw (knob raw_heads, session 11): heads lists only, every pass-job's
 * k ≤ AXF_TS and n ≤ raw_heads, all of them in one wave (`resident` CTAs) at AXF_TS keys a split, each split count
 * reaching merge_heads (the merge launch merges them, a row per CTA) and at most AXF_NW·32 (a merge thread a
 * split). Then every split is one stage whose warps write their keys' scores as they are: the split kernel keeps
 * no lists and no logsumexps (the list sorts were most of a short heads split's time: RESULTS.md, session 10's
 * trace of 1 × 4K heads); the merge (attn_cuda_fast.cu: merge_row_raw) bars and scans the raw scores, sorts none.
 */
static inline int axf_plan_raw(const axf_plan *p, const axf_launch *L, uint32_t mode, uint32_t resident)
{
	if (mode != AXF_M_HEADS || !p->kn.raw_heads || !p->kn.merge_heads)
		return 0;
	uint64_t ctas = 0;
	for (uint32_t i = 0; i < L->nj; i++) {
		const axf_job *jb = &p->jb[L->j0 + i];
		const uint64_t S = axf_splits(jb->n, AXF_TS);
		if (!jb->K || jb->K > AXF_TS || jb->n > p->kn.raw_heads || S < p->kn.merge_heads || S > AXF_NW * 32)
			return 0;
		ctas += S;
	}
	return ctas <= resident;
}

/* Split plan of launch L: chunks, splits, split offsets, partial rows and entries, tickets, merge launch. */
static inline int axf_plan_launch(axf_plan *p, axf_launch *L, uint32_t resident)
{
	uint32_t mode = axf_inst_mode(L->inst);
	if (axc_grow((void **)&p->nk, &p->nk_cap, L->nj, sizeof *p->nk) ||
	    axc_grow((void **)&p->lo, &p->lo_cap, L->nj, sizeof *p->lo) ||
	    axc_grow((void **)&p->so, &p->so_cap, (size_t)p->nso + L->nj + 1, sizeof *p->so))
		return -ENOMEM;
	int lists = 0;
	for (uint32_t i = 0; i < L->nj; i++) {
		const axf_job *jb = &p->jb[L->j0 + i];
		p->nk[i] = jb->n;
		p->lo[i] = axf_lo_chunk(&p->kn, jb->n, axf_lists(mode, jb->K));
		lists |= axf_lists(mode, jb->K);
	}
	if (lists && p->res_lists)
		resident = p->res_lists;
	const int raw = axf_plan_raw(p, L, mode, resident);
	for (uint32_t i = 0; raw && i < L->nj; i++)
		p->lo[i] = AXF_TS; /* one wave: the base is AXF_TS too */
	uint32_t base = axf_plan_base(p->nk, p->lo, L->nj, resident);
	/* host merge (knob host_merge): a mean launch of one pass-job with at most host_merge splits, spin off (session
	 * 6: mean_logit; session 13: also mean_prob's probability pass). Launches of several pass-jobs stay on the GPU:
	 * 64 × 4K mean_logit host-merged was 11% slower end to end for 8 µs less kernel time (RESULTS run 78) */
	L->hm = (mode == AXF_M_LOGIT || mode == AXF_M_PROB) && L->nj == 1 && !p->kn.spin && p->kn.host_merge &&
		axf_splits(p->nk[0], base > p->lo[0] ? base : p->lo[0]) <= p->kn.host_merge;
	L->so0 = p->nso;
	L->mg = 0;
	uint32_t maxs = 0;
	uint64_t ctas = 0;
	for (uint32_t i = 0; i < L->nj; i++) {
		axf_job *jb = &p->jb[L->j0 + i];
		jb->chunk = base > p->lo[i] ? base : p->lo[i];
		jb->S = (uint32_t)axf_splits(jb->n, jb->chunk);
		axf_plan_tail(&p->kn, jb, mode);
		jb->sepm = axf_lists(mode, jb->K) && p->kn.merge_heads && jb->S >= p->kn.merge_heads;
		jb->raw = (uint32_t)raw; /* (then chunk AXF_TS, sepm, no tail) */
		L->raw = (uint32_t)raw;
		if (jb->sepm && jb->H > L->mg)
			L->mg = jb->H;
		if (jb->sepm && jb->S > maxs)
			maxs = jb->S;
		jb->ticket = L->j0 + i;
		jb->hm = L->hm;
		if (jb->hm && jb->res >= 0) /* its user job's rows come from the host */
			p->hmj[jb->flag] = 1;
		if (jb->hm) { /* one partial row per split (mean mode), in the staging's hm regions */
			jb->part0 = jb->pf0 = p->hparts, jb->ent0 = p->hents;
			p->hparts += jb->S + jb->tblk;
			p->hents += (uint64_t)jb->S * jb->K;
		} else {
			if (raw) /* its merge reads a split's scores as 16-byte vectors */
				p->entries = (p->entries + 3) & ~(uint64_t)3;
			jb->part0 = p->parts;
			jb->ent0 = p->entries;
			jb->pf0 = p->pfl;
			p->pfl += jb->S;
			p->parts += (uint64_t)axf_prows(jb, mode) * (jb->S + jb->tblk);
			p->entries += (uint64_t)axf_prows(jb, mode) * jb->S * (raw ? AXF_TS : jb->K);
		}
		if (jb->lse_out >= 0) /* a logsumexp pass: its probability pass (a later launch) reduces its partials */
			p->ljb[jb->flag] = L->j0 + i;
		if (mode == AXF_M_PROB) {
			const axf_job *lj = &p->jb[p->ljb[jb->flag]];
			jb->lpart0 = lj->part0, jb->lpf0 = lj->pf0, jb->lS = lj->S; /* (no tail: axf_plan_tail) */
			jb->lticket = lj->ticket;
		}
		p->so[p->nso + i] = (uint32_t)ctas;
		ctas += jb->S;
	}
	L->mrpc = L->mg && maxs <= p->kn.merge_warp && !raw ? AXF_NW : 1;
	L->mg = (L->mg + L->mrpc - 1) / L->mrpc;
	L->few = L->mg && L->mrpc == AXF_NW;
	for (uint32_t i = 0; i < L->nj; i++) {
		const axf_job *jb = &p->jb[L->j0 + i];
		if (jb->sepm && (!jb->K || (uint64_t)jb->S * jb->K > AXF_FEW_ENTS))
			L->few = 0;
	}
	if (ctas > INT32_MAX || (uint64_t)L->nj * L->mg > INT32_MAX)
		return -ENOMEM;
	for (uint32_t i = 0; i < L->nj; i++) /* a pass-job merged by its last CTA is one unit; */
		p->units += !p->jb[L->j0 + i].sepm && !p->jb[L->j0 + i].hm && p->jb[L->j0 + i].lse_out < 0;
	p->units += (uint64_t)L->nj * L->mg; /* so is every CTA of the merge launch */
	p->so[p->nso + L->nj] = (uint32_t)ctas;
	p->nso += L->nj + 1;
	L->ctas = (uint32_t)ctas;
	return 0;
}

/* Append pass-jobs ord[0 .. m-1] (2·job + pass, in user-job order, all of instance inst) as one launch, if there
 * are any. */
static inline int axf_plan_inst(axf_plan *p, const ax_attn_job *jobs, const uint32_t *ord, uint32_t m, uint32_t inst,
				uint32_t resident)
{
	if (m == 0)
		return 0;
	axf_launch L = {inst, p->njb, 0, 0, 0, 0, 1, 0, 0, 0};
	if (axc_grow((void **)&p->jb, &p->jb_cap, (size_t)p->njb + m, sizeof *p->jb))
		return -ENOMEM;
	for (uint32_t k = 0; k < m; k++) {
		const uint32_t i = ord[k] >> 1;
		axf_job_fields(p, &p->jb[p->njb], &jobs[i], i, axf_pass_mode(&jobs[i], (int)(ord[k] & 1)));
		p->njb++, L.nj++;
	}
	p->L[p->nl] = L;
	int r = axf_plan_launch(p, &p->L[p->nl], resident);
	p->nl += r == 0;
	p->upload |= L.nj > 1;
	return r;
}

static inline size_t axf_al(size_t x)
{
	return (x + 255) & ~(size_t)255;
}

static inline void axf_make_layout(axf_plan *p)
{
	axf_layout *L = &p->lay;
	size_t o = 0;
	L->jobs = o, o += axf_al(p->njb * sizeof(axf_job));
	L->so = o, o += axf_al(p->nso * sizeof(uint32_t));
	L->up = o;
	L->pflags = o, o += axf_al(p->njb * sizeof(uint32_t));
	L->rlse = o, o += axf_al(p->rows * sizeof(float));
	L->rent = o, o += axf_al(p->rents * sizeof(axf_ent));
	L->hlse = o, o += axf_al(p->hparts * sizeof(float));
	L->hpf = o, o += axf_al(p->hparts * sizeof(uint32_t));
	L->hps = o, o += axf_al(p->hents * sizeof(float));
	L->hpp = o, o += axf_al(p->hents * sizeof(int32_t));
	L->off_dev = o;
	L->part_lse = o, o += axf_al(p->parts * sizeof(float));
	L->part_s = o, o += axf_al(p->entries * sizeof(float));
	L->part_p = o, o += axf_al(p->entries * sizeof(int32_t));
	L->part_f = o, o += axf_al(p->pfl * sizeof(uint32_t));
	L->sc = o, o += axf_al(p->scs * sizeof(float));
	L->total = o;
}

/*
 * Plan a fast run of n jobs: rc[i] = 0 for an eligible job, the generic validation's code for an invalid one,
 * -EOPNOTSUPP for a valid job the fast path does not run (the dispatcher never passes those). Result rows at the usual
 * offsets (job i's first row = Σ rows of jobs before it); one launch per instance present, in launch order; `resident`
 * CTAs per wave (p->res_lists for a launch with heads lists, when set), floors from p->kn. mean_prob: its logsumexp
 * pass-job comes in a heads launch, which runs before the mean_prob launch, whose pass-job reads its partials
 * (ljb, lpart0 …). Returns 0 or -ENOMEM (tables, or more than 2^31 result rows or CTAs).
 */
static inline int axf_plan_build(axf_plan *p, const ax_attn_job *jobs, uint32_t n, int *rc, uint32_t resident)
{
	if (axc_grow((void **)&p->ord, &p->ord_cap, 2 * (size_t)n, sizeof *p->ord) ||
	    axc_grow((void **)&p->roff, &p->roff_cap, n, sizeof *p->roff) ||
	    axc_grow((void **)&p->ljb, &p->ljb_cap, n ? n : 1, sizeof *p->ljb) ||
	    axc_grow((void **)&p->eoff, &p->eoff_cap, n, sizeof *p->eoff) ||
	    axc_grow((void **)&p->uf, &p->uf_cap, n ? n : 1, sizeof *p->uf) ||
	    axc_grow((void **)&p->planned, &p->planned_cap, n ? n : 1, sizeof *p->planned) ||
	    axc_grow((void **)&p->scoff, &p->scoff_cap, n ? n : 1, sizeof *p->scoff) ||
	    axc_grow((void **)&p->hmj, &p->hmj_cap, n ? n : 1, sizeof *p->hmj))
		return -ENOMEM;
	memset(p->hmj, 0, n);
	p->n = n, p->rows = 0, p->njb = 0, p->nso = 0, p->parts = 0, p->entries = 0, p->nl = 0;
	p->rents = 0, p->pfl = 0, p->upload = 0, p->units = 0, p->hparts = 0, p->hents = 0, p->scs = 0;
	const uint64_t sc_cap = (uint64_t)(p->kn.prob_scores < AXF_SC_MAX_MIB ? p->kn.prob_scores : AXF_SC_MAX_MIB) << 18;
	/* (MiB in floats) */
	uint64_t pkeys = 0; /* the mean_prob jobs' visible keys (knob prob_scores_min) */
	for (uint32_t i = 0; i < n; i++) {
		int why = axf_why_not(&jobs[i]);
		rc[i] = why == AXF_OK ? 0 : why == AXF_NO_INVALID ? axc_check_job(&jobs[i]) : -EOPNOTSUPP;
		p->roff[i] = (uint32_t)p->rows;
		p->planned[i] = rc[i] == 0;
		p->rows += axc_out_rows(&jobs[i]);
		p->eoff[i] = p->rents;
		if (rc[i] == 0)
			p->rents += (uint64_t)axc_out_rows(&jobs[i]) * axf_kout(&jobs[i]);
		/* knob prob_scores: a mean_prob job whose scores fit in what is left gets them, in job order */
		p->scoff[i] = UINT64_MAX;
		if (rc[i] == 0 && jobs[i].mode == AX_MODE_MEAN_PROB && sc_cap) {
			uint64_t st, nv;
			axc_visible(&jobs[i], &st, &nv);
			const uint64_t f = axf_sc_floats(nv, jobs[i].n_q_heads);
			pkeys += nv;
			if (f <= sc_cap - p->scs)
				p->scoff[i] = p->scs, p->scs += f;
		}
	}
	if (p->scs && pkeys < p->kn.prob_scores_min) { /* knob prob_scores_min: too few keys, no scores after all */
		for (uint32_t i = 0; i < n; i++)
			p->scoff[i] = UINT64_MAX;
		p->scs = 0;
	}
	if (p->rows > INT32_MAX)
		return -ENOMEM;
	/* the pass-jobs grouped by instance, in launch order, each group in user-job order (a counting sort: one pass
	 * over the jobs, not one per instance) */
	uint32_t cnt[AXF_N_INST] = {0}, at[AXF_N_INST], rank[AXF_N_INST];
	for (uint32_t o = 0; o < AXF_N_INST; o++)
		rank[axf_launch_order[o]] = o;
	for (int fill = 0; fill < 2; fill++) {
		for (uint32_t i = 0; i < n; i++) {
			if (rc[i] != 0)
				continue;
			const ax_attn_job *j = &jobs[i];
			for (int pass = 0; pass < 2; pass++) {
				const uint32_t mode = axf_pass_mode(j, pass);
				if (!mode)
					continue;
				const uint32_t in = axf_inst(mode, j->k_dtype, j->n_q_heads / j->n_kv_heads, axf_pass_k(j, mode),
							     p->scoff[i] != UINT64_MAX);
				if (fill)
					p->ord[at[rank[in]]++] = 2 * i + (uint32_t)pass;
				else
					cnt[rank[in]]++;
			}
		}
		for (uint32_t o = 0, c = 0; !fill && o < AXF_N_INST; o++)
			at[o] = c, c += cnt[o];
	}
	for (uint32_t o = 0, c = 0; o < AXF_N_INST; c += cnt[o], o++) {
		int r = axf_plan_inst(p, jobs, p->ord + c, cnt[o], axf_launch_order[o], resident);
		if (r)
			return r;
	}
	if (p->units > UINT32_MAX)
		return -ENOMEM;
	axf_make_layout(p);
	return 0;
}

/* The tables into the staging buffer h (at least lay.off_dev bytes), at their layout offsets (one copy of
 * [0, lay.up) brings them to the device; needed only when p->upload). */
static inline void axf_plan_tables(const axf_plan *p, char *h)
{
	memcpy(h + p->lay.jobs, p->jb, p->njb * sizeof(axf_job));
	memcpy(h + p->lay.so, p->so, p->nso * sizeof(uint32_t));
}

/* The argument block of launch L over device scratch d, host staging h (as the device addresses it: pinned and
 * mapped) and the tickets (≥ njb words, all 0). */
static inline axf_args axf_plan_args(const axf_plan *p, char *d, char *h, uint32_t *tickets, uint32_t *tailc,
				     const axf_launch *L)
{
	const axf_layout *y = &p->lay;
	axf_args a;
	memset(&a, 0, sizeof a);
	a.jobs = (const axf_job *)(d + y->jobs) + L->j0;
	a.split_off = (const uint32_t *)(d + y->so) + L->so0;
	a.nj = L->nj;
	a.inl = L->nj == 1;
	if (a.inl)
		a.one = p->jb[L->j0];
	a.part_s = (float *)(d + y->part_s);
	a.part_p = (int32_t *)(d + y->part_p);
	a.part_lse = (float *)(d + y->part_lse);
	a.part_f = (uint32_t *)(d + y->part_f);
	a.lpart_lse = a.part_lse;
	a.lpart_f = a.part_f;
	a.tickets = tickets;
	a.tailc = tailc;
	a.pflags = (uint32_t *)(h + y->pflags);
	a.rlse = (float *)(h + y->rlse);
	a.rent = (axf_ent *)(h + y->rent);
	a.mg = L->mg;
	a.mrpc = L->mrpc;
	a.sc = (float *)(d + y->sc);
	if (L->hm) { /* the partial rows go straight to the host (mapped staging) */
		a.part_lse = (float *)(h + y->hlse);
		a.part_f = (uint32_t *)(h + y->hpf);
		a.part_s = (float *)(h + y->hps);
		a.part_p = (int32_t *)(h + y->hpp);
	}
	return a;
}

/* An empty row: k 0, head_id -1, lse 0, every entry (-1, -inf) (the prefill copies it; made once per plan). */
static inline void axf_empty_row(axf_plan *p)
{
	if (p->empty_ok)
		return;
	memset(&p->empty, 0, sizeof p->empty);
	p->empty.head_id = -1;
	for (uint32_t e = 0; e < AX_ATTN_MAX_TOPK; e++)
		p->empty.pos[e] = -1, p->empty.logit[e] = -INFINITY;
	p->empty_ok = 1;
}

/* Prefill (below) of jobs [i0, i1). */
static inline void axf_prefill_range(axf_plan *p, const ax_attn_job *jobs, ax_attn_result *out, uint32_t i0,
				     uint32_t i1)
{
	for (uint32_t i = i0; i < i1; i++) {
		if (!p->planned[i])
			continue;
		const ax_attn_job *j = &jobs[i];
		const uint32_t rows = axc_out_rows(j), kout = axf_kout(j), heads = j->mode == AX_MODE_HEADS;
		ax_attn_result *o = out + p->roff[i];
		if (p->zc && !p->hmj[i]) { /* the kernels write the first kout entries and the logsumexp (maybe now):
					    * not a byte of those here */
			for (uint32_t r = 0; r < rows; r++) {
				o[r].head_id = heads ? (int32_t)(j->head_offset + r) : -1;
				o[r].k = kout;
				memcpy(o[r].pos + kout, p->empty.pos + kout, (AX_ATTN_MAX_TOPK - kout) * sizeof o[r].pos[0]);
				memcpy(o[r].logit + kout, p->empty.logit + kout, (AX_ATTN_MAX_TOPK - kout) * sizeof o[r].logit[0]);
			}
			continue;
		}
		for (uint32_t r = 0; r < rows; r++) {
			memcpy(&o[r], &p->empty, sizeof o[r]);
			o[r].head_id = heads ? (int32_t)(j->head_offset + r) : -1;
			o[r].k = kout;
		}
	}
}

/*
 * The half of the expansion that does not depend on the results, done while the kernels run (the driver calls it
 * after the launches, before it waits): every row of every planned job gets its head_id, its k (= kout), entries
 * past k as (-1, -inf) (attn_cuda.h's contract) and lse 0 — one copy of a 784-byte row each (1.6 MB for 64 × 4K
 * heads: run 8's ~120 µs of host work after the GPU was done). axf_plan_finish then writes only the logsumexp and
 * the first kout entries of each row. Rows of jobs the kernels fail are undefined anyway. With p->zc (session 18)
 * the kernels write those into the rows themselves, maybe while this runs: the rows of jobs they merge get only
 * their head_id, k and the entries past k here, not a byte of the rest (disjoint bytes of the same rows: the PCIe
 * writes and the CPU's stores are coherent at byte granularity), and the finish leaves them alone.
 */
static inline void axf_plan_prefill(axf_plan *p, const ax_attn_job *jobs, ax_attn_result *out)
{
	axf_empty_row(p);
	axf_prefill_range(p, jobs, out, 0, p->n);
}

/* The result half of row o (prefilled): its logsumexp and kout entries from the compact form (offset -1: empty).
 * Positions and logits in two loops through restrict pointers (the compiler vectorises them: ~30% less time than one
 * loop over both on the CPU machine). */
static inline void axf_finish_row(ax_attn_result *o, float lse, const axf_ent *e, uint32_t kout, uint64_t start)
{
	int64_t *__restrict pos = o->pos;
	float *__restrict lg = o->logit;
	const axf_ent *__restrict c = e;
	o->lse = (double)lse;
	for (uint32_t i = 0; i < kout; i++)
		pos[i] = c[i].p >= 0 ? (int64_t)start + c[i].p : -1;
	for (uint32_t i = 0; i < kout; i++)
		lg[i] = c[i].p >= 0 ? c[i].x : -INFINITY;
}

/*
 * The host's merge of a host-merged pass-job (jb->hm: a mean_logit pass-job, or (prob) mean_prob's probability
 * pass-job, whose partial rows the kernel wrote into the staging h): its flag word (the OR of its splits'), its
 * logsumexp (over the splits': the max, then one sum of exponentials; 0 for prob, as the GPU merge reports it) and
 * its kout best entries (value, then lower offset) into the result staging, as the GPU
 * merge writes them. The splits' lists are sorted, so each is walked only while its entries beat the kth best found
 * so far (most stop at their first entry); the kout best are kept sorted by insertion. Rows of a flagged pass-job
 * are left alone (undefined). Float arithmetic, as the GPU merge's.
 */
static inline int axf_hm_before(float ax, int32_t ap, float bx, int32_t bp)
{
	return ax > bx || (ax == bx && ap < bp);
}

static inline void axf_hmerge_job(const axf_plan *p, char *h, const axf_job *jb, int prob)
{
	const float *pl = (const float *)(h + p->lay.hlse) + jb->part0;
	const uint32_t *pf = (const uint32_t *)(h + p->lay.hpf) + jb->pf0;
	const float *ps = (const float *)(h + p->lay.hps) + jb->ent0;
	const int32_t *pp = (const int32_t *)(h + p->lay.hpp) + jb->ent0;
	const uint32_t S = jb->S, SL = jb->S + jb->tblk, K = jb->K, kout = jb->kout;
	uint32_t f = 0;
	float m = -INFINITY;
	for (uint32_t i = 0; i < S; i++)
		f |= pf[i];
	for (uint32_t i = 0; i < SL; i++) /* the splits' logsumexps, then the tail blocks' */
		m = pl[i] > m ? pl[i] : m;
	((uint32_t *)(h + p->lay.pflags))[jb->ticket] = f;
	if (f)
		return;
	float sum = 0.f;
	if (m != -INFINITY && !prob)
		for (uint32_t i = 0; i < SL; i++)
			sum += pl[i] == -INFINITY ? 0.f : expf(pl[i] - m);
	((float *)(h + p->lay.rlse))[jb->res] = prob ? 0.f : m == -INFINITY ? -INFINITY : m + logf(sum);
	float bx[AX_ATTN_MAX_TOPK];
	int32_t bp[AX_ATTN_MAX_TOPK];
	uint32_t nb = 0;
	for (uint32_t i = 0; i < S; i++) {
		const float *x = ps + (uint64_t)i * K;
		const int32_t *q = pp + (uint64_t)i * K;
		for (uint32_t e = 0; e < K && q[e] >= 0; e++) {
			if (nb == kout && !axf_hm_before(x[e], q[e], bx[kout - 1], bp[kout - 1]))
				break; /* the list is sorted: nothing further in it gets in */
			uint32_t j = nb < kout ? nb++ : kout - 1;
			for (; j > 0 && axf_hm_before(x[e], q[e], bx[j - 1], bp[j - 1]); j--)
				bx[j] = bx[j - 1], bp[j] = bp[j - 1];
			bx[j] = x[e], bp[j] = q[e];
		}
	}
	axf_ent *out = (axf_ent *)(h + p->lay.rent) + jb->rent;
	for (uint32_t e = 0; e < kout; e++)
		out[e].x = e < nb ? bx[e] : -INFINITY, out[e].p = e < nb ? bp[e] : -1;
}

/* The keys a run streams: the sum of its pass-jobs' visible keys (mean_prob's two passes both count). */
static inline uint64_t axf_plan_keys(const axf_plan *p)
{
	uint64_t n = 0;
	for (uint32_t k = 0; k < p->njb; k++)
		n += p->jb[k].n;
	return n;
}

/* 1 when the run's kernels go as one graph launch (knob graph: 0 never, 1 always, N > 1 runs of ≤ N keys). */
static inline int axf_plan_graph(const axf_plan *p)
{
	return p->kn.graph == 1 || (p->kn.graph > 1 && axf_plan_keys(p) <= p->kn.graph);
}

/* The host merges of the plan's host-merged pass-jobs (before axf_plan_codes reads their flag words). */
static inline void axf_plan_hmerge(const axf_plan *p, char *h)
{
	/* the partials came from the GPU over the bus (none of them in the caches): every line of the four hm regions
	 * asked for at once, before any pass-job's merge waits on one (per pass-job, a launch of 64 paid ~64 memory
	 * latencies in a row, session 13's try of several pass-jobs a launch: RESULTS run 78) */
	const size_t reg[4][2] = {{p->lay.hlse, p->hparts * 4}, {p->lay.hpf, p->hparts * 4}, {p->lay.hps, p->hents * 4},
				  {p->lay.hpp, p->hents * 4}};
	for (int r = 0; r < 4; r++)
		for (size_t o = 0; o < reg[r][1]; o += 64)
			__builtin_prefetch(h + reg[r][0] + o);
	for (uint32_t l = 0; l < p->nl; l++)
		for (uint32_t i = 0; p->L[l].hm && i < p->L[l].nj; i++)
			axf_hmerge_job(p, h, &p->jb[p->L[l].j0 + i], axf_inst_mode(p->L[l].inst) == AXF_M_PROB);
}

/* Each planned job's flags (the OR of its pass-jobs' flag words, into p->uf) and code (-ERANGE wins over -EDOM, as in
 * attn_cpu) from the staging buffer h; jobs whose rc was already non-zero are left alone. */
static inline void axf_plan_codes(axf_plan *p, const char *h, int *rc)
{
	const uint32_t *pflags = (const uint32_t *)(h + p->lay.pflags);
	memset(p->uf, 0, p->n * sizeof *p->uf);
	for (uint32_t k = 0; k < p->njb; k++)
		p->uf[p->jb[k].flag] |= pflags[k];
	for (uint32_t i = 0; i < p->n; i++)
		if (p->planned[i])
			rc[i] = p->uf[i] & AXF_F_RANGE ? -ERANGE : p->uf[i] & AXF_F_DOM ? -EDOM : 0;
}

/* The results of jobs [i0, i1) whose flags (axf_plan_codes) are clear, into their prefilled rows. Reads only the
 * plan, p->uf and h: threads may run disjoint ranges at once. */
static inline void axf_finish_range(const axf_plan *p, const char *h, const ax_attn_job *jobs, ax_attn_result *out,
				    uint32_t i0, uint32_t i1)
{
	const float *rlse = (const float *)(h + p->lay.rlse);
	const axf_ent *rent = (const axf_ent *)(h + p->lay.rent);
	for (uint32_t i = i0; i < i1; i++) {
		if (!p->planned[i] || p->uf[i] & (AXF_F_RANGE | AXF_F_DOM) || (p->zc && !p->hmj[i])) /* (zc: written) */
			continue;
		const ax_attn_job *j = &jobs[i];
		uint64_t start, nv;
		axc_visible(j, &start, &nv);
		const uint32_t rows = axc_out_rows(j), kout = axf_kout(j);
		const uint32_t r0 = p->roff[i];
		const axf_ent *e = rent + p->eoff[i];
		for (uint32_t r = 0; r < rows; r++, e += kout) {
			/* the staging ~1 KB ahead: the GPU's writes leave none of it in the CPU's caches (host bench, evicted
			 * results: 64 × 4K heads' finish 55-80 → ~49 µs on one core of the CPU machine) */
			__builtin_prefetch((const void *)((uintptr_t)e + 1024));
			__builtin_prefetch((const void *)((uintptr_t)(rlse + r0 + r) + 256));
			axf_finish_row(out + r0 + r, rlse[r0 + r], e, kout, start);
		}
	}
}

/* From the results in the staging buffer h: each planned job's code (axf_plan_codes) and, where 0, the results
 * written into its rows, which axf_plan_prefill has prepared (the caller calls it first, for the same jobs and
 * out). Jobs whose rc was already non-zero are left alone. Returns 0. */
static inline int axf_plan_finish(axf_plan *p, char *h, const ax_attn_job *jobs, ax_attn_result *out, int *rc)
{
	axf_plan_hmerge(p, h);
	axf_plan_codes(p, h, rc);
	axf_finish_range(p, h, jobs, out, 0, p->n);
	return 0;
}

/* ---- the row pool: prefill and finish on several host threads (knob threads) ------------------------------------ */

#define AXF_POOL_MAX 8            /* threads of a run, the caller's included */
#define AXF_POOL_MIN_ROWS 512     /* fewer rows: the calling thread alone (a wake-up costs more) */

/*
 * Helper threads for runs with many result rows (64 × 4K heads: 2048 rows, ~25 µs of finish on one CPU core after
 * the GPU is done). A run's jobs are cut into nt ranges of about equal rows; axf_pool_start (after the launches)
 * wakes the helpers (a condition variable: they sleep between runs) and prefills range 0 on the calling thread;
 * helper t prefills range t, then spins until the caller, once the results are in and the codes are known
 * (axf_plan_codes), releases the finish (axf_pool_finish: a release store of the generation into `go`; helpers
 * load it with acquire, so p->uf and the staging are theirs to read), finishes range t and counts itself out
 * (`left`, release; the caller waits for 0 with acquire before it returns, so every row is written). Each thread
 * prefills and finishes the same range: no row is written by two threads. An aborted run (a CUDA error) releases the
 * helpers with `abort` set: they skip the finish. The spinning costs a core per helper for the length of the
 * kernels, which is why it is a knob (6 threads by default, at most half the CPUs) and only for runs of ≥
 * AXF_POOL_MIN_ROWS rows.
 */
typedef struct axf_pool {
	pthread_t th[AXF_POOL_MAX];
	uint32_t nth;                 /* helpers started (threads of a run: nth + 1) */
	int init;                     /* mu and cv initialised */
	pthread_mutex_t mu;
	pthread_cond_t cv;
	uint32_t gen;                 /* the run's generation (written under mu, read by helpers under mu) */
	uint32_t stop;                /* under mu: helpers exit */
	axf_plan *p;                  /* the run (written before gen, under mu) */
	const ax_attn_job *jobs;
	ax_attn_result *out;
	const char *h;
	uint32_t nt;                  /* threads of this run (≤ nth + 1); helpers t ≥ nt sit it out */
	uint32_t cut[AXF_POOL_MAX + 1];
	uint32_t go;                  /* atomic: the generation whose finish may start */
	uint32_t abort;               /* written before go: 1 = skip the finish */
	uint32_t left;                /* atomic: helpers of this run still working */
} axf_pool;

typedef struct axf_pool_arg {
	axf_pool *pool;
	uint32_t t;
	uint32_t gen0;                /* the generation when it was created: it works from the next one on */
} axf_pool_arg;

/* Ranges [cut[t], cut[t+1]) of jobs with about rows/nt rows each (by the plan's row offsets). */
static inline void axf_pool_cuts(const axf_plan *p, uint32_t nt, uint32_t *cut)
{
	uint32_t i = 0;
	cut[0] = 0;
	for (uint32_t t = 1; t < nt; t++) {
		const uint64_t want = p->rows * t / nt;
		while (i < p->n && p->roff[i] < want)
			i++;
		cut[t] = i;
	}
	cut[nt] = p->n;
}

static inline void *axf_pool_main(void *arg)
{
	axf_pool_arg a = *(axf_pool_arg *)arg;
	free(arg);
	axf_pool *pl = a.pool;
	uint32_t seen = a.gen0; /* not pl->gen: the caller may have started a run before this thread got here */
	pthread_mutex_lock(&pl->mu);
	for (;;) {
		while (pl->gen == seen && !pl->stop)
			pthread_cond_wait(&pl->cv, &pl->mu);
		if (pl->stop)
			break;
		seen = pl->gen;
		axf_plan *p = pl->p;
		const ax_attn_job *jobs = pl->jobs;
		ax_attn_result *out = pl->out;
		const char *h = pl->h;
		const uint32_t nt = pl->nt, i0 = a.t < nt ? pl->cut[a.t] : 0, i1 = a.t < nt ? pl->cut[a.t + 1] : 0;
		pthread_mutex_unlock(&pl->mu);
		if (a.t < nt) {
			axf_prefill_range(p, jobs, out, i0, i1);
			while (__atomic_load_n(&pl->go, __ATOMIC_ACQUIRE) != seen)
#if defined(__x86_64__) || defined(__i386__)
				__builtin_ia32_pause();
#else
				;
#endif
			if (!pl->abort)
				axf_finish_range(p, h, jobs, out, i0, i1);
			__atomic_fetch_sub(&pl->left, 1, __ATOMIC_RELEASE);
		}
		pthread_mutex_lock(&pl->mu);
	}
	pthread_mutex_unlock(&pl->mu);
	return NULL;
}

/* Stop and join the helpers. Accepts a pool never started. */
static inline void axf_pool_fini(axf_pool *pl)
{
	if (!pl->init)
		return;
	pthread_mutex_lock(&pl->mu);
	pl->stop = 1;
	pthread_cond_broadcast(&pl->cv);
	pthread_mutex_unlock(&pl->mu);
	for (uint32_t t = 0; t < pl->nth; t++)
		pthread_join(pl->th[t], NULL);
	pthread_cond_destroy(&pl->cv);
	pthread_mutex_destroy(&pl->mu);
	memset(pl, 0, sizeof *pl);
}

/* Threads for a run of `rows` rows with `want` threads asked for (the knob): helpers started as needed; returns
 * the threads to use (1: the caller alone, also when a helper cannot be started). */
static inline uint32_t axf_pool_ready(axf_pool *pl, uint32_t want, uint64_t rows)
{
	want = want > AXF_POOL_MAX ? AXF_POOL_MAX : want;
	if (want < 2 || rows < AXF_POOL_MIN_ROWS)
		return 1;
	if (!pl->init) {
		if (pthread_mutex_init(&pl->mu, NULL) != 0)
			return 1;
		if (pthread_cond_init(&pl->cv, NULL) != 0) {
			pthread_mutex_destroy(&pl->mu);
			return 1;
		}
		pl->init = 1;
	}
	while (pl->nth + 1 < want) {
		axf_pool_arg *a = (axf_pool_arg *)malloc(sizeof *a);
		if (!a)
			break;
		pthread_mutex_lock(&pl->mu); /* the new helper takes part from the next generation on */
		a->pool = pl, a->t = pl->nth + 1, a->gen0 = pl->gen;
		int e = pthread_create(&pl->th[pl->nth], NULL, axf_pool_main, a);
		if (e == 0)
			pl->nth++;
		pthread_mutex_unlock(&pl->mu);
		if (e != 0) {
			free(a);
			break;
		}
	}
	return pl->nth + 1 < want ? pl->nth + 1 : want;
}

/* Start a run's rows on nt threads (axf_pool_ready's answer, ≥ 2): the helpers prefill their ranges, the caller
 * range 0 (returns when it has). */
static inline void axf_pool_start(axf_pool *pl, uint32_t nt, axf_plan *p, const ax_attn_job *jobs,
				  ax_attn_result *out, const char *h)
{
	axf_empty_row(p);
	pthread_mutex_lock(&pl->mu);
	pl->p = p, pl->jobs = jobs, pl->out = out, pl->h = h, pl->nt = nt, pl->abort = 0;
	axf_pool_cuts(p, nt, pl->cut);
	__atomic_store_n(&pl->left, nt - 1, __ATOMIC_RELAXED);
	pl->gen++;
	pthread_cond_broadcast(&pl->cv);
	pthread_mutex_unlock(&pl->mu);
	axf_prefill_range(p, jobs, out, pl->cut[0], pl->cut[1]);
}

/* The finish of the run started by axf_pool_start: ok = the results are in and rc holds the codes (axf_plan_codes,
 * called before); 0 = abort (the helpers skip their finish). Returns once every helper is done with this run. */
static inline void axf_pool_finish(axf_pool *pl, int ok)
{
	pl->abort = !ok;
	__atomic_store_n(&pl->go, pl->gen, __ATOMIC_RELEASE);
	if (ok)
		axf_finish_range(pl->p, pl->h, pl->jobs, pl->out, pl->cut[0], pl->cut[1]);
	while (__atomic_load_n(&pl->left, __ATOMIC_ACQUIRE) != 0)
#if defined(__x86_64__) || defined(__i386__)
		__builtin_ia32_pause();
#else
		;
#endif
}

/* ---- a batch split between the fast and the generic path ------------------------------------------------------- */

/* A runner: attn_cuda.h's ax_attn_cuda_run contract (rows at the usual offsets, rc per job, whole-batch code). */
typedef int (*axf_runner)(void *ctx, const ax_attn_job *jobs, uint32_t n, ax_attn_result *out, int *rc);

/* Host arrays of a split batch, grown to the largest seen (kept across runs). */
typedef struct axf_split {
	ax_attn_job *sj;            /* one side's jobs, compacted */
	size_t sj_cap;
	uint32_t *si;               /* their indices in the batch */
	size_t si_cap;
	ax_attn_result *sout;       /* their rows */
	size_t sout_cap;
	int *src;                   /* their codes */
	size_t src_cap;
	uint32_t *roff;             /* [n] first row of each job of the batch */
	size_t roff_cap;
} axf_split;

static inline void axf_split_fini(axf_split *s)
{
	free(s->sj);
	free(s->si);
	free(s->sout);
	free(s->src);
	free(s->roff);
	memset(s, 0, sizeof *s);
}

/* Run the jobs whose rc is -EOPNOTSUPP (those the fast runner left) through `run`, compacted, and scatter codes
 * and rows back. */
static inline int axf_run_rest(axf_split *s, const ax_attn_job *jobs, uint32_t n, ax_attn_result *out, int *rc,
			       axf_runner run, void *ctx)
{
	if (axc_grow((void **)&s->sj, &s->sj_cap, n, sizeof *s->sj) ||
	    axc_grow((void **)&s->si, &s->si_cap, n, sizeof *s->si) ||
	    axc_grow((void **)&s->src, &s->src_cap, n, sizeof *s->src) ||
	    axc_grow((void **)&s->roff, &s->roff_cap, n, sizeof *s->roff))
		return -ENOMEM;
	uint32_t m = 0;
	uint64_t rows = 0, all = 0;
	for (uint32_t i = 0; i < n; i++) {
		const uint32_t nr = axc_out_rows(&jobs[i]);
		s->roff[i] = (uint32_t)all, all += nr;
		if (rc[i] == -EOPNOTSUPP) {
			s->sj[m] = jobs[i];
			s->si[m++] = i;
			rows += nr;
		}
	}
	if (axc_grow((void **)&s->sout, &s->sout_cap, rows ? rows : 1, sizeof *s->sout))
		return -ENOMEM;
	int r = run(ctx, s->sj, m, s->sout, s->src);
	if (r)
		return r;
	uint64_t o = 0;
	for (uint32_t k = 0; k < m; k++) {
		uint32_t i = s->si[k], nr = axc_out_rows(&jobs[i]);
		rc[i] = s->src[k];
		if (rc[i] == 0)
			memcpy(out + s->roff[i], s->sout + o, nr * sizeof *out);
		o += nr;
	}
	return 0;
}

/*
 * Run a batch: every job through `fast`, which runs the eligible ones and leaves the others with -EOPNOTSUPP (an
 * invalid job gets its validation code there, the generic path's); those it left then go through `generic`,
 * compacted and scattered back (the whole batch as it is when it left all of them: no copies). One validation pass
 * per job (the fast runner's plan) instead of a separate eligibility pass first: 64 jobs cost ~1.8 µs a pass on an
 * H200 host (session 13, RESULTS run 76's gap lines). Returns 0 (rc[] tells each job) or the first runner's
 * whole-batch error (-ENOMEM, -EIO; -ENOMEM also for the host arrays here).
 */
static inline int axf_dispatch(axf_split *s, const ax_attn_job *jobs, uint32_t n, ax_attn_result *out, int *rc,
			       axf_runner fast, void *fctx, axf_runner generic, void *gctx)
{
	if (!fast)
		return generic(gctx, jobs, n, out, rc);
	int r = fast(fctx, jobs, n, out, rc);
	if (r)
		return r;
	uint32_t ng = 0;
	for (uint32_t i = 0; i < n; i++)
		ng += rc[i] == -EOPNOTSUPP;
	if (ng == 0)
		return 0;
	if (ng == n)
		return generic(gctx, jobs, n, out, rc);
	return axf_run_rest(s, jobs, n, out, rc, generic, gctx);
}

/* ---- the driver (attn_cuda_fast.cu) ------------------------------------------------------------------------------ */

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ax_attn_fast ax_attn_fast;

/* axf_eligible, exported. Thread-safe. */
int ax__attn_fast_eligible(const ax_attn_job *j);

/*
 * Fast-path state for a context on `device` running on `stream` (a cudaStream_t the caller owns and keeps until
 * ax__attn_fast_free). *out = NULL with 0 when the fast path is off here: AX_ATTN_CUDA_FAST=0 in the environment,
 * a device before sm_90, kernels not built for this device, or a failing device query (the generic path then
 * serves everything). Returns 0, -EINVAL (out NULL) or -ENOMEM.
 */
int ax__attn_fast_new(ax_attn_fast **out, int device, void *stream);
/* Free the state (waits for the stream). Accepts NULL. */
void ax__attn_fast_free(ax_attn_fast *f);

/* Run n jobs with ax_attn_cuda_run's contract (synchronous on the stream; 0, or -ENOMEM / -EIO for the whole
 * batch): the eligible ones; the others get -EOPNOTSUPP (valid, not the fast path's shape: axf_dispatch sends them
 * to the generic path) or their validation code, and their rows are not written. Not thread-safe per state. */
int ax__attn_fast_run(ax_attn_fast *f, const ax_attn_job *jobs, uint32_t n, ax_attn_result *out, int *rc);

/*
 * A buffer of `rows` result rows the kernels write into directly when it is the `out` of a run (session 18):
 * page-locked host memory mapped into the device (cudaHostAllocMapped), kept by the state (at most AXF_ZB_MAX at
 * once; freed with it). A run whose rows all lie in one such buffer skips its staging and its host finish: the
 * merges write each row's first k entries and its logsumexp, the host's prefill the rest (while the kernels run).
 * NULL on failure (f NULL, no slot left, no memory): any memory still works as `out`.
 */
#define AXF_ZB_MAX 8 /* result buffers a state keeps */
ax_attn_result *ax__attn_fast_results_alloc(ax_attn_fast *f, size_t rows);
/* Free a buffer of ax__attn_fast_results_alloc: 1, or 0 when r is not one of f's (nothing done). */
int ax__attn_fast_results_free(ax_attn_fast *f, ax_attn_result *r);

/* axf_dispatch with this state as the fast runner (f NULL: everything through generic). */
int ax__attn_fast_dispatch(ax_attn_fast *f, const ax_attn_job *jobs, uint32_t n, ax_attn_result *out, int *rc,
			   axf_runner generic, void *gctx);

/* The fast-path state of a context (NULL when it has none); owned by the context. For benchmarks. */
struct ax_attn_cuda;
ax_attn_fast *ax__attn_cuda_fast_state(struct ax_attn_cuda *c);

/* The last CUDA error of the fast path (a cudaError_t), then cleared; 0 when none. */
int ax__attn_fast_take_error(ax_attn_fast *f);

/* The planner's knobs: *get = the current ones (get may be NULL); then, when set is not NULL, replace them (the
 * next run plans with them). Accepts f NULL (does nothing). For benchmarks and sweeps; a context reads the
 * environment once (axf_knobs_env). */
void ax__attn_fast_knobs(ax_attn_fast *f, axf_knobs *get, const axf_knobs *set);

/* Kernel timing: with on, every run records CUDA events around its launches (after the upload, if any, before
 * the synchronisation); ax__attn_fast_kernel_us then gives the last run's launches in µs (-1 when off or none).
 * ax__attn_fast_timing returns 0, -EINVAL (f NULL) or -EIO (event creation failed). */
int ax__attn_fast_timing(ax_attn_fast *f, int on);
float ax__attn_fast_kernel_us(const ax_attn_fast *f);
/* Diagnostics: with on, every run records the GPU's global timer at the points of enum axf_trace_slot (one more
 * copy up and one down per run: not for timing the call); ax__attn_fast_trace_get copies the last run's AXF_TR_ALL
 * slots (ns; a slot never reached keeps ~0 for a first-slot, 0 for a last-slot). 0, -EINVAL or -EIO. */
int ax__attn_fast_trace(ax_attn_fast *f, int on);
void ax__attn_fast_trace_get(const ax_attn_fast *f, unsigned long long *out);

/* The last successful run on the host clock, µs (out has room for 6): [0] plan, upload and launches (to the last
 * launch call's return), [1] the prefill, [2] the wait (synchronisation or completion word), [3] the finish; the
 * parts of [0]: [4] the plan and the scratch check, [5] the tables' upload call (and the diagnostics' event and
 * trace calls). For benchmarks. */
void ax__attn_fast_host_us(const ax_attn_fast *f, double *out);

/* Runs (knob spin) whose wait ended because the stream completed without the completion word: a counting bug, 0
 * when all is well (the GPU test checks it). */
uint64_t ax__attn_fast_spin_misses(const ax_attn_fast *f);

/* For tests: the device scratch a run of this state may take, in bytes (0 or more than AX_ATTN_CUDA_MAX_SCRATCH:
 * that limit). A run whose plan needs more fails with -ENOMEM, unless it gave mean_prob jobs their scores (knob
 * prob_scores): then it is planned again without them (ax__attn_fast_sc_fallbacks counts those runs), as when
 * the scratch cannot be allocated. */
void ax__attn_fast_limit_scratch(ax_attn_fast *f, size_t bytes);
uint64_t ax__attn_fast_sc_fallbacks(const ax_attn_fast *f);

#ifdef __cplusplus
}
#endif

#endif
