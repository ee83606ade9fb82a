/*
 * e2e_util.h — helpers shared by the end-to-end tests of tests/: child processes with their own log files,
 * free TCP ports, libcurl requests, SSE bodies, attnx-tail JSON lines and the segment's consumer flag.
 *
 * The tests start real binaries (engine or test producer, capture, relay, attnx-tail) with addresses unique to
 * the run and stop them again; everything here is small and blocking, meant for test processes only (helpers
 * may fail_msg through cmocka's callers, never exit). Not thread-safe unless said otherwise.
 */
#ifndef ATTNX_TESTS_E2E_UTIL_H
#define ATTNX_TESTS_E2E_UTIL_H

#include <pthread.h>
#include <stddef.h>
#include <sys/types.h>

#include <jansson.h>

/* ---- child processes ------------------------------------------------------------------------------------------- */

typedef struct ex_proc {
	const char *name;  /* "engine", "relay", ... (log file <dir>/<name>.log) */
	pid_t pid;         /* 0 when not running */
	char **argv;       /* owned (ex_argv), kept for restarts; freed by ex_proc_forget */
	char out[256];     /* stdout goes here when set, else to the log */
} ex_proc;

/* argv from a NULL-terminated list of strings (copied). Free with ex_argv_free. */
char **ex_argv(const char *first, ...);
void ex_argv_free(char **v);
/* Fork + exec p->argv with stdout/stderr appended to <dir>/<name>.log (stdout to p->out when set). Returns the
 * pid, or -1. */
pid_t ex_spawn(ex_proc *p, const char *dir);
/* 1 while the child runs (reaps it when it exited). */
int ex_alive(ex_proc *p);
/* Send `sig`, wait up to 10 s; returns the exit status, 128+signal when killed by one, -1 when it had to be
 * SIGKILLed after the wait, 0 when not running. */
int ex_stop(ex_proc *p, int sig);
/* ex_stop(SIGKILL) and free argv. */
void ex_proc_forget(ex_proc *p);
/* Print the last 30 lines of each process log to stderr. */
void ex_dump_logs(const ex_proc *ps, int n, const char *dir);
/* A free TCP port on 127.0.0.1, never one this process was given before, or -1. */
int ex_free_port(void);

/* ---- HTTP (libcurl easy; curl_global_init is the caller's) -------------------------------------------------- */

typedef struct ex_buf {
	char *p;           /* body so far, NUL-terminated (malloc'd) */
	size_t n;
	pthread_mutex_t mu;
	int events;        /* "data:" events received so far (stream progress; read under mu) */
} ex_buf;

void ex_buf_init(ex_buf *b);
void ex_buf_fini(ex_buf *b);
/* POST `body` (JSON) or GET when body is NULL. Returns the HTTP status, 0 when there was no answer; the body
 * is appended to *b. Thread-safe (one ex_buf per call). */
long ex_http(const char *url, const char *body, ex_buf *b, long timeout_ms);
/* POST a JSON value and parse the JSON answer: returns it (new reference) on status 200, else NULL. */
json_t *ex_http_json(const char *url, json_t *body, long timeout_ms);
/* Poll url until it answers 200; 0 or -ETIMEDOUT. */
int ex_wait_http(const char *url, int seconds);

/* ---- feeds ---------------------------------------------------------------------------------------------------- */

/* The data events of an SSE body, parsed (new array; events that are not JSON are skipped); *done = 1 when
 * `data: [DONE]` was seen. */
json_t *ex_sse_parse(const char *body, int *done);
/* Every JSON line of a file (attnx-tail's output) as a new array; missing file → empty array. */
json_t *ex_jsonl_read(const char *path);
/* 1 when a consumer is attached to segment `shm` and has told the producer which layers it wants. */
int ex_shm_consumer_ready(const char *shm);

#endif
