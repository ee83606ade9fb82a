/*
 * fuzz_record.c — libFuzzer target for the record decoder (proto/).
 *
 * Every input goes through ax_frame_decode; every record it delivers must then survive the encoders and read back
 * identically: ax_record_pack → ax_record_unpack → ax_record_pack gives the same bytes, and ax_record_json →
 * jansson → ax_record_from_json → ax_record_pack gives them too. A decoded record that an encoder refuses, or
 * that does not read back, is a bug (__builtin_trap). ASan/UBSan catch the rest.
 */
#include "attnx_proto.h"

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

static void same_bytes(const ax_buf *a, const ax_buf *b)
{
	if (a->len != b->len || memcmp(a->data, b->data, a->len) != 0)
		__builtin_trap();
}

static void check_json(const ax_record *r, const ax_buf *packed)
{
	ax_buf text, again;
	ax_record back;
	ax_buf_init(&text);
	ax_buf_init(&again);
	if (ax_record_json(r, &text) != 0)
		__builtin_trap();
	json_t *j = json_loadb((const char *)text.data, text.len, 0, NULL);
	if (!j || ax_record_from_json(j, &back) != 0 || ax_record_pack(&back, &again) != 0)
		__builtin_trap();
	same_bytes(packed, &again);
	ax_record_fini(&back);
	json_decref(j);
	ax_buf_fini(&again);
	ax_buf_fini(&text);
}

static int on_record(const ax_record *r, void *arg)
{
	ax_buf packed, again;
	ax_record back;
	ax_buf_init(&packed);
	ax_buf_init(&again);
	if (ax_record_pack(r, &packed) != 0 || ax_record_unpack(packed.data, packed.len, &back) != 0 ||
	    ax_record_pack(&back, &again) != 0)
		__builtin_trap();
	same_bytes(&packed, &again);
	check_json(r, &packed);
	ax_record_fini(&back);
	ax_buf_fini(&again);
	ax_buf_fini(&packed);
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	ax_record r;
	ax_frame_decode(data, size, on_record, NULL);
	/* the single-record entry point too */
	ax_record_unpack(data, size, &r);
	ax_record_fini(&r);
	return 0;
}
