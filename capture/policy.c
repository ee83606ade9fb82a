/*
 * policy.c — the rid → policy table: a chained hash table (FNV-1a of the rid) with per-entry expiry.
 *
 * A capture sees at most a few thousand live requests, so a fixed bucket array sized for that and heap entries
 * are enough; expiry is a sweep the capture loop runs every few hundred milliseconds.
 */
#include "policy.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define NBUCKETS 1024u
#define DEFAULT_TTL_MS 60000u

static uint32_t hash_rid(const char *s)
{
	uint32_t h = 2166136261u;
	for (; *s; s++)
		h = (h ^ (uint8_t)*s) * 16777619u;
	return h;
}

static uint64_t ttl_ns(const ax_rec_policy *p)
{
	return (p->ttl_ms ? p->ttl_ms : DEFAULT_TTL_MS) * 1000000ull;
}

int ax__policy_init(ax__policy_table *t)
{
	memset(t, 0, sizeof *t);
	t->buckets = calloc(NBUCKETS, sizeof *t->buckets);
	if (t->buckets == NULL)
		return -ENOMEM;
	t->nbuckets = NBUCKETS;
	return 0;
}

void ax__policy_fini(ax__policy_table *t)
{
	for (uint32_t i = 0; i < t->nbuckets; i++) {
		ax__policy_entry *e = t->buckets[i];
		while (e) {
			ax__policy_entry *n = e->next;
			free(e);
			e = n;
		}
	}
	free(t->buckets);
	memset(t, 0, sizeof *t);
}

/* The link that points at rid's entry (or at the NULL ending its chain). */
static ax__policy_entry **find_link(const ax__policy_table *t, const char *rid)
{
	ax__policy_entry **link = &t->buckets[hash_rid(rid) & (t->nbuckets - 1)];
	while (*link && strcmp((*link)->rid, rid) != 0)
		link = &(*link)->next;
	return link;
}

/* The entry of rid, created (zeroed) if absent; *added says which. NULL with *err on failure. */
static ax__policy_entry *get_or_add(ax__policy_table *t, const char *rid, int *added, int *err)
{
	*added = 0;
	if (rid == NULL || rid[0] == '\0' || strlen(rid) >= AX_PROTO_STR) {
		*err = -EINVAL;
		return NULL;
	}
	ax__policy_entry **link = find_link(t, rid);
	if (*link != NULL)
		return *link;
	if (t->count >= AX_POLICY_MAX_ENTRIES) {
		*err = -ENOSPC;
		return NULL;
	}
	ax__policy_entry *e = calloc(1, sizeof *e);
	if (e == NULL) {
		*err = -ENOMEM;
		return NULL;
	}
	memcpy(e->rid, rid, strlen(rid) + 1);
	*link = e;
	t->count++;
	*added = 1;
	return e;
}

int ax__policy_put(ax__policy_table *t, const char *rid, const ax_rec_policy *p, uint64_t now_ns)
{
	int added, err = 0;
	ax__policy_entry *e = get_or_add(t, rid, &added, &err);
	if (e == NULL)
		return err;
	if (e->ended)
		return -EALREADY;
	e->p = *p;
	e->version = ++t->version;
	e->expires_ns = now_ns + ttl_ns(p);
	return added;
}

const ax__policy_entry *ax__policy_get(ax__policy_table *t, const char *rid, uint64_t now_ns)
{
	if (t->buckets == NULL || rid == NULL || rid[0] == '\0')
		return NULL;
	ax__policy_entry *e = *find_link(t, rid);
	if (e == NULL || e->ended || e->expires_ns <= now_ns)
		return NULL;
	e->expires_ns = now_ns + ttl_ns(&e->p);
	return e;
}

void ax__policy_remove(ax__policy_table *t, const char *rid)
{
	if (t->buckets == NULL || rid == NULL)
		return;
	ax__policy_entry **link = find_link(t, rid);
	ax__policy_entry *e = *link;
	if (e == NULL)
		return;
	*link = e->next;
	free(e);
	t->count--;
	t->version++;
}

int ax__policy_end(ax__policy_table *t, const char *rid, uint64_t now_ns)
{
	int added, err = 0;
	ax__policy_entry *e = get_or_add(t, rid, &added, &err);
	if (e == NULL)
		return err;
	e->ended = 1;
	e->version = ++t->version;
	e->expires_ns = now_ns + AX_POLICY_ENDED_MS * 1000000ull;
	return 0;
}

uint32_t ax__policy_expire(ax__policy_table *t, uint64_t now_ns)
{
	uint32_t dropped = 0;
	for (uint32_t i = 0; i < t->nbuckets; i++) {
		ax__policy_entry **link = &t->buckets[i];
		while (*link) {
			ax__policy_entry *e = *link;
			if (e->expires_ns <= now_ns) {
				*link = e->next;
				free(e);
				t->count--;
				dropped++;
			} else {
				link = &e->next;
			}
		}
	}
	if (dropped)
		t->version++;
	return dropped;
}

void ax__policy_foreach(const ax__policy_table *t, void (*fn)(const ax__policy_entry *e, void *arg), void *arg)
{
	for (uint32_t i = 0; i < t->nbuckets; i++)
		for (const ax__policy_entry *e = t->buckets[i]; e; e = e->next)
			fn(e, arg);
}
