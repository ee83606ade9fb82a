/*
 * attn_cuda_fast_emu_test.cc — attn_cuda_fast.cu's kernels run on the CPU, unchanged, under the SIMT emulator
 * of attn_cuda_fast_emu.h (g++, no GPU, no nvcc): the real kernel code, the real plan and layout of
 * attn_cuda_fast.h, host memory in place of device memory, each launch's CTAs one after the other. What it
 * checks: results against the float64 reference and ax_attn_cpu (attn_cuda_testdata.h's checker: k, head_id,
 * positions with near-ties, logits and logsumexp within 1e-3, ties by lower position), entries past k (-1,
 * -inf), error codes (-ERANGE / -EDOM, -ERANGE winning, neighbours unharmed), determinism, and — by the
 * emulator — that warp collectives are never divergent, mbarrier arrivals never exceed their counts, bulk
 * copies are 16-byte aligned and inside shared memory, and no CTA deadlocks. A launch's CTAs run one after
 * the other, by index, backwards or at random (runs take turns), as a GPU promises no order. Plans are forced to one split per
 * job, a few, and many short (16-key) splits, so the merge runs with 1..~200 splits; and under planner knobs
 * (floors, caps, the default ones) with heads lists merged by the separate merge kernel.
 * What it cannot check: races, memory ordering, the async proxy, timing (the GPU test and compute-sanitizer).
 * AX_TEST_SEED=N repeats a run.
 */
#define AXF_EMU 1
#include "attn_cuda_fast.cu"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <time.h>

extern "C" {
#include <cmocka.h>
}

#include "attn_cuda_testdata.h"

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define TOL 1e-3

struct emu_arg {
	axf_args a;
	uint32_t inst, raw; /* raw: the instance's raw kernel (KB 0) */
	uint32_t few;       /* the merge launch (inst AXF_N_INST) of few lists: axf_merge_kernel<AXF_MK_FEW> */
};

static void emu_body(void *p)
{
	const emu_arg *x = (const emu_arg *)p;
	if (x->inst == AXF_N_INST) { /* the separate heads merge */
		if (x->raw)
			axf_merge_kernel<AXF_MK_RAW>(x->a);
		else if (x->few)
			axf_merge_kernel<AXF_MK_FEW>(x->a);
		else
			axf_merge_kernel<AXF_MK_LISTS>(x->a);
		return;
	}
	if (x->raw) {
		switch (x->inst) {
		case 8: axf_kernel<AXF_M_HEADS, 0, 4, 0>(x->a); break;
		case 9: axf_kernel<AXF_M_HEADS, 1, 4, 0>(x->a); break;
		case 10: axf_kernel<AXF_M_HEADS, 0, 8, 0>(x->a); break;
		case 11: axf_kernel<AXF_M_HEADS, 1, 8, 0>(x->a); break;
		default: EMU_FAIL("a raw launch of instance %u", x->inst);
		}
		return;
	}
	switch (x->inst) {
	case 0: axf_kernel<AXF_M_LOGIT, 0, 1, 2>(x->a); break;
	case 1: axf_kernel<AXF_M_LOGIT, 1, 1, 2>(x->a); break;
	case 2: axf_kernel<AXF_M_HEADS, 0, 4, 2>(x->a); break;
	case 3: axf_kernel<AXF_M_HEADS, 1, 4, 2>(x->a); break;
	case 4: axf_kernel<AXF_M_HEADS, 0, 8, 2>(x->a); break;
	case 5: axf_kernel<AXF_M_HEADS, 1, 8, 2>(x->a); break;
	case 6: axf_kernel<AXF_M_PROB, 0, 1, 2>(x->a); break;
	case 7: axf_kernel<AXF_M_PROB, 1, 1, 2>(x->a); break;
	case 8: axf_kernel<AXF_M_HEADS, 0, 4, 1>(x->a); break;
	case 9: axf_kernel<AXF_M_HEADS, 1, 4, 1>(x->a); break;
	case 10: axf_kernel<AXF_M_HEADS, 0, 8, 1>(x->a); break;
	case 11: axf_kernel<AXF_M_HEADS, 1, 8, 1>(x->a); break;
	case 12: axf_kernel<AXF_M_HEADS, 0, 4, 1, 1>(x->a); break;
	case 13: axf_kernel<AXF_M_HEADS, 1, 4, 1, 1>(x->a); break;
	case 14: axf_kernel<AXF_M_HEADS, 0, 8, 1, 1>(x->a); break;
	case 15: axf_kernel<AXF_M_HEADS, 1, 8, 1, 1>(x->a); break;
	case 16: axf_kernel<AXF_M_PROB, 0, 1, 2, 1>(x->a); break;
	default: EMU_FAIL("a launch of instance %u", x->inst);
	}
}

/* The planner knobs of emu_run's plans (all 0: the lab's one-wave planner). */
static axf_knobs g_kn;
static uint64_t g_tail_blocks; /* tail blocks (knob tail) the runs so far had: test_tail_ran */
static uint64_t g_raw_jobs;    /* raw pass-jobs (knob raw_heads) the runs so far had: test_raw_ran */
static uint64_t g_few_jobs;    /* pass-jobs merged a row per warp by the few-list merge kernel (merge_row_few) */
static uint64_t g_wide_jobs;   /* pass-jobs merged a row per warp by the list merge kernel (merge_row) */
static uint32_t g_first_S;     /* the last run's first pass-job's split count */
static uint64_t g_hm_prob;     /* host-merged mean_prob probability launches (session 13): test_hm_ran */
static uint64_t g_sc_jobs;     /* probability pass-jobs that read their scores (knob prob_scores, session 14) */
static int g_zc;               /* the kernels write the rows into out themselves (axf_args.zout, session 18) */

/* ax__attn_fast_run's steps with host memory: plan, tables, zeroed flags/tickets, launches, finish. */
static int emu_run(const ax_attn_job *jobs, uint32_t n, ax_attn_result *out, int *rc, uint32_t resident)
{
	axf_plan *p = (axf_plan *)calloc(1, sizeof *p);
	assert_non_null(p);
	p->kn = g_kn;
	p->res_lists = g_kn.ctas_per_sm_heads ? 7 * g_kn.ctas_per_sm_heads : 0; /* the driver's SMs × knob */
	int r = axf_plan_build(p, jobs, n, rc, resident);
	if (r || p->nl == 0) {
		axf_plan_free(p);
		return r;
	}
	g_first_S = p->jb[0].S;
	p->zc = (uint32_t)g_zc;
	char *buf = (char *)aligned_alloc(256, (p->lay.total + 255) / 256 * 256);
	assert_non_null(buf);
	memset(buf, 0xa5, p->lay.total); /* garbage: nothing may depend on scratch contents */
	uint32_t *tick = (uint32_t *)calloc(p->njb, sizeof *tick); /* the driver's tickets: zero once */
	uint32_t *tailc = (uint32_t *)calloc(p->njb, sizeof *tailc); /* tail counters, from 0 (every tbase 0) */
	assert_non_null(tick);
	assert_non_null(tailc);
	if (p->upload) /* device scratch and host staging are one buffer here: the tables are in place */
		axf_plan_tables(p, buf);
	/* the completion word (knob spin) on every other run: the last unit of the run, and only it, writes seq */
	static uint32_t calls;
	int hm = 0; /* a host-merged pass-job: the driver's plans have those only with spin off */
	for (uint32_t l = 0; l < p->nl; l++) {
		hm |= (int)p->L[l].hm;
		assert_true(!p->L[l].hm || p->L[l].nj == 1);
		g_hm_prob += p->L[l].hm && axf_inst_mode(p->L[l].inst) == AXF_M_PROB;
	}
	const int spin = (calls++ & 1) == 0 && !hm;
	uint32_t done_cnt = 0, done = 0, seq = 0x5eed0000u + calls;
	static unsigned long long tr[AXF_TR_ALL]; /* diagnostics on every third run: the driver's initial values */
	for (int i = 0; i < AXF_TR_ALL; i++)
		tr[i] = i == AXF_TR_START0 || i == AXF_TR_DATA0 || i == AXF_TR_LOOP0 || i == AXF_TR_MERGE0 || i == AXF_TR_MK0
				? ~0ull
				: 0;
	const int trace = calls % 3 == 0;
	emu_cta_order = (int)(calls % 7 % 3); /* CTAs by index, backwards or at random: a GPU promises no order */
	for (uint32_t l = 0; l < p->nl; l++) {
		emu_arg x = {axf_plan_args(p, buf, buf, tick, tailc, &p->L[l]), p->L[l].inst, p->L[l].raw, 0};
		if (spin)
			x.a.done_cnt = &done_cnt, x.a.done = &done, x.a.units = (uint32_t)p->units, x.a.seq = seq;
		x.a.pdl = calls % 4 == 1; /* a no-op here: launches run one after the other */
		x.a.trace = trace ? tr : NULL;
		x.a.zout = g_zc ? out : NULL;
		emu_launch(p->L[l].ctas, AXF_SMEM, emu_body, &x);
		for (uint32_t j = p->L[l].j0; p->L[l].mg && p->L[l].mrpc == AXF_NW && j < p->L[l].j0 + p->L[l].nj; j++)
			if (p->jb[j].sepm) /* which row-per-warp merge its rows take */
				(p->L[l].few ? g_few_jobs : g_wide_jobs)++;
		if (p->L[l].mg) { /* the separate merge launch of heads lists */
			assert_int_equal(done, 0);
			emu_arg m = {x.a, AXF_N_INST, p->L[l].raw, p->L[l].few};
			emu_launch(p->L[l].nj * p->L[l].mg, AXF_SMEM, emu_body, &m); /* mg: CTAs per pass-job */
		}
		if (l + 1 < p->nl)
			assert_int_equal(done, 0); /* not before the last launch */
	}
	if (spin) {
		assert_int_equal(done, seq);
		assert_int_equal(done_cnt, 0); /* reset for the next run by the last unit */
	}
	if (trace) { /* the timer is a counter here: every CTA passed its points in order */
		assert_true(tr[AXF_TR_START0] <= tr[AXF_TR_DATA0] && tr[AXF_TR_DATA0] <= tr[AXF_TR_LOOP0]);
		assert_true(tr[AXF_TR_START1] <= tr[AXF_TR_LOOP1] && tr[AXF_TR_DATA1] <= tr[AXF_TR_LOOP1]);
		assert_true(tr[AXF_TR_MERGE0] == ~0ull || tr[AXF_TR_MERGE1] <= tr[AXF_TR_MDONE1]);
		assert_true(tr[AXF_TR_MK0] == ~0ull || tr[AXF_TR_MKGO] <= tr[AXF_TR_MKDONE]);
		assert_true(tr[AXF_TR_LOOP1] <= tr[AXF_TR_WLOOP1] && tr[AXF_TR_WLOOP1] <= tr[AXF_TR_EPI1]);
		for (uint32_t l = 0; l < p->nl; l++) /* every split CTA's own end, before every epilogue was done */
			for (uint32_t b = 0; b < p->L[l].ctas && b < AXF_TR_CTAS; b++)
				assert_true(tr[AXF_TR_N + b] >= tr[AXF_TR_START0] && tr[AXF_TR_N + b] <= tr[AXF_TR_EPI1]);
		/* every split wrote before the last merged (unless the last launch is host-merged: mean_prob's probability
		 * pass after its logsumexp pass's last-CTA merge) */
		assert_true(tr[AXF_TR_MERGE0] == ~0ull || p->L[p->nl - 1].hm || tr[AXF_TR_EPI1] <= tr[AXF_TR_MERGE1]);
	}
	axf_plan_prefill(p, jobs, out); /* the driver does this while the kernels run */
	assert_int_equal(axf_plan_finish(p, buf, jobs, out, rc), 0);
	for (uint32_t k = 0; k < p->njb; k++) { /* every last CTA reset its ticket (sepm ones never took any) */
		assert_int_equal(tick[k], 0);
		/* every split CTA of a pass-job with a tail drew until it drew past the last block: tblk + S draws */
		assert_int_equal(tailc[k], p->jb[k].tblk ? p->jb[k].tblk + p->jb[k].S : 0);
		g_tail_blocks += p->jb[k].tblk;
		g_sc_jobs += p->jb[k].scw && p->jb[k].lse_out < 0;
		if (p->jb[k].raw) { /* the plan's promises to the kernels: one stage a split, merged by the merge launch,
				     * a CTA a row, every score 16-byte aligned */
			assert_int_equal(p->jb[k].chunk, AXF_TS);
			assert_true(p->jb[k].sepm && !p->jb[k].tblk && p->jb[k].K <= AXF_TS && p->jb[k].ent0 % 4 == 0);
			g_raw_jobs++;
		}
	}
	free(tick);
	free(tailc);
	free(buf);
	axf_plan_free(p);
	return 0;
}

static int g_near;

/* Rows of one job against the float64 reference, ax_attn_cpu, and the (-1, -inf) padding past k. */
static void check_job(const ax_attn_job *job, const ax_attn_result *got, const char *name)
{
	tref ref;
	char why[256] = "";
	td_ref(job, &ref);
	int r = td_check(&ref, job->top_k, got, TOL, &g_near, why, sizeof why);
	if (r == 0) {
		ax_attn_scratch *s = ax_attn_scratch_new();
		ax_attn_result *cpu = (ax_attn_result *)calloc(ref.rows, sizeof *cpu);
		assert_int_equal(ax_attn_cpu(job, s, cpu), 0);
		for (uint32_t i = 0; r == 0 && i < ref.rows; i++) {
			for (uint32_t e = 0; r == 0 && e < got[i].k; e++)
				if (got[i].pos[e] != cpu[i].pos[e] &&
				    !(fabs(got[i].logit[e] - cpu[i].logit[e]) <= 1e-5 * fmax(1, fabs(cpu[i].logit[e]))))
					r = td_fail(why, sizeof why, "row %u entry %u: position %lld, ax_attn_cpu %lld", i, e,
						    (long long)got[i].pos[e], (long long)cpu[i].pos[e]);
			for (uint32_t e = got[i].k; r == 0 && e < AX_ATTN_MAX_TOPK; e++)
				if (got[i].pos[e] != -1 || got[i].logit[e] != -INFINITY)
					r = td_fail(why, sizeof why, "row %u entry %u past k: %lld", i, e, (long long)got[i].pos[e]);
		}
		free(cpu);
		ax_attn_scratch_free(s);
	}
	td_ref_free(&ref);
	if (r)
		fail_msg("%s: %s", name, why);
}

static const tcase emu_cases[] = {
	/* name, mode, kdt, qdt, idt, D, H, Hkv, top_k, n_keys, window, cap, n_heads, heads, tie, pad */
	{"logit bf16 32/8", ML, BF, BF, I32, 128, 32, 8, 10, 700, 0, 0, 0, {0}, 1, 0},
	{"heads bf16 32/8", HD, BF, BF, I32, 128, 32, 8, 10, 500, 0, 0, 0, {0}, 1, 0},
	{"prob bf16 32/8", MP, BF, BF, I32, 128, 32, 8, 10, 600, 0, 0, 0, {0}, 1, 0},
	{"logit f16 G1 i64 top-64", ML, F16, F16, I64, 128, 8, 8, 64, 400, 0, 0, 0, {0}, 1, 0},
	{"heads f16 G8 H_kv 1 top-33", HD, F16, F16, I32, 128, 8, 1, 33, 300, 0, 0, 0, {0}, 1, 0},
	{"heads bf16 G5 H_kv 3 i64", HD, BF, BF, I64, 128, 15, 3, 12, 350, 0, 0, 0, {0}, 1, 0},
	{"prob bf16 G8 window 200", MP, BF, BF, I32, 128, 16, 2, 10, 900, 200, 0, 0, {0}, 1, 0},
	{"logit G3 H_kv 5 n 17", ML, BF, BF, I32, 128, 15, 5, 10, 17, 0, 0, 0, {0}, 1, 0},
	{"heads n 1", HD, BF, BF, I32, 128, 4, 2, 5, 1, 0, 0, 0, {0}, 0, 0},
	{"heads n < k top-64", HD, BF, BF, I64, 128, 8, 4, 64, 40, 0, 0, 0, {0}, 1, 0},
	{"prob top-64 G2", MP, F16, F16, I32, 128, 4, 2, 64, 300, 0, 0, 0, {0}, 1, 0},
	{"logit window 1", ML, BF, BF, I32, 128, 8, 2, 3, 100, 1, 0, 0, {0}, 0, 0},
	{"heads G2 H_kv 8 top-1", HD, BF, BF, I32, 128, 16, 8, 1, 257, 0, 0, 0, {0}, 1, 0},
	{"logit G7 H_kv 2 top-40", ML, F16, F16, I64, 128, 14, 2, 40, 333, 0, 0, 0, {0}, 1, 0},
	{"heads bf16 8/2 1500 (many splits)", HD, BF, BF, I32, 128, 8, 2, 10, 1500, 0, 0, 0, {0}, 1, 0},
};

/* Plans: one split per job (resident 1), a few, many 16-key splits (the lab's planner); the defaults; heads lists
 * merged by the separate merge launch (every split count, and from 3 splits on) under floors and caps. */
static const struct emu_plan {
	uint32_t resident;
	axf_knobs kn;
} emu_plans[] = {
	{1, {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 256, 0, 0, 0, 0, 0, 0}},
	{5, {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}},
	{64, {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0, 0, 0, 0, 0}},
	{40, AXF_KNOBS_DEFAULT},
	{64, {0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}},
	{50, {0, 48, 5, 32, 7, 3, 0, 0, 0, 4, 0, 3, 0, 0, 0, 0, 0, 0}},
	{30, {2, 16, 0, 64, 0, 2, 1, 0, 0, 1000, 0, 0, 0, 0, 0, 0, 0, 0}}, /* lists launches on fewer CTAs than the others */
	{120, {0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2000, 0, 0}}, /* up to ~94 splits, every heads list merged apart: S·E > 256;
								     * raw where k ≤ 16 */
	/* knob tail (session 9): splits stream a static share, then draw tail blocks — here the first CTA to finish
	 * draws them all (CTAs run one at a time), so one CTA streams many ranges through one ring */
	{5, {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 30, 1, 0, 0, 0}},                /* heads merged by their last CTA */
	{7, {0, 32, 0, 32, 0, 1, 0, 0, 1, 32, 6, 256, 0, 40, 3, 0, 1, 0}}, /* the defaults with a tail, mean_prob's scores */
	{3, {0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 90, 2, 0, 0, 0}},                /* spin: the completion count */
	{1, {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 1u << 28, 0, 0, 0}},         /* a huge block: the whole tail in one */
};
#define emu_resident_n ARRAY_LEN(emu_plans)

static void test_cases(void **state)
{
	(void)state;
	for (size_t i = 0; i < ARRAY_LEN(emu_cases); i++) {
		tdata t;
		td_make(&emu_cases[i], &t);
		assert_true(axf_eligible(&t.job));
		uint32_t rows = ax_attn_rows(&t.job);
		ax_attn_result *out = (ax_attn_result *)malloc(rows * sizeof *out);
		for (size_t p = 0; p < emu_resident_n; p++) {
			int rc = 12345;
			memset(out, 0xff, rows * sizeof *out);
			g_kn = emu_plans[p].kn;
			assert_int_equal(emu_run(&t.job, 1, out, &rc, emu_plans[p].resident), 0);
			if (rc != 0)
				fail_msg("%s (plan %zu): rc %d", emu_cases[i].name, p, rc);
			check_job(&t.job, out, emu_cases[i].name);
			if (p != 3)
				continue;
			/* the defaults again with the rows written by the kernels themselves: the same rows */
			ax_attn_result *z = (ax_attn_result *)malloc(rows * sizeof *z);
			memset(z, 0x5a, rows * sizeof *z);
			g_zc = 1;
			assert_int_equal(emu_run(&t.job, 1, z, &rc, emu_plans[p].resident), 0);
			g_zc = 0;
			assert_int_equal(rc, 0);
			for (uint32_t r = 0; r < rows; r++)
				assert_true(z[r].head_id == out[r].head_id && z[r].k == out[r].k && z[r].lse == out[r].lse &&
					    memcmp(z[r].pos, out[r].pos, sizeof z[r].pos) == 0 &&
					    memcmp(z[r].logit, out[r].logit, sizeof z[r].logit) == 0);
			free(z);
		}
		g_kn = axf_knobs{};
		free(out);
		td_free(&t);
	}
}

/* More splits than the CTA-wide merge's 8 warps scan in one round (S > 256: row_scan's second round per warp), and
 * more staged entries than one load round: 16-key splits of 5000 keys (313 splits) in each mode, heads lists merged
 * by their last CTA (merge_heads 0: a warp per row) and by the merge kernel, a row per CTA and a row per warp. */
static void test_many_splits(void **state)
{
	(void)state;
	static const tcase cs[] = {
		{"313 splits logit", ML, BF, BF, I32, 128, 8, 2, 10, 5000, 0, 0, 0, {0}, 1, 0},
		{"313 splits prob", MP, BF, BF, I32, 128, 8, 2, 10, 5000, 0, 0, 0, {0}, 1, 0},
		{"313 splits heads", HD, BF, BF, I64, 128, 8, 2, 10, 5000, 0, 0, 0, {0}, 1, 0},
		{"313 splits heads top-40", HD, F16, F16, I32, 128, 4, 4, 40, 5000, 0, 0, 0, {0}, 1, 0},
	};
	for (size_t i = 0; i < ARRAY_LEN(cs); i++) {
		tdata t;
		td_make(&cs[i], &t);
		assert_true(axf_eligible(&t.job));
		uint32_t rows = ax_attn_rows(&t.job);
		ax_attn_result *out = (ax_attn_result *)malloc(rows * sizeof *out);
		for (uint32_t mh = 0; mh < 3; mh++) { /* heads lists: last CTA, merge kernel a row per CTA / per warp */
			int rc = 12345;
			memset(out, 0xff, rows * sizeof *out);
			g_kn = axf_knobs{0, 0, 0, 0, 0, mh ? 1u : 0u, 0, 0, 0, mh == 2 ? 1024u : 0u, 0, mh == 0 ? 400u : 0u, 0, 0, 0, 0, 0, 0};
			assert_int_equal(emu_run(&t.job, 1, out, &rc, 320), 0);
			if (rc != 0)
				fail_msg("%s: rc %d", cs[i].name, rc);
			check_job(&t.job, out, cs[i].name);
			if (cs[i].mode != HD)
				break;
		}
		g_kn = axf_knobs{};
		free(out);
		td_free(&t);
	}
}

/* Heads case c (no window) with every key equal — every score ties, so each row's top-k is positions 0 .. k-1 — in
 * one run under knobs kn on `resident` CTAs, which must add exactly one pass-job to *counter (the path meant). */
static void run_all_equal(const tcase *c, const axf_knobs &kn, uint32_t resident, const uint64_t *counter)
{
	tdata u;
	td_make(c, &u);
	const size_t row = u.job.k_stride[0] * 2;
	for (uint64_t sl = 1; sl < u.slots; sl++)
		memcpy((char *)u.k + sl * row, u.k, row);
	const uint32_t ur = ax_attn_rows(&u.job);
	ax_attn_result *uo = (ax_attn_result *)malloc(ur * sizeof *uo);
	int rc = 1;
	const uint64_t before = *counter;
	g_kn = kn;
	assert_int_equal(emu_run(&u.job, 1, uo, &rc, resident), 0);
	g_kn = axf_knobs{};
	assert_int_equal(rc, 0);
	assert_int_equal(*counter - before, 1);
	check_job(&u.job, uo, c->name);
	for (uint32_t r = 0; r < ur; r++)
		for (uint32_t e = 0; e < uo[r].k; e++)
			assert_int_equal(uo[r].pos[e], (int64_t)e);
	free(uo);
	td_free(&u);
}

/* Raw heads pass-jobs (knob raw_heads, session 11): one-stage splits writing their raw scores, scanned by
 * the merge — every k up to AXF_TS, group sizes 1..8, lengths around a split's edge (keys past n in the last
 * split's scores must be left out), windows, exact ties, i64 index rows; alone and in batches, and the same jobs
 * with the knob off must give the same top-k. */
static void test_raw(void **state)
{
	(void)state;
	static const tcase cs[] = {
		{"raw heads 32/8 k10 4096", HD, BF, BF, I32, 128, 32, 8, 10, 4096, 0, 0, 0, {0}, 1, 0},
		{"raw heads k16 n 17", HD, F16, F16, I64, 128, 8, 2, 16, 17, 0, 0, 0, {0}, 1, 0},
		{"raw heads k1 G8 n 16", HD, BF, BF, I32, 128, 8, 1, 1, 16, 0, 0, 0, {0}, 0, 0},
		{"raw heads k7 G3 n 1", HD, BF, BF, I32, 128, 15, 5, 7, 1, 0, 0, 0, {0}, 0, 0},
		{"raw heads k16 G5 n 333 window 100", HD, BF, BF, I64, 128, 15, 3, 16, 333, 100, 0, 0, {0}, 1, 0},
		{"raw heads k12 G2 n 1000", HD, F16, F16, I32, 128, 16, 8, 12, 1000, 0, 0, 0, {0}, 1, 0},
		{"raw heads k5 G7 n 250", HD, BF, BF, I32, 128, 14, 2, 5, 250, 0, 0, 0, {0}, 1, 0},
	};
	const axf_knobs d = AXF_KNOBS_DEFAULT;
	for (size_t i = 0; i < ARRAY_LEN(cs); i++) {
		tdata t;
		td_make(&cs[i], &t);
		assert_true(axf_eligible(&t.job));
		const uint32_t rows = ax_attn_rows(&t.job);
		ax_attn_result *out = (ax_attn_result *)malloc(rows * sizeof *out);
		ax_attn_result *off = (ax_attn_result *)malloc(rows * sizeof *out);
		for (int raw = 1; raw >= 0; raw--) {
			int rc = 12345;
			const uint64_t before = g_raw_jobs;
			g_kn = d;
			g_kn.raw_heads = raw ? 4096 : 0;
			memset(raw ? out : off, 0xff, rows * sizeof *out);
			assert_int_equal(emu_run(&t.job, 1, raw ? out : off, &rc, 264), 0);
			g_kn = axf_knobs{};
			if (rc != 0)
				fail_msg("%s (raw %d): rc %d", cs[i].name, raw, rc);
			assert_int_equal(g_raw_jobs - before, (uint64_t)raw); /* it took the path meant */
			check_job(&t.job, raw ? out : off, cs[i].name);
		}
		for (uint32_t r = 0; r < rows; r++) { /* an exact top-k is one top-k: the same positions either way */
			assert_int_equal(out[r].k, off[r].k);
			assert_memory_equal(out[r].pos, off[r].pos, out[r].k * sizeof out[r].pos[0]);
		}
		free(out), free(off);
		td_free(&t);
	}
	/* a batch of them in one launch (one instance): raw while the splits fit one wave (63 + 19 + 16 = 98 ≤ 120),
	 * not past it (resident 90) */
	static const tcase bs[] = {
		{"raw batch k10 n 1000", HD, BF, BF, I32, 128, 32, 8, 10, 1000, 0, 0, 0, {0}, 1, 0},
		{"raw batch k16 n 496 window 300", HD, BF, BF, I64, 128, 32, 8, 16, 496, 300, 0, 0, {0}, 1, 0},
		{"raw batch k3 n 256", HD, BF, BF, I32, 128, 32, 8, 3, 256, 0, 0, 0, {0}, 0, 0},
	};
	tdata t[3];
	ax_attn_job jobs[3];
	uint32_t offs[3], rows = 0;
	for (int i = 0; i < 3; i++) {
		td_make(&bs[i], &t[i]);
		jobs[i] = t[i].job, offs[i] = rows, rows += ax_attn_rows(&jobs[i]);
	}
	ax_attn_result *out = (ax_attn_result *)malloc(rows * sizeof *out);
	for (uint32_t res = 120; res >= 90; res -= 30) {
		int rc[3] = {1, 1, 1};
		const uint64_t before = g_raw_jobs;
		g_kn = d;
		assert_int_equal(emu_run(jobs, 3, out, rc, res), 0);
		g_kn = axf_knobs{};
		assert_int_equal(g_raw_jobs - before, res == 120 ? 3u : 0u);
		for (int i = 0; i < 3; i++) {
			assert_int_equal(rc[i], 0);
			check_job(&jobs[i], out + offs[i], bs[i].name);
		}
	}
	free(out);
	for (int i = 0; i < 3; i++)
		td_free(&t[i]);
	/* every key equal: every score of a row ties, all survive the bar (past 64: the merge's slow exact path) */
	static const tcase ties = {"raw ties k16 n 700", HD, BF, BF, I32, 128, 8, 2, 16, 700, 0, 0, 0, {0}, 0, 0};
	run_all_equal(&ties, d, 264, &g_raw_jobs);
}

/* mean_prob's logsumexp pass's partials, reduced by each CTA of its probability pass (lse_rows, session 22: a warp
 * its G heads, four rows at a time, a round of loads per 128 partials; until then the logsumexp pass's last CTA
 * merged them): split counts at a round's edges (1, 31, 97, 128, 129, 200, 257), group sizes 1, 2, 4, 8, 64 rows, a
 * window. 16-key splits (knob min_keys 16) in one wave of 300. */
static void test_lse_rows(void **state)
{
	(void)state;
	static const struct {
		uint32_t S, H, Hkv;
		int32_t window;
	} c[] = {{1, 32, 8, 0}, {31, 8, 8, 0}, {97, 32, 8, 0}, {128, 16, 8, 0}, {120, 8, 2, 0}, {129, 32, 8, 0},
		 {100, 32, 4, 0}, {128, 4, 4, 1500}, {110, 64, 8, 0}, {200, 32, 8, 0}, {200, 64, 8, 0}, {257, 32, 8, 0},
		 {257, 8, 1, 0}};
	for (size_t i = 0; i < ARRAY_LEN(c); i++) {
		const uint32_t n = c[i].window ? 3000 : 16 * c[i].S - 5;
		tcase tc = {"lse rows", MP, BF, BF, I32, 128, c[i].H, c[i].Hkv, 10, n, c[i].window, 0, 0, {0}, 1, 0};
		tdata t;
		td_make(&tc, &t);
		ax_attn_result out;
		int rc = 1;
		g_kn = axf_knobs{};
		g_kn.min_keys = 16;
		assert_int_equal(emu_run(&t.job, 1, &out, &rc, 300), 0);
		g_kn = axf_knobs{};
		char name[96];
		snprintf(name, sizeof name, "lse rows: S %u, H %u, H_kv %u, window %d", c[i].S, c[i].H, c[i].Hkv, c[i].window);
		if (rc != 0)
			fail_msg("%s: rc %d", name, rc);
		if (g_first_S != c[i].S && !c[i].window)
			fail_msg("%s: the logsumexp pass has %u splits", name, g_first_S);
		check_job(&t.job, &out, name);
		td_free(&t);
	}
}

/* Heads rows merged a row per warp by the merge launch (knob merge_warp) when the splits' lists hold ≤ 64 entries in
 * all (merge_row_few, session 12: loaded in one round and sorted whole) and just past it (merge_row): k 1..64, split
 * counts 1..~13 (resident), lists shorter than k (n < S·k: empty entries), windows, a tail, every key equal (every
 * entry ties: positions 0 .. k-1); the same positions as the CTA-wide merge (merge_warp 0). */
static void test_few(void **state)
{
	(void)state;
	static const tcase cs[] = {
		{"few k10 32/8 n 1500", HD, BF, BF, I32, 128, 32, 8, 10, 1500, 0, 0, 0, {0}, 1, 0},
		{"few k1 G8 n 100", HD, BF, BF, I32, 128, 8, 1, 1, 100, 0, 0, 0, {0}, 0, 0},
		{"few k16 G5 n 333 window 100", HD, BF, BF, I64, 128, 15, 3, 16, 333, 100, 0, 0, {0}, 1, 0},
		{"few k21 G2 n 50", HD, F16, F16, I32, 128, 8, 4, 21, 50, 0, 0, 0, {0}, 1, 0},
		{"few k32 n 700", HD, BF, BF, I32, 128, 8, 2, 32, 700, 0, 0, 0, {0}, 1, 0},
		{"few k64 n 40", HD, BF, BF, I64, 128, 8, 4, 64, 40, 0, 0, 0, {0}, 1, 0},
		{"few k33 G4 n 1200", HD, F16, F16, I32, 128, 16, 4, 33, 1200, 0, 0, 0, {0}, 1, 0},
	};
	static const uint32_t res[] = {1, 2, 4, 7, 13};
	const axf_knobs warp = {0, 0, 0, 0, 0, 1, 0, 0, 0, 1024, 0, 0, 0, 0, 0, 0, 0, 0},
			tail = {0, 0, 0, 0, 0, 1, 0, 0, 0, 1024, 0, 0, 0, 40, 1, 0, 0, 0},
			cta = {0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
	const uint64_t few0 = g_few_jobs, wide0 = g_wide_jobs, tb0 = g_tail_blocks;
	for (size_t i = 0; i < ARRAY_LEN(cs); i++) {
		tdata t;
		td_make(&cs[i], &t);
		assert_true(axf_eligible(&t.job));
		const uint32_t rows = ax_attn_rows(&t.job);
		ax_attn_result *out = (ax_attn_result *)malloc(rows * sizeof *out);
		ax_attn_result *ref = (ax_attn_result *)malloc(rows * sizeof *out);
		for (size_t r = 0; r < ARRAY_LEN(res); r++) {
			for (int kn = 0; kn < 3; kn++) { /* the CTA-wide merge first: the positions to match */
				int rc = 12345;
				memset(kn ? out : ref, 0xff, rows * sizeof *out);
				g_kn = kn == 0 ? cta : kn == 1 ? warp : tail;
				assert_int_equal(emu_run(&t.job, 1, kn ? out : ref, &rc, res[r]), 0);
				g_kn = axf_knobs{};
				if (rc != 0)
					fail_msg("%s (resident %u, knobs %d): rc %d", cs[i].name, res[r], kn, rc);
				check_job(&t.job, kn ? out : ref, cs[i].name);
				for (uint32_t o = 0; kn && o < rows; o++) {
					assert_int_equal(out[o].k, ref[o].k);
					assert_memory_equal(out[o].pos, ref[o].pos, out[o].k * sizeof out[o].pos[0]);
				}
			}
		}
		free(out), free(ref);
		td_free(&t);
	}
	/* both row-per-warp merges ran, the short one with and without a tail */
	printf("# row-per-warp merges: %llu few, %llu wide; tail blocks %llu\n",
	       (unsigned long long)(g_few_jobs - few0), (unsigned long long)(g_wide_jobs - wide0),
	       (unsigned long long)(g_tail_blocks - tb0));
	assert_true(g_few_jobs - few0 > 20 && g_wide_jobs - wide0 > 5 && g_tail_blocks > tb0);
	/* every key equal: all entries of all lists tie */
	static const tcase ties = {"few ties k10 n 300", HD, BF, BF, I32, 128, 8, 2, 10, 300, 0, 0, 0, {0}, 0, 0};
	run_all_equal(&ties, warp, 6, &g_few_jobs);
}

/* The shared small table (attn_cuda_testdata.h): its eligible cases, one plan each. */
static void test_shared_table(void **state)
{
	(void)state;
	int ran = 0;
	for (size_t i = 0; i < ARRAY_LEN(td_cases); i++) {
		tdata t;
		td_make(&td_cases[i], &t);
		if (axf_eligible(&t.job)) {
			uint32_t rows = ax_attn_rows(&t.job);
			ax_attn_result *out = (ax_attn_result *)malloc(rows * sizeof *out);
			int rc = 1;
			assert_int_equal(emu_run(&t.job, 1, out, &rc, 40), 0);
			if (rc != 0)
				fail_msg("%s: rc %d", td_cases[i].name, rc);
			check_job(&t.job, out, td_cases[i].name);
			free(out);
			ran++;
		}
		td_free(&t);
	}
	assert_true(ran >= 3);
}

/* Every key equal: every score ties, so the top k are the k lowest positions and every merge keeps all its
 * entries (the insertion fallback past 64 survivors). */
static void test_all_ties(void **state)
{
	(void)state;
	static const tcase cs[] = {
		{"ties logit", ML, BF, BF, I32, 128, 32, 8, 10, 600, 0, 0, 0, {0}, 0, 0},
		{"ties heads top-64", HD, F16, F16, I64, 128, 8, 2, 64, 700, 0, 0, 0, {0}, 0, 0},
		{"ties prob top-20 window", MP, BF, BF, I32, 128, 16, 4, 20, 900, 500, 0, 0, {0}, 0, 0},
	};
	for (size_t i = 0; i < ARRAY_LEN(cs); i++) {
		tdata t;
		td_make(&cs[i], &t);
		size_t row = t.job.k_stride[0] * 2;
		for (uint64_t s = 1; s < t.slots; s++)
			memcpy((char *)t.k + s * row, t.k, row);
		uint32_t rows = ax_attn_rows(&t.job);
		ax_attn_result *out = (ax_attn_result *)malloc(rows * sizeof *out);
		for (size_t p = 0; p < emu_resident_n; p++) {
			int rc = 1;
			g_kn = emu_plans[p].kn;
			assert_int_equal(emu_run(&t.job, 1, out, &rc, emu_plans[p].resident), 0);
			assert_int_equal(rc, 0);
			check_job(&t.job, out, cs[i].name);
			for (uint32_t r = 0; r < rows; r++)
				for (uint32_t e = 0; e < out[r].k; e++) {
					uint64_t first = t.job.window ? t.job.position + 1 - (uint64_t)t.job.window : 0;
					assert_int_equal(out[r].pos[e], (int64_t)(first + e));
				}
		}
		g_kn = axf_knobs{};
		free(out);
		td_free(&t);
	}
}

/* All cases in one batch (every instance in one plan, mean_prob's two launches), twice: bitwise identical. */
static void test_batch(void **state)
{
	(void)state;
	size_t n = ARRAY_LEN(emu_cases);
	tdata *t = (tdata *)calloc(n, sizeof *t);
	ax_attn_job *jobs = (ax_attn_job *)calloc(n, sizeof *jobs);
	uint32_t *off = (uint32_t *)calloc(n, sizeof *off), rows = 0;
	int *rc = (int *)calloc(n, sizeof *rc);
	for (size_t i = 0; i < n; i++) {
		td_make(&emu_cases[i], &t[i]);
		jobs[i] = t[i].job;
		off[i] = rows, rows += ax_attn_rows(&jobs[i]);
	}
	ax_attn_result *a = (ax_attn_result *)malloc(rows * sizeof *a), *b = (ax_attn_result *)malloc(rows * sizeof *b);
	memset(a, 0xff, rows * sizeof *a);
	memset(b, 0x00, rows * sizeof *b);
	assert_int_equal(emu_run(jobs, (uint32_t)n, a, rc, 40), 0);
	for (size_t i = 0; i < n; i++) {
		if (rc[i] != 0)
			fail_msg("%s in the batch: rc %d", emu_cases[i].name, rc[i]);
		check_job(&jobs[i], a + off[i], emu_cases[i].name);
	}
	assert_int_equal(emu_run(jobs, (uint32_t)n, b, rc, 40), 0);
	assert_memory_equal(a, b, rows * sizeof *a);
	g_kn = axf_knobs{0, 32, 0, 16, 0, 2, 3, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0}; /* heads lists merged separately: the same rows, bitwise */
	memset(b, 0x00, rows * sizeof *b);
	assert_int_equal(emu_run(jobs, (uint32_t)n, b, rc, 40), 0);
	g_kn = axf_knobs{};
	for (size_t i = 0; i < n; i++)
		check_job(&jobs[i], b + off[i], emu_cases[i].name);
	/* the defaults (a batch: no host merge, several pass-jobs a launch) */
	const axf_knobs d = AXF_KNOBS_DEFAULT;
	g_kn = d;
	memset(b, 0x00, rows * sizeof *b);
	assert_int_equal(emu_run(jobs, (uint32_t)n, b, rc, 40), 0);
	g_kn = axf_knobs{};
	for (size_t i = 0; i < n; i++) {
		if (rc[i] != 0)
			fail_msg("%s in the batch, default knobs: rc %d", emu_cases[i].name, rc[i]);
		check_job(&jobs[i], b + off[i], emu_cases[i].name);
	}
	for (size_t i = 0; i < n; i++)
		td_free(&t[i]);
	free(a), free(b), free(t), free(jobs), free(off), free(rc);
}

/* Errors only the fast path's own checks catch (its table, beside td_errors): non-finite keys in every mode and
 * KV head, NaN in Q with all heads reported; and NaN outside the window, which must not matter. */
static const td_error fast_error_cases[] = {
	{"inf in a visible key, heads", E_K_INF, HD, 0, {0}, 0, -EDOM},
	{"NaN in Q, heads (all heads)", E_Q_NAN_UNLISTED, HD, 0, {0}, 0, -EDOM},
	{"NaN in Q, mean_logit", E_Q_NAN_UNLISTED, ML, 0, {0}, 0, -EDOM},
	{"NaN in Q, mean_prob", E_Q_NAN_UNLISTED, MP, 0, {0}, 0, -EDOM},
	{"NaN in a visible key of KV head 1, mean_logit", E_K_NAN_UNUSED, ML, 0, {0}, 0, -EDOM},
	{"NaN in a visible key of KV head 1, heads", E_K_NAN_UNUSED, HD, 0, {0}, 0, -EDOM},
	{"NaN in keys outside the window, heads", E_K_NAN_OUTSIDE, HD, 0, {0}, 100, 0},
	{"NaN in keys outside the window, mean_prob", E_K_NAN_OUTSIDE, MP, 0, {0}, 300, 0},
};

/* Random eligible jobs (shape, dtypes, mode, top-k, length, window all drawn) in one batch under a random plan. */
static void test_random(void **state)
{
	(void)state;
	static const uint32_t modes[3] = {ML, HD, MP}, hkvs[6] = {1, 2, 3, 4, 6, 8};
	enum { NJ = 10 };
	for (int round = 0; round < 2; round++) {
		tcase cs[NJ];
		tdata t[NJ];
		ax_attn_job jobs[NJ];
		uint32_t off[NJ], rows = 0;
		int rc[NJ];
		for (int i = 0; i < NJ; i++) {
			uint32_t hkv = hkvs[td_u64() % 6], g = 1 + (uint32_t)(td_u64() % 8), n = 1 + (uint32_t)(td_u64() % 700);
			uint32_t dt = td_u64() % 2 ? (uint32_t)BF : (uint32_t)F16;
			tcase c = {"random", modes[td_u64() % 3], dt, dt, td_u64() % 2 ? (uint32_t)I32 : (uint32_t)I64, 128,
				   hkv * g, hkv, 1 + (uint32_t)(td_u64() % 64), n,
				   td_u64() % 4 == 0 ? (int32_t)(1 + td_u64() % n) : 0, 0, 0, {0}, (int)(td_u64() % 2), 0};
			cs[i] = c;
			td_make(&cs[i], &t[i]);
			jobs[i] = t[i].job;
			assert_true(axf_eligible(&jobs[i]));
			off[i] = rows, rows += ax_attn_rows(&jobs[i]);
		}
		uint32_t resident = 1 + (uint32_t)(td_u64() % 80);
		if (round == 1) /* random knobs */
			g_kn = axf_knobs{0, (uint32_t)(td_u64() % 200), (uint32_t)(td_u64() % 20),
					 (uint32_t)(td_u64() % 300), (uint32_t)(td_u64() % 20), (uint32_t)(td_u64() % 6),
					 (uint32_t)(td_u64() % 4), 0, 0, (uint32_t)(td_u64() % 40), 0, (uint32_t)(td_u64() % 300), 0,
					 (uint32_t)(td_u64() % 3 == 0 ? td_u64() % 60 : 0), (uint32_t)(td_u64() % 5),
					 (uint32_t)(td_u64() % 2 ? td_u64() % 1000 : 0), (uint32_t)(td_u64() % 2),
					 (uint32_t)(td_u64() % 2 ? td_u64() % 3000 : 0)};
		ax_attn_result *out = (ax_attn_result *)malloc(rows * sizeof *out);
		assert_int_equal(emu_run(jobs, NJ, out, rc, resident), 0);
		g_kn = axf_knobs{};
		for (int i = 0; i < NJ; i++) {
			char name[128];
			snprintf(name, sizeof name, "random job %d (mode %u, H %u, H_kv %u, k %u, n %llu, window %d, resident %u)",
				 i, cs[i].mode, cs[i].H, cs[i].Hkv, cs[i].top_k, (unsigned long long)cs[i].n_keys, cs[i].window,
				 resident);
			if (rc[i] != 0)
				fail_msg("%s: rc %d", name, rc[i]);
			check_job(&jobs[i], out + off[i], name);
		}
		free(out);
		for (int i = 0; i < NJ; i++)
			td_free(&t[i]);
	}
}

/* The error tables at head_dim 128 (the cases the fast path takes), each between two valid jobs. */
static void test_errors(void **state)
{
	(void)state;
	int ran = 0;
	const size_t nt = ARRAY_LEN(td_errors), nx = ARRAY_LEN(fast_error_cases);
	for (size_t i = 0; i < nt + nx; i++) {
		const td_error *e = i < nt ? &td_errors[i] : &fast_error_cases[i - nt];
		tcase tc = {e->name, e->mode, BF, BF, (uint32_t)(i % 2 ? I64 : I32), 128, 4, 2, 5, 2000, e->window, 0,
			    e->n_heads, {e->heads[0], e->heads[1]}, 0, 0};
		tdata t, okd;
		td_make(&tc, &t);
		td_make(&tc, &okd);
		td_corrupt(&t, e->what);
		if (!axf_eligible(&t.job) || !axf_eligible(&okd.job)) {
			td_free(&t), td_free(&okd);
			continue;
		}
		ax_attn_job jobs[3] = {okd.job, t.job, okd.job};
		uint32_t r0 = ax_attn_rows(&okd.job), r1 = ax_attn_rows(&t.job), rows = 2 * r0 + r1;
		ax_attn_result *out = (ax_attn_result *)malloc(rows * sizeof *out);
		int rc[3] = {1, 1, 1};
		assert_int_equal(emu_run(jobs, 3, out, rc, 12), 0);
		if (rc[0] != 0 || rc[1] != e->want || rc[2] != 0)
			fail_msg("%s: rc %d %d %d, want 0 %d 0", e->name, rc[0], rc[1], rc[2], e->want);
		check_job(&okd.job, out, e->name);
		check_job(&okd.job, out + r0 + r1, e->name);
		if (e->mode == ML || e->mode == MP) { /* alone in its launch: the host merge's path (the flag words from the
							* staging; mean_prob: its probability pass-job's, session 13) */
			g_kn = axf_knobs{};
			g_kn.host_merge = 256;
			int rc1 = 1;
			assert_int_equal(emu_run(&t.job, 1, out, &rc1, 12), 0);
			g_kn = axf_knobs{};
			if (rc1 != e->want)
				fail_msg("%s alone (host merge): rc %d, want %d", e->name, rc1, e->want);
		}
		if (e->mode == HD) { /* the separate merge launch, a CTA a row (knob merge_warp 0): merge_row_cta must carry
				      * the split's flag word into the pass-job's; and raw (knob raw_heads: 3 × 125 one-stage
				      * splits in one wave of 400) */
			for (int raw = 0; raw < 2; raw++) {
				const axf_knobs d = AXF_KNOBS_DEFAULT;
				const uint64_t before = g_raw_jobs;
				g_kn = d;
				g_kn.merge_warp = 0;
				int rc3[3] = {1, 1, 1};
				assert_int_equal(emu_run(jobs, 3, out, rc3, raw ? 400 : 12), 0);
				g_kn = axf_knobs{};
				assert_int_equal(g_raw_jobs - before, raw ? 3u : 0u);
				if (rc3[0] != 0 || rc3[1] != e->want || rc3[2] != 0)
					fail_msg("%s (merge launch, raw %d): rc %d %d %d, want 0 %d 0", e->name, raw, rc3[0],
						 rc3[1], rc3[2], e->want);
				check_job(&okd.job, out, e->name);
			}
		}
		ax_attn_scratch *s = ax_attn_scratch_new();
		ax_attn_result *cpu = (ax_attn_result *)calloc(r1, sizeof *cpu);
		assert_int_equal(ax_attn_cpu(&t.job, s, cpu), e->want);
		free(cpu);
		ax_attn_scratch_free(s);
		free(out);
		td_free(&t), td_free(&okd);
		ran++;
	}
	assert_true(ran >= 16);
}

/* A split's flag word reaches its pass-job's from far among many splits (put_flags: lane l ORs splits l, l + 32, ...;
 * split 259 of 263 is lane 3's ninth): an inf in one visible key of it gives -EDOM, mean_logit merged by the last
 * CTA, heads lists by their last CTA, by the merge launch a row per CTA and a row per warp; a clean neighbour in the
 * same launch stays 0. */
static void test_flags_splits(void **state)
{
	(void)state;
	static const uint32_t at[] = {259};
	static const tcase cs[] = {
		{"flags logit", ML, BF, BF, I32, 128, 8, 2, 10, 4200, 0, 0, 0, {0}, 0, 0},
		{"flags heads", HD, BF, BF, I64, 128, 8, 2, 10, 4200, 0, 0, 0, {0}, 0, 0},
	};
	for (size_t c = 0; c < ARRAY_LEN(cs); c++) {
		for (size_t k = 0; k < ARRAY_LEN(at); k++) {
			tdata t, okd;
			td_make(&cs[c], &t);
			td_make(&cs[c], &okd);
			const uint64_t pos = (uint64_t)at[k] * AXF_TS + 3;
			const uint64_t slot = t.job.index_dtype == AX_DTYPE_I32 ? (uint64_t)((int32_t *)t.index)[pos]
										: (uint64_t)((int64_t *)t.index)[pos];
			((uint16_t *)t.k)[slot * t.job.k_stride[0] + 5] = 0x7f80; /* KV head 0, dim 5: +inf */
			ax_attn_job jobs[2] = {t.job, okd.job};
			const uint32_t r0 = ax_attn_rows(&t.job);
			ax_attn_result *out = (ax_attn_result *)malloc((r0 + ax_attn_rows(&okd.job)) * sizeof *out);
			for (uint32_t mh = 0; mh < 3; mh++) {
				int rc[2] = {1, 1};
				g_kn = axf_knobs{0, 0, 0, 0, 0, mh ? 1u : 0u, 0, 0, 0, mh == 2 ? 1024u : 0u, 0, 0, 0, 0, 0, 0, 0, 0};
				assert_int_equal(emu_run(jobs, 2, out, rc, 640), 0);
				g_kn = axf_knobs{};
				assert_int_equal(g_first_S, 263);
				if (rc[0] != -EDOM || rc[1] != 0)
					fail_msg("%s, inf in split %u (merge %u): rc %d %d, want %d 0", cs[c].name, at[k], mh,
						 rc[0], rc[1], -EDOM);
				check_job(&okd.job, out + r0, cs[c].name);
				if (cs[c].mode != HD)
					break;
			}
			free(out);
			td_free(&t), td_free(&okd);
		}
	}
}

static int setup(void **state)
{
	(void)state;
	const char *e = getenv("AX_TEST_SEED");
	td_state = e ? strtoull(e, NULL, 0) : (uint64_t)time(NULL);
	emu_seed = td_state * 2 + 1; /* the emulator's thread order follows the seed too */
	printf("# seed %llu (AX_TEST_SEED=%llu repeats it)\n", (unsigned long long)td_state,
	       (unsigned long long)td_state);
	return 0;
}

/* Rows a and b equal bit for bit (k, head_id, logsumexp, every entry). */
static int same_rows(const ax_attn_result *a, const ax_attn_result *b, uint32_t rows)
{
	for (uint32_t r = 0; r < rows; r++) {
		if (a[r].k != b[r].k || a[r].head_id != b[r].head_id || memcmp(&a[r].lse, &b[r].lse, sizeof a[r].lse))
			return 0;
		for (uint32_t e = 0; e < AX_ATTN_MAX_TOPK; e++)
			if (a[r].pos[e] != b[r].pos[e] || memcmp(&a[r].logit[e], &b[r].logit[e], sizeof a[r].logit[e]))
				return 0;
	}
	return 1;
}

/*
 * mean_prob with its scores (knob prob_scores, session 14): the logsumexp pass writes every key's scaled scores,
 * the probability pass streams them in place of K. Group sizes 1..8 (odd ones: a lane's column pair is not 8-byte
 * aligned), a window, top-64, n < one stage, many splits; under the lab's planner on one CTA and on many, the
 * defaults (the probability pass merged by the host) and a tail; alone and all in one batch with jobs of the other
 * modes. Each run is checked against the reference and must have read its scores (the counter); a job alone must
 * also equal its run without the knob bit for bit (the same scores, summed in the same order; in a batch its
 * logsumexp pass shares a launch with other jobs only without the knob, so its splits, and the last bits of its
 * logsumexps, can differ). The batch has knob prob_scores_min at its mean_prob keys (scores), then one more (none:
 * checked too). Then the error cases as mean_prob jobs between two clean ones: the codes ax_attn_cpu gives.
 * Session 15 changed the scores' layout (blocks of 8 keys) and the probability pass's stages (128 keys, a thread a
 * key): the same tests.
 */
static void test_scores(void **state)
{
	(void)state;
	static const tcase cs[] = {
		{"scores G4 32/8", MP, BF, BF, I32, 128, 32, 8, 10, 700, 0, 0, 0, {0}, 1, 0},
		{"scores G1 8/8 f16 i64", MP, F16, F16, I64, 128, 8, 8, 10, 400, 0, 0, 0, {0}, 1, 0},
		{"scores G3 15/5", MP, BF, BF, I32, 128, 15, 5, 12, 350, 0, 0, 0, {0}, 1, 0},
		{"scores G5 H_kv 1 window 150", MP, BF, BF, I32, 128, 5, 1, 7, 500, 150, 0, 0, {0}, 1, 0},
		{"scores G8 16/2 f16 top-64", MP, F16, F16, I32, 128, 16, 2, 64, 300, 0, 0, 0, {0}, 1, 0},
		{"scores G7 14/2 n 9", MP, BF, BF, I32, 128, 14, 2, 10, 9, 0, 0, 0, {0}, 1, 0},
		{"scores 8/2 2500", MP, BF, BF, I64, 128, 8, 2, 10, 2500, 0, 0, 0, {0}, 1, 0},
		{"heads beside them", HD, BF, BF, I32, 128, 8, 2, 10, 300, 0, 0, 0, {0}, 1, 0},
		{"logit beside them", ML, F16, F16, I32, 128, 6, 3, 10, 200, 0, 0, 0, {0}, 1, 0},
	};
	const axf_knobs d = AXF_KNOBS_DEFAULT;
	const struct {
		uint32_t resident;
		axf_knobs kn;
	} plans[] = {
		{1, axf_knobs{}}, {64, axf_knobs{}}, {40, d}, {5, axf_knobs{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 30, 1, 0, 0, 0}},
	};
	enum { NC = ARRAY_LEN(cs) };
	tdata t[NC];
	ax_attn_job jobs[NC];
	uint32_t off[NC], rows = 0, nprob = 0;
	uint64_t pkeys = 0; /* the batch's mean_prob keys: knob prob_scores_min at exactly that still gives scores */
	for (size_t i = 0; i < NC; i++) {
		td_make(&cs[i], &t[i]);
		jobs[i] = t[i].job;
		uint64_t st, nv;
		axc_visible(&jobs[i], &st, &nv);
		pkeys += cs[i].mode == MP ? nv : 0;
		assert_true(axf_eligible(&jobs[i]));
		off[i] = rows, rows += ax_attn_rows(&jobs[i]);
		nprob += cs[i].mode == MP;
	}
	ax_attn_result *a = (ax_attn_result *)malloc(rows * sizeof *a), *b = (ax_attn_result *)malloc(rows * sizeof *b);
	int ra[NC], rb[NC];
	for (size_t p = 0; p < ARRAY_LEN(plans); p++) {
		for (size_t i = 0; i <= NC; i++) { /* each job alone, then all of them in one batch */
			const uint32_t j0 = i < NC ? (uint32_t)i : 0, nj = i < NC ? 1 : NC;
			memset(a, 0xff, rows * sizeof *a), memset(b, 0xff, rows * sizeof *b);
			const uint64_t before = g_sc_jobs;
			g_kn = plans[p].kn;
			g_kn.prob_scores = 1;
			g_kn.prob_scores_min = i < NC ? 0 : (uint32_t)pkeys;
			assert_int_equal(emu_run(jobs + j0, nj, a + off[j0], ra, plans[p].resident), 0);
			assert_int_equal(g_sc_jobs - before, i < NC ? (cs[i].mode == MP) : nprob);
			/* without scores: knob prob_scores off, or (the batch) one key short of prob_scores_min */
			if (i < NC)
				g_kn.prob_scores = 0;
			else
				g_kn.prob_scores_min = (uint32_t)pkeys + 1;
			assert_int_equal(emu_run(jobs + j0, nj, b + off[j0], rb, plans[p].resident), 0);
			assert_int_equal(g_sc_jobs - before, i < NC ? (cs[i].mode == MP) : nprob);
			g_kn = axf_knobs{};
			for (uint32_t k = j0; k < j0 + nj; k++) {
				char name[160];
				snprintf(name, sizeof name, "%s (plan %zu, %s)", cs[k].name, p, i < NC ? "alone" : "batch");
				if (ra[k - j0] != 0 || rb[k - j0] != 0)
					fail_msg("%s: rc %d / %d without scores", name, ra[k - j0], rb[k - j0]);
				check_job(&jobs[k], a + off[k], name);
				if (i == NC) /* the batch without scores (knob prob_scores_min) */
					check_job(&jobs[k], b + off[k], name);
				if (i < NC && !same_rows(a + off[k], b + off[k], ax_attn_rows(&jobs[k])))
					fail_msg("%s: not the two passes' results bit for bit", name);
			}
		}
	}
	free(a), free(b);
	for (size_t i = 0; i < NC; i++)
		td_free(&t[i]);
	/* errors: NaN / inf and bad index values, as mean_prob jobs with scores between two clean ones */
	int ran = 0;
	for (size_t i = 0; i < ARRAY_LEN(td_errors); i++) {
		const td_error *e = &td_errors[i];
		if (e->n_heads || e->what == E_D1024 || e->what == E_SCALE)
			continue; /* head lists are heads mode's; the rest are not the fast path's */
		tcase tc = {e->name, MP, BF, BF, (uint32_t)(i % 2 ? I64 : I32), 128, 4, 2, 5, 2000, e->window, 0, 0, {0}, 0, 0};
		tdata u, okd;
		td_make(&tc, &u);
		td_make(&tc, &okd);
		td_corrupt(&u, e->what);
		ax_attn_job trio[3] = {okd.job, u.job, okd.job};
		const uint32_t r0 = ax_attn_rows(&okd.job), r1 = ax_attn_rows(&u.job);
		ax_attn_result *out = (ax_attn_result *)malloc((2 * r0 + r1) * sizeof *out), *cpu = (ax_attn_result *)calloc(r1, sizeof *cpu);
		ax_attn_scratch *sc = ax_attn_scratch_new();
		const int want = ax_attn_cpu(&u.job, sc, cpu);
		int rc[3] = {1, 1, 1};
		const uint64_t before = g_sc_jobs;
		g_kn = d;
		g_kn.prob_scores = 1, g_kn.prob_scores_min = 0;
		assert_int_equal(emu_run(trio, 3, out, rc, 12), 0);
		g_kn = axf_knobs{};
		assert_int_equal(g_sc_jobs - before, 3);
		if (rc[0] != 0 || rc[1] != want || rc[2] != 0)
			fail_msg("%s (mean_prob with scores): rc %d %d %d, want 0 %d 0", e->name, rc[0], rc[1], rc[2], want);
		check_job(&okd.job, out, e->name);
		check_job(&okd.job, out + r0 + r1, e->name);
		ran += want != 0;
		ax_attn_scratch_free(sc);
		free(out), free(cpu);
		td_free(&u), td_free(&okd);
	}
	assert_true(ran >= 6);
}

/* The plans with knob raw_heads had raw pass-jobs beyond test_raw's own (the default plans, random knobs). */
static void test_raw_ran(void **state)
{
	(void)state;
	printf("# raw pass-jobs: %llu\n", (unsigned long long)g_raw_jobs);
	assert_true(g_raw_jobs > 20);
}

/* The plans with knob host_merge had host-merged probability passes of mean_prob (session 13), checked against the
 * reference like every other run. */
static void test_hm_ran(void **state)
{
	(void)state;
	printf("# host-merged probability passes: %llu\n", (unsigned long long)g_hm_prob);
	assert_true(g_hm_prob > 10);
}

/* The plans with knob tail had tail blocks (the tests above would pass without the tail path ever running). */
static void test_tail_ran(void **state)
{
	(void)state;
	printf("# tail blocks streamed: %llu\n", (unsigned long long)g_tail_blocks);
	assert_true(g_tail_blocks > 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_cases),
		cmocka_unit_test(test_all_ties),
		cmocka_unit_test(test_many_splits),
		cmocka_unit_test(test_shared_table),
		cmocka_unit_test(test_batch),
		cmocka_unit_test(test_random),
		cmocka_unit_test(test_errors),
		cmocka_unit_test(test_tail_ran),
		cmocka_unit_test(test_hm_ran),
		cmocka_unit_test(test_raw),
		cmocka_unit_test(test_raw_ran),
		cmocka_unit_test(test_few),
		cmocka_unit_test(test_lse_rows),
		cmocka_unit_test(test_flags_splits),
		cmocka_unit_test(test_scores),
	};
	int r = cmocka_run_group_tests(tests, setup, NULL);
	printf("# near-tie substitutions: %d\n", g_near);
	return r;
}
