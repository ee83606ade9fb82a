/*
 * main.c — the attnx-capture daemon: parse options, run the capture loop until SIGINT/SIGTERM, clean up.
 *
 * All the work is in the ax_capture_* library (capture.h) so tests can run the same loop in a thread. The signal
 * handler only calls ax_capture_stop (one atomic store); the loop notices within a millisecond or so, finishes
 * queued jobs, flushes what the relay will take, detaches and returns. Exit status: 0 after a signal, 1 on a
 * runtime failure, 2 on invalid options (or a backend this build lacks).
 *
 * Re-execution after a sticky CUDA error (capture/README.md, "Sticky CUDA errors"): when the device stays broken
 * after a reset, which on real hardware it does (only a new process gets a working context), ax_capture_run
 * returns AX_CAPTURE_REEXEC having reported what was in flight, sent its stats, flushed its records and released
 * the segment and every CUDA mapping. This file then replaces the process image with a fresh copy of itself: same
 * pid, same argv (copied before getopt could permute it), the environment plus ATTNX_CAPTURE_REEXEC (count and a
 * one-minute window, backend_cuda.h) so the new image logs "restarted after a sticky CUDA error (n)", reports
 * cuda_reexecs in stats, and so that repeated re-execs wait (1 s doubling to 60 s after 3 a minute). The new image
 * probes the device before it starts and re-executes again while it does not open. Every fd above
 * stderr is marked close-on-exec rather than closed (nng's sockets and pipes, the CUDA driver's device files): the
 * exec closes them all, and a failed exec leaves the process intact, in which case the capture runs on with the
 * backend's backoff retries. The relay sees the records socket close and a new hello, as for any capture restart.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <nng/nng.h>

#include "attnx_common.h"
#include "backend_cuda.h"
#include "capture.h"

#define TAG "capture"

static ax_capture *g_capture;
static volatile sig_atomic_t g_stop;

static void on_signal(int sig)
{
	(void)sig;
	g_stop = 1;
	if (g_capture)
		ax_capture_stop(g_capture);
}

static void install_signals(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
}

/* argv as given (getopt_long permutes the array it parses), NULL-terminated, for the re-exec. NULL on ENOMEM. */
static char **copy_args(int argc, char **argv)
{
	char **a = calloc((size_t)argc + 1, sizeof *a);
	if (a)
		memcpy(a, argv, (size_t)argc * sizeof *a);
	return a;
}

/* Mark every descriptor above stderr close-on-exec: close_range (Linux ≥ 5.11), else /proc/self/fd. */
static void cloexec_above_stderr(void)
{
#if defined(SYS_close_range) && defined(CLOSE_RANGE_CLOEXEC)
	if (syscall(SYS_close_range, 3u, ~0u, CLOSE_RANGE_CLOEXEC) == 0)
		return;
#endif
	DIR *d = opendir("/proc/self/fd");
	if (d == NULL)
		return;
	struct dirent *e;
	while ((e = readdir(d)) != NULL) {
		int fd = atoi(e->d_name), fl;
		if (fd > 2 && fd != dirfd(d) && (fl = fcntl(fd, F_GETFD)) >= 0)
			fcntl(fd, F_SETFD, fl | FD_CLOEXEC);
	}
	closedir(d);
}

/* Sleep `ms`, waking early on a stop signal. Returns 1 if stopped. */
static int sleep_unless_stopped(uint64_t ms)
{
	for (uint64_t t = 0; t < ms && !g_stop; t += 100) {
		struct timespec ts = {0, 100 * 1000000L};
		nanosleep(&ts, NULL);
	}
	return g_stop != 0;
}

/* The environment with `var` (NAME=value) in place of any NAME= entry: built for execve, since setenv is not safe
 * while nng's and the workers' threads run. The array is malloc'ed (the caller frees it), its strings are not. */
static char **env_with(char *var)
{
	extern char **environ;
	size_t n = 0, k = 0, name = (size_t)(strchr(var, '=') - var) + 1;
	while (environ[n])
		n++;
	char **env = calloc(n + 2, sizeof *env);
	if (env == NULL)
		return NULL;
	for (size_t i = 0; i < n; i++)
		if (strncmp(environ[i], var, name) != 0)
			env[k++] = environ[i];
	env[k] = var;
	return env;
}

/* Replace this process with a fresh image of itself (see the top). Returns only on failure (or a stop signal
 * during the backoff wait: -EINTR), with the process intact. */
static int reexec(char **args, ax__cuda_be_reexec *re)
{
	uint64_t delay_ms = ax__cuda_be_reexec_next(re, ax_now_ns() / 1000000000ull);
	if (delay_ms)
		ax_log(AX_LOG_WARN, TAG, "%u re-executions in the last minute: waiting %llu ms before the next",
		       re->in_window - 1, (unsigned long long)delay_ms);
	if (sleep_unless_stopped(delay_ms))
		return -EINTR;
	char var[96];
	int len = snprintf(var, sizeof var, "%s=", AX_REEXEC_ENV);
	char **env = ax__cuda_be_reexec_format(re, var + len, sizeof var - (size_t)len) < 0 ? NULL : env_with(var);
	if (env == NULL)
		return -ENOMEM;
	ax_log(AX_LOG_WARN, TAG, "re-executing (%u) for a fresh CUDA context after a sticky error", re->count);
	fflush(NULL);
	cloexec_above_stderr();
	execve("/proc/self/exe", args, env);
	int err = errno;
	if (strchr(args[0], '/'))
		execve(args[0], args, env); /* no /proc: the path it was started with (the cwd is unchanged) */
	free(env);
	ax_log(AX_LOG_ERROR, TAG, "cannot re-execute %s: %s; capturing nothing on the CUDA device until one of its "
	       "resets (retried with backoff) brings it back", args[0], strerror(err));
	return -err;
}

/* After a re-exec the device may take a moment to be enumerable again: retry the open (1 s apart, 60 s at most)
 * before giving up, instead of exiting on the first -ENOTSUP. */
static int open_capture(ax_capture **c, const ax_capture_opts *o)
{
	int rv = ax_capture_open(c, o);
	for (int i = 0; rv < 0 && rv != -EINVAL && o->reexecs > 0 && i < 60; i++) {
		if (i == 0)
			ax_log(AX_LOG_WARN, TAG, "capture open after a re-exec failed (%s); retrying every second",
			       ax_strerror(rv));
		if (sleep_unless_stopped(1000))
			break;
		rv = ax_capture_open(c, o);
	}
	return rv;
}

/* After a re-exec: does the CUDA device open? The capture opens its backend once per attach, so a device still
 * unusable here (the driver tearing down the previous image's faulted context) would leave this image capturing
 * nothing. Two probes 1 s apart; 0 if usable (or nothing to probe: no re-exec, --backend cpu, no device left, where
 * the capture's own checks decide), -EIO if not: the caller re-executes again (bounded by the re-exec delays).
 * The device is --device, or 0 (a probe only: the capture picks its own). */
static int probe_device(const ax_capture_opts *o)
{
	if (o->reexecs == 0 || o->backend == AX_BACKEND_CPU || ax__cuda_be_devices() <= 0)
		return 0;
	int dev = o->device >= 0 ? o->device : 0, rv = 0;
	for (int i = 0; i < 2 && !g_stop; i++) {
		ax__cuda_be *b = NULL;
		if ((rv = ax__cuda_be_open(&b, dev)) == 0) {
			ax__cuda_be_close(b);
			return 0;
		}
		ax_log(AX_LOG_WARN, TAG, "device %d not usable after the re-exec (%s)%s", dev, ax_strerror(rv),
		       i == 0 ? "; probing again in 1 s" : "");
		if (i == 0)
			sleep_unless_stopped(1000);
	}
	return g_stop ? 0 : -EIO;
}

int main(int argc, char **argv)
{
	char **args = copy_args(argc, argv);
	ax__cuda_be_reexec re;
	if (args == NULL)
		return 1;
	if (ax__cuda_be_reexec_parse(getenv(AX_REEXEC_ENV), &re) < 0)
		fprintf(stderr, "attnx-capture: ignoring a malformed %s\n", AX_REEXEC_ENV);
	ax_capture_opts o;
	ax_capture_opts_default(&o);
	int rv = ax_capture_opts_parse(&o, argc, argv, stdout, stderr);
	if (rv != 0) {
		free(args);
		return rv == 1 ? 0 : 2;
	}
	ax_log_set_level(o.log_level);
	o.may_reexec = 1;
	o.reexecs = re.count;
	if (re.count)
		ax_log(AX_LOG_WARN, TAG, "restarted after a sticky CUDA error (%u)", re.count);
	install_signals();
	if (probe_device(&o) < 0)
		reexec(args, &re); /* returns only if the exec failed: go on, the capture retries the device itself */
	ax_capture *c;
	if ((rv = open_capture(&c, &o)) < 0) {
		fprintf(stderr, "attnx-capture: %s\n", ax_strerror(rv));
		free(args);
		return rv == -EINVAL || rv == -ENOTSUP ? 2 : 1;
	}
	g_capture = c;
	if (g_stop)
		ax_capture_stop(c);
	while ((rv = ax_capture_run(c)) == AX_CAPTURE_REEXEC && !g_stop)
		reexec(args, &re); /* returns only on failure: run again, with the backend's backoff retries */
	g_capture = NULL;
	ax_capture_close(c);
	nng_fini();
	free(args);
	return rv < 0 ? 1 : 0;
}
