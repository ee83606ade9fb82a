/*
 * vmm_fd.c — passing CUDA VMM allocations' POSIX fds from an engine to a capture (attnx_shm_cuda.h, part 2).
 *
 * cuMemExportToShareableHandle gives the engine a POSIX fd per allocation; an fd means nothing in another process
 * unless the kernel carries it, so the engine runs this server: one thread, one AF_UNIX SOCK_SEQPACKET socket
 * (message boundaries, so a short or oversized datagram is visible as such), one request and one reply per
 * connection, the fd attached to the reply with SCM_RIGHTS. The thread polls the listening socket and a pipe that
 * ax_vmm_server_stop writes to; a connected peer gets 1 s to send its request, and every send uses MSG_NOSIGNAL, so
 * a dead or silent client costs the engine nothing but that second on this thread. Peers of another uid are
 * refused (SO_PEERCRED), as the segment itself is mode 0600.
 *
 * The client side (ax_vmm_fetch) checks everything it receives before trusting it: datagram size (MSG_TRUNC),
 * control-message truncation (MSG_CTRUNC), the number of fds, magic, id and status; any fd that arrived with a bad
 * reply is closed.
 */
#include "attnx_shm_cuda.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

_Static_assert(sizeof(ax_vmm_request) == 16, "ax_vmm_request is 16 bytes");
_Static_assert(sizeof(ax_vmm_reply) == 96, "ax_vmm_reply is 96 bytes");

#define PEER_TIMEOUT_MS 1000
#define MAX_FDS_SEEN 4 /* room for a misbehaving peer's extra fds, so they can be closed */

typedef struct vmm_alloc {
	uint64_t id;
	int fd;
	uint64_t size;
	int32_t device;
	int has_event;
	uint8_t event[AX_CUDA_IPC_HANDLE_SIZE];
} vmm_alloc;

struct ax_vmm_server {
	int lfd;
	int wake[2];
	char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
	pthread_t thread;
	int started;
	pthread_mutex_t mu;
	vmm_alloc *allocs;
	uint32_t n, cap;
	uint64_t served, refused;
};

static int make_addr(const char *path, struct sockaddr_un *sa)
{
	memset(sa, 0, sizeof *sa);
	sa->sun_family = AF_UNIX;
	if (path == NULL || path[0] == '\0')
		return -EINVAL;
	if (strlen(path) >= sizeof sa->sun_path)
		return -ENAMETOOLONG;
	memcpy(sa->sun_path, path, strlen(path));
	return 0;
}

/* 0 when the datagram can be sent now or within the timeout, else -ETIMEDOUT / -errno. */
static int wait_fd(int fd, short events, uint32_t timeout_ms)
{
	struct pollfd p = {.fd = fd, .events = events};
	int n;
	do {
		n = poll(&p, 1, (int)timeout_ms);
	} while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	return n == 0 ? -ETIMEDOUT : 0;
}

/* ---- server --------------------------------------------------------------------------------------------- */

static vmm_alloc *find_alloc(ax_vmm_server *s, uint64_t id)
{
	for (uint32_t i = 0; i < s->n; i++)
		if (s->allocs[i].id == id)
			return &s->allocs[i];
	return NULL;
}

static int peer_same_uid(int cfd)
{
	struct ucred cr;
	socklen_t len = sizeof cr;
	return getsockopt(cfd, SOL_SOCKET, SO_PEERCRED, &cr, &len) == 0 && cr.uid == geteuid();
}

/* Send `r`, with `fd` attached when fd >= 0. */
static void send_reply(int cfd, const ax_vmm_reply *r, int fd)
{
	struct iovec iov = {.iov_base = (void *)r, .iov_len = sizeof *r};
	union {
		struct cmsghdr h;
		char buf[CMSG_SPACE(sizeof(int))];
	} ctl;
	struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1};
	if (fd >= 0) {
		memset(&ctl, 0, sizeof ctl);
		m.msg_control = ctl.buf;
		m.msg_controllen = sizeof ctl.buf;
		struct cmsghdr *c = CMSG_FIRSTHDR(&m);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(c), &fd, sizeof fd);
	}
	if (wait_fd(cfd, POLLOUT, PEER_TIMEOUT_MS) == 0)
		(void)sendmsg(cfd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
}

int ax_vmm_request_check(const void *buf, size_t len, uint64_t *id)
{
	ax_vmm_request q;
	if (len != sizeof q)
		return -EPROTO;
	memcpy(&q, buf, sizeof q);
	if (q.magic != AX_VMM_MAGIC || q.version != AX_VMM_VERSION)
		return -EPROTO;
	*id = q.id;
	return 0;
}

/* Read one request from a connected peer and answer it. Never blocks past the peer timeout. */
static void serve_one(ax_vmm_server *s, int cfd)
{
	ax_vmm_request q;
	ax_vmm_reply r;
	uint64_t id;
	memset(&r, 0, sizeof r);
	r.magic = AX_VMM_MAGIC;
	r.status = -EPROTO;
	int fd = -1;
	if (!peer_same_uid(cfd)) {
		r.status = -EACCES;
	} else if (wait_fd(cfd, POLLIN, PEER_TIMEOUT_MS) == 0) {
		ssize_t n = recv(cfd, &q, sizeof q, MSG_DONTWAIT | MSG_TRUNC); /* MSG_TRUNC: n is the datagram's size */
		if (n > 0 && ax_vmm_request_check(&q, (size_t)n, &id) == 0) {
			r.id = id;
			pthread_mutex_lock(&s->mu);
			vmm_alloc *a = find_alloc(s, id);
			if (a && (fd = dup(a->fd)) >= 0) {
				r.status = 0;
				r.size = a->size;
				r.device = a->device;
				r.flags = a->has_event ? AX_VMM_F_EVENT : 0;
				memcpy(r.event, a->event, sizeof r.event);
			} else {
				r.status = a ? -EMFILE : -ENOENT;
			}
			pthread_mutex_unlock(&s->mu);
		} else if (n <= 0) {
			return; /* the peer went away or sent an empty datagram: nobody to answer */
		}
	} else {
		return; /* silent peer */
	}
	pthread_mutex_lock(&s->mu); /* counted before the reply, so a client that got it sees the count */
	if (r.status == 0)
		s->served++;
	else
		s->refused++;
	pthread_mutex_unlock(&s->mu);
	send_reply(cfd, &r, r.status == 0 ? fd : -1);
	if (fd >= 0)
		close(fd);
}

static void *server_main(void *arg)
{
	ax_vmm_server *s = arg;
	for (;;) {
		struct pollfd p[2] = {{.fd = s->lfd, .events = POLLIN}, {.fd = s->wake[0], .events = POLLIN}};
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (p[1].revents)
			break;
		if (!(p[0].revents & POLLIN))
			continue;
		int cfd = accept4(s->lfd, NULL, NULL, SOCK_CLOEXEC);
		if (cfd < 0)
			continue;
		serve_one(s, cfd);
		close(cfd);
	}
	return NULL;
}

/* A socket file at path: -EADDRINUSE if a server answers there, 0 after removing a stale one. */
static int clear_stale(const char *path, const struct sockaddr_un *sa)
{
	struct stat st;
	if (lstat(path, &st) != 0)
		return 0;
	if (!S_ISSOCK(st.st_mode))
		return -EEXIST;
	int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	int live = connect(fd, (const struct sockaddr *)sa, sizeof *sa) == 0;
	close(fd);
	if (live)
		return -EADDRINUSE;
	return unlink(path) == 0 || errno == ENOENT ? 0 : -errno;
}

static int bind_listen(ax_vmm_server *s, const struct sockaddr_un *sa)
{
	s->lfd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (s->lfd < 0)
		return -errno;
	mode_t old = umask(0177); /* socket file mode 0600 */
	int rc = bind(s->lfd, (const struct sockaddr *)sa, sizeof *sa);
	umask(old);
	if (rc != 0 || listen(s->lfd, 16) != 0)
		return -errno;
	return 0;
}

int ax_vmm_server_start(ax_vmm_server **out, const char *path)
{
	struct sockaddr_un sa;
	int rc = make_addr(path, &sa);
	if (rc)
		return rc;
	if ((rc = clear_stale(path, &sa)) < 0)
		return rc;
	ax_vmm_server *s = calloc(1, sizeof *s);
	if (s == NULL)
		return -ENOMEM;
	s->lfd = s->wake[0] = s->wake[1] = -1;
	pthread_mutex_init(&s->mu, NULL);
	memcpy(s->path, sa.sun_path, sizeof s->path);
	if (pipe2(s->wake, O_CLOEXEC) != 0) {
		rc = -errno;
		goto fail;
	}
	if ((rc = bind_listen(s, &sa)) < 0)
		goto fail;
	if ((rc = -pthread_create(&s->thread, NULL, server_main, s)) < 0)
		goto fail;
	s->started = 1;
	*out = s;
	return 0;
fail:
	ax_vmm_server_stop(s);
	return rc;
}

int ax_vmm_server_add(ax_vmm_server *s, uint64_t id, int fd, uint64_t size, int device, const void *event64)
{
	if (s == NULL || fd < 0 || size == 0)
		return -EINVAL;
	int rc = 0;
	pthread_mutex_lock(&s->mu);
	if (find_alloc(s, id)) {
		rc = -EEXIST;
	} else if (s->n == s->cap) {
		uint32_t cap = s->cap ? 2 * s->cap : 16;
		vmm_alloc *a = realloc(s->allocs, cap * sizeof *a);
		if (a == NULL)
			rc = -ENOMEM;
		else
			s->allocs = a, s->cap = cap;
	}
	int dfd = rc == 0 ? fcntl(fd, F_DUPFD_CLOEXEC, 0) : -1;
	if (rc == 0 && dfd < 0)
		rc = -errno;
	if (rc == 0) {
		vmm_alloc *a = &s->allocs[s->n++];
		memset(a, 0, sizeof *a);
		a->id = id, a->fd = dfd, a->size = size, a->device = device;
		if (event64) {
			a->has_event = 1;
			memcpy(a->event, event64, sizeof a->event);
		}
	}
	pthread_mutex_unlock(&s->mu);
	return rc;
}

int ax_vmm_server_remove(ax_vmm_server *s, uint64_t id)
{
	pthread_mutex_lock(&s->mu);
	vmm_alloc *a = find_alloc(s, id);
	if (a) {
		close(a->fd);
		*a = s->allocs[--s->n];
	}
	pthread_mutex_unlock(&s->mu);
	return a ? 0 : -ENOENT;
}

void ax_vmm_server_counts(ax_vmm_server *s, uint64_t *served, uint64_t *refused)
{
	pthread_mutex_lock(&s->mu);
	if (served)
		*served = s->served;
	if (refused)
		*refused = s->refused;
	pthread_mutex_unlock(&s->mu);
}

void ax_vmm_server_stop(ax_vmm_server *s)
{
	if (s == NULL)
		return;
	if (s->started) {
		char b = 1;
		while (write(s->wake[1], &b, 1) < 0 && errno == EINTR)
			;
		pthread_join(s->thread, NULL);
	}
	if (s->lfd >= 0) {
		close(s->lfd);
		unlink(s->path);
	}
	for (int i = 0; i < 2; i++)
		if (s->wake[i] >= 0)
			close(s->wake[i]);
	for (uint32_t i = 0; i < s->n; i++)
		close(s->allocs[i].fd);
	free(s->allocs);
	pthread_mutex_destroy(&s->mu);
	free(s);
}

/* ---- client --------------------------------------------------------------------------------------------- */

int ax_vmm_reply_check(const ax_vmm_reply *r, size_t len, uint64_t id, int nfds)
{
	if (len != sizeof *r || r->magic != AX_VMM_MAGIC || r->id != id)
		return -EPROTO;
	if (r->status < 0)
		return nfds == 0 && r->status > -4096 ? r->status : -EPROTO;
	if (r->status != 0 || nfds != 1 || r->size == 0 || (r->flags & ~(uint32_t)AX_VMM_F_EVENT) || r->device < 0)
		return -EPROTO;
	return 0;
}

/* Collect the fds of every SCM_RIGHTS message into fds[0..*n). */
static void take_fds(struct msghdr *m, int *fds, int *n)
{
	*n = 0;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(m); c; c = CMSG_NXTHDR(m, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS || c->cmsg_len < CMSG_LEN(0))
			continue;
		size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (size_t i = 0; i < k && *n < MAX_FDS_SEEN; i++)
			memcpy(&fds[(*n)++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
	}
}

/* Receive the reply datagram; returns its length (flags checked) or a negative errno. */
static int recv_reply(int sfd, uint32_t timeout_ms, ax_vmm_reply *r, int *fds, int *nfds)
{
	union {
		struct cmsghdr h;
		char buf[CMSG_SPACE(MAX_FDS_SEEN * sizeof(int))];
	} ctl;
	struct iovec iov = {.iov_base = r, .iov_len = sizeof *r};
	struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf, .msg_controllen = sizeof ctl.buf};
	*nfds = 0;
	int rc = wait_fd(sfd, POLLIN, timeout_ms);
	if (rc)
		return rc;
	ssize_t n = recvmsg(sfd, &m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
	if (n < 0)
		return errno == ECONNRESET ? -EPROTO : -errno;
	take_fds(&m, fds, nfds);
	if (n == 0 || (m.msg_flags & (MSG_TRUNC | MSG_CTRUNC)))
		return -EPROTO;
	return (int)n;
}

int ax_vmm_fetch(const char *path, uint64_t id, uint32_t timeout_ms, int *fd, ax_vmm_reply *info)
{
	struct sockaddr_un sa;
	int rc = make_addr(path, &sa);
	if (rc)
		return rc;
	int sfd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (sfd < 0)
		return -errno;
	int fds[MAX_FDS_SEEN], nfds = 0;
	ax_vmm_request q = {.magic = AX_VMM_MAGIC, .version = AX_VMM_VERSION, .id = id};
	ax_vmm_reply r;
	memset(&r, 0, sizeof r);
	if (connect(sfd, (struct sockaddr *)&sa, sizeof sa) != 0) {
		rc = errno == ECONNREFUSED || errno == ENOENT ? -ENOENT : -errno;
	} else if (send(sfd, &q, sizeof q, MSG_NOSIGNAL) != (ssize_t)sizeof q) {
		rc = -EPROTO;
	} else if ((rc = recv_reply(sfd, timeout_ms, &r, fds, &nfds)) >= 0) {
		rc = ax_vmm_reply_check(&r, (size_t)rc, id, nfds);
	}
	close(sfd);
	if (rc == 0) {
		*fd = fds[0];
		if (info)
			*info = r;
		return 0;
	}
	for (int i = 0; i < nfds; i++)
		close(fds[i]);
	return rc;
}
