/*
 * attnx_common.h — the few helpers every attnx module shares: error strings, clocks and logging.
 *
 * Every attnx function returns 0 or a positive count on success and a negative errno on failure; ax_strerror()
 * turns those codes into text. Logging goes to stderr with a level and a component tag; daemons set the level
 * once at start-up (ax_log_set_level), before threads start. Nothing here allocates or can fail.
 */
#ifndef ATTNX_COMMON_H
#define ATTNX_COMMON_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Text for a negative errno (or 0). Never NULL; thread-safe (returns static strings). */
const char *ax_strerror(int err);

/* CLOCK_MONOTONIC in nanoseconds. Thread-safe. */
uint64_t ax_now_ns(void);
/* CLOCK_REALTIME in nanoseconds (wall clock, for timestamps shown to people). Thread-safe. */
uint64_t ax_wall_ns(void);

enum { AX_LOG_ERROR = 0, AX_LOG_WARN = 1, AX_LOG_INFO = 2, AX_LOG_DEBUG = 3 };
/* Set the global level (default AX_LOG_INFO). Call before starting threads. */
void ax_log_set_level(int level);
int ax_log_get_level(void);
/* printf-style line to stderr, prefixed with time, level and tag. Thread-safe (one write per line). */
void ax_log(int level, const char *tag, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#define AX_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

#ifdef __cplusplus
}
#endif
#endif
