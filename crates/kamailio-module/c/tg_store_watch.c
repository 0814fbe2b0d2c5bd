/*
 * trunkguard.so: the Redis store watched from a process of its own, so that a Redis
 * that stops answering gets writes refused at once instead of every SIP worker
 * stuck.
 *
 * db_redis reads Redis's replies with hiredis's blocking calls and no read timeout
 * (redisConnectWithTimeout bounds the connect alone, hiredis 0.14 as Debian 12 ships
 * it; db_redis never calls redisSetTimeout), and its reconnect after an error
 * connects again and waits for its SELECT's reply the same way. A Redis that accepts
 * connections but answers nothing (a stopped or hung server, whose kernel still
 * completes the handshake) keeps the worker whose write is in progress waiting, and
 * with it every worker that needs the store's write lock (tg_db.c): the whole edge
 * answered nothing, OPTIONS and in-dialog requests included, until Redis came back.
 *
 * Here a process of the module sends PING over a connection of its own every second
 * and waits a second for the answer (any reply counts: a "-NOAUTH" from a Redis with
 * a password is an answer). While none comes, the store reads as down: a write is
 * refused before it waits for the lock (the policy fails closed, 500
 * store_unavailable), a worker waiting for the lock stops waiting, and everything
 * that writes nothing is served. The write that was under way when Redis stopped
 * still waits for it, in its one worker. SQLite is a local file: not watched.
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../../core/dprint.h"
#include "../../core/mem/shm_mem.h"
#include "../../core/timer_proc.h"

#include "tg_mod.h"

#define TG_WATCH_TIMEOUT_MS 1000

/* 1 while Redis does not answer: shared by every process. NULL: nothing watched. */
static volatile int *tg_store_down = NULL;
static char tg_watch_host[256];
static char tg_watch_port[8];
static int tg_watch_fd = -1; /* the watch process's connection */

/* redis://[userinfo@]host[:port][/db] -> host, port (6379 when none). */
static int tg_watch_parse(const str *url)
{
	const char *s = url->s + 8, *end = url->s + url->len, *p, *host, *host_end;
	const char *port = NULL, *port_end = NULL;

	for(p = s; p < end && *p != '/'; p++)
		if(*p == '@')
			s = p + 1;
	end = p;
	if(s < end && *s == '[') {
		host = s + 1;
		host_end = memchr(host, ']', end - host);
		if(host_end == NULL)
			return -1;
		if(host_end + 1 < end && host_end[1] == ':') {
			port = host_end + 2;
			port_end = end;
		}
	} else {
		host = s;
		host_end = memchr(s, ':', end - s);
		if(host_end == NULL) {
			host_end = end;
		} else {
			port = host_end + 1;
			port_end = end;
		}
	}
	if(host_end <= host || host_end - host >= (int)sizeof(tg_watch_host))
		return -1;
	if(port != NULL && (port_end <= port || port_end - port >= (int)sizeof(tg_watch_port)))
		return -1;
	memcpy(tg_watch_host, host, host_end - host);
	tg_watch_host[host_end - host] = '\0';
	if(port != NULL) {
		memcpy(tg_watch_port, port, port_end - port);
		tg_watch_port[port_end - port] = '\0';
	} else {
		strcpy(tg_watch_port, "6379");
	}
	return 0;
}

/* mod_init: 1 when a watch process is wanted (a Redis store), 0 when not, -1 on
 * error. */
int tg_store_watch_init(void)
{
	if(!tg_db_enabled() || tg_db_url.len <= 8
			|| strncasecmp(tg_db_url.s, "redis://", 8) != 0)
		return 0;
	if(tg_watch_parse(&tg_db_url) < 0) {
		LM_ERR("db_url: cannot read a Redis host and port in it\n");
		return -1;
	}
	tg_store_down = shm_malloc(sizeof(*tg_store_down));
	if(tg_store_down == NULL) {
		LM_ERR("no shared memory for the store watch\n");
		return -1;
	}
	*tg_store_down = 0;
	return 1;
}

int tg_store_is_down(void)
{
	return tg_store_down != NULL && *tg_store_down;
}

unsigned long tg_stat_store_down(void)
{
	return (unsigned long)tg_store_is_down();
}

static void tg_watch_close(void)
{
	if(tg_watch_fd >= 0)
		close(tg_watch_fd);
	tg_watch_fd = -1;
}

/* Waits up to TG_WATCH_TIMEOUT_MS for `events` on the watch's connection. */
static int tg_watch_wait(short events)
{
	struct pollfd pfd;
	int n;

	pfd.fd = tg_watch_fd;
	pfd.events = events;
	do {
		n = poll(&pfd, 1, TG_WATCH_TIMEOUT_MS);
	} while(n < 0 && errno == EINTR);
	return n == 1 && (pfd.revents & events) ? 0 : -1;
}

static int tg_watch_connect(void)
{
	struct addrinfo hints, *res = NULL, *ai;
	int err = 0;
	socklen_t len = sizeof(err);

	memset(&hints, 0, sizeof(hints));
	hints.ai_socktype = SOCK_STREAM;
	if(getaddrinfo(tg_watch_host, tg_watch_port, &hints, &res) != 0)
		return -1;
	for(ai = res; ai != NULL; ai = ai->ai_next) {
		tg_watch_fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
				ai->ai_protocol);
		if(tg_watch_fd < 0)
			continue;
		if(connect(tg_watch_fd, ai->ai_addr, ai->ai_addrlen) == 0
				|| (errno == EINPROGRESS && tg_watch_wait(POLLOUT) == 0
						&& getsockopt(tg_watch_fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0
						&& err == 0))
			break;
		tg_watch_close();
	}
	freeaddrinfo(res);
	return tg_watch_fd >= 0 ? 0 : -1;
}

/* 0 when Redis answered a PING within the timeout, -1 otherwise. */
static int tg_watch_ping(void)
{
	static const char ping[] = "PING\r\n";
	char buf[256];
	size_t got = 0;
	ssize_t n;

	if(tg_watch_fd < 0 && tg_watch_connect() < 0)
		return -1;
	do {
		n = send(tg_watch_fd, ping, sizeof(ping) - 1, MSG_NOSIGNAL);
	} while(n < 0 && errno == EINTR);
	if(n != (ssize_t)(sizeof(ping) - 1))
		goto gone;
	/* One line: "+PONG" or an error ("-NOAUTH ..."), Redis there and answering. A
	 * reply that does not fit is not one a PING gets. */
	while(got == 0 || buf[got - 1] != '\n') {
		if(got == sizeof(buf) || tg_watch_wait(POLLIN) < 0)
			goto gone;
		n = recv(tg_watch_fd, buf + got, sizeof(buf) - got, 0);
		if(n < 0 && errno == EINTR)
			continue;
		if(n <= 0)
			goto gone;
		got += (size_t)n;
	}
	if(buf[0] != '+' && buf[0] != '-')
		goto gone;
	return 0;
gone:
	/* A new connection next time: a late answer on this one would be taken for the
	 * next PING's. */
	tg_watch_close();
	return -1;
}

/* The watch process, every second (fork_basic_timer). */
void tg_store_watch(unsigned int ticks, void *param)
{
	int kept = tg_watch_fd >= 0;
	/* A kept connection that failed (Redis restarted since) gets one more try on a
	 * new one, so a quick restart does not read as silence. */
	int down = tg_watch_ping() < 0 && (!kept || tg_watch_ping() < 0);

	if(down == *tg_store_down)
		return;
	*tg_store_down = down;
	if(down) {
		LM_ERR("store: Redis at %s:%s does not answer: store writes are refused until "
			   "it does\n",
				tg_watch_host, tg_watch_port);
	} else {
		LM_NOTICE("store: Redis at %s:%s answers again\n", tg_watch_host, tg_watch_port);
	}
}
