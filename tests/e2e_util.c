/*
 * e2e_util.c — see e2e_util.h. Children get their own log file (append mode, so a restarted capture keeps its
 * history) and are stopped with a bounded wait, so a hung daemon fails a test instead of hanging it. HTTP is
 * libcurl's easy interface, one handle per call, which is all a test needs.
 */
#include "e2e_util.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <curl/curl.h>

#include "attnx_shm.h"

/* ---- child processes ------------------------------------------------------------------------------------------- */

char **ex_argv(const char *first, ...)
{
	va_list ap;
	char **v = calloc(48, sizeof *v);
	int n = 0;

	v[n++] = strdup(first);
	va_start(ap, first);
	for (const char *s; n < 47 && (s = va_arg(ap, const char *));)
		v[n++] = strdup(s);
	va_end(ap);
	return v;
}

void ex_argv_free(char **v)
{
	for (int i = 0; v && v[i]; i++)
		free(v[i]);
	free(v);
}

pid_t ex_spawn(ex_proc *p, const char *dir)
{
	char log[400];
	pid_t pid;

	snprintf(log, sizeof log, "%s/%s.log", dir, p->name);
	pid = fork();
	if (pid == 0) {
		int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
		int out = p->out[0] ? open(p->out, O_WRONLY | O_CREAT | O_APPEND, 0644) : fd;
		dup2(out, 1);
		dup2(fd, 2);
		execv(p->argv[0], p->argv);
		_exit(127);
	}
	p->pid = pid > 0 ? pid : 0;
	return pid;
}

int ex_alive(ex_proc *p)
{
	return p->pid > 0 && waitpid(p->pid, NULL, WNOHANG) == 0;
}

int ex_stop(ex_proc *p, int sig)
{
	int st;

	if (p->pid <= 0)
		return 0;
	kill(p->pid, sig);
	for (int i = 0; i < 200; i++) {
		if (waitpid(p->pid, &st, WNOHANG) == p->pid) {
			p->pid = 0;
			return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
		}
		usleep(50000);
	}
	kill(p->pid, SIGKILL);
	waitpid(p->pid, &st, 0);
	p->pid = 0;
	return -1;
}

void ex_proc_forget(ex_proc *p)
{
	ex_stop(p, SIGKILL);
	ex_argv_free(p->argv);
	p->argv = NULL;
}

void ex_dump_logs(const ex_proc *ps, int n, const char *dir)
{
	char cmd[600];

	for (int i = 0; i < n; i++) {
		fprintf(stderr, "---- %s log (last 30 lines) ----\n", ps[i].name);
		fflush(stderr);
		snprintf(cmd, sizeof cmd, "tail -n 30 %s/%s.log 1>&2", dir, ps[i].name);
		if (system(cmd)) {
		}
	}
}

/* One port the kernel hands out for 127.0.0.1, the socket closed again (-1 on failure). */
static int ex_one_port(void)
{
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t len = sizeof a;
	int fd = socket(AF_INET, SOCK_STREAM, 0), port = -1;

	if (fd >= 0 && !bind(fd, (struct sockaddr *)&a, sizeof a) && !getsockname(fd, (struct sockaddr *)&a, &len))
		port = ntohs(a.sin_port);
	if (fd >= 0)
		close(fd);
	return port;
}

/* A free port, never one this process was given before: two calls in a row can get the same port from the kernel
 * (its socket is closed in between), and then the engine and the relay of one test both tried to listen on it (CI,
 * session 16: "relay: cannot listen on 127.0.0.1:34069: Address already in use"). Not thread-safe (set-up code). */
int ex_free_port(void)
{
	static int given[64];
	static int n_given;

	for (int tries = 0; tries < 100; tries++) {
		int port = ex_one_port(), seen = 0;

		if (port < 0)
			return -1;
		for (int i = 0; i < n_given && !seen; i++)
			seen = given[i] == port;
		if (seen)
			continue;
		if (n_given < (int)(sizeof given / sizeof given[0]))
			given[n_given++] = port;
		return port;
	}
	return -1;
}

/* ---- HTTP ----------------------------------------------------------------------------------------------------- */

void ex_buf_init(ex_buf *b)
{
	memset(b, 0, sizeof *b);
	pthread_mutex_init(&b->mu, NULL);
}

void ex_buf_fini(ex_buf *b)
{
	free(b->p);
	b->p = NULL;
	pthread_mutex_destroy(&b->mu);
}

static size_t on_body(char *d, size_t sz, size_t nm, void *arg)
{
	ex_buf *b = arg;
	size_t n = sz * nm;
	char *p;

	pthread_mutex_lock(&b->mu);
	p = realloc(b->p, b->n + n + 1);
	if (!p) {
		pthread_mutex_unlock(&b->mu);
		return 0;
	}
	b->p = p;
	memcpy(b->p + b->n, d, n);
	b->n += n;
	b->p[b->n] = 0;
	b->events = 0;
	for (const char *s = b->p; (s = strstr(s, "data:")); s += 5)
		b->events++;
	pthread_mutex_unlock(&b->mu);
	return n;
}

long ex_http(const char *url, const char *body, ex_buf *b, long timeout_ms)
{
	CURL *c = curl_easy_init();
	struct curl_slist *h = curl_slist_append(NULL, "Content-Type: application/json");
	long status = 0;

	curl_easy_setopt(c, CURLOPT_URL, url);
	curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
	curl_easy_setopt(c, CURLOPT_WRITEDATA, b);
	curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, timeout_ms);
	curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
	if (body) {
		curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
		curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
	}
	if (curl_easy_perform(c) == CURLE_OK)
		curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
	curl_slist_free_all(h);
	curl_easy_cleanup(c);
	return status;
}

json_t *ex_http_json(const char *url, json_t *body, long timeout_ms)
{
	char *s = json_dumps(body, JSON_COMPACT);
	json_t *j = NULL;
	ex_buf b;

	ex_buf_init(&b);
	if (s && ex_http(url, s, &b, timeout_ms) == 200 && b.p)
		j = json_loads(b.p, 0, NULL);
	ex_buf_fini(&b);
	free(s);
	return j;
}

int ex_wait_http(const char *url, int seconds)
{
	for (int i = 0; i < seconds * 10; i++) {
		ex_buf b;
		ex_buf_init(&b);
		long st = ex_http(url, NULL, &b, 1000);
		ex_buf_fini(&b);
		if (st == 200)
			return 0;
		usleep(100000);
	}
	return -ETIMEDOUT;
}

/* ---- feeds ---------------------------------------------------------------------------------------------------- */

json_t *ex_sse_parse(const char *text, int *done)
{
	char *save = NULL, *body = strdup(text ? text : "");
	json_t *out = json_array();

	*done = 0;
	for (char *line = strtok_r(body, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		size_t n = strlen(line);
		if (n && line[n - 1] == '\r')
			line[--n] = 0;
		if (strncmp(line, "data:", 5))
			continue;
		line += 5;
		line += *line == ' ';
		if (!strcmp(line, "[DONE]")) {
			*done = 1;
			continue;
		}
		json_t *j = json_loads(line, 0, NULL);
		if (j)
			json_array_append_new(out, j);
	}
	free(body);
	return out;
}

json_t *ex_jsonl_read(const char *path)
{
	FILE *f = fopen(path, "r");
	json_t *a = json_array();
	char *line = NULL;
	size_t cap = 0;

	while (f && getline(&line, &cap, f) > 0) {
		json_t *j = json_loads(line, 0, NULL);
		if (j)
			json_array_append_new(a, j);
	}
	free(line);
	if (f)
		fclose(f);
	return a;
}

int ex_shm_consumer_ready(const char *shm)
{
	int fd = shm_open(shm, O_RDONLY, 0);
	ax_shm_header *h;
	int ready;

	if (fd < 0)
		return 0;
	h = mmap(NULL, sizeof *h, PROT_READ, MAP_SHARED, fd, 0);
	close(fd);
	if (h == MAP_FAILED)
		return 0;
	ready = __atomic_load_n(&h->consumer_pid, __ATOMIC_ACQUIRE) != 0 &&
		(__atomic_load_n(&h->want_layers[0], __ATOMIC_RELAXED) | h->want_layers[1]) != 0;
	munmap(h, sizeof *h);
	return ready;
}
