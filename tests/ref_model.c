/*
 * ref_model.c — see ref_model.h. Weights are converted once to f32 (exact for f16 / bf16) and every product is
 * accumulated in double. A run recomputes the whole sequence layer by layer (all positions of a layer before the
 * next), keeping every layer's q and k rows for the attention checks; the attention inside the forward is plain
 * softmax(q·k / sqrt(D))·v over keys 0..t.
 */
#include "ref_model.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attnx_engine.h"

typedef struct ref_layer {
	float *an, *wq, *wk, *wv, *wo, *bq, *bk, *bv, *qn, *kn, *fn, *wg, *wu, *wd;
} ref_layer;

struct ref_model {
	ref_shape s;
	double eps, theta;
	int tie;
	float *embed, *norm, *lm_head; /* lm_head == embed when tied */
	ref_layer *L;
	/* last run */
	int n;
	double *q;  /* [layers, n, heads, D] */
	double *k;  /* [layers, n, kv_heads, D] */
};

/* ---- loading -------------------------------------------------------------------------------------------------- */

static int cfg_int(json_t *c, const char *key, int dflt)
{
	json_t *v = json_object_get(c, key);
	return json_is_integer(v) ? (int)json_integer_value(v) : dflt;
}

static int parse_config(ref_model *m, const char *dir)
{
	char path[512];
	json_t *c, *rp;

	snprintf(path, sizeof path, "%s/config.json", dir);
	c = json_load_file(path, 0, NULL);
	if (!c)
		return -ENOENT;
	ref_shape *s = &m->s;
	s->layers = cfg_int(c, "num_hidden_layers", 0);
	s->hidden = cfg_int(c, "hidden_size", 0);
	s->heads = cfg_int(c, "num_attention_heads", 0);
	s->kv_heads = cfg_int(c, "num_key_value_heads", s->heads);
	s->head_dim = cfg_int(c, "head_dim", s->heads ? s->hidden / s->heads : 0);
	s->ffn = cfg_int(c, "intermediate_size", 0);
	s->vocab = cfg_int(c, "vocab_size", 0);
	m->eps = json_is_number(json_object_get(c, "rms_norm_eps")) ? json_number_value(json_object_get(c, "rms_norm_eps"))
								   : 1e-6;
	rp = json_object_get(c, "rope_parameters");
	m->theta = json_number_value(json_object_get(json_is_object(rp) ? rp : c, "rope_theta"));
	m->tie = json_is_true(json_object_get(c, "tie_word_embeddings"));
	int scaled = json_is_object(json_object_get(c, "rope_scaling")) ||
		     (json_is_object(rp) && json_string_value(json_object_get(rp, "rope_type")) &&
		      strcmp(json_string_value(json_object_get(rp, "rope_type")), "default"));
	json_decref(c);
	if (s->layers <= 0 || s->hidden <= 0 || s->heads <= 0 || s->kv_heads <= 0 || s->heads % s->kv_heads ||
	    s->head_dim <= 0 || s->head_dim % 2 || s->ffn <= 0 || s->vocab <= 0 || m->theta <= 0 || scaled)
		return -EPROTO;
	return 0;
}

static float half_to_f32(uint16_t h, int bf16)
{
	uint32_t u;
	float f;

	if (bf16) {
		u = (uint32_t)h << 16;
		memcpy(&f, &u, 4);
		return f;
	}
	int e = (h >> 10) & 31, mant = h & 1023;
	double v = e == 0 ? ldexp(mant, -24) : e == 31 ? (mant ? NAN : INFINITY) : ldexp(1024 + mant, e - 25);
	return (float)((h & 0x8000) ? -v : v);
}

/* A tensor of exactly rows × cols (cols 0: a vector of rows) as f32; NULL when absent (optional) or wrong. */
static float *tensor(const ax_st *st, const char *name, int64_t rows, int64_t cols, int optional, int *err)
{
	const ax_st_tensor *t = ax_st_find(st, name);
	size_t n = (size_t)rows * (size_t)(cols ? cols : 1);
	float *v;

	if (!t) {
		if (!optional) {
			fprintf(stderr, "ref_model: no tensor %s\n", name);
			*err = -EPROTO;
		}
		return NULL;
	}
	if (t->ndim != (cols ? 2u : 1u) || t->shape[0] != rows || (cols && t->shape[1] != cols) ||
	    (t->dtype != AX_ST_F32 && t->dtype != AX_ST_F16 && t->dtype != AX_ST_BF16)) {
		fprintf(stderr, "ref_model: tensor %s has the wrong shape or dtype\n", name);
		*err = -EPROTO;
		return NULL;
	}
	v = malloc(n * sizeof *v);
	if (!v) {
		*err = -ENOMEM;
		return NULL;
	}
	for (size_t i = 0; i < n; i++) {
		const uint8_t *b = (const uint8_t *)t->data + i * (t->dtype == AX_ST_F32 ? 4 : 2);
		uint16_t h;
		if (t->dtype == AX_ST_F32) {
			memcpy(&v[i], b, 4);
		} else {
			memcpy(&h, b, 2);
			v[i] = half_to_f32(h, t->dtype == AX_ST_BF16);
		}
	}
	return v;
}

static int load_layer(ref_model *m, const ax_st *st, int l)
{
	const ref_shape *s = &m->s;
	int64_t H = s->hidden, qd = (int64_t)s->heads * s->head_dim, kd = (int64_t)s->kv_heads * s->head_dim,
		F = s->ffn, D = s->head_dim;
	ref_layer *L = &m->L[l];
	char n[128];
	int err = 0;

#define T(field, suffix, r, c, opt)                                                                              \
	do {                                                                                                     \
		snprintf(n, sizeof n, "model.layers.%d.%s", l, suffix);                                          \
		L->field = tensor(st, n, r, c, opt, &err);                                                       \
	} while (0)
	T(an, "input_layernorm.weight", H, 0, 0);
	T(wq, "self_attn.q_proj.weight", qd, H, 0);
	T(wk, "self_attn.k_proj.weight", kd, H, 0);
	T(wv, "self_attn.v_proj.weight", kd, H, 0);
	T(wo, "self_attn.o_proj.weight", H, qd, 0);
	T(bq, "self_attn.q_proj.bias", qd, 0, 1);
	T(bk, "self_attn.k_proj.bias", kd, 0, 1);
	T(bv, "self_attn.v_proj.bias", kd, 0, 1);
	T(qn, "self_attn.q_norm.weight", D, 0, 1);
	T(kn, "self_attn.k_norm.weight", D, 0, 1);
	T(fn, "post_attention_layernorm.weight", H, 0, 0);
	T(wg, "mlp.gate_proj.weight", F, H, 0);
	T(wu, "mlp.up_proj.weight", F, H, 0);
	T(wd, "mlp.down_proj.weight", H, F, 0);
#undef T
	return err;
}

int ref_model_open(ref_model **out, const char *dir)
{
	char path[512];
	ax_st *st = NULL;
	ref_model *m = calloc(1, sizeof *m);
	int rc;

	*out = NULL;
	if (!m)
		return -ENOMEM;
	if ((rc = parse_config(m, dir)))
		goto fail;
	snprintf(path, sizeof path, "%s/model.safetensors", dir);
	if ((rc = ax_st_open(&st, path)))
		goto fail;
	m->embed = tensor(st, "model.embed_tokens.weight", m->s.vocab, m->s.hidden, 0, &rc);
	m->norm = tensor(st, "model.norm.weight", m->s.hidden, 0, 0, &rc);
	m->lm_head = m->tie ? m->embed : tensor(st, "lm_head.weight", m->s.vocab, m->s.hidden, 0, &rc);
	m->L = calloc((size_t)m->s.layers, sizeof *m->L);
	if (!m->L && !rc)
		rc = -ENOMEM;
	for (int l = 0; !rc && l < m->s.layers; l++)
		rc = load_layer(m, st, l);
	if (rc)
		goto fail;
	ax_st_close(st);
	*out = m;
	return 0;
fail:
	ax_st_close(st);
	ref_model_close(m);
	return rc;
}

void ref_model_close(ref_model *m)
{
	if (!m)
		return;
	for (int l = 0; m->L && l < m->s.layers; l++) {
		ref_layer *L = &m->L[l];
		float *all[] = {L->an, L->wq, L->wk, L->wv, L->wo, L->bq, L->bk, L->bv, L->qn, L->kn, L->fn, L->wg,
				L->wu, L->wd};
		for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
			free(all[i]);
	}
	free(m->L);
	if (m->lm_head != m->embed)
		free(m->lm_head);
	free(m->embed);
	free(m->norm);
	free(m->q);
	free(m->k);
	free(m);
}

const ref_shape *ref_model_shape(const ref_model *m)
{
	return &m->s;
}

/* ---- the forward ---------------------------------------------------------------------------------------------- */

static void rms(double *out, const double *x, const float *w, int n, double eps)
{
	double ss = 0;

	for (int i = 0; i < n; i++)
		ss += x[i] * x[i];
	double inv = 1.0 / sqrt(ss / n + eps);
	for (int i = 0; i < n; i++)
		out[i] = x[i] * inv * w[i];
}

/* y[o] = W[o]·x + b[o]; W: [rows, cols] */
static void matvec(double *y, const float *W, const float *b, const double *x, int rows, int cols)
{
	for (int o = 0; o < rows; o++) {
		double s = b ? b[o] : 0;
		const float *w = W + (size_t)o * cols;
		for (int i = 0; i < cols; i++)
			s += (double)w[i] * x[i];
		y[o] = s;
	}
}

/* rotate_half RoPE: pairs (i, i + D/2) rotate by pos · theta^(-2i/D). */
static void rope(double *v, int D, int pos, double theta)
{
	for (int i = 0; i < D / 2; i++) {
		double ang = pos * pow(theta, -2.0 * i / D), a = v[i], b = v[i + D / 2];
		v[i] = a * cos(ang) - b * sin(ang);
		v[i + D / 2] = b * cos(ang) + a * sin(ang);
	}
}

typedef struct work {
	double *xn, *v, *att, *o, *g, *u, *sc;
} work;

/* q, k (rotated, stored for the checks) and v of every position of layer l. */
static void qkv(ref_model *m, int l, const double *x, double *v, double *xn)
{
	const ref_shape *s = &m->s;
	const ref_layer *L = &m->L[l];
	int H = s->hidden, D = s->head_dim, qd = s->heads * D, kd = s->kv_heads * D;

	for (int t = 0; t < m->n; t++) {
		double *q = (double *)ref_q(m, l, t), *k = (double *)ref_k(m, l, t);
		rms(xn, x + (size_t)t * H, L->an, H, m->eps);
		matvec(q, L->wq, L->bq, xn, qd, H);
		matvec(k, L->wk, L->bk, xn, kd, H);
		matvec(v + (size_t)t * kd, L->wv, L->bv, xn, kd, H);
		for (int h = 0; h < s->heads; h++) {
			if (L->qn)
				rms(q + h * D, q + h * D, L->qn, D, m->eps);
			rope(q + h * D, D, t, m->theta);
		}
		for (int h = 0; h < s->kv_heads; h++) {
			if (L->kn)
				rms(k + h * D, k + h * D, L->kn, D, m->eps);
			rope(k + h * D, D, t, m->theta);
		}
	}
}

/* Attention output of position t, all heads, into att [heads, D]. */
static void attend(const ref_model *m, int l, int t, const double *v, double *att, double *sc)
{
	const ref_shape *s = &m->s;
	int D = s->head_dim, kd = s->kv_heads * D, grp = s->heads / s->kv_heads;

	for (int h = 0; h < s->heads; h++) {
		double lse;
		ref_scores(m, l, t, REF_HEADS, h, sc, &lse);
		for (int e = 0; e < D; e++) {
			double a = 0;
			for (int j = 0; j <= t; j++)
				a += exp(sc[j] - lse) * v[(size_t)j * kd + (h / grp) * D + e];
			att[h * D + e] = a;
		}
	}
}

static void layer(ref_model *m, int l, double *x, work *w)
{
	const ref_shape *s = &m->s;
	const ref_layer *L = &m->L[l];
	int H = s->hidden, F = s->ffn, qd = s->heads * s->head_dim;

	qkv(m, l, x, w->v, w->xn);
	for (int t = 0; t < m->n; t++) {
		double *xt = x + (size_t)t * H;
		attend(m, l, t, w->v, w->att, w->sc);
		matvec(w->o, L->wo, NULL, w->att, H, qd);
		for (int i = 0; i < H; i++)
			xt[i] += w->o[i];
		rms(w->xn, xt, L->fn, H, m->eps);
		matvec(w->g, L->wg, NULL, w->xn, F, H);
		matvec(w->u, L->wu, NULL, w->xn, F, H);
		for (int i = 0; i < F; i++)
			w->g[i] = w->g[i] / (1.0 + exp(-w->g[i])) * w->u[i];
		matvec(w->o, L->wd, NULL, w->g, H, F);
		for (int i = 0; i < H; i++)
			xt[i] += w->o[i];
	}
}

int ref_model_run(ref_model *m, const int32_t *tokens, int n, double *logits)
{
	const ref_shape *s = &m->s;
	int H = s->hidden, D = s->head_dim;
	work w;
	double *x;
	int rc = 0;

	for (int t = 0; t < n; t++)
		if (tokens[t] < 0 || tokens[t] >= s->vocab)
			return -EINVAL;
	free(m->q);
	free(m->k);
	m->n = n;
	m->q = calloc((size_t)s->layers * n * s->heads * D, sizeof *m->q);
	m->k = calloc((size_t)s->layers * n * s->kv_heads * D, sizeof *m->k);
	x = calloc((size_t)n * H, sizeof *x);
	w = (work){calloc((size_t)H, sizeof(double)),         calloc((size_t)n * s->kv_heads * D, sizeof(double)),
		   calloc((size_t)s->heads * D, sizeof(double)), calloc((size_t)H, sizeof(double)),
		   calloc((size_t)s->ffn, sizeof(double)),      calloc((size_t)s->ffn, sizeof(double)),
		   calloc((size_t)n, sizeof(double))};
	if (!m->q || !m->k || !x || !w.xn || !w.v || !w.att || !w.o || !w.g || !w.u || !w.sc) {
		rc = -ENOMEM;
		goto out;
	}
	for (int t = 0; t < n; t++)
		for (int i = 0; i < H; i++)
			x[(size_t)t * H + i] = m->embed[(size_t)tokens[t] * H + i];
	for (int l = 0; l < s->layers; l++)
		layer(m, l, x, &w);
	for (int t = 0; logits && t < n; t++) {
		rms(w.xn, x + (size_t)t * H, m->norm, H, m->eps);
		matvec(logits + (size_t)t * s->vocab, m->lm_head, NULL, w.xn, s->vocab, H);
	}
out:
	free(x);
	free(w.xn), free(w.v), free(w.att), free(w.o), free(w.g), free(w.u), free(w.sc);
	return rc;
}

const double *ref_q(const ref_model *m, int l, int p)
{
	return m->q + (((size_t)l * m->n + p) * m->s.heads) * m->s.head_dim;
}

const double *ref_k(const ref_model *m, int l, int p)
{
	return m->k + (((size_t)l * m->n + p) * m->s.kv_heads) * m->s.head_dim;
}

/* ---- attention scores ----------------------------------------------------------------------------------------- */

static double dot(const double *a, const double *b, int n)
{
	double s = 0;

	for (int i = 0; i < n; i++)
		s += a[i] * b[i];
	return s;
}

static double logsumexp(const double *s, int n)
{
	double mx = -INFINITY, z = 0;

	for (int j = 0; j < n; j++)
		mx = s[j] > mx ? s[j] : mx;
	for (int j = 0; j < n; j++)
		z += exp(s[j] - mx);
	return mx + log(z);
}

/* s[j] = scale · q_h · k_j for j in 0..p. */
static void head_logits(const ref_model *m, int l, int p, int h, double *s)
{
	int D = m->s.head_dim, g = h / (m->s.heads / m->s.kv_heads);
	double scale = 1.0 / sqrt((double)D);
	const double *q = ref_q(m, l, p) + (size_t)h * D;

	for (int j = 0; j <= p; j++)
		s[j] = scale * dot(q, ref_k(m, l, j) + (size_t)g * D, D);
}

void ref_scores(const ref_model *m, int l, int p, int mode, int head, double *s, double *lse)
{
	int Hq = m->s.heads;
	double *t;

	if (mode == REF_HEADS) {
		head_logits(m, l, p, head, s);
		*lse = logsumexp(s, p + 1);
		return;
	}
	t = malloc((size_t)(p + 1) * sizeof *t);
	for (int j = 0; j <= p; j++)
		s[j] = 0;
	for (int h = 0; h < Hq; h++) {
		head_logits(m, l, p, h, t);
		double z = logsumexp(t, p + 1);
		for (int j = 0; j <= p; j++)
			s[j] += mode == REF_MEAN_PROB ? exp(t[j] - z) / Hq : t[j] / Hq;
	}
	if (mode == REF_MEAN_PROB) {
		for (int j = 0; j <= p; j++)
			s[j] = log(s[j]);
		*lse = 0;
	} else {
		*lse = logsumexp(s, p + 1);
	}
	free(t);
}
