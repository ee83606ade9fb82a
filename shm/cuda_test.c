/*
 * cuda_test.c — unit tests of the plain-C half of attnx_shm_cuda.h, no GPU needed: handle parsing (raw and
 * PyTorch's prefixed bytes), entry helpers and extent checks, the VMM reply checker, the fd server and client over
 * a real Unix socket (an fd passed to another process and read there; truncated, garbage and silent peers on both
 * sides; fd leaks checked through /proc/self/fd), and the capture-side importer driven by fake CUDA ops over a
 * real segment (allocation sharing, extents, rejection counting, events, VMM through the server, teardown).
 * Cases are in tables where there are more than two.
 */
#include "attnx_shm.h"
#include "attnx_shm_cuda.h"

#include <dirent.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

static int count_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	int n = 0;
	if (d == NULL)
		return -1;
	while (readdir(d))
		n++;
	closedir(d);
	return n;
}

/* The fd count once an in-process server thread has closed its side of a connection (up to 1 s): a leak stays. */
static int settled_fds(int want)
{
	int n = count_fds();
	for (int i = 0; i < 100 && n != want; i++) {
		usleep(10000);
		n = count_fds();
	}
	return n;
}

static void sock_path(char *out, size_t cap, const char *tag)
{
	snprintf(out, cap, "/tmp/attnx-cudatest-%d-%s.sock", (int)getpid(), tag);
}

/* A memfd holding `text`, standing in for an exported VMM allocation. */
static int fake_alloc_fd(const char *text)
{
	int fd = memfd_create("attnx-fake-vmm", MFD_CLOEXEC);
	assert_true(fd >= 0);
	assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
	return fd;
}

/* ---- handle bytes ---------------------------------------------------------------------------------------- */

static const struct {
	const char *what;
	size_t len;
	int b0, b1; /* prefix bytes (-1 = leave the pattern) */
	int want;
	int stripped; /* 1: the result is bytes 2..65 */
} handle_cases[] = {
	{"raw 64-byte handle", 64, -1, -1, 0, 0},
	{"torch v1 'c'", 66, 1, 'c', 0, 1},
	{"torch v2 'c'", 66, 2, 'c', 0, 1},
	{"torch v3 'c'", 66, 3, 'c', 0, 1},
	{"torch v2 expandable segment", 66, 2, 'e', -ENOTSUP, 0},
	{"torch v2 expandable, longer payload", 130, 2, 'e', -ENOTSUP, 0},
	{"version 0", 66, 0, 'c', -EINVAL, 0},
	{"version 4", 66, 4, 'c', -EINVAL, 0},
	{"unknown type byte", 66, 2, 'x', -EINVAL, 0},
	{"65 bytes", 65, 2, 'c', -EINVAL, 0},
	{"67 bytes", 67, 2, 'c', -EINVAL, 0},
	{"empty", 0, -1, -1, -EINVAL, 0},
	{"one byte", 1, -1, -1, -EINVAL, 0},
};

static void test_handle_parse(void **state)
{
	(void)state;
	for (size_t i = 0; i < sizeof handle_cases / sizeof handle_cases[0]; i++) {
		uint8_t in[160], out[64];
		for (size_t j = 0; j < sizeof in; j++)
			in[j] = (uint8_t)(j * 7 + 1);
		if (handle_cases[i].b0 >= 0)
			in[0] = (uint8_t)handle_cases[i].b0, in[1] = (uint8_t)handle_cases[i].b1;
		memset(out, 0xee, sizeof out);
		int rc = ax_cuda_ipc_handle_parse(in, handle_cases[i].len, out);
		if (rc != handle_cases[i].want)
			fail_msg("handle case '%s': got %d, want %d", handle_cases[i].what, rc, handle_cases[i].want);
		if (rc == 0 && memcmp(out, in + (handle_cases[i].stripped ? 2 : 0), 64) != 0)
			fail_msg("handle case '%s': wrong bytes", handle_cases[i].what);
	}
	uint8_t out[64];
	assert_int_equal(ax_cuda_ipc_handle_parse(NULL, 64, out), -EINVAL);
}

static void test_entry_helpers(void **state)
{
	(void)state;
	ax_shm_buffer b;
	memset(&b, 0, sizeof b);
	uint8_t h[66] = {2, 'c'}, ev[64], got[64];
	for (int i = 0; i < 64; i++)
		h[i + 2] = (uint8_t)(i + 1), ev[i] = (uint8_t)(200 - i);
	assert_int_equal(ax_cuda_entry_set_ipc(&b, 1, h, sizeof h, 4096, 100), 0);
	assert_int_equal(b.loc, AX_LOC_CUDA_IPC);
	assert_int_equal(b.device, 1);
	assert_memory_equal(b.handle, h + 2, 64);
	assert_int_equal(b.offset, 4096);
	assert_int_equal(b.bytes, 100);
	assert_int_equal(ax_cuda_entry_set_ipc(&b, -1, h, sizeof h, 0, 1), -EINVAL);
	assert_int_equal(ax_cuda_entry_event(&b, got), 0);
	assert_int_equal(ax_cuda_entry_set_event(&b, ev), 0);
	assert_int_equal(ax_cuda_entry_event(&b, got), 1);
	assert_memory_equal(got, ev, 64);
	assert_int_equal(ax_cuda_entry_set_event(&b, NULL), 0);
	assert_int_equal(ax_cuda_entry_event(&b, got), 0);

	char longp[80];
	memset(longp, 'a', sizeof longp - 1);
	longp[sizeof longp - 1] = '\0';
	assert_int_equal(ax_cuda_entry_set_vmm(&b, 0, 42, longp, 0, 8), -ENAMETOOLONG);
	assert_int_equal(ax_cuda_entry_set_vmm(&b, 0, 42, "", 0, 8), -EINVAL);
	assert_int_equal(ax_cuda_entry_set_vmm(&b, 0, 0x1122334455667788ull, "/tmp/x.sock", 64, 8), 0);
	assert_int_equal(b.loc, AX_LOC_CUDA_VMM);
	assert_int_equal(ax_cuda_entry_vmm_id(&b), 0x1122334455667788ull);
	assert_string_equal(b.vmm_socket, "/tmp/x.sock");
	/* A VMM entry carries no event in its socket field; a HOST entry none at all. */
	assert_int_equal(ax_cuda_entry_set_event(&b, ev), -EINVAL);
	assert_int_equal(ax_cuda_entry_event(&b, got), -EINVAL);
}

static const struct {
	const char *what;
	uint64_t offset, bytes, alloc;
	int want;
} extent_cases[] = {
	{"exactly the allocation", 0, 4096, 4096, 0},
	{"tail of the allocation", 1024, 3072, 4096, 0},
	{"one byte past", 1024, 3073, 4096, -ERANGE},
	{"offset past the end", 8192, 1, 4096, -ERANGE},
	{"zero bytes", 0, 0, 4096, -ERANGE},
	{"offset + bytes overflows", UINT64_MAX - 10, 20, UINT64_MAX, -ERANGE},
	{"empty allocation", 0, 1, 0, -ERANGE},
};

static void test_extent(void **state)
{
	(void)state;
	for (size_t i = 0; i < sizeof extent_cases / sizeof extent_cases[0]; i++) {
		ax_shm_buffer b = {.offset = extent_cases[i].offset, .bytes = extent_cases[i].bytes};
		int rc = ax_cuda_check_extent(&b, extent_cases[i].alloc);
		if (rc != extent_cases[i].want)
			fail_msg("extent case '%s': got %d, want %d", extent_cases[i].what, rc, extent_cases[i].want);
	}
}

/* ---- reply checker --------------------------------------------------------------------------------------- */

static void rp_ok(ax_vmm_reply *r, size_t *len, int *nfds) { (void)r, (void)len, (void)nfds; }
static void rp_short(ax_vmm_reply *r, size_t *len, int *nfds) { (void)r, (void)nfds, *len = 95; }
static void rp_magic(ax_vmm_reply *r, size_t *len, int *nfds) { (void)len, (void)nfds, r->magic ^= 1; }
static void rp_id(ax_vmm_reply *r, size_t *len, int *nfds) { (void)len, (void)nfds, r->id++; }
static void rp_enoent(ax_vmm_reply *r, size_t *len, int *nfds) { (void)len, r->status = -ENOENT, *nfds = 0; }
static void rp_err_fd(ax_vmm_reply *r, size_t *len, int *nfds) { (void)len, (void)nfds, r->status = -ENOENT; }
static void rp_huge_err(ax_vmm_reply *r, size_t *len, int *nfds) { (void)len, r->status = -100000, *nfds = 0; }
static void rp_pos(ax_vmm_reply *r, size_t *len, int *nfds) { (void)len, (void)nfds, r->status = 3; }
static void rp_nofd(ax_vmm_reply *r, size_t *len, int *nfds) { (void)r, (void)len, *nfds = 0; }
static void rp_twofd(ax_vmm_reply *r, size_t *len, int *nfds) { (void)r, (void)len, *nfds = 2; }
static void rp_size0(ax_vmm_reply *r, size_t *len, int *nfds) { (void)len, (void)nfds, r->size = 0; }
static void rp_flags(ax_vmm_reply *r, size_t *len, int *nfds) { (void)len, (void)nfds, r->flags = 6; }
static void rp_dev(ax_vmm_reply *r, size_t *len, int *nfds) { (void)len, (void)nfds, r->device = -1; }

static const struct {
	const char *what;
	void (*mutate)(ax_vmm_reply *, size_t *, int *);
	int want;
} reply_cases[] = {
	{"good reply", rp_ok, 0},
	{"short datagram", rp_short, -EPROTO},
	{"bad magic", rp_magic, -EPROTO},
	{"other id", rp_id, -EPROTO},
	{"unknown id, no fd", rp_enoent, -ENOENT},
	{"error status with an fd", rp_err_fd, -EPROTO},
	{"absurd error status", rp_huge_err, -EPROTO},
	{"positive status", rp_pos, -EPROTO},
	{"success without fd", rp_nofd, -EPROTO},
	{"success with two fds", rp_twofd, -EPROTO},
	{"size 0", rp_size0, -EPROTO},
	{"unknown flags", rp_flags, -EPROTO},
	{"negative device", rp_dev, -EPROTO},
};

static void test_reply_check(void **state)
{
	(void)state;
	for (size_t i = 0; i < sizeof reply_cases / sizeof reply_cases[0]; i++) {
		ax_vmm_reply r = {.magic = AX_VMM_MAGIC, .status = 0, .id = 7, .size = 1 << 21, .device = 0,
				  .flags = AX_VMM_F_EVENT};
		size_t len = sizeof r;
		int nfds = 1;
		reply_cases[i].mutate(&r, &len, &nfds);
		int rc = ax_vmm_reply_check(&r, len, 7, nfds);
		if (rc != reply_cases[i].want)
			fail_msg("reply case '%s': got %d, want %d", reply_cases[i].what, rc, reply_cases[i].want);
	}
}

/* ---- server and client ----------------------------------------------------------------------------------- */

/* The fd crosses into a child process, which reads the allocation's contents through it. */
static void test_fd_to_other_process(void **state)
{
	(void)state;
	char path[108];
	sock_path(path, sizeof path, "xproc");
	ax_vmm_server *s;
	assert_int_equal(ax_vmm_server_start(&s, path), 0);
	struct stat st;
	assert_int_equal(stat(path, &st), 0);
	assert_int_equal(st.st_mode & 0777, 0600);
	int fd = fake_alloc_fd("allocation-77");
	uint8_t ev[64];
	memset(ev, 0x5a, sizeof ev);
	assert_int_equal(ax_vmm_server_add(s, 77, fd, 2u << 20, 3, ev), 0);
	assert_int_equal(ax_vmm_server_add(s, 77, fd, 2u << 20, 3, NULL), -EEXIST);
	assert_int_equal(ax_vmm_server_add(s, 78, -1, 2u << 20, 3, NULL), -EINVAL);
	assert_int_equal(ax_vmm_server_add(s, 78, fd, 0, 3, NULL), -EINVAL);
	close(fd); /* the server keeps its own dup */
	pid_t pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		int got = -1;
		ax_vmm_reply r;
		char buf[32] = {0};
		int ok = ax_vmm_fetch(path, 77, 2000, &got, &r) == 0 && r.size == (2u << 20) && r.device == 3 &&
			 (r.flags & AX_VMM_F_EVENT) && r.event[10] == 0x5a &&
			 pread(got, buf, sizeof buf - 1, 0) == 13 && strcmp(buf, "allocation-77") == 0;
		_exit(ok ? 0 : 1);
	}
	int status;
	assert_int_equal(waitpid(pid, &status, 0), pid);
	assert_true(WIFEXITED(status));
	assert_int_equal(WEXITSTATUS(status), 0);
	uint64_t served, refused;
	ax_vmm_server_counts(s, &served, &refused);
	assert_int_equal(served, 1);
	assert_int_equal(refused, 0);
	ax_vmm_server_stop(s);
	assert_int_not_equal(access(path, F_OK), 0); /* unlinked */
}

/* Unknown id, withdrawn id, no server at all; no fd leaks on any of them. */
static void test_fetch_errors(void **state)
{
	(void)state;
	char path[108];
	sock_path(path, sizeof path, "errors");
	int before = count_fds();
	int fd = -1;
	assert_int_equal(ax_vmm_fetch(path, 1, 200, &fd, NULL), -ENOENT); /* no socket file */
	ax_vmm_server *s;
	assert_int_equal(ax_vmm_server_start(&s, path), 0);
	int afd = fake_alloc_fd("x");
	assert_int_equal(ax_vmm_server_add(s, 5, afd, 4096, 0, NULL), 0);
	assert_int_equal(ax_vmm_fetch(path, 6, 1000, &fd, NULL), -ENOENT);
	assert_int_equal(ax_vmm_fetch(path, 5, 1000, &fd, NULL), 0);
	close(fd);
	assert_int_equal(ax_vmm_server_remove(s, 5), 0);
	assert_int_equal(ax_vmm_server_remove(s, 5), -ENOENT);
	assert_int_equal(ax_vmm_fetch(path, 5, 1000, &fd, NULL), -ENOENT);
	char longp[200];
	memset(longp, 'p', sizeof longp - 1);
	longp[sizeof longp - 1] = '\0';
	assert_int_equal(ax_vmm_fetch(longp, 5, 100, &fd, NULL), -ENAMETOOLONG);
	assert_int_equal(ax_vmm_fetch("", 5, 100, &fd, NULL), -EINVAL);
	ax_vmm_server_stop(s);
	close(afd);
	assert_int_equal(count_fds(), before);
}

static int raw_connect(const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
	int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	assert_true(fd >= 0);
	assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof sa), 0);
	return fd;
}

/* Send `len` bytes of `msg` and return the status of the server's reply (or 1 if it closed without one). */
static int raw_exchange(const char *path, const void *msg, size_t len)
{
	int fd = raw_connect(path);
	assert_int_equal(send(fd, msg, len, MSG_NOSIGNAL), (ssize_t)len);
	ax_vmm_reply r;
	struct pollfd p = {.fd = fd, .events = POLLIN};
	assert_int_equal(poll(&p, 1, 3000), 1);
	ssize_t n = recv(fd, &r, sizeof r, 0);
	close(fd);
	if (n == 0)
		return 1;
	assert_int_equal(n, (ssize_t)sizeof r);
	assert_int_equal(r.magic, AX_VMM_MAGIC);
	return r.status;
}

/* Garbage, truncated and oversized requests get -EPROTO; silent and vanished peers are dropped; the server keeps
 * serving good requests throughout. */
static void test_server_bad_peers(void **state)
{
	(void)state;
	char path[108];
	sock_path(path, sizeof path, "badpeers");
	ax_vmm_server *s;
	assert_int_equal(ax_vmm_server_start(&s, path), 0);
	int afd = fake_alloc_fd("y");
	assert_int_equal(ax_vmm_server_add(s, 9, afd, 4096, 0, NULL), 0);
	ax_vmm_request good = {.magic = AX_VMM_MAGIC, .version = AX_VMM_VERSION, .id = 9};
	ax_vmm_request badmagic = good, badver = good;
	badmagic.magic = 0xdeadbeef;
	badver.version = 99;
	uint8_t big[64] = {0};
	memcpy(big, &good, sizeof good);
	assert_int_equal(raw_exchange(path, &good, 3), -EPROTO);        /* truncated */
	assert_int_equal(raw_exchange(path, &badmagic, sizeof badmagic), -EPROTO);
	assert_int_equal(raw_exchange(path, &badver, sizeof badver), -EPROTO);
	assert_int_equal(raw_exchange(path, big, sizeof big), -EPROTO); /* oversized datagram */
	/* A peer that connects and dies, and one that connects and says nothing: the next request is still served. */
	close(raw_connect(path));
	int silent = raw_connect(path);
	int fd = -1;
	uint64_t t0 = (uint64_t)time(NULL);
	assert_int_equal(ax_vmm_fetch(path, 9, 3000, &fd, NULL), 0);
	assert_true((uint64_t)time(NULL) - t0 <= 2);
	close(fd);
	close(silent);
	/* A peer in another process killed while connected. */
	pid_t pid = fork();
	if (pid == 0) {
		raw_connect(path);
		pause();
		_exit(0);
	}
	usleep(50000);
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
	assert_int_equal(ax_vmm_fetch(path, 9, 3000, &fd, NULL), 0);
	close(fd);
	uint64_t served, refused;
	ax_vmm_server_counts(s, &served, &refused);
	assert_int_equal(served, 2);
	assert_int_equal(refused, 4);
	ax_vmm_server_stop(s);
	close(afd);
}

/* A fake server that answers every connection with one scripted reply. */
typedef struct fake_srv {
	char path[108];
	int lfd;
	int mode;
	pthread_t th;
} fake_srv;

enum { FK_SHORT, FK_OTHER_ID, FK_OK_NOFD, FK_TWO_FDS, FK_OVERSIZE, FK_SILENT, FK_CLOSE, FK_N };

static void *fake_main(void *arg)
{
	fake_srv *f = arg;
	int cfd = accept(f->lfd, NULL, NULL);
	if (cfd < 0)
		return NULL;
	ax_vmm_request q;
	if (recv(cfd, &q, sizeof q, 0) != sizeof q)
		q.id = 0;
	uint8_t buf[200] = {0};
	ax_vmm_reply r = {.magic = AX_VMM_MAGIC, .status = 0, .id = q.id, .size = 4096};
	memcpy(buf, &r, sizeof r);
	size_t len = sizeof r;
	int nfd = 1;
	int fds[2] = {fake_alloc_fd("a"), fake_alloc_fd("b")};
	switch (f->mode) {
	case FK_SHORT: len = 40; break;
	case FK_OTHER_ID: ((ax_vmm_reply *)buf)->id = q.id + 1; break;
	case FK_OK_NOFD: nfd = 0; break;
	case FK_TWO_FDS: nfd = 2; break;
	case FK_OVERSIZE: len = sizeof buf; break;
	case FK_SILENT: usleep(400000); nfd = -1; break;
	case FK_CLOSE: nfd = -1; break;
	}
	if (nfd >= 0) {
		union {
			struct cmsghdr h;
			char c[CMSG_SPACE(2 * sizeof(int))];
		} ctl;
		memset(&ctl, 0, sizeof ctl);
		struct iovec iov = {.iov_base = buf, .iov_len = len};
		struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1};
		if (nfd > 0) {
			m.msg_control = ctl.c;
			m.msg_controllen = CMSG_SPACE(nfd * sizeof(int));
			struct cmsghdr *c = CMSG_FIRSTHDR(&m);
			c->cmsg_level = SOL_SOCKET;
			c->cmsg_type = SCM_RIGHTS;
			c->cmsg_len = CMSG_LEN(nfd * sizeof(int));
			memcpy(CMSG_DATA(c), fds, nfd * sizeof(int));
		}
		sendmsg(cfd, &m, MSG_NOSIGNAL);
	}
	close(fds[0]);
	close(fds[1]);
	close(cfd);
	return NULL;
}

static void fake_start(fake_srv *f, int mode)
{
	sock_path(f->path, sizeof f->path, "fake");
	unlink(f->path);
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	snprintf(sa.sun_path, sizeof sa.sun_path, "%s", f->path);
	f->lfd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	assert_int_equal(bind(f->lfd, (struct sockaddr *)&sa, sizeof sa), 0);
	assert_int_equal(listen(f->lfd, 4), 0);
	f->mode = mode;
	assert_int_equal(pthread_create(&f->th, NULL, fake_main, f), 0);
}

static void fake_stop(fake_srv *f)
{
	pthread_join(f->th, NULL);
	close(f->lfd);
	unlink(f->path);
}

static const struct {
	const char *what;
	int mode;
	int want;
} bad_server_cases[] = {
	{"truncated reply", FK_SHORT, -EPROTO},
	{"reply for another id", FK_OTHER_ID, -EPROTO},
	{"success without an fd", FK_OK_NOFD, -EPROTO},
	{"two fds", FK_TWO_FDS, -EPROTO},
	{"oversized reply", FK_OVERSIZE, -EPROTO},
	{"server never answers", FK_SILENT, -ETIMEDOUT},
	{"server closes without answering", FK_CLOSE, -EPROTO},
};

/* The client rejects every malformed reply and closes whatever fds came with it. */
static void test_client_bad_servers(void **state)
{
	(void)state;
	for (size_t i = 0; i < sizeof bad_server_cases / sizeof bad_server_cases[0]; i++) {
		fake_srv f;
		int before = count_fds();
		fake_start(&f, bad_server_cases[i].mode);
		int fd = -1;
		int rc = ax_vmm_fetch(f.path, 11, 150, &fd, NULL);
		fake_stop(&f);
		if (rc != bad_server_cases[i].want)
			fail_msg("bad server '%s': got %d, want %d", bad_server_cases[i].what, rc, bad_server_cases[i].want);
		if (count_fds() != before)
			fail_msg("bad server '%s': %d fds leaked", bad_server_cases[i].what, count_fds() - before);
	}
}

/* A stale socket file is replaced; a live server's path is refused; a regular file is never removed. */
static void test_server_path(void **state)
{
	(void)state;
	char path[108];
	sock_path(path, sizeof path, "stale");
	unlink(path);
	int fd = socket(AF_UNIX, SOCK_SEQPACKET, 0);
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
	assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
	close(fd); /* bound, never listening: a dead server's leftover */
	ax_vmm_server *s, *s2;
	assert_int_equal(ax_vmm_server_start(&s, path), 0);
	assert_int_equal(ax_vmm_server_start(&s2, path), -EADDRINUSE);
	ax_vmm_server_stop(s);
	FILE *f = fopen(path, "w");
	fclose(f);
	assert_int_equal(ax_vmm_server_start(&s, path), -EEXIST);
	assert_int_equal(access(path, F_OK), 0);
	unlink(path);
	ax_vmm_server_stop(NULL);
}

/* ---- importer over fake CUDA ops ------------------------------------------------------------------------- */

typedef struct fake_cuda {
	int ipc_opens, ipc_closes, vmm_maps, vmm_unmaps, ev_opens, ev_closes;
	int fail_ipc;        /* handle byte 0 value whose open fails */
	uint64_t vmm_size_seen;
	char vmm_text[16];   /* first bytes read through the VMM fd */
	int close_order_ok;  /* events were all closed before the first allocation */
} fake_cuda;

static int f_ipc_open(void *ctx, int device, const uint8_t h[64], uint64_t *base, uint64_t *size)
{
	fake_cuda *f = ctx;
	(void)device;
	if (h[0] == f->fail_ipc)
		return -EIO;
	f->ipc_opens++;
	*base = 0x7f0000000000ull + ((uint64_t)h[0] << 32);
	*size = (uint64_t)h[1] << 20; /* byte 1: allocation size in MiB */
	return 0;
}
static void f_ipc_close(void *ctx, int device, uint64_t base) { (void)device, (void)base, ((fake_cuda *)ctx)->ipc_closes++; }
static int f_vmm_map(void *ctx, int device, int fd, uint64_t size, uint64_t *base)
{
	fake_cuda *f = ctx;
	(void)device;
	f->vmm_maps++;
	f->vmm_size_seen = size;
	memset(f->vmm_text, 0, sizeof f->vmm_text);
	if (pread(fd, f->vmm_text, sizeof f->vmm_text - 1, 0) < 0)
		return -EIO;
	*base = 0x7e0000000000ull;
	return 0;
}
static void f_vmm_unmap(void *ctx, int device, uint64_t base, uint64_t size)
{
	fake_cuda *f = ctx;
	(void)device, (void)base, (void)size;
	if (f->ev_closes != f->ev_opens)
		f->close_order_ok = 0;
	f->vmm_unmaps++;
}
static int f_event_open(void *ctx, int device, const uint8_t h[64], void **ev)
{
	(void)device;
	if (h[0] == 0xee)
		return -EIO;
	((fake_cuda *)ctx)->ev_opens++;
	*ev = (void *)(uintptr_t)(0x1000 + h[0]);
	return 0;
}
static void f_event_close(void *ctx, int device, void *ev) { (void)device, (void)ev, ((fake_cuda *)ctx)->ev_closes++; }
static const char *f_last_error(void *ctx) { (void)ctx; return "fake CUDA error"; }

enum { LAYERS = 4, HQ = 4, HKV = 2, D = 8 };

typedef struct seg {
	char name[AX_SHM_NAME_MAX];
	ax_export *ex;
	ax_shm *sh;
} seg;

static void seg_open(seg *g)
{
	snprintf(g->name, sizeof g->name, "/attnx.cudatest.%d", (int)getpid());
	shm_unlink(g->name);
	ax_export_config cfg = {.name = g->name, .engine = "cuda_test", .model = "toy", .world_size = 1,
				.n_layers = LAYERS, .n_q_heads = HQ, .n_kv_heads = HKV, .head_dim = D,
				.q_dtype = AX_DTYPE_BF16, .k_dtype = AX_DTYPE_BF16, .max_ctx = 256, .req_cap = 8,
				.ring_cap = 8, .arena_cap = 64, .data_size = 1 << 16};
	assert_int_equal(ax_export_open(&g->ex, &cfg), 0);
}

/* A K-pool entry of layer l: [slots, HKV, D] bf16 = slots * 32 bytes, in IPC allocation (h0, size h1 MiB). */
static uint32_t add_ipc_k(seg *g, int l, uint64_t slots, uint8_t h0, uint8_t h1, uint64_t offset, const uint8_t *ev)
{
	ax_shm_buffer b = {.kind = AX_BUF_K_POOL, .dtype = AX_DTYPE_BF16, .layer = l, .ndim = 3,
			   .dim = {slots, HKV, D}, .scale = 1};
	uint8_t h[64] = {h0, h1, 9, 9};
	assert_int_equal(ax_cuda_entry_set_ipc(&b, 0, h, 64, offset, slots * HKV * D * 2), 0);
	if (ev)
		assert_int_equal(ax_cuda_entry_set_event(&b, ev), 0);
	uint32_t idx;
	assert_int_equal(ax_export_add_device_buffer(g->ex, &b, &idx), 0);
	return idx;
}

static void test_importer(void **state)
{
	(void)state;
	seg g;
	seg_open(&g);
	fake_cuda f = {.fail_ipc = 0x66, .close_order_ok = 1};
	ax_cuda_ops ops = {&f, f_ipc_open, f_ipc_close, f_vmm_map, f_vmm_unmap, f_event_open, f_event_close,
			   f_last_error};
	uint8_t ev[64] = {0x21}, badev[64] = {0xee};
	/* Layers 0 and 1 share allocation 0x10 (4 MiB); layer 2 overruns allocation 0x20 (1 MiB); layer 3's handle
	 * does not open. */
	uint32_t k0 = add_ipc_k(&g, 0, 4096, 0x10, 4, 0, ev);
	uint32_t k1 = add_ipc_k(&g, 1, 4096, 0x10, 4, 1 << 20, NULL);
	uint32_t k2 = add_ipc_k(&g, 2, 32768, 0x20, 1, 4096, badev);
	uint32_t k3 = add_ipc_k(&g, 3, 16, 0x66, 1, 0, NULL);
	void *host;
	uint32_t hq;
	ax_shm_buffer q = {.kind = AX_BUF_Q_RING, .loc = AX_LOC_HOST, .dtype = AX_DTYPE_BF16, .layer = -1, .ndim = 3,
			   .dim = {16, HQ, D}, .scale = 1};
	assert_int_equal(ax_export_add_host_buffer(g.ex, &q, &host, &hq), 0);
	assert_int_equal(ax_shm_attach(&g.sh, g.name), 0);

	ax_shm_cuda *c;
	assert_int_equal(ax_shm_cuda_open(&c, g.sh, -1, &ops), -EINVAL);
	assert_int_equal(ax_shm_cuda_open(&c, g.sh, 0, NULL), -EINVAL);
	assert_int_equal(ax_shm_cuda_open(&c, g.sh, 0, &ops), 0);
	uint64_t p0, p1, p;
	assert_int_equal(ax_shm_cuda_map(c, k0, &p0), 0);
	assert_int_equal(ax_shm_cuda_map(c, k1, &p1), 0);
	assert_int_equal(ax_shm_cuda_map(c, k0, &p), 0);
	assert_int_equal(f.ipc_opens, 1); /* one allocation, opened once */
	assert_int_equal(p0, 0x7f1000000000ull);
	assert_int_equal(p1, p0 + (1 << 20));
	assert_int_equal(p, p0);
	for (int i = 0; i < 2; i++) /* rejected once, remembered */
		assert_int_equal(ax_shm_cuda_map(c, k2, &p), -ERANGE);
	assert_string_equal(ax_shm_cuda_last_error(c), "buffer extent outside its allocation");
	for (int i = 0; i < 2; i++)
		assert_int_equal(ax_shm_cuda_map(c, k3, &p), -EIO);
	assert_string_equal(ax_shm_cuda_last_error(c), "fake CUDA error");
	assert_int_equal(ax_shm_cuda_map(c, hq, &p), -EINVAL);
	assert_int_equal(ax_shm_cuda_map(c, 999, &p), -ENOENT);
	/* Events: opened once per entry; none on k1; an entry that was rejected has none to give. */
	void *e = NULL;
	assert_int_equal(ax_shm_cuda_event(c, k0, &e), 1);
	assert_ptr_equal(e, (void *)(uintptr_t)0x1021);
	assert_int_equal(ax_shm_cuda_event(c, k0, &e), 1);
	assert_int_equal(f.ev_opens, 1);
	assert_int_equal(ax_shm_cuda_event(c, k1, &e), 0);
	assert_int_equal(ax_shm_cuda_event(c, k2, &e), -ERANGE);
	ax_shm_cuda_stats st;
	ax_shm_cuda_get_stats(c, &st);
	assert_int_equal(st.allocations, 2); /* 0x10 and 0x20 (opened, then the entry's extent failed) */
	assert_int_equal(st.entries, 2);
	assert_int_equal(st.rejected, 2);
	assert_int_equal(st.events, 1);
	/* An entry the engine appends after the importer was opened is found too. */
	uint32_t k0b = add_ipc_k(&g, 0, 16, 0x30, 1, 0, NULL);
	ax_shm_find_buffer(g.sh, AX_BUF_K_POOL, 0); /* the capture's lookups refresh the table copy */
	assert_int_equal(ax_shm_cuda_map(c, k0b, &p), 0);
	ax_shm_cuda_close(c);
	assert_int_equal(f.ipc_closes, f.ipc_opens);
	assert_int_equal(f.ev_closes, f.ev_opens);
	ax_shm_detach(g.sh);
	ax_export_close(g.ex);
}

/* VMM entries: the fd comes from a real server, is mapped with the server's size, closed after the import; the
 * server's event handle is used; an unknown id and a dead server reject the entry. */
static void test_importer_vmm(void **state)
{
	(void)state;
	seg g;
	seg_open(&g);
	char path[108];
	sock_path(path, sizeof path, "importer");
	ax_vmm_server *s;
	assert_int_equal(ax_vmm_server_start(&s, path), 0);
	int afd = fake_alloc_fd("vmm-block-1");
	uint8_t ev[64] = {0x42};
	assert_int_equal(ax_vmm_server_add(s, 1, afd, 8u << 20, 0, ev), 0);
	uint32_t idx[3];
	for (int i = 0; i < 3; i++) {
		ax_shm_buffer b = {.kind = AX_BUF_K_POOL, .dtype = AX_DTYPE_BF16, .layer = i, .ndim = 3,
				   .dim = {1024, HKV, D}, .scale = 1};
		/* 0: id 1 at 1 MiB; 1: id 2 (unknown); 2: id 1 again at 2 MiB (same mapping) */
		uint64_t id = i == 1 ? 2 : 1;
		assert_int_equal(ax_cuda_entry_set_vmm(&b, 0, id, path, (uint64_t)(i + 1) << 20, 1024 * HKV * D * 2), 0);
		assert_int_equal(ax_export_add_device_buffer(g.ex, &b, &idx[i]), 0);
	}
	assert_int_equal(ax_shm_attach(&g.sh, g.name), 0);
	fake_cuda f = {.fail_ipc = -1, .close_order_ok = 1};
	ax_cuda_ops ops = {&f, f_ipc_open, f_ipc_close, f_vmm_map, f_vmm_unmap, f_event_open, f_event_close,
			   f_last_error};
	ax_shm_cuda *c;
	assert_int_equal(ax_shm_cuda_open(&c, g.sh, 0, &ops), 0);
	int fds_before = count_fds();
	uint64_t p;
	assert_int_equal(ax_shm_cuda_map(c, idx[0], &p), 0);
	assert_int_equal(p, 0x7e0000000000ull + (1 << 20));
	assert_string_equal(f.vmm_text, "vmm-block-1");
	assert_int_equal(f.vmm_size_seen, 8u << 20);
	assert_int_equal(ax_shm_cuda_map(c, idx[1], &p), -ENOENT);
	assert_int_equal(ax_shm_cuda_map(c, idx[2], &p), 0);
	assert_int_equal(p, 0x7e0000000000ull + (3 << 20));
	assert_int_equal(f.vmm_maps, 1);
	assert_int_equal(settled_fds(fds_before), fds_before); /* the imported fd was closed */
	void *e;
	assert_int_equal(ax_shm_cuda_event(c, idx[0], &e), 1);
	assert_ptr_equal(e, (void *)(uintptr_t)0x1042);
	ax_shm_cuda_close(c);
	assert_int_equal(f.vmm_unmaps, 1);
	assert_true(f.close_order_ok);
	/* The server gone (engine died): a fresh importer rejects the entry instead of hanging. */
	ax_vmm_server_stop(s);
	assert_int_equal(ax_shm_cuda_open(&c, g.sh, 0, &ops), 0);
	assert_int_equal(ax_shm_cuda_map(c, idx[0], &p), -ENOENT);
	ax_shm_cuda_stats st;
	ax_shm_cuda_get_stats(c, &st);
	assert_int_equal(st.rejected, 1);
	ax_shm_cuda_close(c);
	close(afd);
	ax_shm_detach(g.sh);
	ax_export_close(g.ex);
}

int main(void)
{
	signal(SIGPIPE, SIG_IGN);
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_handle_parse),
		cmocka_unit_test(test_entry_helpers),
		cmocka_unit_test(test_extent),
		cmocka_unit_test(test_reply_check),
		cmocka_unit_test(test_fd_to_other_process),
		cmocka_unit_test(test_fetch_errors),
		cmocka_unit_test(test_server_bad_peers),
		cmocka_unit_test(test_client_bad_servers),
		cmocka_unit_test(test_server_path),
		cmocka_unit_test(test_importer),
		cmocka_unit_test(test_importer_vmm),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
