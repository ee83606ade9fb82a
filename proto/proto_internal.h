/*
 * proto_internal.h — what the proto files share and nobody else sees.
 *
 * One schema, two directions, three representations. Encoding walks a record once through an emitter (a small
 * table of "write a map / key / number / string / array" callbacks): pack.c plugs in msgpack_packer, json.c a JSON
 * text writer, so the two outputs cannot disagree on names or on which fields are present. Decoding turns each
 * value into an ax__val (a scalar, or an array/map with accessors) — unpack.c from the msgpack bytes (a cursor),
 * json.c from json_t — and fields.c applies them to the record, checks required fields, then ax_record_validate runs.
 */
#ifndef ATTNX_PROTO_INTERNAL_H
#define ATTNX_PROTO_INTERNAL_H

#include "attnx_proto.h"

#include <stdbool.h>

/* ---- encoding ---- */
typedef struct ax__emitter {
	int (*map)(void *ctx, uint32_t n);        /* begin a map of n pairs */
	int (*array)(void *ctx, uint32_t n);      /* begin an array of n values */
	int (*end)(void *ctx);                    /* close the innermost map or array */
	int (*key)(void *ctx, const char *k, size_t n);
	int (*u64)(void *ctx, uint64_t v);
	int (*i64)(void *ctx, int64_t v);
	int (*f32)(void *ctx, float v);
	int (*f64)(void *ctx, double v);
	int (*str)(void *ctx, const char *s);
} ax__emitter;

/* Emit a record that passed ax_record_validate. Returns 0 or the first non-zero emitter result. */
int ax__record_emit(const ax_record *r, const ax__emitter *e, void *ctx);

/* ---- decoding ---- */
enum ax__vkind { AX_V_UINT, AX_V_INT, AX_V_FLOAT, AX_V_STR, AX_V_ARRAY, AX_V_MAP, AX_V_OTHER };

typedef struct ax__val ax__val;
typedef int (*ax__kv_fn)(const ax__val *k, ax__val *v, void *arg);
struct ax__val {
	int kind;          /* enum ax__vkind; AX_V_INT only for negative integers */
	uint64_t u;        /* AX_V_UINT */
	int64_t i;         /* AX_V_INT */
	double f;          /* AX_V_FLOAT */
	const char *s;     /* AX_V_STR: not NUL-terminated */
	size_t n;          /* AX_V_STR bytes, AX_V_ARRAY / AX_V_MAP entries */
	const void *obj;   /* the representation's own object (json_t *; msgpack: the first entry's bytes) */
	const void *end;   /* msgpack: end of the bytes the value lies in (bounds every read) */
	size_t idx;        /* entries (arrays) / pairs (maps) consumed so far by next() / each() */
	/* AX_V_ARRAY: the next element (at most n times, in order). The array value itself is the iterator, so the
	 * msgpack reader knows where a fully read array ends. An element that cannot be read comes back AX_V_OTHER. */
	void (*next)(ax__val *arr, ax__val *out);
	/* AX_V_MAP: fn for every pair, stopping at fn's first non-zero (returned). fn may iterate the value. */
	int (*each)(ax__val *map, ax__kv_fn fn, void *arg);
	/* AX_V_ARRAY, optional (NULL in JSON): all n elements at once when every one is a float32 (f32s) or a
	 * non-negative integer below 2^32 (u32s, into int64_t): 1, the array consumed; else 0, nothing consumed
	 * (iterate with next). The common top-k arrays in one loop instead of a call per element. */
	int (*f32s)(ax__val *arr, float *out);
	int (*u32s)(ax__val *arr, int64_t *out);
};

/* Every key the schema knows (fields.c maps names to these). */
enum ax__field {
	AX__F_T,
	AX__F_V,
	AX__F_SRC,
	AX__F_SEQ,
	AX__F_TS,
	AX__F_RID,
	AX__F_POSITION,
	AX__F_DECODE_STEP,
	AX__F_TOKEN_ID,
	AX__F_LAYER_ID,
	AX__F_MODE,
	AX__F_HEAD_ID,
	AX__F_TOKEN_POSITIONS,
	AX__F_TOPK_LOGITS,
	AX__F_ATTENTION_SCORES,
	AX__F_LOGSUMEXP_ALL,
	AX__F_TOPK_MASS,
	AX__F_PREFILL,
	AX__F_PROMPT,
	AX__F_PROMPT_LEN,
	AX__F_REASON,
	AX__F_TOKENS,
	AX__F_WHAT,
	AX__F_COUNT,
	AX__F_FROM_SEQ,
	AX__F_TO_SEQ,
	AX__F_COUNTERS,
	AX__F_TOP_K,
	AX__F_STRIDE,
	AX__F_MAX_TOKENS,
	AX__F_LAYERS,
	AX__F_HEADS,
	AX__F_TTL_MS,
	AX__F_ENGINE,
	AX__F_MODEL,
	AX__F_BACKEND,
	AX__F_RANK,
	AX__F_WORLD_SIZE,
	AX__F_N_LAYERS,
	AX__F_N_Q_HEADS,
	AX__F_N_KV_HEADS,
	AX__F_HEAD_OFFSET,
	AX__F_HEAD_DIM,
	AX__F_GENERATION
};

/* Decoder state for one record (fields.c). */
typedef struct ax__dec {
	ax_record *r;
	uint64_t seen;
	uint32_t n_pos, n_logits, n_scores; /* top-k array lengths as found */
	uint64_t prompt_len;                 /* prompt_len as found */
} ax__dec;
/* One record, field by field, for a reader that already knows which field a key is (unpack.c's canonical attn
 * path): begin (clears *r, sets its type), then ax__dec_field for every pair in map order (0, -EPROTO, -ENOMEM;
 * the value may be iterated), then finish (required fields, cross-field rules, ax_record_validate: 0 / -EPROTO). */
void ax__dec_begin(ax__dec *d, ax_record *r, int type);
int ax__dec_field(ax__dec *d, int f, ax__val *v);
int ax__dec_finish(ax__dec *d);

/* Decode one map into *r. `find` looks one key up (1 found, 0 not; used for `t`, which may come anywhere).
 * Returns 0, -EPROTO or -ENOMEM; *r may hold an allocated prompt either way: the caller runs ax_record_fini. */
int ax__record_from_map(ax__val *map, int (*find)(const ax__val *, const char *, ax__val *), ax_record *r);

/* Structural check of one msgpack object at data[0..len): well-formed, complete, containers no longer than the
 * bytes left, nesting ≤ AX__MAX_DEPTH. Sets *end (bytes used). 0 or -EBADMSG. Allocates nothing. */
#define AX__MAX_DEPTH 16
int ax__mp_scan(const uint8_t *data, size_t len, size_t *end);
/* What a msgpack head byte says: ≥ 0, a scalar with that many payload bytes after the head (fixint 0, fixstr its
 * length, float32 4, ...); else one of these. */
enum { AX__H_FIXMAP = -1, AX__H_FIXARRAY = -2, AX__H_VAR = -3, AX__H_BIG = -4, AX__H_BAD = -5 };
extern const int8_t ax__mp_head[256] __attribute__((visibility("hidden")));
/* Skip n msgpack values starting at p (bounded by end): the first byte after them, or NULL if they do not fit. */
const uint8_t *ax__mp_skip(const uint8_t *p, const uint8_t *end, uint64_t n);

/* The previous msgpack-c based decoder (unpack_mpc.c): only the differential test links it. */
int ax__frame_decode_mpc(const void *data, size_t len, ax_record_cb cb, void *arg);
int ax__record_unpack_mpc(const void *data, size_t len, ax_record *r);

/* ax_record_json through the emitter for every type (attn included; ax_record_json writes attn directly). The
 * record must be valid. 0 or -ENOMEM. For the test that the two agree. */
int ax__record_json_emit(const ax_record *r, ax_buf *out);

/* ---- numbers as text (fmt.c) ---- */
/* Shortest decimal text that reads back as exactly v (float32: strtod, then a cast to float), in %g style with
 * precision max(digits, 6) (f32) / max(digits, 15) (f64); -0 as "-0.0". v finite. The text is at most 32 bytes,
 * no NUL, and the length is returned; out must have AX__FMT_ROOM bytes (the rest is scratch). Thread-safe (a
 * table is built once, on first use). */
#define AX__FMT_ROOM 64
size_t ax__fmt_f32(float v, char *out);
size_t ax__fmt_f64(double v, char *out);
/* Decimal integers: at most 20 bytes, no NUL; returns the length. out: AX__FMT_ROOM bytes, like above. */
size_t ax__fmt_u64(uint64_t v, char *out);
size_t ax__fmt_i64(int64_t v, char *out);

/* UTF-8 check of a NUL-terminated string of at most `cap` bytes including the NUL: 1 valid. */
bool ax__str_ok(const char *s, size_t cap, bool nonempty);

#endif
