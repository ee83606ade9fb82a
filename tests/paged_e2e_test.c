/*
 * paged_e2e_test.c — a paged engine (vLLM's layout) end to end through attnx-capture: this process exports a segment
 * whose keys are addressed through a block table (shm/README.md, "Paged layouts"), a real attnx-capture process
 * (--backend cpu) computes the records, and every attn record is checked against a float64 brute force over the
 * keys the engine wrote.
 *
 * The engine: 4 layers, H_q 4, H_kv 2, D 64, bf16 Q and K; one block table i32 [4 rows, 64 blocks] of block size BS
 * (argv; not only powers of two); layer 0's pool is 4-D NHD [blocks, BS, H_kv, D], layer 1's 4-D HND (the same shape
 * described by strides: [blocks, H_kv, BS, D] in memory), layer 2's 3-D [blocks·BS, H_kv, D] (blocks of BS slots),
 * layer 3's 4-D with block size 2·BS, which the table cannot address: the capture must skip it (`gap` "unsupported",
 * no layer-3 record). Three requests run interleaved, each in its own table row, their blocks drawn from a shuffled
 * free list (so table cells jump all over the pools); a prefill forward covers the prompt, then decode forwards one
 * token each. Blocks are never reused (no recycling race to reason about). Planted keys (a key equal to a scaled
 * copy of the group's summed query) make the top-k meaningful.
 *
 * Checks: every (request, position, layer 0..2, head) record arrives exactly once, none for layer 3, an `end` per
 * request; top-k positions equal the reference's (a swap allowed only between keys whose reference values agree to
 * 1e-5), logits and logsumexp within 1e-3; a gap "unsupported" was reported.
 *
 * INDEX token: the same pools read through a token index table (SGLang's req_to_token, slot = block·BS + row): the
 * 4-D NHD pools (layers 0 and 3, block sizes BS and 2·BS) and the 3-D one are seen as slots, the HND pool (layer 1)
 * cannot be (its blocks are not evenly strided in slots) and is the skipped one.
 *
 * Built with PE_DEV (paged_e2e_gpu, with paged_e2e_dev.cu) and run with BACKEND cuda, every buffer lives in GPU
 * memory (cudaMalloc, CUDA IPC entries through ax_cuda_fill_ipc): the engine writes host shadows and uploads them
 * (synchronously) before each descriptor is published, and the capture runs --backend cuda; the checks are the same.
 * Built with PE_DEV and paged_e2e_emuldev.c instead (paged_e2e_emul), the "GPU memory" is tests/capture_emul.c's
 * emulated device (named shm objects, "AXEM" IPC handles) and CAPTURE is attnx-capture-emul: the capture's CUDA
 * path for paged jobs (import, job fill, batching, extents) runs in CI with the same checks.
 * Usage: paged_e2e_test CAPTURE MODE BS [cpu|cuda [paged|token]]. Exit 0 pass, 1 fail, 2 usage, 77 no CUDA device
 * (cuda).
 * A test program: it fails fast.
 */
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <nng/nng.h>
#include <nng/protocol/pipeline0/pull.h>

#include "attnx_proto.h"
#include "attnx_shm.h"

enum { NL = 4, HQ = 4, HKV = 2, D = 64, TROWS = 4, MAXB = 64, NREQ = 3, ND = 6, TOPK = 8, QROWS = 4096 };
#define TOL 1e-3

static uint32_t g_bs, g_mode;
static int g_fail;
static int g_dev;   /* buffers in GPU memory (BACKEND cuda) */
static int g_token; /* a token index table instead of the block table (INDEX token) */
static uint32_t g_skip; /* the layer the index cannot address: 3 (paged), 1 (token) */

#ifdef PE_DEV /* paged_e2e_dev.cu (a GPU) or paged_e2e_emuldev.c (the emulated device) */
int pe_dev_init(void);
int pe_dev_alloc(uint64_t bytes, uint64_t *dptr);
int pe_dev_upload(uint64_t dst, const void *src, uint64_t bytes);
int pe_dev_entry(ax_shm_buffer *b, uint64_t dptr, uint64_t bytes);
void pe_dev_free(uint64_t dptr);
#endif

#define FAIL(...)                                                                                             \
	do {                                                                                                  \
		fprintf(stderr, "FAIL: " __VA_ARGS__);                                                        \
		fprintf(stderr, "\n");                                                                        \
		g_fail++;                                                                                     \
	} while (0)
#define DIE(...)                                                                                              \
	do {                                                                                                  \
		fprintf(stderr, "FATAL: " __VA_ARGS__);                                                       \
		fprintf(stderr, "\n");                                                                        \
		exit(1);                                                                                      \
	} while (0)

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;
static double uni(void)
{
	g_rng ^= g_rng << 13, g_rng ^= g_rng >> 7, g_rng ^= g_rng << 17;
	return (double)(g_rng >> 11) * 0x1p-53 * 2.0 - 1.0;
}

static uint16_t to_bf16(double x)
{
	float f = (float)x;
	uint32_t u;
	memcpy(&u, &f, 4);
	u += 0x7fffu + ((u >> 16) & 1u);
	return (uint16_t)(u >> 16);
}
static double from_bf16(uint16_t b)
{
	uint32_t u = (uint32_t)b << 16;
	float f;
	memcpy(&f, &u, 4);
	return f;
}

/* ---- the engine -------------------------------------------------------------------------------------------------- */

/* Every exported buffer: where the engine writes it (the segment, or a host shadow of GPU memory at dptr). */
typedef struct xbuf {
	void *host;
	uint64_t dptr, bytes;
} xbuf;
static xbuf g_bufs[8];
static int g_nbufs;

/* Export *b (strides all zero: contiguous) in the segment or in GPU memory; returns where the engine writes it. */
static void *add_buf(ax_export *ex, ax_shm_buffer *b, uint32_t *index)
{
	uint64_t st = 1, last = 0;
	for (int i = (int)b->ndim - 1; i >= 0 && !b->bytes; i--)
		b->stride[i] = st, st *= b->dim[i];
	for (uint32_t i = 0; i < b->ndim; i++)
		last += (b->dim[i] - 1) * b->stride[i];
	b->bytes = (last + 1) * ax_dtype_size(b->dtype);
	xbuf *x = &g_bufs[g_nbufs++];
	x->bytes = b->bytes;
	if (!g_dev) {
		b->loc = AX_LOC_HOST;
		if (ax_export_add_host_buffer(ex, b, &x->host, index))
			DIE("ax_export_add_host_buffer (kind %u)", b->kind);
		return x->host;
	}
#ifdef PE_DEV
	x->host = calloc(1, b->bytes);
	if (!x->host || pe_dev_alloc(b->bytes, &x->dptr) || pe_dev_entry(b, x->dptr, b->bytes) ||
	    ax_export_add_device_buffer(ex, b, index))
		DIE("device buffer (kind %u)", b->kind);
#endif
	return x->host;
}

/* GPU memory: upload every shadow before a descriptor names what was written (no-op for host buffers). */
static void sync_bufs(void)
{
#ifdef PE_DEV
	for (int i = 0; g_dev && i < g_nbufs; i++)
		if (pe_dev_upload(g_bufs[i].dptr, g_bufs[i].host, g_bufs[i].bytes))
			DIE("upload");
#endif
}

static void free_bufs(void)
{
	for (int i = 0; g_dev && i < g_nbufs; i++) {
#ifdef PE_DEV
		pe_dev_free(g_bufs[i].dptr);
#endif
		free(g_bufs[i].host);
	}
	g_nbufs = 0;
}

typedef struct pool {
	uint16_t *k;
	uint64_t sb, sr, sg; /* element strides: block, row in the block, KV head */
} pool;

typedef struct req {
	char rid[32];
	uint64_t id;
	uint32_t row, P, len; /* table row, prompt length, positions written */
	int32_t blk[MAXB];    /* the request's blocks */
	double (*q)[NL][HQ][D];  /* [positions] the decoded Q rows */
	double (*k)[NL][HKV][D]; /* [positions] the decoded keys */
	int ended;
} req;

typedef struct engine {
	ax_export *ex;
	pool pl[NL];
	int32_t *table; /* [TROWS, MAXB] */
	uint16_t *q;    /* the Q ring [QROWS, HQ, D] */
	uint32_t tbuf, qbuf;
	uint32_t *freeb, nfree; /* shuffled free blocks */
	float scale;
} engine;

static void add_pool(engine *e, uint32_t l, uint64_t blocks)
{
	ax_shm_buffer b;
	pool *p = &e->pl[l];
	uint32_t bs = l == 3 ? 2 * g_bs : g_bs;
	if (l == 2) { /* [blocks·bs, H_kv, D] */
		b = (ax_shm_buffer){.kind = AX_BUF_K_POOL, .dtype = AX_DTYPE_BF16, .layer = 2, .ndim = 3,
				    .dim = {blocks * bs, HKV, D}, .scale = 1};
		p->sb = (uint64_t)bs * HKV * D, p->sr = HKV * D, p->sg = D;
	} else if (ax_shm_paged_kpool_desc(&b, (int32_t)l, AX_DTYPE_BF16, blocks, bs, HKV, D)) {
		DIE("ax_shm_paged_kpool_desc");
	} else if (l == 1) { /* HND */
		b.stride[1] = D, b.stride[2] = (uint64_t)bs * D;
		p->sb = b.stride[0], p->sr = D, p->sg = (uint64_t)bs * D;
	} else {
		p->sb = b.stride[0], p->sr = b.stride[1], p->sg = b.stride[2];
	}
	p->k = add_buf(e->ex, &b, NULL);
	uint64_t n = b.bytes / 2;
	for (uint64_t i = 0; i < n; i++)
		p->k[i] = to_bf16(uni() * 3); /* every cell random: a misaddressed read gives wrong records */
}

static void engine_open(engine *e, const char *name)
{
	uint64_t blocks = NREQ * MAXB + 5;
	ax_export_config cfg = {.name = name, .engine = "paged-e2e", .model = "toy", .world_size = 1, .n_layers = NL,
				.n_q_heads = HQ, .n_kv_heads = HKV, .n_q_heads_total = HQ, .head_dim = D,
				.q_dtype = AX_DTYPE_BF16, .k_dtype = AX_DTYPE_BF16, .max_ctx = MAXB * g_bs,
				.data_size = (uint64_t)NL * 2 * blocks * 2 * g_bs * HKV * D + QROWS * HQ * D * 2 +
					     TROWS * MAXB * 4 + 65536};
	memset(e, 0, sizeof *e);
	int rc = ax_export_open(&e->ex, &cfg);
	if (rc)
		DIE("ax_export_open: %d", rc);
	e->scale = ax_export_header(e->ex)->scale;
	for (uint32_t l = 0; l < NL; l++)
		add_pool(e, l, blocks);
	ax_shm_buffer tb, ti = {.kind = AX_BUF_INDEX_TOKEN, .dtype = AX_DTYPE_I32, .layer = -1, .ndim = 2,
				.dim = {TROWS, (uint64_t)MAXB * g_bs}, .scale = 1};
	if (g_token)
		e->table = add_buf(e->ex, &ti, &e->tbuf);
	else if (g_dev && ax_shm_block_table_desc(&tb, TROWS, MAXB, g_bs) == 0)
		e->table = add_buf(e->ex, &tb, &e->tbuf);
	else if (g_dev || ax_export_add_block_table(e->ex, TROWS, MAXB, g_bs, &e->table, &e->tbuf))
		DIE("block table");
	ax_shm_buffer q = {.kind = AX_BUF_Q_RING, .dtype = AX_DTYPE_BF16, .layer = -1, .ndim = 3, .dim = {QROWS, HQ, D},
			   .scale = 1};
	e->q = add_buf(e->ex, &q, &e->qbuf);
	e->nfree = (uint32_t)blocks;
	e->freeb = malloc(blocks * sizeof *e->freeb);
	for (uint32_t i = 0; i < e->nfree; i++)
		e->freeb[i] = i;
	for (uint32_t i = e->nfree - 1; i > 0; i--) {
		uint32_t j = (uint32_t)((g_rng = g_rng * 6364136223846793005ull + 1) >> 33) % (i + 1), t = e->freeb[i];
		e->freeb[i] = e->freeb[j], e->freeb[j] = t;
	}
}

/* Write the key of position p of r into every layer (a fresh block at each block boundary). */
static void put_key(engine *e, req *r, uint32_t p)
{
	if (p % g_bs == 0) {
		if (e->nfree == 0)
			DIE("out of blocks");
		r->blk[p / g_bs] = (int32_t)e->freeb[--e->nfree];
		if (!g_token)
			e->table[r->row * MAXB + p / g_bs] = r->blk[p / g_bs];
	}
	uint64_t b = (uint64_t)r->blk[p / g_bs], slot = b * g_bs + p % g_bs;
	if (g_token)
		e->table[(uint64_t)r->row * MAXB * g_bs + p] = (int32_t)slot;
	int plant = p % 7 == 3;
	for (uint32_t l = 0; l < NL; l++) {
		const pool *pl = &e->pl[l];
		/* paged: block b, row p % bs; token: slot·(row stride) in the pools seen as slots; the skipped layer's
		 * cells stay random */
		uint64_t at = g_token ? slot * pl->sr : b * pl->sb + (p % g_bs) * pl->sr;
		for (uint32_t g = 0; g < HKV; g++)
			for (uint32_t d = 0; d < D; d++) {
				double x = uni();
				if (plant && p > 0) { /* a copy of the group's summed query of an earlier position */
					uint32_t src = p / 2;
					x = 0;
					for (uint32_t h = g * (HQ / HKV); h < (g + 1) * (HQ / HKV); h++)
						x += r->q[src][l][h][d];
					x *= 0.5 + (p % 5) * 0.3;
				}
				uint16_t v = to_bf16(x);
				if (l != g_skip)
					pl->k[at + g * pl->sg + d] = v;
				r->k[p][l][g][d] = from_bf16(v);
			}
	}
}

/* One forward over positions pos0 .. pos0+n-1 (keys and Q rows written first, then the descriptor). */
static void forward(engine *e, req *r, uint32_t pos0, uint32_t n)
{
	uint64_t want[2] = {0, 0};
	int prefill = 0;
	ax_export_wanted(e->ex, want, &prefill);
	uint32_t nl = (uint32_t)__builtin_popcountll(want[0]);
	ax_shm_step s = {.req_id = r->id, .n_tokens = n, .pos0 = pos0, .seq_len = pos0 + n, .index_buf = e->tbuf,
			 .index_row = r->row, .decode_step = pos0 >= r->P ? pos0 - r->P + 1 : 0,
			 .layers = {want[0], 0}, .flags = pos0 < r->P ? AX_STEP_F_PREFILL : 0};
	for (uint32_t t = 0; t < n; t++)
		for (uint32_t l = 0; l < NL; l++)
			for (uint32_t h = 0; h < HQ; h++)
				for (uint32_t d = 0; d < D; d++)
					r->q[pos0 + t][l][h][d] = from_bf16(to_bf16(uni()));
	for (uint32_t t = 0; t < n; t++)
		put_key(e, r, pos0 + t);
	if (nl) {
		void *ptr;
		if (ax_export_q_reserve(e->ex, e->qbuf, n * nl, &s.q_row, &ptr))
			DIE("q_reserve");
		uint16_t *q = e->q + (s.q_row % QROWS) * HQ * D; /* = ptr for a host ring (NULL for a device one) */
		for (uint32_t t = 0; t < n; t++)
			for (uint32_t l = 0; l < NL; l++)
				if (want[0] >> l & 1)
					for (uint32_t h = 0; h < HQ; h++)
						for (uint32_t d = 0; d < D; d++)
							*q++ = to_bf16(r->q[pos0 + t][l][h][d]);
	}
	int32_t toks[512];
	for (uint32_t t = 0; t < n; t++)
		toks[t] = (int32_t)(1000 + pos0 + t);
	sync_bufs();
	int rc = ax_export_step(e->ex, &s, toks);
	if (rc)
		DIE("ax_export_step: %d", rc);
	r->len = pos0 + n;
}

/* ---- the reference ---------------------------------------------------------------------------------------------- */

/* Values of keys 0..p (heads mode: of head h) into v; returns their logsumexp (0 for mean_prob). */
static double ref_values(const engine *e, const req *r, uint32_t p, uint32_t l, uint32_t h, double *v)
{
	static double s[HQ][MAXB * 300];
	double lse[HQ];
	for (uint32_t hh = 0; hh < HQ; hh++) {
		double m = -INFINITY, sum = 0;
		for (uint32_t j = 0; j <= p; j++) {
			double acc = 0;
			for (uint32_t d = 0; d < D; d++)
				acc += r->q[p][l][hh][d] * r->k[j][l][hh / (HQ / HKV)][d];
			s[hh][j] = (double)e->scale * acc;
			m = fmax(m, s[hh][j]);
		}
		for (uint32_t j = 0; j <= p; j++)
			sum += exp(s[hh][j] - m);
		lse[hh] = m + log(sum);
	}
	double m = -INFINITY, sum = 0;
	for (uint32_t j = 0; j <= p; j++) {
		if (g_mode == AX_MODE_HEADS) {
			v[j] = s[h][j];
		} else if (g_mode == AX_MODE_MEAN_LOGIT) {
			v[j] = 0;
			for (uint32_t hh = 0; hh < HQ; hh++)
				v[j] += s[hh][j] / HQ;
		} else {
			double acc = 0;
			for (uint32_t hh = 0; hh < HQ; hh++)
				acc += exp(s[hh][j] - lse[hh]);
			v[j] = log(acc / HQ);
		}
		m = fmax(m, v[j]);
	}
	if (g_mode == AX_MODE_MEAN_PROB)
		return 0;
	for (uint32_t j = 0; j <= p; j++)
		sum += exp(v[j] - m);
	return m + log(sum);
}

static void check_record(const engine *e, const req *r, const ax_rec_attn *a)
{
	static double v[MAXB * 300];
	uint32_t p = (uint32_t)a->position, l = (uint32_t)a->layer_id;
	uint32_t h = g_mode == AX_MODE_HEADS ? (uint32_t)a->head_id : 0;
	double lse = ref_values(e, r, p, l, h, v);
	uint32_t k = p + 1 < TOPK ? p + 1 : TOPK;
	if (a->k != k) {
		FAIL("%s p %u layer %u head %d: k %u, want %u", r->rid, p, l, a->head_id, a->k, k);
		return;
	}
	if (fabs(a->logsumexp_all - lse) > TOL)
		FAIL("%s p %u layer %u head %d: logsumexp %.9g, want %.9g", r->rid, p, l, a->head_id, a->logsumexp_all,
		     lse);
	char used[MAXB * 300] = {0};
	for (uint32_t i = 0; i < k; i++) {
		/* the i-th best of the reference: highest value, lowest position among equals, not yet taken */
		uint32_t best = UINT32_MAX;
		for (uint32_t j = 0; j <= p; j++)
			if (!used[j] && (best == UINT32_MAX || v[j] > v[best]))
				best = j;
		used[best] = 1;
		int64_t got = a->token_positions[i];
		if (got < 0 || got > (int64_t)p) {
			FAIL("%s p %u layer %u: entry %u position %lld", r->rid, p, l, i, (long long)got);
			return;
		}
		if ((uint32_t)got != best && fabs(v[got] - v[best]) > 1e-5 * fmax(1, fabs(v[best])))
			FAIL("%s p %u layer %u head %d: entry %u position %lld (%.9g), want %u (%.9g)", r->rid, p, l,
			     a->head_id, i, (long long)got, v[got], best, v[best]);
		if (fabs(a->topk_logits[i] - v[got]) > TOL)
			FAIL("%s p %u layer %u head %d: entry %u logit %.9g, want %.9g", r->rid, p, l, a->head_id, i,
			     a->topk_logits[i], v[got]);
	}
}

/* ---- records ----------------------------------------------------------------------------------------------------- */

typedef struct sink {
	engine *e;
	req *reqs;
	uint8_t *seen;     /* [req][pos][layer][head] */
	uint64_t attn, ends, unsupported, skipped;
} sink;

static int on_record(const ax_record *rec, void *arg)
{
	sink *s = arg;
	if (rec->type == AX_REC_GAP && !strcmp(rec->u.gap.reason, "unsupported"))
		s->unsupported += rec->u.gap.count;
	if (rec->type == AX_REC_GAP && strcmp(rec->u.gap.reason, "unsupported"))
		FAIL("gap %s/%s × %llu", rec->u.gap.what, rec->u.gap.reason, (unsigned long long)rec->u.gap.count);
	if (rec->type != AX_REC_ATTN && rec->type != AX_REC_END)
		return 0;
	int ri = -1;
	for (int i = 0; i < NREQ; i++)
		if (!strcmp(s->reqs[i].rid, rec->rid))
			ri = i;
	if (ri < 0) {
		FAIL("record of unknown rid %s", rec->rid);
		return 0;
	}
	if (rec->type == AX_REC_END) {
		s->ends++;
		return 0;
	}
	const ax_rec_attn *a = &rec->u.attn;
	uint32_t hi = g_mode == AX_MODE_HEADS ? (uint32_t)a->head_id : 0;
	if (a->layer_id == (int32_t)g_skip) {
		s->skipped++;
		return 0;
	}
	if (a->layer_id < 0 || a->layer_id >= NL || a->position < 0 || a->position >= MAXB * 300 || hi >= HQ) {
		FAIL("attn record out of range: layer %d position %lld head %d", a->layer_id, (long long)a->position,
		     a->head_id);
		return 0;
	}
	size_t at = (((size_t)ri * MAXB * 300 + (size_t)a->position) * NL + (size_t)a->layer_id) * HQ + hi;
	uint8_t *seen = &s->seen[at];
	if ((*seen)++)
		FAIL("%s p %lld layer %d head %d twice", rec->rid, (long long)a->position, a->layer_id, a->head_id);
	check_record(s->e, &s->reqs[ri], a);
	s->attn++;
	return 0;
}

static void drain(nng_socket pull, sink *s, uint64_t want_attn, int timeout_ms)
{
	for (int waited = 0; waited < timeout_ms && (s->attn < want_attn || s->ends < NREQ || !s->unsupported);) {
		nng_msg *m;
		int rc = nng_recvmsg(pull, &m, 0);
		if (rc == NNG_ETIMEDOUT) {
			waited += 50;
			continue;
		}
		if (rc)
			DIE("nng_recvmsg: %s", nng_strerror(rc));
		if (ax_frame_decode(nng_msg_body(m), nng_msg_len(m), on_record, s) < 0)
			FAIL("undecodable frame");
		nng_msg_free(m);
	}
}

/* ---- main -------------------------------------------------------------------------------------------------------- */

static pid_t spawn_capture(const char *bin, const char *shm, const char *addr, const char *mode)
{
	const char *backend = g_dev ? "cuda" : "cpu";
	char topk[16];
	snprintf(topk, sizeof topk, "%d", TOPK);
	pid_t pid = fork();
	if (pid == 0) {
		execl(bin, bin, "--shm", shm, "--records", addr, "--backend", backend, "--mode", mode, "--top-k", topk,
		      "--layers", "all", "--prefill", "--threads", "2", "--log-level", "warn", (char *)NULL);
		_exit(127);
	}
	return pid;
}

static int wait_wanted(engine *e)
{
	for (int i = 0; i < 1000; i++) {
		uint64_t want[2];
		int prefill;
		if (ax_export_wanted(e->ex, want, &prefill) && want[0] == (1u << NL) - 1 && prefill)
			return 0;
		ax_export_heartbeat(e->ex);
		usleep(10000);
	}
	return -ETIMEDOUT;
}

int main(int argc, char **argv)
{
	if (argc < 4 || argc > 6 || ax_mode_parse(argv[2]) < 0 || atoi(argv[3]) < 1 || atoi(argv[3]) > 64 ||
	    (argc >= 5 && strcmp(argv[4], "cpu") && strcmp(argv[4], "cuda")) ||
	    (argc == 6 && strcmp(argv[5], "paged") && strcmp(argv[5], "token"))) {
		fprintf(stderr, "usage: %s CAPTURE mean_logit|mean_prob|heads BLOCK_SIZE(1..64) [cpu|cuda [paged|token]]"
				"\n", argv[0]);
		return 2;
	}
	g_token = argc == 6 && !strcmp(argv[5], "token");
	g_skip = g_token ? 1 : 3;
	g_mode = (uint32_t)ax_mode_parse(argv[2]);
	g_bs = (uint32_t)atoi(argv[3]);
	g_dev = argc >= 5 && !strcmp(argv[4], "cuda");
#ifdef PE_DEV
	if (g_dev && pe_dev_init() != 0) {
		printf("paged_e2e_test: SKIP (no CUDA device)\n");
		return 77;
	}
#else
	if (g_dev) {
		fprintf(stderr, "paged_e2e_test: built without CUDA (paged_e2e_gpu has it)\n");
		return 2;
	}
#endif
	char shm[64], addr[128];
	snprintf(shm, sizeof shm, "/attnx.paged-e2e.%d", (int)getpid());
	snprintf(addr, sizeof addr, "ipc:///tmp/attnx-paged-e2e-%d.rec", (int)getpid());
	engine e;
	engine_open(&e, shm);
	nng_socket pull;
	if (nng_pull0_open(&pull) || nng_listen(pull, addr, NULL, 0))
		DIE("nng pull");
	nng_socket_set_ms(pull, NNG_OPT_RECVTIMEO, 50);
	pid_t cap = spawn_capture(argv[1], shm, addr, argv[2]);
	if (cap < 0 || wait_wanted(&e))
		DIE("the capture did not attach");
	req reqs[NREQ];
	uint32_t maxpos = MAXB * g_bs;
	for (int i = 0; i < NREQ; i++) {
		req *r = &reqs[i];
		memset(r, 0, sizeof *r);
		snprintf(r->rid, sizeof r->rid, "ax-paged-%d", i);
		r->row = (uint32_t)(TROWS - 1 - i); /* rows not in request order */
		r->P = g_bs * (uint32_t)(i + 2) + 3 * (uint32_t)i + 1;
		r->P = r->P < 200 ? r->P : 150 + (uint32_t)i;
		if (r->P + ND > maxpos)
			r->P = maxpos - ND;
		r->q = calloc(r->P + ND, sizeof *r->q);
		r->k = calloc(r->P + ND, sizeof *r->k);
		int32_t prompt[512];
		for (uint32_t t = 0; t < r->P; t++)
			prompt[t] = (int32_t)(1000 + t);
		if (ax_export_request_begin(e.ex, r->rid, prompt, r->P, &r->id))
			DIE("request_begin");
		forward(&e, r, 0, r->P);
	}
	for (uint32_t t = 1; t <= ND; t++) /* decode, interleaved */
		for (int i = 0; i < NREQ; i++)
			forward(&e, &reqs[i], reqs[i].P - 1 + t, 1);
	for (int i = 0; i < NREQ; i++)
		ax_export_request_end(e.ex, reqs[i].id, AX_END_STOP);
	uint64_t want_attn = 0;
	for (int i = 0; i < NREQ; i++)
		want_attn += (uint64_t)reqs[i].len * 3 * (g_mode == AX_MODE_HEADS ? HQ : 1);
	sink s = {.e = &e, .reqs = reqs, .seen = calloc((size_t)NREQ * MAXB * 300 * NL * HQ, 1)};
	drain(pull, &s, want_attn, 30000);
	if (s.attn != want_attn)
		FAIL("%llu attn records, want %llu", (unsigned long long)s.attn, (unsigned long long)want_attn);
	if (s.ends != NREQ)
		FAIL("%llu end records, want %d", (unsigned long long)s.ends, NREQ);
	if (s.skipped)
		FAIL("%llu records of layer %u (a pool the index cannot address)", (unsigned long long)s.skipped,
		     g_skip);
	if (!s.unsupported)
		FAIL("no gap \"unsupported\" for layer %u", g_skip);
	kill(cap, SIGTERM);
	waitpid(cap, NULL, 0);
	nng_close(pull);
	ax_export_close(e.ex);
	free_bufs();
	printf("paged_e2e_test %s bs %u%s%s: %llu attn records checked, %d failures\n", argv[2], g_bs,
	       g_token ? " token index" : "", g_dev ? " (GPU buffers, --backend cuda)" : "", (unsigned long long)s.attn,
	       g_fail);
	for (int i = 0; i < NREQ; i++) {
		free(reqs[i].q);
		free(reqs[i].k);
	}
	free(s.seen);
	free(e.freeb);
	return g_fail ? 1 : 0;
}
