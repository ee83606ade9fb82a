/*
 * model.c — Llama / Qwen3 decoder: config.json, weights, and the batched forward pass.
 *
 * The weights stay memory-mapped in their stored dtype (f32, f16, bf16). A matmul splits the OUTPUT rows of a
 * weight over the pool's workers; each worker converts one weight row to f32 in its own buffer and dots it with
 * every token of the step, so the conversion is paid once per step, not once per token, and batching many
 * requests into one step reads the weights once for all of them (that is what continuous batching buys on a CPU).
 *
 * One step = T tokens from any number of requests (prefill chunks and decode tokens mixed). Per layer:
 * x → RMSNorm → q,k,v projections (+bias) → Qwen3 per-head q/k RMSNorm → RoPE (HF rotate_half layout; inverse
 * frequencies from rope_theta with linear / llama3 rescaling) → K/V written into the token slots the scheduler
 * allocated → causal attention of each token over its request's slots 0..pos (GQA: query head h reads KV head
 * h / (H_q/H_kv)) → o_proj (+bias) → residual → RMSNorm → SwiGLU MLP (+biases) → residual. Every bias is
 * optional: present in the file, it is used. Logits are computed only for the tokens that sample. All arithmetic
 * is f32. The config parser refuses (-ENOTSUP) what this does not compute, rather than run it wrong.
 */
#include "attnx_engine.h"

#include "attnx_common.h"

#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct weight {
	const void *p;
	uint32_t dtype; /* enum ax_st_dtype */
	int rows, cols; /* [rows, cols]; 1-D tensors have rows = 1 */
} weight;

typedef struct layer {
	weight attn_norm, wq, wk, wv, wo, bq, bk, bv, bo, q_norm, k_norm, ffn_norm, gate, up, down, bg, bu, bd;
} layer;

struct ax_model {
	ax_model_config c;
	ax_st **files;
	int n_files;
	weight embed, norm, lm_head;
	layer *layers;
	float *inv_freq; /* [D/2] RoPE inverse frequencies */
};

/* ---- config ------------------------------------------------------------------------------------------ */

static int jint(json_t *o, const char *k, int def)
{
	json_t *v = json_object_get(o, k);
	if (json_is_integer(v))
		return (int)json_integer_value(v);
	return def;
}

static double jnum(json_t *o, const char *k, double def)
{
	json_t *v = json_object_get(o, k);
	return json_is_number(v) ? json_number_value(v) : def;
}

static void add_eos(ax_model_config *c, json_t *v)
{
	if (json_is_integer(v)) {
		int id = (int)json_integer_value(v);
		for (int i = 0; i < c->n_eos; i++)
			if (c->eos_ids[i] == id)
				return;
		if (c->n_eos < AX_MAX_EOS)
			c->eos_ids[c->n_eos++] = id;
	} else if (json_is_array(v)) {
		size_t i;
		json_t *e;
		json_array_foreach(v, i, e) add_eos(c, e);
	}
}

/* rope_scaling (older files) or rope_parameters (transformers ≥ 5): the rope_type and its numbers into c.
 * Returns 1 for a rope_type the forward pass does not implement, or numbers that make no sense. */
static int parse_rope(json_t *o, json_t *rp, ax_model_config *c)
{
	json_t *rs = json_object_get(o, "rope_scaling");
	if (!json_is_object(rs))
		rs = rp;
	if (!json_is_object(rs))
		return 0;
	json_t *ty = json_object_get(rs, "rope_type");
	if (!ty)
		ty = json_object_get(rs, "type");
	const char *t = json_is_string(ty) ? json_string_value(ty) : "";
	c->rope_factor = (float)jnum(rs, "factor", 1.0);
	if (!strcmp(t, "default"))
		return 0;
	if (!strcmp(t, "linear")) {
		c->rope_type = AX_ROPE_LINEAR;
		return !(c->rope_factor > 0);
	}
	if (!strcmp(t, "llama3")) {
		c->rope_type = AX_ROPE_LLAMA3;
		c->rope_low_freq = (float)jnum(rs, "low_freq_factor", 0);
		c->rope_high_freq = (float)jnum(rs, "high_freq_factor", 0);
		c->rope_orig_max_pos = jint(rs, "original_max_position_embeddings", 0);
		return !(c->rope_factor > 0 && c->rope_low_freq > 0 && c->rope_high_freq >= c->rope_low_freq &&
			 c->rope_orig_max_pos > 0);
	}
	return 1; /* yarn, dynamic, longrope, ...: not implemented */
}

/* 1 if the config asks for something this forward pass does not compute: another model family (Gemma's (1+w)
 * norms, SmolLM3's NoPE layers, ...), an activation other than SiLU, sliding-window attention layers. */
static int unsupported_arch(json_t *o)
{
	static const char *const types[] = {"llama", "qwen3", "qwen2", "mistral"};
	json_t *mt = json_object_get(o, "model_type"), *act = json_object_get(o, "hidden_act");
	int bad = 0;
	if (json_is_string(mt)) {
		bad = 1;
		for (size_t i = 0; i < sizeof types / sizeof types[0]; i++)
			bad &= !!strcmp(json_string_value(mt), types[i]);
	}
	if (json_is_string(act) && strcmp(json_string_value(act), "silu") && strcmp(json_string_value(act), "swish"))
		bad = 1;
	if (json_is_true(json_object_get(o, "use_sliding_window")))
		bad = 1;
	size_t i;
	json_t *lt;
	json_array_foreach(json_object_get(o, "layer_types"), i, lt)
	{
		bad |= !json_is_string(lt) || strcmp(json_string_value(lt), "full_attention");
	}
	return bad;
}

int ax_model_parse_config(const char *json, size_t len, ax_model_config *c)
{
	json_error_t err;
	json_t *o = json_loadb(json, len, 0, &err);
	if (!json_is_object(o)) {
		json_decref(o);
		return -EPROTO;
	}
	memset(c, 0, sizeof *c);
	json_t *arch = json_array_get(json_object_get(o, "architectures"), 0);
	snprintf(c->arch, sizeof c->arch, "%s", json_is_string(arch) ? json_string_value(arch) : "LlamaForCausalLM");
	c->n_layers = jint(o, "num_hidden_layers", 0);
	c->hidden = jint(o, "hidden_size", 0);
	c->n_heads = jint(o, "num_attention_heads", 0);
	c->n_kv_heads = jint(o, "num_key_value_heads", c->n_heads);
	c->head_dim = jint(o, "head_dim", c->n_heads > 0 ? c->hidden / c->n_heads : 0);
	c->ffn = jint(o, "intermediate_size", 0);
	c->vocab = jint(o, "vocab_size", 0);
	c->max_pos = jint(o, "max_position_embeddings", 2048);
	c->rms_eps = (float)jnum(o, "rms_norm_eps", 1e-6);
	/* transformers ≥ 5 writes rope_parameters {rope_theta, rope_type}; older files rope_theta + rope_scaling */
	json_t *rp = json_object_get(o, "rope_parameters");
	c->rope_theta = (float)jnum(o, "rope_theta", jnum(rp, "rope_theta", 10000.0));
	c->tie_embeddings = json_is_true(json_object_get(o, "tie_word_embeddings"));
	c->attn_bias = json_is_true(json_object_get(o, "attention_bias"));
	json_t *mt = json_object_get(o, "model_type");
	c->qk_norm = json_is_string(mt) && !strncmp(json_string_value(mt), "qwen3", 5);
	if (json_is_string(mt) && !strcmp(json_string_value(mt), "qwen2"))
		c->attn_bias = 1;
	c->bos_id = jint(o, "bos_token_id", -1);
	add_eos(c, json_object_get(o, "eos_token_id"));
	json_t *sw = json_object_get(o, "sliding_window");
	if (json_is_string(mt) && !strcmp(json_string_value(mt), "mistral") && json_is_integer(sw) &&
	    json_integer_value(sw) > 0 && json_integer_value(sw) < c->max_pos)
		c->sliding_window = (int)json_integer_value(sw);
	int unsupported = parse_rope(o, rp, c) || unsupported_arch(o);
	json_decref(o);
	if (c->n_layers <= 0 || c->hidden <= 0 || c->n_heads <= 0 || c->n_kv_heads <= 0 || c->head_dim <= 0 ||
	    c->ffn <= 0 || c->vocab <= 0 || c->n_heads % c->n_kv_heads || c->head_dim % 2 || c->n_layers > 1024 ||
	    c->head_dim > 1024 || c->max_pos <= 0)
		return -EPROTO;
	if (unsupported)
		return -ENOTSUP;
	return 0;
}

void ax_model_rope_freqs(const ax_model_config *c, float *inv_freq)
{
	int D = c->head_dim;
	for (int i = 0; i < D / 2; i++) {
		/* transformers: 1 / base ** (arange(0, D, 2) / D), then the rope_type's rescaling */
		double f = 1.0 / pow((double)c->rope_theta, (double)(2 * i) / D);
		if (c->rope_type == AX_ROPE_LINEAR) {
			f /= c->rope_factor;
		} else if (c->rope_type == AX_ROPE_LLAMA3) {
			/* Llama 3.1: long wavelengths slowed down by factor, short ones kept, a smooth blend between */
			double wavelen = 2 * M_PI / f, old = c->rope_orig_max_pos;
			double lo = old / c->rope_low_freq, hi = old / c->rope_high_freq;
			if (wavelen > lo) {
				f /= c->rope_factor;
			} else if (wavelen >= hi && c->rope_high_freq > c->rope_low_freq) {
				double sm = (old / wavelen - c->rope_low_freq) / (c->rope_high_freq - c->rope_low_freq);
				f = (1 - sm) * f / c->rope_factor + sm * f;
			}
		}
		inv_freq[i] = (float)f;
	}
}
static char *slurp(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return NULL;
	char *buf = NULL;
	if (fseek(f, 0, SEEK_END) == 0) {
		long n = ftell(f);
		if (n >= 0 && n < (1l << 30) && fseek(f, 0, SEEK_SET) == 0) {
			buf = malloc((size_t)n + 1);
			if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
				free(buf);
				buf = NULL;
			} else if (buf) {
				buf[n] = 0;
				*len = (size_t)n;
			}
		}
	}
	fclose(f);
	return buf;
}

/* ---- weights ----------------------------------------------------------------------------------------- */

static const ax_st_tensor *find_tensor(const ax_model *m, const char *name)
{
	for (int i = 0; i < m->n_files; i++) {
		const ax_st_tensor *t = ax_st_find(m->files[i], name);
		if (t)
			return t;
	}
	return NULL;
}

/* Bind weight `name` of shape [rows, cols] (cols = 0: 1-D of `rows`). Missing and optional: returns 0 with
 * w->p NULL. */
static int bind(ax_model *m, weight *w, const char *name, int rows, int cols, int optional)
{
	const ax_st_tensor *t = find_tensor(m, name);
	memset(w, 0, sizeof *w);
	if (!t) {
		if (optional)
			return 0;
		ax_log(AX_LOG_ERROR, "engine", "missing tensor %s", name);
		return -EPROTO;
	}
	int ok = cols ? (t->ndim == 2 && t->shape[0] == rows && t->shape[1] == cols)
		      : (t->ndim == 1 && t->shape[0] == rows);
	if (!ok) {
		ax_log(AX_LOG_ERROR, "engine", "tensor %s has an unexpected shape", name);
		return -EPROTO;
	}
	if (t->dtype == AX_ST_OTHER) {
		ax_log(AX_LOG_ERROR, "engine", "tensor %s: unsupported dtype", name);
		return -ENOTSUP;
	}
	w->p = t->data;
	w->dtype = t->dtype;
	w->rows = cols ? rows : 1;
	w->cols = cols ? cols : rows;
	return 0;
}

static int bind_layer(ax_model *m, int i)
{
	const ax_model_config *c = &m->c;
	layer *L = &m->layers[i];
	int qd = c->n_heads * c->head_dim, kd = c->n_kv_heads * c->head_dim, rc = 0;
	char n[160];
#define B(field, suffix, r, cc, opt)                                                                              \
	do {                                                                                                     \
		snprintf(n, sizeof n, "model.layers.%d.%s", i, suffix);                                          \
		if (!rc)                                                                                         \
			rc = bind(m, &L->field, n, r, cc, opt);                                                  \
	} while (0)
	B(attn_norm, "input_layernorm.weight", c->hidden, 0, 0);
	B(wq, "self_attn.q_proj.weight", qd, c->hidden, 0);
	B(wk, "self_attn.k_proj.weight", kd, c->hidden, 0);
	B(wv, "self_attn.v_proj.weight", kd, c->hidden, 0);
	B(wo, "self_attn.o_proj.weight", c->hidden, qd, 0);
	B(bq, "self_attn.q_proj.bias", qd, 0, 1);
	B(bk, "self_attn.k_proj.bias", kd, 0, 1);
	B(bv, "self_attn.v_proj.bias", kd, 0, 1);
	B(bo, "self_attn.o_proj.bias", c->hidden, 0, 1); /* Llama / Qwen3 with attention_bias (not Qwen2) */
	B(q_norm, "self_attn.q_norm.weight", c->head_dim, 0, !c->qk_norm);
	B(k_norm, "self_attn.k_norm.weight", c->head_dim, 0, !c->qk_norm);
	B(ffn_norm, "post_attention_layernorm.weight", c->hidden, 0, 0);
	B(gate, "mlp.gate_proj.weight", c->ffn, c->hidden, 0);
	B(up, "mlp.up_proj.weight", c->ffn, c->hidden, 0);
	B(down, "mlp.down_proj.weight", c->hidden, c->ffn, 0);
	B(bg, "mlp.gate_proj.bias", c->ffn, 0, 1); /* Llama's mlp_bias */
	B(bu, "mlp.up_proj.bias", c->ffn, 0, 1);
	B(bd, "mlp.down_proj.bias", c->hidden, 0, 1);
#undef B
	return rc;
}

static int open_weights(ax_model *m, const char *dir)
{
	char path[4096];
	snprintf(path, sizeof path, "%s/model.safetensors", dir);
	m->files = calloc(64, sizeof *m->files);
	if (!m->files)
		return -ENOMEM;
	int rc = ax_st_open(&m->files[0], path);
	if (rc == 0) {
		m->n_files = 1;
		return 0;
	}
	if (rc != -ENOENT)
		return rc;
	/* Sharded: model.safetensors.index.json names the files in its weight_map. */
	size_t len;
	snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
	char *txt = slurp(path, &len);
	if (!txt)
		return -ENOENT;
	json_t *o = json_loadb(txt, len, 0, NULL);
	free(txt);
	json_t *wm = json_object_get(o, "weight_map");
	rc = json_is_object(wm) ? 0 : -EPROTO;
	const char *key;
	json_t *v;
	char seen[64][256];
	json_object_foreach(wm, key, v) {
		if (rc || !json_is_string(v))
			break;
		int dup = 0;
		for (int i = 0; i < m->n_files; i++)
			dup |= !strcmp(seen[i], json_string_value(v));
		if (dup)
			continue;
		if (m->n_files == 64 || strchr(json_string_value(v), '/')) {
			rc = -ENOTSUP;
			break;
		}
		snprintf(seen[m->n_files], sizeof seen[0], "%s", json_string_value(v));
		snprintf(path, sizeof path, "%s/%s", dir, seen[m->n_files]);
		rc = ax_st_open(&m->files[m->n_files], path);
		if (!rc)
			m->n_files++;
	}
	json_decref(o);
	return rc;
}

static int load_config(ax_model *m, const char *dir)
{
	char path[4096];
	size_t len;
	snprintf(path, sizeof path, "%s/config.json", dir);
	char *txt = slurp(path, &len);
	if (!txt)
		return -ENOENT;
	int rc = ax_model_parse_config(txt, len, &m->c);
	free(txt);
	if (rc)
		return rc;
	snprintf(path, sizeof path, "%s/generation_config.json", dir);
	txt = slurp(path, &len);
	if (txt) {
		json_t *o = json_loadb(txt, len, 0, NULL);
		add_eos(&m->c, json_object_get(o, "eos_token_id"));
		json_decref(o);
		free(txt);
	}
	const char *base = strrchr(dir, '/');
	while (base && base[1] == 0 && base > dir) { /* trailing slash */
		const char *p = base - 1;
		while (p > dir && *p != '/')
			p--;
		base = p;
	}
	base = base ? base + (*base == '/') : dir;
	snprintf(m->c.name, sizeof m->c.name, "%.*s", (int)strcspn(base, "/"), base);
	return 0;
}

int ax_model_open(ax_model **out, const char *dir)
{
	ax_model *m = calloc(1, sizeof *m);
	if (!m)
		return -ENOMEM;
	int rc = load_config(m, dir);
	if (!rc)
		rc = open_weights(m, dir);
	if (rc)
		goto fail;
	const ax_model_config *c = &m->c;
	/* Qwen3 checkpoints say so by their tensors as much as by model_type. */
	if (find_tensor(m, "model.layers.0.self_attn.q_norm.weight"))
		m->c.qk_norm = 1;
	m->layers = calloc((size_t)c->n_layers, sizeof *m->layers);
	m->inv_freq = malloc((size_t)c->head_dim / 2 * sizeof(float));
	if (!m->layers || !m->inv_freq) {
		rc = -ENOMEM;
		goto fail;
	}
	rc = bind(m, &m->embed, "model.embed_tokens.weight", c->vocab, c->hidden, 0);
	if (!rc)
		rc = bind(m, &m->norm, "model.norm.weight", c->hidden, 0, 0);
	/* tie_word_embeddings: the output layer IS the embedding, whatever lm_head.weight a file also carries (as
	 * transformers ties them); untied without lm_head.weight, the embedding is the best guess left. */
	if (!rc && !c->tie_embeddings)
		rc = bind(m, &m->lm_head, "lm_head.weight", c->vocab, c->hidden, 1);
	if (!rc && !m->lm_head.p)
		m->lm_head = m->embed;
	for (int i = 0; !rc && i < c->n_layers; i++)
		rc = bind_layer(m, i);
	if (rc)
		goto fail;
	ax_model_rope_freqs(c, m->inv_freq);
	*out = m;
	return 0;
fail:
	ax_model_close(m);
	return rc;
}

void ax_model_close(ax_model *m)
{
	if (!m)
		return;
	for (int i = 0; i < m->n_files; i++)
		ax_st_close(m->files[i]);
	free(m->files);
	free(m->layers);
	free(m->inv_freq);
	free(m);
}

const ax_model_config *ax_model_cfg(const ax_model *m) { return &m->c; }

/* ---- kernels ----------------------------------------------------------------------------------------- */

/*
 * The hot loops (matmul rows, attention) are written on GCC vector types of 8 floats and compiled three times
 * through target_clones — AVX-512 (skylake-avx512), AVX2 + FMA (haswell), and the x86-64 baseline (SSE2, where a
 * v8f is two xmm registers) — the dynamic loader picks the best one for the CPU once (ifunc). Helpers are
 * always_inline so that each clone gets its own copy compiled for its ISA. -DAX_ENGINE_NO_CLONES builds only the
 * baseline (the `engine-baseline` test runs the forward-pass cases on it).
 */
#define AX_INLINE static inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(AX_ENGINE_NO_CLONES) && \
	!defined(__SANITIZE_THREAD__) && !defined(__SANITIZE_ADDRESS__) /* ifunc resolvers run before the sanitizer runtime */
#define AX_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define AX_CLONES
#endif

/* Matmul tiling: weight rows converted per block, tokens per block (16 rows and 32 tokens of 1024 floats: 192 KB). */
#define MM_RB 16
#define MM_TB 32

/* Below this many multiply-adds a loop runs on the calling thread alone (about 10 µs of work). */
#define AX_PAR_MIN_MACS 100000

typedef float v8f __attribute__((vector_size(32)));
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi" /* v8f helpers are always inlined: no v8f crosses a call */
#endif

AX_INLINE v8f ld8(const float *p)
{
	v8f v;
	memcpy(&v, p, sizeof v); /* unaligned load */
	return v;
}

AX_INLINE float hsum8(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

AX_INLINE float bf16f(uint16_t h)
{
	uint32_t u = (uint32_t)h << 16;
	float f;
	memcpy(&f, &u, 4);
	return f;
}

/* Row r of w as f32: a pointer into the mapping for f32 weights, else converted into buf (vectorised). */
AX_INLINE const float *wrow(const weight *w, int r, float *buf)
{
	size_t off = (size_t)r * w->cols;
	if (w->dtype == AX_ST_F32)
		return (const float *)w->p + off;
	const uint16_t *h = (const uint16_t *)w->p + off;
	if (w->dtype == AX_ST_BF16)
		for (int i = 0; i < w->cols; i++)
			buf[i] = bf16f(h[i]);
	else
		for (int i = 0; i < w->cols; i++)
			buf[i] = ax_f16_to_f32(h[i]);
	return buf;
}

/* Element i of a weight as f32. */
AX_INLINE float wat(const weight *w, size_t i)
{
	if (w->dtype == AX_ST_F32)
		return ((const float *)w->p)[i];
	uint16_t h = ((const uint16_t *)w->p)[i];
	return w->dtype == AX_ST_BF16 ? bf16f(h) : ax_f16_to_f32(h);
}

/* a · b over n floats: two 8-wide accumulators (FMA latency), scalar tail. */
AX_INLINE float dot(const float *a, const float *b, int n)
{
	v8f s0 = {0}, s1 = {0};
	int i = 0;
	for (; i + 16 <= n; i += 16) {
		s0 += ld8(a + i) * ld8(b + i);
		s1 += ld8(a + i + 8) * ld8(b + i + 8);
	}
	for (; i + 8 <= n; i += 8)
		s0 += ld8(a + i) * ld8(b + i);
	float r = hsum8(s0 + s1);
	for (; i < n; i++)
		r += a[i] * b[i];
	return r;
}

/* Four dot products of one weight row w with four rows x0 + k·ldx (k < 4): each w chunk is loaded once. */
AX_INLINE void dot4(const float *x0, size_t ldx, const float *w, int n, float out[4])
{
	const float *x1 = x0 + ldx, *x2 = x1 + ldx, *x3 = x2 + ldx;
	v8f s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
	int i = 0;
	for (; i + 8 <= n; i += 8) {
		v8f wv = ld8(w + i);
		s0 += ld8(x0 + i) * wv;
		s1 += ld8(x1 + i) * wv;
		s2 += ld8(x2 + i) * wv;
		s3 += ld8(x3 + i) * wv;
	}
	float r0 = hsum8(s0), r1 = hsum8(s1), r2 = hsum8(s2), r3 = hsum8(s3);
	for (; i < n; i++) {
		r0 += x0[i] * w[i];
		r1 += x1[i] * w[i];
		r2 += x2[i] * w[i];
		r3 += x3[i] * w[i];
	}
	out[0] = r0, out[1] = r1, out[2] = r2, out[3] = r3;
}

struct ax_fwd_scratch {
	int max_tokens, threads;
	float *x, *xn, *q, *k, *v, *att, *gate, *up;
	float *rowbuf;   /* [threads, MM_RB, wmax] weight-row conversion */
	int wmax;        /* max(hidden, ffn, qd) */
	float *scores;   /* [threads, max_pos] attention scores */
	int scores_cap;
	int *tok_row, *tok_pos, *ymap;
};

int ax_fwd_scratch_open(ax_fwd_scratch **out, const ax_model *m, int max_tokens, int threads)
{
	const ax_model_config *c = &m->c;
	ax_fwd_scratch *s = calloc(1, sizeof *s);
	if (!s || max_tokens <= 0)
		goto fail;
	size_t T = (size_t)max_tokens, qd = (size_t)c->n_heads * c->head_dim, kd = (size_t)c->n_kv_heads * c->head_dim;
	size_t wmax = (size_t)(c->hidden > c->ffn ? c->hidden : c->ffn);
	if (qd > wmax)
		wmax = qd;
	s->max_tokens = max_tokens;
	s->wmax = (int)wmax;
	s->threads = threads > 0 ? threads : 1;
	s->scores_cap = c->max_pos > 0 ? c->max_pos : 1;
	s->x = malloc(T * c->hidden * sizeof(float));
	s->xn = malloc(T * c->hidden * sizeof(float));
	s->q = malloc(T * qd * sizeof(float));
	s->k = malloc(T * kd * sizeof(float));
	s->v = malloc(T * kd * sizeof(float));
	s->att = malloc(T * qd * sizeof(float));
	s->gate = malloc(T * c->ffn * sizeof(float));
	s->up = malloc(T * c->ffn * sizeof(float));
	s->rowbuf = malloc((size_t)s->threads * MM_RB * wmax * sizeof(float));
	s->scores = malloc((size_t)s->threads * s->scores_cap * sizeof(float));
	s->tok_row = malloc(T * sizeof(int));
	s->tok_pos = malloc(T * sizeof(int));
	s->ymap = malloc(T * sizeof(int));
	if (!s->x || !s->xn || !s->q || !s->k || !s->v || !s->att || !s->gate || !s->up || !s->rowbuf || !s->scores ||
	    !s->tok_row || !s->tok_pos || !s->ymap)
		goto fail;
	*out = s;
	return 0;
fail:
	ax_fwd_scratch_close(s);
	return -ENOMEM;
}

void ax_fwd_scratch_close(ax_fwd_scratch *s)
{
	if (!s)
		return;
	free(s->x), free(s->xn), free(s->q), free(s->k), free(s->v), free(s->att), free(s->gate), free(s->up);
	free(s->rowbuf), free(s->scores), free(s->tok_row), free(s->tok_pos), free(s->ymap);
	free(s);
}

/* y[t*ldy + o] = x[t] · W[o] (+ bias[o]) for t < T and the output rows o of the caller's chunk. */
typedef struct mm_job {
	const weight *w, *bias;
	const float *x;
	float *y;
	int T, ldy;
	const int *ymap; /* optional: row t of y is ymap[t] */
	float *rowbuf;
	int rowbuf_stride;
} mm_job;

/* Output row o for tokens t0..t1 of the job, from the f32 weight row wr. */
AX_INLINE void mm_row(const mm_job *j, const float *wr, int o, int t0, int t1)
{
	int n = j->w->cols;
	float b = j->bias && j->bias->p ? wat(j->bias, (size_t)o) : 0.0f;
	int t = t0;
	for (; t + 4 <= t1; t += 4) {
		float r[4];
		dot4(j->x + (size_t)t * n, (size_t)n, wr, n, r);
		for (int k = 0; k < 4; k++) {
			size_t yr = (size_t)(j->ymap ? j->ymap[t + k] : t + k);
			j->y[yr * j->ldy + o] = r[k] + b;
		}
	}
	for (; t < t1; t++) {
		size_t yr = (size_t)(j->ymap ? j->ymap[t] : t);
		j->y[yr * j->ldy + o] = dot(j->x + (size_t)t * n, wr, n) + b;
	}
}

/* Rows o0..o1 of the output, MM_RB weight rows at a time (converted once), tokens MM_TB at a time, so that the
 * rows and the token block stay in L1/L2 however many tokens the step has (prefill). */
AX_CLONES static void mm_work(void *ctx, int o0, int o1, int tid)
{
	const mm_job *j = ctx;
	float *buf = j->rowbuf + (size_t)tid * j->rowbuf_stride;
	int n = j->w->cols;
	const float *wr[MM_RB];
	for (int ob = o0; ob < o1; ob += MM_RB) {
		int nr = o1 - ob < MM_RB ? o1 - ob : MM_RB;
		for (int r = 0; r < nr; r++)
			wr[r] = wrow(j->w, ob + r, buf + (size_t)r * n);
		for (int tb = 0; tb < j->T; tb += MM_TB) {
			int te = j->T - tb < MM_TB ? j->T : tb + MM_TB;
			for (int r = 0; r < nr; r++)
				mm_row(j, wr[r], ob + r, tb, te);
		}
	}
}

static void matmul(ax_pool *pool, ax_fwd_scratch *s, const weight *w, const weight *bias, const float *x, int T,
		   float *y, int ldy, const int *ymap)
{
	mm_job j = {w, bias, x, y, T, ldy, ymap, s->rowbuf, MM_RB * s->wmax};
	if ((size_t)w->rows * w->cols * T < AX_PAR_MIN_MACS) /* a hand-off would cost more than it saves */
		mm_work(&j, 0, w->rows, 0);
	else
		ax_pool_run(pool, mm_work, &j, w->rows);
}

/* ---- forward ----------------------------------------------------------------------------------------- */

/* x[t] ← x[t] / rms(x[t]) · w, over rows of n; out may alias x. */
static void rmsnorm(float *out, const float *x, const weight *w, int rows, int n, float eps)
{
	for (int r = 0; r < rows; r++) {
		const float *xr = x + (size_t)r * n;
		float *o = out + (size_t)r * n;
		float ss = 0;
		for (int i = 0; i < n; i++)
			ss += xr[i] * xr[i];
		float inv = 1.0f / sqrtf(ss / n + eps);
		for (int i = 0; i < n; i++)
			o[i] = xr[i] * inv * wat(w, (size_t)i);
	}
}

/* HF rotate_half RoPE on one head vector of D at position pos. */
static void rope(float *v, int D, int pos, const float *inv_freq)
{
	int h = D / 2;
	for (int i = 0; i < h; i++) {
		float ang = (float)pos * inv_freq[i];
		float c = cosf(ang), s = sinf(ang);
		float a = v[i], b = v[i + h];
		v[i] = a * c - b * s;
		v[i + h] = b * c + a * s;
	}
}

typedef struct att_job {
	const ax_model *m;
	ax_kv *kv;
	ax_fwd_scratch *s;
	int layer;
} att_job;

/* Items are (token, query head) pairs. */
AX_CLONES static void att_work(void *ctx, int i0, int i1, int tid)
{
	const att_job *j = ctx;
	const ax_model_config *c = &j->m->c;
	int D = c->head_dim, Hq = c->n_heads, Hkv = c->n_kv_heads, grp = Hq / Hkv;
	const float *K = ax_kv_k(j->kv, j->layer), *V = ax_kv_v(j->kv, j->layer);
	float *sc = j->s->scores + (size_t)tid * j->s->scores_cap;
	float scale = 1.0f / sqrtf((float)D);
	for (int it = i0; it < i1; it++) {
		int t = it / Hq, h = it % Hq, kvh = h / grp;
		int pos = j->s->tok_pos[t];
		const int32_t *idx = ax_kv_index_row(j->kv, j->s->tok_row[t]);
		const float *q = j->s->q + ((size_t)t * Hq + h) * D;
		float mx = -INFINITY;
		for (int p = 0; p <= pos; p++) {
			sc[p] = dot(q, K + ((size_t)idx[p] * Hkv + kvh) * D, D) * scale;
			if (sc[p] > mx)
				mx = sc[p];
		}
		float sum = 0;
		for (int p = 0; p <= pos; p++) {
			sc[p] = expf(sc[p] - mx);
			sum += sc[p];
		}
		float *o = j->s->att + ((size_t)t * Hq + h) * D;
		memset(o, 0, (size_t)D * sizeof(float));
		float inv = 1.0f / sum;
		for (int p = 0; p <= pos; p++) {
			const float *vr = V + ((size_t)idx[p] * Hkv + kvh) * D;
			float w = sc[p] * inv;
			for (int d = 0; d < D; d++)
				o[d] += w * vr[d];
		}
	}
}

/* q/k norm, RoPE, and the K/V store into the cache slots, for all T tokens of one layer. */
static void qk_finish(const ax_model *m, const layer *L, ax_kv *kv, ax_fwd_scratch *s, int l, int T)
{
	const ax_model_config *c = &m->c;
	int D = c->head_dim, Hq = c->n_heads, Hkv = c->n_kv_heads;
	float *K = ax_kv_k(kv, l), *V = ax_kv_v(kv, l);
	for (int t = 0; t < T; t++) {
		float *q = s->q + (size_t)t * Hq * D, *k = s->k + (size_t)t * Hkv * D;
		if (L->q_norm.p) {
			rmsnorm(q, q, &L->q_norm, Hq, D, c->rms_eps);
			rmsnorm(k, k, &L->k_norm, Hkv, D, c->rms_eps);
		}
		int pos = s->tok_pos[t];
		for (int h = 0; h < Hq; h++)
			rope(q + (size_t)h * D, D, pos, m->inv_freq);
		for (int h = 0; h < Hkv; h++)
			rope(k + (size_t)h * D, D, pos, m->inv_freq);
		int32_t slot = ax_kv_index_row(kv, s->tok_row[t])[pos];
		memcpy(K + (size_t)slot * Hkv * D, k, (size_t)Hkv * D * sizeof(float));
		memcpy(V + (size_t)slot * Hkv * D, s->v + (size_t)t * Hkv * D, (size_t)Hkv * D * sizeof(float));
	}
}

static void layer_forward(const ax_model *m, ax_kv *kv, ax_pool *pool, ax_fwd_scratch *s, int l, int T,
			  ax_q_hook hook, void *hook_ctx)
{
	const ax_model_config *c = &m->c;
	const layer *L = &m->layers[l];
	int H = c->hidden, qd = c->n_heads * c->head_dim, kd = c->n_kv_heads * c->head_dim, F = c->ffn;
	rmsnorm(s->xn, s->x, &L->attn_norm, T, H, c->rms_eps);
	matmul(pool, s, &L->wq, &L->bq, s->xn, T, s->q, qd, NULL);
	matmul(pool, s, &L->wk, &L->bk, s->xn, T, s->k, kd, NULL);
	matmul(pool, s, &L->wv, &L->bv, s->xn, T, s->v, kd, NULL);
	qk_finish(m, L, kv, s, l, T);
	if (hook)
		hook(hook_ctx, l, s->q, T);
	att_job aj = {m, kv, s, l};
	size_t keys = 0;
	for (int t = 0; t < T; t++)
		keys += (size_t)s->tok_pos[t] + 1;
	if (keys * c->n_heads * c->head_dim * 2 < AX_PAR_MIN_MACS)
		att_work(&aj, 0, T * c->n_heads, 0);
	else
		ax_pool_run(pool, att_work, &aj, T * c->n_heads);
	matmul(pool, s, &L->wo, &L->bo, s->att, T, s->xn, H, NULL);
	for (size_t i = 0; i < (size_t)T * H; i++)
		s->x[i] += s->xn[i];
	rmsnorm(s->xn, s->x, &L->ffn_norm, T, H, c->rms_eps);
	matmul(pool, s, &L->gate, &L->bg, s->xn, T, s->gate, F, NULL);
	matmul(pool, s, &L->up, &L->bu, s->xn, T, s->up, F, NULL);
	for (size_t i = 0; i < (size_t)T * F; i++) {
		float g = s->gate[i];
		s->gate[i] = g / (1.0f + expf(-g)) * s->up[i];
	}
	matmul(pool, s, &L->down, &L->bd, s->gate, T, s->xn, H, NULL);
	for (size_t i = 0; i < (size_t)T * H; i++)
		s->x[i] += s->xn[i];
}

/* Lay the step out token by token; checks every token and position. Returns T or -EINVAL. */
static int layout(const ax_model *m, ax_kv *kv, ax_fwd_scratch *s, const ax_fwd_seq *seqs, int n_seqs)
{
	int T = 0;
	for (int i = 0; i < n_seqs; i++) {
		const ax_fwd_seq *q = &seqs[i];
		if (q->n <= 0 || q->pos0 < 0 || q->pos0 + q->n > s->scores_cap || T + q->n > s->max_tokens)
			return -EINVAL;
		for (int k = 0; k < q->n; k++) {
			int32_t tok = q->tokens[k];
			if (tok < 0 || tok >= m->c.vocab)
				return -EINVAL;
			if (ax_kv_index_row(kv, q->row)[q->pos0 + k] < 0)
				return -EINVAL;
			s->tok_row[T] = q->row;
			s->tok_pos[T] = q->pos0 + k;
			T++;
		}
	}
	return T;
}

int ax_model_forward(const ax_model *m, ax_kv *kv, ax_pool *pool, ax_fwd_scratch *s, const ax_fwd_seq *seqs,
		     int n_seqs, float *logits, ax_q_hook hook, void *hook_ctx)
{
	const ax_model_config *c = &m->c;
	int T = layout(m, kv, s, seqs, n_seqs);
	if (T < 0)
		return T;
	int t = 0;
	for (int i = 0; i < n_seqs; i++)
		for (int k = 0; k < seqs[i].n; k++, t++)
			memcpy(s->x + (size_t)t * c->hidden, wrow(&m->embed, seqs[i].tokens[k], s->xn),
			       (size_t)c->hidden * sizeof(float));
	for (int l = 0; l < c->n_layers; l++)
		layer_forward(m, kv, pool, s, l, T, hook, hook_ctx);
	/* Final norm only on the rows that sample, gathered into xn; their logits go to row i of `logits`. */
	int n_out = 0;
	t = 0;
	for (int i = 0; i < n_seqs; i++) {
		t += seqs[i].n;
		if (!seqs[i].want_logits)
			continue;
		rmsnorm(s->xn + (size_t)n_out * c->hidden, s->x + (size_t)(t - 1) * c->hidden, &m->norm, 1, c->hidden,
			c->rms_eps);
		s->ymap[n_out++] = i;
	}
	if (n_out && logits)
		matmul(pool, s, &m->lm_head, NULL, s->xn, n_out, logits, c->vocab, s->ymap);
	return 0;
}
