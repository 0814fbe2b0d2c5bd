/*
 * trunkguard.so: alerts. Workers spool each alert of a verdict as one JSON file
 * (tmp + rename: never a network call in a SIP worker, as the KEMI shim does it);
 * the timer process, every timer_interval seconds, closes the policy's expired
 * alert windows (their summaries are spooled too), writes its refusal-log summary,
 * and delivers the spool to alert_url (docs/alerts.md) with the bearer token of
 * alert_token_file, read again whenever the file changes.
 *
 * Delivery outcome: the core's rule (tg_alert_delivery, docs/alerts.md "Posting
 * from a host"): sent, the file removed; refused (a 4xx but 408/429), moved to
 * spool_dir/rejected for the operator (a wrong token is fixed by hand, not retried
 * blindly); retry (unreachable, 5xx, ...), kept, with a backoff doubling from 1 s
 * to 60 s.
 */
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../../core/dprint.h"
#include "../../core/mem/mem.h"

#include "tg_mod.h"

#define TG_DELIVERY_TIMEOUT_MS 2000
#define TG_DELIVERY_BATCH 100
#define TG_RETRY_MIN_MS 1000
#define TG_RETRY_MAX_MS 60000

/* Writes one alert to the spool: 0, or -1 (logged: the alert is lost). */
int tg_spool(const tg_str *alert)
{
	char name[96], path[PATH_MAX], tmp[PATH_MAX];
	int fd;
	size_t done = 0;
	ssize_t n;

	tg_proc.alert_seq++;
	snprintf(name, sizeof(name), "%llu-%d-%u.json",
			(unsigned long long)tg_now_ms(), (int)getpid(), tg_proc.alert_seq);
	snprintf(path, sizeof(path), "%s/%s", tg_spool_dir, name);
	snprintf(tmp, sizeof(tmp), "%s/.%s", tg_spool_dir, name);
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if(fd < 0)
		goto lost;
	while(done < alert->len) {
		n = write(fd, alert->s + done, alert->len - done);
		if(n < 0 && errno == EINTR)
			continue;
		if(n <= 0) {
			close(fd);
			unlink(tmp);
			goto lost;
		}
		done += (size_t)n;
	}
	if(close(fd) != 0 || rename(tmp, path) != 0) {
		unlink(tmp);
		goto lost;
	}
	update_stat(tg_st_alerts_spooled, 1);
	return 0;
lost:
	update_stat(tg_st_alerts_dropped, 1);
	LM_ERR("alert lost, cannot spool it in %s: %s: %.*s\n", tg_spool_dir,
			strerror(errno), (int)alert->len, alert->s);
	return -1;
}

static int tg_spooled_name(const char *name)
{
	size_t n = strlen(name);
	return name[0] != '.' && n > 5 && strcmp(name + n - 5, ".json") == 0;
}

int tg_spool_count(void)
{
	DIR *d;
	struct dirent *e;
	int count = 0;

	d = opendir(tg_spool_dir);
	if(d == NULL)
		return -1;
	while((e = readdir(d)) != NULL)
		if(tg_spooled_name(e->d_name))
			count++;
	closedir(d);
	return count;
}

/* --- the timer process ------------------------------------------------------------ */

static char tg_token[1024];
static int tg_token_read = 0;
static struct stat tg_token_seen;
static uint64_t tg_next_delivery = 0;
static uint64_t tg_backoff = TG_RETRY_MIN_MS;

/* (Re)reads the token file when it changed (inode, size, modification time: an edit
 * in place or a new file renamed over it): a corrected token is used from the next
 * delivery on, with no restart. */
static void tg_read_token(void)
{
	struct stat st;
	char *text = NULL;
	size_t len = 0, a = 0, b;

	if(tg_alert_token_file == NULL)
		return;
	if(stat(tg_alert_token_file, &st) != 0) {
		LM_ERR("cannot read the alert token %s: %s\n", tg_alert_token_file,
				strerror(errno));
		return;
	}
	if(tg_token_read && st.st_ino == tg_token_seen.st_ino
			&& st.st_size == tg_token_seen.st_size
			&& st.st_mtim.tv_sec == tg_token_seen.st_mtim.tv_sec
			&& st.st_mtim.tv_nsec == tg_token_seen.st_mtim.tv_nsec)
		return;
	if(tg_read_file(tg_alert_token_file, &text, &len) < 0) {
		LM_ERR("cannot read the alert token %s: %s\n", tg_alert_token_file,
				strerror(errno));
		return;
	}
	b = len;
	while(a < b && (text[a] == ' ' || text[a] == '\t' || text[a] == '\r' || text[a] == '\n'))
		a++;
	while(b > a && (text[b - 1] == ' ' || text[b - 1] == '\t' || text[b - 1] == '\r'
						   || text[b - 1] == '\n'))
		b--;
	if(b == a && tg_token[0] != '\0') {
		/* Caught between the truncation and the write of an edit in place: the
		 * last token serves this delivery, the next one reads again. */
		pkg_free(text);
		return;
	}
	if(b - a >= sizeof(tg_token)) {
		LM_ERR("the alert token in %s is too long\n", tg_alert_token_file);
		pkg_free(text);
		return;
	}
	memcpy(tg_token, text + a, b - a);
	tg_token[b - a] = '\0';
	pkg_free(text);
	if(tg_token_read)
		LM_INFO("trunkguard: alert token %s changed: read again\n", tg_alert_token_file);
	tg_token_read = 1;
	tg_token_seen = st;
}

static int tg_name_cmp(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

static void tg_set_aside(const char *name)
{
	char from[PATH_MAX + 256], dir[PATH_MAX], to[PATH_MAX + 256];

	snprintf(dir, sizeof(dir), "%s/rejected", tg_spool_dir);
	snprintf(from, sizeof(from), "%s/%s", tg_spool_dir, name);
	snprintf(to, sizeof(to), "%s/%s", dir, name);
	if((mkdir(dir, 0700) != 0 && errno != EEXIST) || rename(from, to) != 0) {
		LM_ERR("cannot set alert %s aside: %s\n", name, strerror(errno));
		return;
	}
	update_stat(tg_st_alerts_rejected, 1);
}

static void tg_deliver(void)
{
	DIR *d;
	struct dirent *e;
	char *names[TG_DELIVERY_BATCH];
	char path[PATH_MAX], err[TG_ERR_LEN], shown[256];
	int count = 0, i, status, delivery;
	uint64_t now, deadline;
	char *body;
	size_t len;

	now = tg_now_ms();
	if(tg_alert_url == NULL || now < tg_next_delivery)
		return;
	d = opendir(tg_spool_dir);
	if(d == NULL) {
		LM_ERR("cannot read the alert spool %s: %s\n", tg_spool_dir, strerror(errno));
		return;
	}
	/* The oldest first (names start with the spooling time); a bounded batch per
	 * tick, so a slow receiver cannot hold the timer for long. */
	while((e = readdir(d)) != NULL) {
		if(!tg_spooled_name(e->d_name))
			continue;
		if(count < TG_DELIVERY_BATCH) {
			names[count] = pkg_malloc(strlen(e->d_name) + 1);
			if(names[count] == NULL)
				break;
			strcpy(names[count++], e->d_name);
		} else {
			/* Keep the oldest TG_DELIVERY_BATCH. */
			qsort(names, count, sizeof(char *), tg_name_cmp);
			if(strcmp(e->d_name, names[count - 1]) < 0) {
				pkg_free(names[count - 1]);
				names[count - 1] = pkg_malloc(strlen(e->d_name) + 1);
				if(names[count - 1] == NULL) {
					count--;
					break;
				}
				strcpy(names[count - 1], e->d_name);
			}
		}
	}
	closedir(d);
	qsort(names, count, sizeof(char *), tg_name_cmp);
	deadline = now + 2 * TG_DELIVERY_TIMEOUT_MS;
	tg_url_shown(tg_alert_url, shown, sizeof(shown));
	tg_read_token();
	for(i = 0; i < count; i++) {
		if(tg_now_ms() > deadline)
			break;
		snprintf(path, sizeof(path), "%s/%s", tg_spool_dir, names[i]);
		if(tg_read_file(path, &body, &len) < 0)
			continue;
		err[0] = '\0';
		status = tg_post_alert(tg_alert_url, tg_token, body, len,
				TG_DELIVERY_TIMEOUT_MS, err, sizeof(err));
		pkg_free(body);
		delivery = tg_alert_delivery(status);
		if(delivery == 1) {
			unlink(path);
			update_stat(tg_st_alerts_sent, 1);
			tg_backoff = TG_RETRY_MIN_MS;
		} else if(delivery < 0) {
			/* The receiver will never take this one (a bad token, malformed for
			 * it): kept aside for the operator instead of retried forever. */
			LM_ERR("trunkguard: alert refused by %s with %d, kept in %s/rejected\n", shown,
					status, tg_spool_dir);
			tg_set_aside(names[i]);
		} else {
			/* Keep it, and everything after it, for the next attempt. */
			update_stat(tg_st_alerts_retried, 1);
			if(status < 0)
				/* The HTTP client's error may quote the URL (one it cannot
				 * parse, in its own normal form). */
				LM_WARN("alert delivery to %s failed: %s\n", shown,
						strstr(err, "://") != NULL || strchr(err, '@') != NULL
								? "(its error names the URL)"
								: err);
			else
				LM_WARN("alert delivery to %s failed: HTTP %d\n", shown, status);
			tg_next_delivery = tg_now_ms() + tg_backoff;
			tg_backoff = tg_backoff * 2 > TG_RETRY_MAX_MS ? TG_RETRY_MAX_MS : tg_backoff * 2;
			break;
		}
	}
	for(i = 0; i < count; i++)
		pkg_free(names[i]);
}

void tg_timer(unsigned int ticks, void *param)
{
	const tg_str *alerts = NULL, *lines = NULL;
	size_t n = 0, i;
	char err[TG_ERR_LEN];
	uint64_t now;

	/* Made here, after the fork, on the first tick (the timer process gets no
	 * child_init): the same publication as the workers. */
	if(tg_proc.rlog == NULL)
		tg_proc.rlog = tg_refusal_log_new((uint32_t)tg_refusal_log_rate);
	if(tg_sync() == 0) {
		now = tg_now_ms();
		err[0] = '\0';
		if(tg_policy_tick(tg_proc.policy, now, &alerts, &n, err, sizeof(err)) == 0) {
			for(i = 0; i < n; i++)
				tg_spool(&alerts[i]);
		} else {
			LM_ERR("timer: %s\n", err);
			update_stat(tg_st_policy_errors, 1);
		}
	}
	if(tg_proc.rlog != NULL) {
		n = tg_refusal_log_flush(tg_proc.rlog, tg_now_ms(), &lines);
		for(i = 0; i < n; i++)
			LM_NOTICE("%.*s\n", (int)lines[i].len, lines[i].s);
	}
	tg_deliver();
}

void tg_url_shown(const char *url, char *out, size_t size)
{
	size_t scheme = 0, host, end, k;

	if(size == 0)
		return;
	out[0] = '\0';
	if(url == NULL)
		return;
	/* RFC 3986 3.1: ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ), then "://" */
	if(isalpha((unsigned char)url[0]))
		while(isalnum((unsigned char)url[scheme]) || url[scheme] == '+' || url[scheme] == '-'
				|| url[scheme] == '.')
			scheme++;
	if(scheme == 0 || strncmp(url + scheme, "://", 3) != 0) {
		snprintf(out, size, "(an alert URL without a scheme)");
		return;
	}
	host = scheme + 3;
	end = host + strcspn(url + host, "/?#");
	/* An '@' past the authority (a password with an unencoded '/') would leave part
	 * of the userinfo for the host: the scheme alone then. */
	if(strchr(url + end, '@') != NULL) {
		snprintf(out, size, "%.*s...", (int)host, url);
		return;
	}
	/* userinfo@host: only what follows the authority's last '@' */
	for(k = host; k < end; k++)
		if(url[k] == '@')
			host = k + 1;
	snprintf(out, size, "%.*s%.*s%s", (int)(scheme + 3), url, (int)(end - host), url + host,
			url[end] != '\0' ? "/..." : "");
}
