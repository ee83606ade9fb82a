/*
 * testmodel.c — see testmodel.h. The safetensors writer builds the JSON header with jansson, pads it with spaces
 * to a multiple of 8 bytes (as the format recommends) and appends the tensors in header order.
 */
#include "testmodel.h"

#include "attnx_engine.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

static float rnd(uint64_t *st) { return (float)((ax_rng_next(st) >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f; }

static float round_to(float v, uint32_t dtype)
{
	if (dtype == AX_ST_BF16)
		return ax_bf16_to_f32(ax_f32_to_bf16(v));
	if (dtype == AX_ST_F16)
		return ax_f16_to_f32(ax_f32_to_f16(v));
	return v;
}

/* n values: center + scale·U(-1, 1), rounded to the dtype. */
static float *draw(const tm_spec *s, uint64_t *st, size_t n, float center, float scale)
{
	float *v = malloc(n * sizeof *v);
	for (size_t i = 0; v && i < n; i++)
		v[i] = round_to(center + scale * rnd(st), s->dtype);
	return v;
}

int tm_make(tm_model *m, const tm_spec *s)
{
	memset(m, 0, sizeof *m);
	m->s = *s;
	uint64_t st = s->seed;
	size_t H = (size_t)s->hidden, qd = (size_t)s->heads * s->head_dim, kd = (size_t)s->kv_heads * s->head_dim,
	       F = (size_t)s->ffn, V = (size_t)s->vocab, D = (size_t)s->head_dim;
	float ws = 1.0f / sqrtf((float)H);
	m->embed = draw(s, &st, V * H, 0, 1.0f);
	m->norm = draw(s, &st, H, 1.0f, 0.2f);
	m->lm_head = s->tie ? m->embed : draw(s, &st, V * H, 0, ws);
	if (s->tie && s->lm_head_too && !(m->decoy = draw(s, &st, V * H, 0, ws)))
		return -ENOMEM;
	m->L = calloc((size_t)s->layers, sizeof *m->L);
	if (!m->embed || !m->norm || !m->lm_head || !m->L)
		return -ENOMEM;
	for (int l = 0; l < s->layers; l++) {
		tm_layer *L = &m->L[l];
		L->an = draw(s, &st, H, 1.0f, 0.2f);
		L->wq = draw(s, &st, qd * H, 0, ws);
		L->wk = draw(s, &st, kd * H, 0, ws);
		L->wv = draw(s, &st, kd * H, 0, ws);
		L->wo = draw(s, &st, H * qd, 0, 1.0f / sqrtf((float)qd));
		if (s->bias) {
			L->bq = draw(s, &st, qd, 0, 0.1f);
			L->bk = draw(s, &st, kd, 0, 0.1f);
			L->bv = draw(s, &st, kd, 0, 0.1f);
		}
		if (s->o_bias && !(L->bo = draw(s, &st, H, 0, 0.1f)))
			return -ENOMEM;
		if (s->mlp_bias) {
			L->bg = draw(s, &st, F, 0, 0.1f);
			L->bu = draw(s, &st, F, 0, 0.1f);
			L->bd = draw(s, &st, H, 0, 0.1f);
			if (!L->bg || !L->bu || !L->bd)
				return -ENOMEM;
		}
		if (s->qk_norm) {
			L->qn = draw(s, &st, D, 1.0f, 0.2f);
			L->kn = draw(s, &st, D, 1.0f, 0.2f);
		}
		L->fn = draw(s, &st, H, 1.0f, 0.2f);
		L->g = draw(s, &st, F * H, 0, ws);
		L->u = draw(s, &st, F * H, 0, ws);
		L->d = draw(s, &st, H * F, 0, 1.0f / sqrtf((float)F));
		if (!L->an || !L->wq || !L->wk || !L->wv || !L->wo || !L->fn || !L->g || !L->u || !L->d)
			return -ENOMEM;
	}
	return 0;
}

void tm_free(tm_model *m)
{
	for (int l = 0; m->L && l < m->s.layers; l++) {
		tm_layer *L = &m->L[l];
		float *all[] = {L->an, L->wq, L->wk, L->wv, L->wo, L->bq, L->bk, L->bv, L->bo, L->qn,
				L->kn, L->fn, L->g,  L->u,  L->d,  L->bg, L->bu, L->bd};
		for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
			free(all[i]);
	}
	free(m->L);
	if (m->lm_head != m->embed)
		free(m->lm_head);
	free(m->embed);
	free(m->decoy);
	free(m->norm);
	memset(m, 0, sizeof *m);
}

/* ---- writer ------------------------------------------------------------------------------------------ */

typedef struct tensor_out {
	char name[96];
	const float *v;
	int64_t shape[2];
	int ndim;
} tensor_out;

static size_t esize(uint32_t dtype) { return dtype == AX_ST_F32 ? 4 : 2; }

/* The tensors i ≡ shard (mod every) of t[0..n) into one file (every = 1: all of them). */
static int write_st(const char *path, const tensor_out *t, int n, uint32_t dtype, int shard, int every)
{
	json_t *hdr = json_object();
	size_t off = 0;
	const char *dn = dtype == AX_ST_F32 ? "F32" : dtype == AX_ST_F16 ? "F16" : "BF16";
	for (int i = shard; i < n; i += every) {
		size_t cnt = (size_t)t[i].shape[0] * (t[i].ndim == 2 ? (size_t)t[i].shape[1] : 1);
		json_t *sh = json_array();
		for (int d = 0; d < t[i].ndim; d++)
			json_array_append_new(sh, json_integer(t[i].shape[d]));
		json_object_set_new(hdr, t[i].name,
				    json_pack("{s:s,s:o,s:[I,I]}", "dtype", dn, "shape", sh, "data_offsets", (json_int_t)off,
					      (json_int_t)(off + cnt * esize(dtype))));
		off += cnt * esize(dtype);
	}
	json_object_set_new(hdr, "__metadata__", json_pack("{s:s}", "format", "pt"));
	char *js = json_dumps(hdr, JSON_COMPACT | JSON_PRESERVE_ORDER);
	json_decref(hdr);
	FILE *f = fopen(path, "wb");
	if (!js || !f) {
		free(js);
		if (f)
			fclose(f);
		return -EIO;
	}
	size_t jl = strlen(js), padded = (jl + 7) / 8 * 8;
	uint8_t len8[8];
	for (int i = 0; i < 8; i++)
		len8[i] = (uint8_t)(padded >> (8 * i));
	fwrite(len8, 1, 8, f);
	fwrite(js, 1, jl, f);
	for (size_t i = jl; i < padded; i++)
		fputc(' ', f);
	free(js);
	for (int i = shard; i < n; i += every) {
		size_t cnt = (size_t)t[i].shape[0] * (t[i].ndim == 2 ? (size_t)t[i].shape[1] : 1);
		for (size_t k = 0; k < cnt; k++) {
			if (dtype == AX_ST_F32) {
				fwrite(&t[i].v[k], 4, 1, f);
			} else {
				uint16_t h = dtype == AX_ST_BF16 ? ax_f32_to_bf16(t[i].v[k]) : ax_f32_to_f16(t[i].v[k]);
				fwrite(&h, 2, 1, f);
			}
		}
	}
	return fclose(f) ? -EIO : 0;
}

static void add(tensor_out *t, int *n, const char *name, const float *v, int64_t r, int64_t c)
{
	if (!v)
		return;
	tensor_out *o = &t[(*n)++];
	snprintf(o->name, sizeof o->name, "%s", name);
	o->v = v;
	o->shape[0] = r;
	o->shape[1] = c;
	o->ndim = c ? 2 : 1;
}

/* Shards: file k of n holds the tensors i ≡ k (mod n); the index maps every name to its file. */
static int write_shards(const char *dir, const tensor_out *t, int n, uint32_t dtype, int shards)
{
	char path[512], file[64];
	json_t *map = json_object();
	int rc = 0;
	for (int k = 0; k < shards && !rc; k++) {
		snprintf(file, sizeof file, "model-%05d-of-%05d.safetensors", k + 1, shards);
		snprintf(path, sizeof path, "%s/%s", dir, file);
		rc = write_st(path, t, n, dtype, k, shards);
		for (int i = k; i < n; i += shards)
			json_object_set_new(map, t[i].name, json_string(file));
	}
	json_t *idx = json_pack("{s:{s:i},s:o}", "metadata", "total_size", 0, "weight_map", map);
	snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
	if (!rc && json_dump_file(idx, path, JSON_INDENT(2)))
		rc = -EIO;
	json_decref(idx);
	return rc;
}

static int write_config(const tm_model *m, const char *dir)
{
	const tm_spec *s = &m->s;
	json_t *c = json_pack("{s:[s],s:s,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:f,s:f,s:b,s:b,s:i,s:i,s:b,s:s}",
			      "architectures", s->qk_norm ? "Qwen3ForCausalLM" : "LlamaForCausalLM", "model_type",
			      s->qk_norm ? "qwen3" : "llama", "num_hidden_layers", s->layers, "hidden_size", s->hidden,
			      "num_attention_heads", s->heads, "num_key_value_heads", s->kv_heads, "head_dim", s->head_dim,
			      "intermediate_size", s->ffn, "vocab_size", s->vocab, "max_position_embeddings", 256,
			      "rms_norm_eps", 1e-6, "rope_theta", (double)s->theta, "tie_word_embeddings", s->tie,
			      "attention_bias", s->bias || s->o_bias, "bos_token_id", 1, "eos_token_id", 2, "mlp_bias",
			      s->mlp_bias, "hidden_act", "silu");
	if (s->llama3_rope)
		json_object_set_new(c, "rope_scaling",
				    json_pack("{s:s,s:f,s:f,s:f,s:i}", "rope_type", "llama3", "factor", 8.0,
					      "low_freq_factor", 1.0, "high_freq_factor", 4.0,
					      "original_max_position_embeddings", 64));
	char path[512];
	snprintf(path, sizeof path, "%s/config.json", dir);
	int rc = json_dump_file(c, path, JSON_INDENT(2)) ? -EIO : 0;
	json_decref(c);
	return rc;
}

int tm_write(const tm_model *m, const char *dir)
{
	const tm_spec *s = &m->s;
	mkdir(dir, 0700);
	int64_t H = s->hidden, qd = (int64_t)s->heads * s->head_dim, kd = (int64_t)s->kv_heads * s->head_dim,
		F = s->ffn, V = s->vocab, D = s->head_dim;
	int n = 0;
	tensor_out *t = calloc((size_t)(20 * s->layers + 4), sizeof *t);
	if (!t)
		return -ENOMEM;
	add(t, &n, "model.embed_tokens.weight", m->embed, V, H);
	add(t, &n, "model.norm.weight", m->norm, H, 0);
	if (!s->tie)
		add(t, &n, "lm_head.weight", m->lm_head, V, H);
	add(t, &n, "lm_head.weight", m->decoy, V, H);
	for (int l = 0; l < s->layers; l++) {
		const tm_layer *L = &m->L[l];
		char p[96];
#define A(suffix, v, r, c)                                                                                       \
	do {                                                                                                     \
		snprintf(p, sizeof p, "model.layers.%d.%s", l, suffix);                                          \
		add(t, &n, p, v, r, c);                                                                          \
	} while (0)
		A("input_layernorm.weight", L->an, H, 0);
		A("self_attn.q_proj.weight", L->wq, qd, H);
		A("self_attn.k_proj.weight", L->wk, kd, H);
		A("self_attn.v_proj.weight", L->wv, kd, H);
		A("self_attn.o_proj.weight", L->wo, H, qd);
		A("self_attn.q_proj.bias", L->bq, qd, 0);
		A("self_attn.k_proj.bias", L->bk, kd, 0);
		A("self_attn.v_proj.bias", L->bv, kd, 0);
		A("self_attn.o_proj.bias", L->bo, H, 0);
		A("self_attn.q_norm.weight", L->qn, D, 0);
		A("self_attn.k_norm.weight", L->kn, D, 0);
		A("post_attention_layernorm.weight", L->fn, H, 0);
		A("mlp.gate_proj.weight", L->g, F, H);
		A("mlp.up_proj.weight", L->u, F, H);
		A("mlp.down_proj.weight", L->d, H, F);
		A("mlp.gate_proj.bias", L->bg, F, 0);
		A("mlp.up_proj.bias", L->bu, F, 0);
		A("mlp.down_proj.bias", L->bd, H, 0);
#undef A
	}
	char path[512];
	snprintf(path, sizeof path, "%s/model.safetensors", dir);
	int rc = s->shards > 1 ? write_shards(dir, t, n, s->dtype, s->shards) : write_st(path, t, n, s->dtype, 0, 1);
	free(t);
	return rc ? rc : write_config(m, dir);
}

void tm_remove(const char *dir)
{
	DIR *d = opendir(dir);
	struct dirent *e;
	char p[512];
	while (d && (e = readdir(d)))
		if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
			snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
			unlink(p);
		}
	if (d)
		closedir(d);
	rmdir(dir);
}

/* ---- reference forward ------------------------------------------------------------------------------- */

static void ref_rms(double *out, const double *x, const float *w, int n)
{
	double ss = 0;
	for (int i = 0; i < n; i++)
		ss += x[i] * x[i];
	double inv = 1.0 / sqrt(ss / n + 1e-6);
	for (int i = 0; i < n; i++)
		out[i] = x[i] * inv * w[i];
}

/* y[o] = W[o]·x + b[o] */
static void ref_mv(double *y, const float *W, const float *b, const double *x, int rows, int cols)
{
	for (int o = 0; o < rows; o++) {
		double s = b ? b[o] : 0;
		for (int i = 0; i < cols; i++)
			s += (double)W[(size_t)o * cols + i] * x[i];
		y[o] = s;
	}
}

/* Frequency i of D: theta^(-2i/D), and with llama3 scaling (factor 8, low 1, high 4, original context 64) the
 * long wavelengths divided by 8, the short ones kept, a linear blend in 1/wavelength between them. */
static double ref_freq(const tm_spec *s, int i, int D)
{
	double f = 1.0 / pow(s->theta, 2.0 * i / D);
	if (!s->llama3_rope)
		return f;
	double wl = 2 * M_PI / f;
	if (wl < 64.0 / 4)
		return f;
	if (wl > 64.0 / 1)
		return f / 8;
	double a = (64.0 / wl - 1) / (4 - 1);
	return (1 - a) * f / 8 + a * f;
}

static void ref_rope(double *v, int D, int pos, const tm_spec *s)
{
	for (int i = 0; i < D / 2; i++) {
		double ang = pos * ref_freq(s, i, D), a = v[i], b = v[i + D / 2];
		v[i] = a * cos(ang) - b * sin(ang);
		v[i + D / 2] = b * cos(ang) + a * sin(ang);
	}
}

void tm_ref_forward(const tm_model *m, const int32_t *tok, int n, float *logits)
{
	const tm_spec *s = &m->s;
	int H = s->hidden, D = s->head_dim, Hq = s->heads, Hkv = s->kv_heads, F = s->ffn, V = s->vocab;
	int qd = Hq * D, kd = Hkv * D;
	double *x = calloc((size_t)n * H, sizeof *x), *xn = calloc((size_t)H, sizeof *xn);
	double *q = calloc((size_t)n * qd, sizeof *q), *k = calloc((size_t)n * kd, sizeof *k);
	double *v = calloc((size_t)n * kd, sizeof *v), *att = calloc((size_t)qd, sizeof *att);
	double *o = calloc((size_t)H, sizeof *o), *g = calloc((size_t)F, sizeof *g), *u = calloc((size_t)F, sizeof *u);
	double *sc = calloc((size_t)n, sizeof *sc), *lg = calloc((size_t)V, sizeof *lg);
	for (int t = 0; t < n; t++)
		for (int i = 0; i < H; i++)
			x[(size_t)t * H + i] = m->embed[(size_t)tok[t] * H + i];
	for (int l = 0; l < s->layers; l++) {
		const tm_layer *L = &m->L[l];
		for (int t = 0; t < n; t++) {
			ref_rms(xn, x + (size_t)t * H, L->an, H);
			ref_mv(q + (size_t)t * qd, L->wq, L->bq, xn, qd, H);
			ref_mv(k + (size_t)t * kd, L->wk, L->bk, xn, kd, H);
			ref_mv(v + (size_t)t * kd, L->wv, L->bv, xn, kd, H);
			for (int h = 0; h < Hq; h++) {
				double *qh = q + (size_t)t * qd + (size_t)h * D;
				if (L->qn)
					ref_rms(qh, qh, L->qn, D);
				ref_rope(qh, D, t, s);
			}
			for (int h = 0; h < Hkv; h++) {
				double *kh = k + (size_t)t * kd + (size_t)h * D;
				if (L->kn)
					ref_rms(kh, kh, L->kn, D);
				ref_rope(kh, D, t, s);
			}
		}
		for (int t = 0; t < n; t++) {
			for (int h = 0; h < Hq; h++) {
				int kh = h / (Hq / Hkv);
				double mx = -1e300, sum = 0;
				for (int j = 0; j <= t; j++) {
					double d = 0;
					for (int e = 0; e < D; e++)
						d += q[(size_t)t * qd + h * D + e] * k[(size_t)j * kd + kh * D + e];
					sc[j] = d / sqrt((double)D);
					mx = sc[j] > mx ? sc[j] : mx;
				}
				for (int j = 0; j <= t; j++)
					sum += (sc[j] = exp(sc[j] - mx));
				for (int e = 0; e < D; e++) {
					double a = 0;
					for (int j = 0; j <= t; j++)
						a += sc[j] / sum * v[(size_t)j * kd + kh * D + e];
					att[h * D + e] = a;
				}
			}
			ref_mv(o, L->wo, L->bo, att, H, qd);
			for (int i = 0; i < H; i++)
				x[(size_t)t * H + i] += o[i];
			ref_rms(xn, x + (size_t)t * H, L->fn, H);
			ref_mv(g, L->g, L->bg, xn, F, H);
			ref_mv(u, L->u, L->bu, xn, F, H);
			for (int i = 0; i < F; i++)
				g[i] = g[i] / (1.0 + exp(-g[i])) * u[i];
			ref_mv(o, L->d, L->bd, g, H, F);
			for (int i = 0; i < H; i++)
				x[(size_t)t * H + i] += o[i];
		}
	}
	for (int t = 0; t < n; t++) {
		ref_rms(xn, x + (size_t)t * H, m->norm, H);
		ref_mv(lg, m->lm_head, NULL, xn, V, H);
		for (int i = 0; i < V; i++)
			logits[(size_t)t * V + i] = (float)lg[i];
	}
	free(x), free(xn), free(q), free(k), free(v), free(att), free(o), free(g), free(u), free(sc), free(lg);
}
