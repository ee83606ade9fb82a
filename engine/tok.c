/*
 * tok.c — byte-level BPE tokenizer read from a Hugging Face tokenizer.json.
 *
 * Encoding runs the same stages as HF tokenizers for GPT-2 / Llama 3 / Qwen2 / Qwen3 files:
 *   1. added tokens are cut out first (longest match at each position; special ones only when asked);
 *   2. the pre-tokenizer chain splits each remaining span into words, stage by stage, every stage working on
 *      each piece the previous one produced: Split (the file's regex or literal string, with its behavior:
 *      Isolated, Removed, MergedWithPrevious, MergedWithNext, Contiguous; invert), Digits (SmolLM, StarCoder:
 *      \p{N} one by one or in runs), ByteLevel's GPT-2 regex when use_regex — in a Sequence or alone. Regexes
 *      are compiled with PCRE2 in UTF + UCP mode (\p{L}, \p{N}, and lookahead work as in the Rust
 *      `onig`/`fancy-regex` engines);
 *   3. each word's bytes are mapped to GPT-2's printable characters (bytes_to_unicode) and merged by BPE: the
 *      adjacent pair with the lowest merge rank is merged until none is left (ignore_merges: a word already in
 *      the vocabulary is taken whole).
 *   4. the post-processor's TemplateProcessing "single" template puts its special tokens around the sequence
 *      (Llama 3's <|begin_of_text|>) for callers that ask for it (ax_tok_encode_prompt).
 * Decoding maps each piece back through the inverse byte map. Not implemented, and refused with -ENOTSUP where a
 * file asks for it (so no text is ever tokenized differently from HF without a word): normalizers other than NFC
 * (Qwen's NFC is the identity on already-composed text), other pre-tokenizers (Metaspace, Whitespace, ...),
 * ByteLevel's add_prefix_space. Not implemented and not detected: added-token lstrip/rstrip.
 * The tables are read-only after loading, so encode/decode are thread-safe (each call has its own match data).
 */
#include "attnx_engine.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <errno.h>
#include <jansson.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define GPT2_PATTERN "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"

typedef struct smap_ent {
	char *key; /* NULL: empty */
	int32_t val;
} smap_ent;

typedef struct pmap_ent {
	uint64_t key; /* (a << 32 | b) + 1; 0: empty */
	int32_t rank, merged;
} pmap_ent;

/* HF SplitDelimiterBehavior: what a stage does with the pieces its pattern matches. */
enum split_behavior { SPLIT_ISOLATED, SPLIT_REMOVED, SPLIT_MERGED_PREV, SPLIT_MERGED_NEXT, SPLIT_CONTIGUOUS };

#define MAX_PRE 8
#define MAX_TPL 4

typedef struct pre_split {
	pcre2_code *re;
	int behavior; /* enum split_behavior */
	int invert;   /* the pattern matches the pieces, not the delimiters */
} pre_split;

typedef struct added {
	char *content;
	size_t len;
	int32_t id;
	int special;
} added;

struct ax_tok {
	char **piece;       /* [n_ids] vocabulary string by id (NULL for holes) */
	int n_ids;
	smap_ent *smap;     /* piece → id, open addressing */
	size_t smap_cap;
	pmap_ent *pmap;     /* (id_a, id_b) → rank, merged id */
	size_t pmap_cap;
	added *add;
	int n_add;
	uint8_t *is_special; /* [n_ids] */
	pre_split pre[MAX_PRE]; /* the pre-tokenizer chain, applied in order */
	int n_pre;
	int32_t tpl_pre[MAX_TPL], tpl_post[MAX_TPL]; /* TemplateProcessing "single": ids before / after $A */
	int n_tpl_pre, n_tpl_post;
	int ignore_merges;
	char byte_chr[256][3]; /* byte → UTF-8 of its mapped char (NUL-terminated, 1-2 bytes) */
	int16_t chr_byte[512];  /* mapped code point → byte, -1 if none */
	int32_t byte_id[256];   /* id of the single-byte token, -1 if none */
};

static uint64_t fnv(const char *s, size_t n)
{
	uint64_t h = 1469598103934665603ull;
	for (size_t i = 0; i < n; i++)
		h = (h ^ (uint8_t)s[i]) * 1099511628211ull;
	return h;
}

static int32_t smap_get(const ax_tok *t, const char *s, size_t n)
{
	size_t i = fnv(s, n) & (t->smap_cap - 1);
	for (; t->smap[i].key; i = (i + 1) & (t->smap_cap - 1))
		if (strlen(t->smap[i].key) == n && !memcmp(t->smap[i].key, s, n))
			return t->smap[i].val;
	return -1;
}

static void smap_put(ax_tok *t, char *key, int32_t val)
{
	size_t i = fnv(key, strlen(key)) & (t->smap_cap - 1);
	for (; t->smap[i].key; i = (i + 1) & (t->smap_cap - 1))
		if (!strcmp(t->smap[i].key, key)) {
			t->smap[i].val = val;
			return;
		}
	t->smap[i].key = key;
	t->smap[i].val = val;
}

static const pmap_ent *pmap_get(const ax_tok *t, int32_t a, int32_t b)
{
	uint64_t k = (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
	size_t i = (size_t)((k * 0x9e3779b97f4a7c15ull) >> 20) & (t->pmap_cap - 1);
	for (; t->pmap[i].key; i = (i + 1) & (t->pmap_cap - 1))
		if (t->pmap[i].key == k)
			return &t->pmap[i];
	return NULL;
}

static void pmap_put(ax_tok *t, int32_t a, int32_t b, int32_t rank, int32_t merged)
{
	uint64_t k = (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
	size_t i = (size_t)((k * 0x9e3779b97f4a7c15ull) >> 20) & (t->pmap_cap - 1);
	for (; t->pmap[i].key; i = (i + 1) & (t->pmap_cap - 1))
		if (t->pmap[i].key == k)
			return; /* first (lowest) rank wins */
	t->pmap[i] = (pmap_ent){k, rank, merged};
}

static size_t pow2_above(size_t n)
{
	size_t c = 16;
	while (c < n * 2)
		c <<= 1;
	return c;
}

/* GPT-2 bytes_to_unicode. */
static void build_byte_map(ax_tok *t)
{
	int n = 0;
	memset(t->chr_byte, 0xff, sizeof t->chr_byte);
	for (int b = 0; b < 256; b++) {
		int keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
		int cp = keep ? b : 256 + n++;
		t->chr_byte[cp] = (int16_t)b;
		if (cp < 0x80) {
			t->byte_chr[b][0] = (char)cp;
			t->byte_chr[b][1] = 0;
		} else {
			t->byte_chr[b][0] = (char)(0xc0 | (cp >> 6));
			t->byte_chr[b][1] = (char)(0x80 | (cp & 0x3f));
			t->byte_chr[b][2] = 0;
		}
	}
}

static int set_piece(ax_tok *t, int32_t id, const char *s)
{
	if (id < 0 || id >= t->n_ids)
		return -EPROTO;
	if (t->piece[id])
		return 0;
	t->piece[id] = strdup(s);
	if (!t->piece[id])
		return -ENOMEM;
	smap_put(t, t->piece[id], id);
	return 0;
}

/* The largest id in vocab and added_tokens, + 1. */
static int count_ids(json_t *vocab, json_t *add)
{
	int n = 0;
	const char *k;
	json_t *v;
	json_object_foreach(vocab, k, v) if (json_is_integer(v) && json_integer_value(v) + 1 > n) n =
		(int)json_integer_value(v) + 1;
	size_t i;
	json_array_foreach(add, i, v)
	{
		json_t *id = json_object_get(v, "id");
		if (json_is_integer(id) && json_integer_value(id) + 1 > n)
			n = (int)json_integer_value(id) + 1;
	}
	return n;
}

static int load_vocab(ax_tok *t, json_t *vocab, json_t *add)
{
	const char *k;
	json_t *v;
	int rc = 0;
	json_object_foreach(vocab, k, v)
	{
		if (!json_is_integer(v))
			return -EPROTO;
		if ((rc = set_piece(t, (int32_t)json_integer_value(v), k)))
			return rc;
	}
	size_t i;
	t->add = calloc(json_array_size(add) + 1, sizeof *t->add);
	if (!t->add)
		return -ENOMEM;
	json_array_foreach(add, i, v)
	{
		json_t *id = json_object_get(v, "id"), *c = json_object_get(v, "content");
		if (!json_is_integer(id) || !json_is_string(c) || json_string_length(c) == 0)
			return -EPROTO;
		int32_t idv = (int32_t)json_integer_value(id);
		if ((rc = set_piece(t, idv, json_string_value(c))))
			return rc;
		added *a = &t->add[t->n_add++];
		a->content = t->piece[idv];
		a->len = strlen(a->content);
		a->id = idv;
		a->special = json_is_true(json_object_get(v, "special"));
		t->is_special[idv] = (uint8_t)a->special;
	}
	return 0;
}

/* One merge: "a b" or ["a", "b"]. */
static int load_merge(ax_tok *t, json_t *m, int32_t rank)
{
	char buf[1024];
	const char *a, *b;
	if (json_is_string(m)) {
		const char *s = json_string_value(m), *sp = strchr(s, ' ');
		if (!sp || (size_t)(sp - s) >= sizeof buf)
			return -EPROTO;
		memcpy(buf, s, (size_t)(sp - s));
		buf[sp - s] = 0;
		a = buf;
		b = sp + 1;
	} else if (json_is_array(m) && json_array_size(m) == 2 && json_is_string(json_array_get(m, 0)) &&
		   json_is_string(json_array_get(m, 1))) {
		a = json_string_value(json_array_get(m, 0));
		b = json_string_value(json_array_get(m, 1));
	} else {
		return -EPROTO;
	}
	size_t la = strlen(a), lb = strlen(b);
	if (la + lb >= sizeof buf * 2)
		return -EPROTO;
	char ab[2048];
	memcpy(ab, a, la);
	memcpy(ab + la, b, lb);
	int32_t ia = smap_get(t, a, la), ib = smap_get(t, b, lb), iab = smap_get(t, ab, la + lb);
	if (ia < 0 || ib < 0 || iab < 0)
		return 0; /* a merge whose parts are not tokens can never fire */
	pmap_put(t, ia, ib, rank, iab);
	return 0;
}

static int add_stage(ax_tok *t, const char *pat, int literal, int behavior, int invert)
{
	int err;
	PCRE2_SIZE off;
	if (t->n_pre == MAX_PRE)
		return -ENOTSUP;
	/* PCRE2_LITERAL takes no UCP (nothing to classify in a literal) */
	pcre2_code *re = pcre2_compile((PCRE2_SPTR)pat, PCRE2_ZERO_TERMINATED,
				       PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP), &err, &off, NULL);
	if (!re)
		return -EPROTO;
	pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* optional speed-up; interpretive match otherwise */
	t->pre[t->n_pre++] = (pre_split){re, behavior, invert};
	return 0;
}

static int behavior_of(json_t *b)
{
	static const char *const names[] = {"Isolated", "Removed", "MergedWithPrevious", "MergedWithNext", "Contiguous"};
	if (!b)
		return SPLIT_ISOLATED;
	for (int i = 0; json_is_string(b) && i < 5; i++)
		if (!strcmp(json_string_value(b), names[i]))
			return i;
	return -1;
}

/* The pre-tokenizer (a Sequence or one stage) into t->pre. Sets *byte_level when a ByteLevel stage is there.
 * Returns 0, -EPROTO (bad regex or fields), -ENOTSUP (a stage we do not implement). */
static int load_pre(ax_tok *t, json_t *pt, int *byte_level)
{
	if (!pt || json_is_null(pt))
		return 0;
	const char *type = json_string_value(json_object_get(pt, "type"));
	if (!type)
		return -EPROTO;
	if (!strcmp(type, "Sequence")) {
		size_t i;
		json_t *e;
		int rc = 0;
		json_array_foreach(json_object_get(pt, "pretokenizers"), i, e)
		{
			if (!rc)
				rc = load_pre(t, e, byte_level);
		}
		return rc;
	}
	if (!strcmp(type, "Split")) {
		json_t *pat = json_object_get(pt, "pattern");
		json_t *re = json_object_get(pat, "Regex"), *str = json_object_get(pat, "String");
		int b = behavior_of(json_object_get(pt, "behavior"));
		if (b < 0 || (!json_is_string(re) && !json_is_string(str)))
			return b < 0 ? -ENOTSUP : -EPROTO;
		return add_stage(t, json_string_value(re ? re : str), !re, b,
				 json_is_true(json_object_get(pt, "invert")));
	}
	if (!strcmp(type, "Digits")) /* HF: is_numeric chars, one by one or in runs (= \p{N}, \p{N}+ isolated) */
		return add_stage(t, json_is_true(json_object_get(pt, "individual_digits")) ? "\\p{N}" : "\\p{N}+", 0,
				 SPLIT_ISOLATED, 0);
	if (!strcmp(type, "ByteLevel")) {
		*byte_level = 1;
		if (json_is_true(json_object_get(pt, "add_prefix_space")))
			return -ENOTSUP;
		json_t *ur = json_object_get(pt, "use_regex");
		return !ur || json_is_true(ur) ? add_stage(t, GPT2_PATTERN, 0, SPLIT_ISOLATED, 0) : 0;
	}
	return -ENOTSUP; /* Metaspace, Whitespace, Punctuation, BertPreTokenizer, ... */
}

/* Normalizers that leave the text of our families alone: none, NFC (a no-op on composed text), a Sequence of
 * those. Returns 0 or -ENOTSUP. */
static int check_normalizer(json_t *n)
{
	if (!n || json_is_null(n))
		return 0;
	const char *type = json_string_value(json_object_get(n, "type"));
	if (type && !strcmp(type, "NFC"))
		return 0;
	if (type && !strcmp(type, "Sequence")) {
		size_t i;
		json_t *e;
		json_array_foreach(json_object_get(n, "normalizers"), i, e)
		{
			if (check_normalizer(e))
				return -ENOTSUP;
		}
		return 0;
	}
	return -ENOTSUP;
}

/* Ids of one TemplateProcessing SpecialToken entry, appended to ids[*n]. */
static int template_ids(json_t *tp, json_t *st, int32_t *ids, int *n)
{
	json_t *def = json_object_get(json_object_get(tp, "special_tokens"), json_string_value(json_object_get(st, "id")));
	size_t i;
	json_t *v;
	if (!json_is_array(json_object_get(def, "ids")))
		return -EPROTO;
	json_array_foreach(json_object_get(def, "ids"), i, v)
	{
		if (!json_is_integer(v) || *n == MAX_TPL)
			return json_is_integer(v) ? -ENOTSUP : -EPROTO;
		ids[(*n)++] = (int32_t)json_integer_value(v);
	}
	return 0;
}

/* The post-processor's TemplateProcessing (alone or in a Sequence): the special ids its "single" template puts
 * before and after the sequence. Other processors (ByteLevel offsets) change no ids. */
static int load_template(ax_tok *t, json_t *pp)
{
	const char *type = json_string_value(json_object_get(pp, "type"));
	if (!type)
		return 0;
	if (!strcmp(type, "Sequence")) {
		size_t i;
		json_t *e;
		int rc = 0;
		json_array_foreach(json_object_get(pp, "processors"), i, e)
		{
			if (!rc)
				rc = load_template(t, e);
		}
		return rc;
	}
	if (strcmp(type, "TemplateProcessing"))
		return 0;
	size_t i;
	json_t *e;
	int seen_a = 0, rc = 0;
	json_array_foreach(json_object_get(pp, "single"), i, e)
	{
		json_t *st = json_object_get(e, "SpecialToken");
		if (json_object_get(e, "Sequence"))
			seen_a = 1;
		else if (st && !rc)
			rc = seen_a ? template_ids(pp, st, t->tpl_post, &t->n_tpl_post)
				    : template_ids(pp, st, t->tpl_pre, &t->n_tpl_pre);
	}
	return rc;
}

static int load_model(ax_tok *t, json_t *root)
{
	json_t *model = json_object_get(root, "model"), *add = json_object_get(root, "added_tokens");
	json_t *vocab = json_object_get(model, "vocab"), *merges = json_object_get(model, "merges");
	const char *type = json_string_value(json_object_get(model, "type"));
	if (!json_is_object(vocab) || !json_is_array(merges))
		return type && strcmp(type, "BPE") ? -ENOTSUP : -EPROTO;
	if (type && strcmp(type, "BPE"))
		return -ENOTSUP;
	t->ignore_merges = json_is_true(json_object_get(model, "ignore_merges"));
	t->n_ids = count_ids(vocab, add);
	if (t->n_ids <= 0 || t->n_ids > (1 << 24))
		return -EPROTO;
	t->piece = calloc((size_t)t->n_ids, sizeof *t->piece);
	t->is_special = calloc((size_t)t->n_ids, 1);
	t->smap_cap = pow2_above((size_t)t->n_ids);
	t->smap = calloc(t->smap_cap, sizeof *t->smap);
	t->pmap_cap = pow2_above(json_array_size(merges) + 1);
	t->pmap = calloc(t->pmap_cap, sizeof *t->pmap);
	if (!t->piece || !t->is_special || !t->smap || !t->pmap)
		return -ENOMEM;
	int rc = load_vocab(t, vocab, json_is_array(add) ? add : NULL);
	size_t i;
	json_t *m;
	json_array_foreach(merges, i, m)
	{
		if (rc)
			break;
		rc = load_merge(t, m, (int32_t)i);
	}
	if (rc)
		return rc;
	for (int b = 0; b < 256; b++)
		t->byte_id[b] = smap_get(t, t->byte_chr[b], strlen(t->byte_chr[b]));
	int byte_level = 0;
	const char *dec = json_string_value(json_object_get(json_object_get(root, "decoder"), "type"));
	if ((rc = load_pre(t, json_object_get(root, "pre_tokenizer"), &byte_level)) ||
	    (rc = check_normalizer(json_object_get(root, "normalizer"))) ||
	    (rc = load_template(t, json_object_get(root, "post_processor"))))
		return rc;
	/* SentencePiece-style BPE (Metaspace, byte_fallback) is not byte-level: refuse rather than mis-tokenize */
	return byte_level || (dec && !strcmp(dec, "ByteLevel")) ? 0 : -ENOTSUP;
}

int ax_tok_open_mem(ax_tok **out, const char *json, size_t len)
{
	ax_tok *t = calloc(1, sizeof *t);
	if (!t)
		return -ENOMEM;
	build_byte_map(t);
	json_error_t err;
	json_t *root = json_loadb(json, len, 0, &err);
	int rc = json_is_object(root) ? load_model(t, root) : -EPROTO;
	json_decref(root);
	if (rc) {
		ax_tok_close(t);
		return rc;
	}
	*out = t;
	return 0;
}

int ax_tok_open(ax_tok **out, const char *path)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return -errno;
	char *buf = NULL;
	size_t cap = 0, len = 0, n;
	int rc = 0;
	do {
		if (len + 65536 > cap) {
			char *nb = realloc(buf, cap = cap * 2 + 65536);
			if (!nb) {
				rc = -ENOMEM;
				break;
			}
			buf = nb;
		}
		n = fread(buf + len, 1, cap - len, f);
		len += n;
	} while (n > 0);
	fclose(f);
	if (!rc)
		rc = ax_tok_open_mem(out, buf, len);
	free(buf);
	return rc;
}

void ax_tok_close(ax_tok *t)
{
	if (!t)
		return;
	for (int i = 0; t->piece && i < t->n_ids; i++)
		free(t->piece[i]);
	free(t->piece);
	free(t->smap);
	free(t->pmap);
	free(t->add);
	free(t->is_special);
	for (int i = 0; i < t->n_pre; i++)
		pcre2_code_free(t->pre[i].re);
	free(t);
}

int ax_tok_vocab_size(const ax_tok *t) { return t->n_ids; }
const char *ax_tok_piece(const ax_tok *t, int32_t id) { return id >= 0 && id < t->n_ids ? t->piece[id] : NULL; }
int ax_tok_is_special(const ax_tok *t, int32_t id) { return id >= 0 && id < t->n_ids && t->is_special[id]; }

int ax_tok_find(const ax_tok *t, const char *piece)
{
	int32_t id = smap_get(t, piece, strlen(piece));
	return id >= 0 ? id : -ENOENT;
}

/* ---- encode ------------------------------------------------------------------------------------------ */

typedef struct ids_buf {
	int32_t *v;
	size_t n, cap;
} ids_buf;

static int push(ids_buf *b, int32_t id)
{
	if (b->n == b->cap) {
		size_t nc = b->cap ? b->cap * 2 : 64;
		int32_t *nv = realloc(b->v, nc * sizeof *nv);
		if (!nv)
			return -ENOMEM;
		b->v = nv;
		b->cap = nc;
	}
	b->v[b->n++] = id;
	return 0;
}

/* BPE over one word's bytes. sym is scratch of len ids. */
static int bpe_word(const ax_tok *t, const char *w, size_t len, ids_buf *out)
{
	if (t->ignore_merges) {
		char mapped[1024];
		size_t ml = 0;
		for (size_t i = 0; i < len && ml + 3 < sizeof mapped; i++) {
			size_t cl = strlen(t->byte_chr[(uint8_t)w[i]]);
			memcpy(mapped + ml, t->byte_chr[(uint8_t)w[i]], cl);
			ml += cl;
		}
		int32_t id = len * 2 < sizeof mapped ? smap_get(t, mapped, ml) : -1;
		if (id >= 0)
			return push(out, id);
	}
	int32_t stack_sym[256], *sym = len <= 256 ? stack_sym : malloc(len * sizeof *sym);
	if (!sym)
		return -ENOMEM;
	size_t n = 0;
	for (size_t i = 0; i < len; i++) {
		int32_t id = t->byte_id[(uint8_t)w[i]];
		if (id >= 0)
			sym[n++] = id; /* a byte with no token is dropped, as a BPE without byte_fallback does */
	}
	for (;;) {
		int32_t best = INT32_MAX, merged = -1;
		size_t at = 0;
		for (size_t i = 0; i + 1 < n; i++) {
			const pmap_ent *e = pmap_get(t, sym[i], sym[i + 1]);
			if (e && e->rank < best) {
				best = e->rank;
				merged = e->merged;
				at = i;
			}
		}
		if (merged < 0)
			break;
		/* Merge every non-overlapping occurrence of that pair, left to right. */
		int32_t a = sym[at], b = sym[at + 1];
		size_t o = 0;
		for (size_t i = 0; i < n;) {
			if (i + 1 < n && sym[i] == a && sym[i + 1] == b) {
				sym[o++] = merged;
				i += 2;
			} else {
				sym[o++] = sym[i++];
			}
		}
		n = o;
	}
	int rc = 0;
	for (size_t i = 0; i < n && !rc; i++)
		rc = push(out, sym[i]);
	if (sym != stack_sym)
		free(sym);
	return rc;
}

static int pre_stage(const ax_tok *t, int k, const char *s, size_t len, pcre2_match_data **md, ids_buf *out);

/* One stage's walk over a span: segments (gaps and matches, in order) go through the stage's behavior; `pend`
 * holds a piece that may still merge with the next segment. Pieces go on to stage k + 1. */
typedef struct split_walk {
	const ax_tok *t;
	int k;
	const char *s;
	pcre2_match_data **md;
	ids_buf *out;
	size_t a, b;  /* pending piece [a, b) */
	int has;      /* a piece is pending */
	int prev_m;   /* the previous segment was a match */
} split_walk;

static int emit(split_walk *w, size_t a, size_t b)
{
	return b > a ? pre_stage(w->t, w->k + 1, w->s + a, b - a, w->md, w->out) : 0;
}

static int flush(split_walk *w)
{
	int rc = w->has ? emit(w, w->a, w->b) : 0;
	w->has = 0;
	return rc;
}

static int hold(split_walk *w, size_t a, size_t b)
{
	int rc = flush(w);
	w->a = a, w->b = b, w->has = 1;
	return rc;
}

/* Segment [a, b), a pattern match when m: as HF's SplitDelimiterBehavior treats it. */
static int segment(split_walk *w, size_t a, size_t b, int m)
{
	const pre_split *p = &w->t->pre[w->k];
	int rc = 0;
	m ^= p->invert;
	switch (p->behavior) {
	case SPLIT_REMOVED:
		rc = m ? 0 : emit(w, a, b);
		break;
	case SPLIT_ISOLATED:
		rc = emit(w, a, b);
		break;
	case SPLIT_MERGED_PREV: /* a match joins the gap before it */
		if (m && !w->prev_m && w->has)
			w->b = b;
		else
			rc = hold(w, a, b);
		break;
	case SPLIT_MERGED_NEXT: /* a match joins the gap after it */
		if (w->has && !m) {
			rc = emit(w, w->a, b);
			w->has = 0;
		} else {
			rc = flush(w);
			if (!rc)
				rc = m ? hold(w, a, b) : emit(w, a, b);
		}
		break;
	default: /* SPLIT_CONTIGUOUS: runs of matches (and of gaps) become one piece */
		if (w->has && m == w->prev_m)
			w->b = b;
		else
			rc = hold(w, a, b);
	}
	w->prev_m = m;
	return rc;
}

/* Stage k of the pre-tokenizer over s[0, len) (no added tokens in it); past the last stage, BPE. Empty matches
 * (no pattern of our families has one) are skipped (PCRE2_NOTEMPTY): they would only make empty pieces. */
static int pre_stage(const ax_tok *t, int k, const char *s, size_t len, pcre2_match_data **md, ids_buf *out)
{
	if (k == t->n_pre)
		return len ? bpe_word(t, s, len, out) : 0;
	split_walk w = {t, k, s, md, out, 0, 0, 0, 0};
	size_t pos = 0;
	int rc = 0;
	while (pos < len && !rc) {
		if (pcre2_match(t->pre[k].re, (PCRE2_SPTR)s, len, pos, PCRE2_NO_UTF_CHECK | PCRE2_NOTEMPTY, md[k], NULL) < 0)
			break; /* no more matches: the rest is one gap */
		PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md[k]);
		if (ov[0] > pos)
			rc = segment(&w, pos, ov[0], 0);
		if (!rc)
			rc = segment(&w, ov[0], ov[1], 1);
		pos = ov[1];
	}
	if (!rc && pos < len)
		rc = segment(&w, pos, len, 0);
	return rc ? rc : flush(&w);
}

/* Longest added token starting at s, or NULL. */
static const added *match_added(const ax_tok *t, const char *s, size_t left, int parse_special)
{
	const added *best = NULL;
	for (int i = 0; i < t->n_add; i++) {
		const added *a = &t->add[i];
		if (a->special && !parse_special)
			continue;
		if (a->len <= left && (!best || a->len > best->len) && !memcmp(s, a->content, a->len))
			best = a;
	}
	return best;
}

/* PCRE2 with NO_UTF_CHECK needs valid UTF-8: 0, or -EILSEQ for invalid input. */
static int check_utf8(const ax_tok *t, const char *text, size_t len)
{
	if (!t->n_pre || !len)
		return 0;
	pcre2_match_data *probe = pcre2_match_data_create(1, NULL);
	if (!probe)
		return -ENOMEM;
	int m = pcre2_match(t->pre[0].re, (PCRE2_SPTR)text, len, 0, 0, probe, NULL);
	pcre2_match_data_free(probe);
	return m <= PCRE2_ERROR_UTF8_ERR1 && m >= PCRE2_ERROR_UTF8_ERR21 ? -EILSEQ : 0;
}

/* Encode text into out (appending). */
static int encode_into(const ax_tok *t, const char *text, size_t len, int parse_special, ids_buf *out)
{
	pcre2_match_data *md[MAX_PRE] = {0};
	int rc = check_utf8(t, text, len);
	for (int k = 0; k < t->n_pre && !rc; k++)
		if (!(md[k] = pcre2_match_data_create_from_pattern(t->pre[k].re, NULL)))
			rc = -ENOMEM;
	size_t start = 0, i = 0;
	while (i < len && !rc) {
		const added *a = t->n_add ? match_added(t, text + i, len - i, parse_special) : NULL;
		if (!a) {
			i++;
			continue;
		}
		rc = pre_stage(t, 0, text + start, i - start, md, out);
		if (!rc)
			rc = push(out, a->id);
		i += a->len;
		start = i;
	}
	if (!rc)
		rc = pre_stage(t, 0, text + start, len - start, md, out);
	for (int k = 0; k < t->n_pre; k++)
		pcre2_match_data_free(md[k]);
	return rc;
}

/* The ids of out, handed to the caller (an empty result is still a malloc'd pointer). */
static int finish(ids_buf *out, int rc, int32_t **ids)
{
	if (!rc && !out->v && !(out->v = malloc(sizeof(int32_t))))
		rc = -ENOMEM;
	if (rc) {
		free(out->v);
		return rc;
	}
	*ids = out->v;
	return (int)out->n;
}

int ax_tok_encode(const ax_tok *t, const char *text, size_t len, int parse_special, int32_t **ids)
{
	ids_buf out = {0};
	*ids = NULL;
	return finish(&out, encode_into(t, text, len, parse_special, &out), ids);
}

int ax_tok_encode_prompt(const ax_tok *t, const char *text, size_t len, int32_t **ids)
{
	ids_buf out = {0};
	int rc = 0;
	*ids = NULL;
	for (int i = 0; i < t->n_tpl_pre && !rc; i++)
		rc = push(&out, t->tpl_pre[i]);
	if (!rc)
		rc = encode_into(t, text, len, 1, &out);
	for (int i = 0; i < t->n_tpl_post && !rc; i++)
		rc = push(&out, t->tpl_post[i]);
	return finish(&out, rc, ids);
}

/* ---- decode ------------------------------------------------------------------------------------------ */

/* Append the bytes of one piece (inverse byte map; characters outside the map are copied as UTF-8). */
static size_t unmap_piece(const ax_tok *t, const char *p, char *buf, size_t cap)
{
	size_t n = 0;
	for (const uint8_t *s = (const uint8_t *)p; *s;) {
		uint32_t cp;
		int cl;
		if (*s < 0x80) {
			cp = *s, cl = 1;
		} else if ((*s & 0xe0) == 0xc0 && s[1]) {
			cp = ((uint32_t)(*s & 0x1f) << 6) | (s[1] & 0x3f), cl = 2;
		} else {
			cp = 0x7fffffff;
			cl = (*s & 0xf0) == 0xe0 ? 3 : (*s & 0xf8) == 0xf0 ? 4 : 1;
		}
		if (cp < 512 && t->chr_byte[cp] >= 0) {
			if (n < cap)
				buf[n] = (char)t->chr_byte[cp];
			n++;
		} else {
			for (int k = 0; k < cl && s[k]; k++, n++)
				if (n < cap)
					buf[n] = (char)s[k];
		}
		for (int k = 0; k < cl && *s; k++)
			s++;
	}
	return n;
}

int ax_tok_token_bytes(const ax_tok *t, int32_t id, char *buf, size_t cap)
{
	const char *p = ax_tok_piece(t, id);
	if (!p)
		return -EINVAL;
	for (int i = 0; i < t->n_add; i++)
		if (t->add[i].id == id) {
			size_t n = t->add[i].len;
			memcpy(buf, p, n < cap ? n : cap);
			return (int)n;
		}
	return (int)unmap_piece(t, p, buf, cap);
}

int ax_tok_decode(const ax_tok *t, const int32_t *ids, size_t n, int skip_special, char **out)
{
	size_t cap = 64, len = 0;
	char *buf = malloc(cap);
	if (!buf)
		return -ENOMEM;
	for (size_t i = 0; i < n; i++) {
		if (skip_special && ax_tok_is_special(t, ids[i]))
			continue;
		int k = ax_tok_token_bytes(t, ids[i], buf + len, cap - len - 1);
		if (k < 0) {
			free(buf);
			return -EINVAL;
		}
		if (len + (size_t)k + 1 > cap) {
			while (len + (size_t)k + 1 > cap)
				cap *= 2;
			char *nb = realloc(buf, cap);
			if (!nb) {
				free(buf);
				return -ENOMEM;
			}
			buf = nb;
			ax_tok_token_bytes(t, ids[i], buf + len, cap - len - 1);
		}
		len += (size_t)k;
	}
	buf[len] = 0;
	*out = buf;
	return (int)len;
}
