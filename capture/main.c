/*
 * main.c — the attnx-capture daemon: parse options, run the capture loop until SIGINT/SIGTERM, clean up.
 *
 * All the work is in the ax_capture_* library (capture.h) so tests can run the same loop in a thread. The signal
 * handler only calls ax_capture_stop (one atomic store); the loop notices within a millisecond or so, finishes
 * queued jobs, flushes what the relay will take, detaches and returns. Exit status: 0 after a signal, 1 on a
 * runtime failure, 2 on invalid options (or a backend this build lacks).
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include <nng/nng.h>

#include "attnx_common.h"
#include "capture.h"

static ax_capture *g_capture;

static void on_signal(int sig)
{
	(void)sig;
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

int main(int argc, char **argv)
{
	ax_capture_opts o;
	ax_capture_opts_default(&o);
	int rv = ax_capture_opts_parse(&o, argc, argv, stdout, stderr);
	if (rv == 1)
		return 0;
	if (rv < 0)
		return 2;
	ax_log_set_level(o.log_level);
	ax_capture *c;
	if ((rv = ax_capture_open(&c, &o)) < 0) {
		fprintf(stderr, "attnx-capture: %s\n", ax_strerror(rv));
		return rv == -EINVAL || rv == -ENOTSUP ? 2 : 1;
	}
	g_capture = c;
	install_signals();
	rv = ax_capture_run(c);
	g_capture = NULL;
	ax_capture_close(c);
	nng_fini();
	return rv < 0 ? 1 : 0;
}
