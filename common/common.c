/*
 * common.c — error strings, clocks and the stderr logger shared by every attnx module.
 *
 * ax_strerror maps negative errno values to strerror text through a small table of thread-local buffers;
 * the logger formats one line into a stack buffer and writes it with a single write(2) so lines from
 * several threads never interleave.
 */
#include "attnx_common.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int g_level = AX_LOG_INFO;

const char *ax_strerror(int err)
{
	static __thread char buf[128];
	if (err == 0)
		return "success";
	if (err > 0)
		err = -err;
	/* strerror_r (GNU) may return a static string rather than filling buf. */
	return strerror_r(-err, buf, sizeof buf);
}

static uint64_t clock_ns(clockid_t id)
{
	struct timespec ts;
	clock_gettime(id, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t ax_now_ns(void) { return clock_ns(CLOCK_MONOTONIC); }
uint64_t ax_wall_ns(void) { return clock_ns(CLOCK_REALTIME); }

void ax_log_set_level(int level) { g_level = level; }
int ax_log_get_level(void) { return g_level; }

void ax_log(int level, const char *tag, const char *fmt, ...)
{
	static const char *names[] = {"error", "warn", "info", "debug"};
	if (level > g_level)
		return;
	char line[1024];
	uint64_t now = ax_wall_ns();
	time_t secs = (time_t)(now / 1000000000ull);
	struct tm tm;
	gmtime_r(&secs, &tm);
	int n = snprintf(line, sizeof line, "%02d:%02d:%02d.%03u %-5s %s: ", tm.tm_hour, tm.tm_min, tm.tm_sec,
			 (unsigned)(now / 1000000ull % 1000), names[level < 0 ? 0 : level > 3 ? 3 : level], tag);
	va_list ap;
	va_start(ap, fmt);
	if (n > 0 && n < (int)sizeof line)
		n += vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
	va_end(ap);
	if (n >= (int)sizeof line)
		n = (int)sizeof line - 1;
	line[n++] = '\n';
	ssize_t w = write(STDERR_FILENO, line, (size_t)n);
	(void)w;
}
