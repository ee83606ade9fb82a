/*
 * chat.c — chat templates, rendered in C (no Jinja interpreter).
 *
 * Two styles cover the families the engine loads: ChatML (Qwen2/Qwen3, SmolLM, and the model we train:
 * "<|im_start|>role\ncontent<|im_end|>\n" per message, then "<|im_start|>assistant\n"; with thinking disabled,
 * Qwen3 appends an empty "<think>\n\n</think>\n\n" block so the model answers at once) and Llama 3
 * ("<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>"). The style is chosen by which special
 * tokens the tokenizer has. The rendered prompt is tokenized with special tokens parsed.
 */
#include "attnx_engine.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int ax_chat_style_for(const ax_tok *t)
{
	return ax_tok_find(t, "<|start_header_id|>") >= 0 ? AX_CHAT_LLAMA3 : AX_CHAT_CHATML;
}

static int known_role(const char *r)
{
	static const char *roles[] = {"system", "user", "assistant", "tool", "developer"};
	for (size_t i = 0; i < sizeof roles / sizeof roles[0]; i++)
		if (!strcmp(r, roles[i]))
			return 1;
	return 0;
}

int ax_chat_render(int style, const ax_chat_msg *msgs, size_t n, int add_generation_prompt, int enable_thinking,
		   char **out)
{
	char *buf = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);
	if (!f)
		return -ENOMEM;
	int rc = 0;
	if (style == AX_CHAT_LLAMA3)
		fputs("<|begin_of_text|>", f);
	for (size_t i = 0; i < n; i++) {
		if (!msgs[i].role || !known_role(msgs[i].role) || !msgs[i].content) {
			rc = -EINVAL;
			break;
		}
		const char *role = strcmp(msgs[i].role, "developer") ? msgs[i].role : "system";
		if (style == AX_CHAT_LLAMA3)
			fprintf(f, "<|start_header_id|>%s<|end_header_id|>\n\n%s<|eot_id|>", role, msgs[i].content);
		else
			fprintf(f, "<|im_start|>%s\n%s<|im_end|>\n", role, msgs[i].content);
	}
	if (!rc && add_generation_prompt) {
		if (style == AX_CHAT_LLAMA3)
			fputs("<|start_header_id|>assistant<|end_header_id|>\n\n", f);
		else
			fputs(enable_thinking ? "<|im_start|>assistant\n" : "<|im_start|>assistant\n<think>\n\n</think>\n\n",
			      f);
	}
	if (fclose(f) != 0 && !rc)
		rc = -ENOMEM;
	if (rc) {
		free(buf);
		return rc;
	}
	*out = buf;
	return (int)len;
}
