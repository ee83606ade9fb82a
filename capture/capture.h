/*
 * capture.h — attnx-capture as a library: options, the capture loop, and its counters.
 *
 * The daemon (main.c) is a thin shell around this API so tests can run the same loop in a thread and stop it.
 * One ax_capture owns: the shm attachment to one engine segment (re-attached when the engine restarts), a pool of
 * worker threads running exact top-k attention jobs (attn.h), an ordered output queue (records of a request leave
 * in position order, `end` after its last `attn`), the record sender (nng PUSH, non-blocking, batched, loss
 * reported as `gap` records) and the policy subscriber (nng SUB; per-request policies from the relay, each new one
 * acknowledged on the records channel once the segment's wanted layers include what it asks for).
 *
 * Lifecycle: ax_capture_opts_default → (ax_capture_opts_parse) → ax_capture_open → ax_capture_run (blocks until
 * ax_capture_stop) → ax_capture_close. Nothing here exits the process: errors are negative errnos.
 */
#ifndef ATTNX_CAPTURE_H
#define ATTNX_CAPTURE_H

#include <stdint.h>
#include <stdio.h>

#include "attnx_proto.h"
#include "attnx_shm.h"

#ifdef __cplusplus
extern "C" {
#endif

#define AX_CAPTURE_DEFAULT_RECORDS "ipc:///tmp/attnx-records.sock"
#define AX_CAPTURE_DEFAULT_POLICY "ipc:///tmp/attnx-policy.sock"
#define AX_CAPTURE_ADDR_MAX 256

enum ax_backend { AX_BACKEND_AUTO = 0, AX_BACKEND_CPU = 1, AX_BACKEND_CUDA = 2 };

/* How the default layer set is chosen (resolved once the segment's layer count L is known). */
enum ax_layer_sel {
	AX_LAYERS_LAST = 0, /* L-1 */
	AX_LAYERS_AUTO = 1, /* L/4, L/2, 3L/4, L-1 */
	AX_LAYERS_ALL = 2,  /* 0..L-1 */
	AX_LAYERS_LIST = 3, /* layer_ids; negative ids count from the end (-1 = L-1) */
};

typedef struct ax_capture_opts {
	char shm_name[AX_SHM_NAME_MAX];  /* segment name, rank suffix already applied ("/attnx.engine.1") */
	int32_t rank;                    /* --rank, -1 when not given */
	int backend;                     /* enum ax_backend */
	int32_t device;                  /* --device: CUDA device ordinal, -1 = the Q ring's device if present, else 0 */
	uint32_t top_k;                  /* default top-k, 1..AX_PROTO_MAX_TOPK */
	int layer_sel;                   /* enum ax_layer_sel */
	uint32_t n_layer_ids;            /* AX_LAYERS_LIST entries */
	int32_t layer_ids[AX_PROTO_MAX_LIST];
	uint32_t mode;                   /* default enum ax_mode */
	uint32_t n_head_ids;             /* heads mode: global head ids to report, 0 = all */
	int32_t head_ids[AX_PROTO_MAX_LIST];
	uint32_t stride;                 /* capture every Nth generated position (≥ 1) */
	uint32_t max_tokens;             /* generated positions captured per request (0 = unlimited) */
	int prefill;                     /* 1 = capture every prefill row, not only the last one */
	uint32_t threads;                /* worker threads (≥ 1) */
	char records_addr[AX_CAPTURE_ADDR_MAX]; /* nng PUSH dial address */
	char policy_addr[AX_CAPTURE_ADDR_MAX];  /* nng SUB dial address ("" = no policy subscriber) */
	char src[AX_PROTO_STR];          /* source id; "" = capture:<hostname>:<pid>:<rank> */
	uint32_t stats_interval_ms;      /* stats record period (0 = none) */
	int log_level;                   /* AX_LOG_* */
	/* tuning, not on the command line except where noted (tests shorten them) */
	uint32_t max_pending_frames;     /* frames kept while the relay cannot take them (≥ 2; default 64) */
	uint32_t pending_max_ms;         /* oldest pending frame age before it is dropped (default 2000) */
	uint32_t attach_retry_ms;        /* attach retry period (default 100) */
	uint32_t dead_after_ms;          /* engine heartbeat silence that counts as a restart (default 2000) */
	uint32_t queue_cap;              /* ordered output queue entries (default 2048) */
	uint32_t idle_ms;                /* longest sleep while attached and idle (0 = 100): the engine wakes the loop
					    when it publishes a step, so this only bounds how late timers run */
	int32_t inline_kmacs;            /* jobs up to this many thousand multiply-adds run on the loop thread, not a
					    worker (0 = 256; -1 = every job on a worker) */
	int may_reexec;                  /* 1: ax_capture_run may return AX_CAPTURE_REEXEC when the CUDA device needs a
					    new process (the daemon, main.c, sets it); 0 (default): retry with backoff */
	uint32_t reexecs;                /* times this daemon re-executed itself before (main.c, from the environment;
					    logged and reported in stats as cuda_reexecs) */
} ax_capture_opts;

/* Fill the defaults (see --help). Never fails. */
void ax_capture_opts_default(ax_capture_opts *o);

/*
 * Parse a command line into `o` (which holds the defaults). Help text goes to `out`, error messages to `err`.
 * Returns 0 (run), 1 (--help or --version printed: exit 0) or -EINVAL (message printed: exit 2).
 * Not thread-safe (getopt_long's globals).
 */
int ax_capture_opts_parse(ax_capture_opts *o, int argc, char **argv, FILE *out, FILE *err);

/* Print the usage text. */
void ax_capture_usage(FILE *out, const char *prog);

/*
 * Resolve a layer selection against a model of `n_layers` layers into a 128-bit mask. `ids` are used for
 * AX_LAYERS_LIST (negative = from the end); ids out of range are skipped and counted in *ignored (may be NULL).
 * Returns the number of layers selected (≥ 0). Thread-safe (pure).
 */
int ax_capture_resolve_layers(int sel, const int32_t *ids, uint32_t n_ids, uint32_t n_layers, uint64_t mask[2],
			      uint32_t *ignored);

/* Parse "1,3,5-7" (and, when allow_negative, "-1") into ids; returns the count or -EINVAL / -E2BIG. Pure. */
int ax_capture_parse_list(const char *s, int32_t *ids, uint32_t cap, int allow_negative);

typedef struct ax_capture ax_capture;

/*
 * Create a capture: validate options, open the nng sockets (dialing in the background, so no relay needs to be
 * up), start the workers. Does not attach yet (ax_capture_run does, and retries). Returns 0 and sets *out, or
 * -EINVAL (bad options), -ENOTSUP (backend not available in this build), -ENOMEM, or an nng error as -EIO /
 * -EADDRNOTAVAIL. Thread-safe with respect to other captures.
 */
int ax_capture_open(ax_capture **out, const ax_capture_opts *o);

/*
 * Run the loop until ax_capture_stop is called: attach (retrying), announce, read the step ring, compute,
 * send. Survives a dead engine (re-attaches), a dead relay (drops with gap records) and bad descriptors. On
 * stop: finishes queued jobs, flushes what the relay will take within ~0.5 s, detaches. Returns 0, or a
 * negative errno for an unrecoverable local failure (-ENOMEM). Call from one thread.
 * With opts.may_reexec, it may also return AX_CAPTURE_REEXEC: the CUDA device is broken for this process (a
 * sticky error the reset did not clear, capture/README.md); the requests in flight were reported
 * (`requests/cuda_restart` gaps), a stats record sent (unless --stats-interval 0), records flushed, the segment
 * and every CUDA mapping released, as at a stop. The caller should re-execute the process; if it cannot, calling
 * ax_capture_run again resumes with backoff retries of the device (AX_CAPTURE_REEXEC is returned at most once per
 * capture).
 */
#define AX_CAPTURE_REEXEC 1
int ax_capture_run(ax_capture *c);

/* Ask ax_capture_run to return. Async-signal-safe and thread-safe (an atomic store, and a futex wake of the loop
 * if it sleeps on the segment). */
void ax_capture_stop(ax_capture *c);

/* Stop the workers, close sockets, free everything. Accepts NULL. Call after ax_capture_run returned. */
void ax_capture_close(ax_capture *c);

/* Counters; a snapshot is consistent per field, not across fields. */
typedef struct ax_capture_stats {
	uint64_t attaches;        /* successful attaches */
	uint64_t restarts;        /* engine restarts / closes seen */
	uint64_t steps;           /* FORWARD descriptors processed */
	uint64_t descriptors;     /* descriptors taken from the ring */
	uint64_t rows;            /* attention jobs run (position × layer) */
	uint64_t records;         /* records handed to the sender */
	uint64_t sent_frames;     /* frames nng accepted */
	uint64_t dropped;         /* records dropped because the relay could not take them */
	uint64_t gaps;            /* gap records emitted */
	uint64_t rejected;        /* descriptors rejected (invalid or torn) */
	uint64_t ring_lost;       /* descriptors the engine dropped (ring full) */
	uint64_t lapped;          /* jobs discarded because their Q rows were overwritten */
	uint64_t job_errors;      /* jobs that failed (bad index values, unsupported layout) */
	uint64_t policies;        /* policy records received */
	uint64_t busy_ns;         /* worker time spent computing */
	uint64_t policy_acks;     /* policies acknowledged (echoed to the relay) */
	uint64_t cuda_rejected;   /* CUDA buffer entries the importer rejected (bad extent, unopenable handle) */
} ax_capture_stats;

/* Snapshot the counters. Thread-safe. */
void ax_capture_get_stats(ax_capture *c, ax_capture_stats *out);

#ifdef __cplusplus
}
#endif
#endif
