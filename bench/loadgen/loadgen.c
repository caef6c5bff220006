/*
 * loadgen.c: the load generator of section 7's workers part (bench/cluster.py).
 *
 * A node of 2 workers on a 2-core box shares its cores with whatever loads it, so the load
 * must cost far less CPU per message than the server does. This one is plain C: one thread,
 * epoll (level-triggered), non-blocking sockets, plain TCP with newline-delimited JSON
 * (docs/protocol.md). Per read of a socket it makes at most one write; it parses only the
 * few fields it needs (the lines the server writes have a fixed shape: `{"result":…,"tid":…`
 * and `{"class":"core","cmd":"event","tid":…`), and it counts messages by their newlines.
 *
 *   loadgen rtt --port P [--conns 50] [--window 32] [--warmup 1] [--duration 4] [--pids A,B]
 *   loadgen fanout --port P [--subscribers 10000] [--pids A,B] [--command-wait 300]
 *
 * Every connection logs in first (`core`/`user`/`login` as --user/--password, tid 0), then
 * asks `core`/`ping` (tid 2): an admin's ping on a node of several workers answers with the
 * process that holds the session (`{"cluster":{"process":…}}`), which gives the split of the
 * connections over the workers as the server sees it ("single" when the answer has none).
 *
 * rtt: --conns connections, each with --window `core ping` requests in flight (every answer
 * sends the next one); after --warmup seconds, --duration seconds are measured: answers
 * counted and the latency of each (its request's send time kept by tid), p50 and p99. Then it
 * stops sending, waits for the answers still due, closes, and prints one JSON line.
 *
 * fanout: --subscribers connections subscribed to class `bench` (tid 1), each answering every
 * event `{"result":"ok","tid":N}` at once (the server requires an answer, PROTOCOL.md §5.2),
 * and one publisher connection (not subscribed) that sends `event`/`send` of class `bench`.
 * Once set up it prints one JSON line, then runs the commands read on stdin, one a line, each
 * answered with one JSON line (`{"error":…}` when it failed):
 *   sequential P W   W publishes not measured, then P: each sent once every subscriber had
 *                    the previous one and the publisher its ok
 *   pipelined K      K publishes in one write, timed from the write to the last delivery
 *   count            the connections still open, and the counters of what went wrong
 *   close            (or end of input) close everything and exit
 *
 * Every result carries the CPU of the measured period: this process (getrusage), the
 * processes of --pids (/proc/PID/stat), and the machine (/proc/stat), each in % of one core,
 * and this process's system calls (epoll_wait, the sockets it found ready, reads, writes).
 * Every phase has a deadline (--setup-timeout, --op-timeout for each publish's deliveries,
 * --command-wait for the next command); the process always ends by itself.
 */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { TID_LOGIN = 0, TID_SUBSCRIBE = 1, TID_PROBE = 2, TID_FIRST = 10 };
enum role { ROLE_RTT, ROLE_SUB, ROLE_PUB };

#define RING 1024                /* rtt: send times kept per connection (window <= RING) */
#define READ_SIZE (256 * 1024)   /* one read; a line must fit in it */
#define MAX_EVENTS 1024
#define MAX_PIDS 64
#define MAX_PROCS 64
#define SETUP_CONCURRENCY 200    /* connections logging in at once (the accept backlog) */
#define HIST_US 1000000          /* latency histogram: 1 us buckets up to 1 s, then overflow */

struct conn {
    int fd;
    unsigned char role;
    unsigned char open;        /* connected (or connecting) and not closed */
    unsigned char connecting;  /* connect() in progress */
    unsigned char setting_up;  /* counted in g.setting_up */
    unsigned char logged_in, subscribed, probed, ready;
    unsigned char want_out;    /* EPOLLOUT requested */
    short proc;                /* index in g.procs once probed */
    char *in;                  /* the start of a line not complete yet */
    uint32_t in_len;
    char *out;                 /* what a write could not take yet */
    uint32_t out_len, out_cap;
    uint64_t next_tid;
    uint32_t inflight;
    uint64_t *sent_ns;         /* rtt: send time of tid t at [t % RING] */
};

struct mark {                  /* CPU counters at one instant */
    double t;
    double self_user, self_sys;
    double pid_cpu[MAX_PIDS];
    unsigned long long stat[8]; /* /proc/stat cpu: user nice system idle iowait irq softirq steal */
    uint64_t waits, ready, reads, writes; /* this process's system calls (see g.sys) */
};

static struct {
    /* arguments */
    int rtt, port, conn_count, window, subscribers;
    double warmup, duration, setup_timeout, op_timeout, command_wait;
    const char *user, *password;
    int pids[MAX_PIDS], npids;
    /* connections */
    int ep;
    struct conn *conns;
    int nconns, opened, setting_up, ready, failed;
    char first_failure[512];
    struct conn *publisher;
    /* processes seen in the probes' answers */
    char *procs[MAX_PROCS];
    int nprocs;
    /* tallies */
    uint64_t answers, errors, server_requests, events, expected_events, unexpected;
    uint64_t disconnected, pub_ok, pub_err;
    char first_error[512];
    /* rtt */
    int running, measuring;
    uint64_t read_ns;
    uint32_t *hist;
    uint64_t hist_over, hist_n;
    /* fanout */
    uint64_t target;
    uint64_t reached_ns;
    /* stdin */
    char cmd[4096];
    size_t cmd_len;
    int stdin_eof;
    /* system calls: epoll_wait, the sockets it found ready, reads and writes of sockets */
    struct { uint64_t waits, ready, reads, writes; } sys;
    /* buffers */
    char *rbuf;
    char *obuf;
    size_t olen, ocap;
    long hz;
} g;

/* -- small helpers ----------------------------------------------------------------------- */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static double now_s(void) { return (double)now_ns() / 1e9; }

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("loadgen: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static void *xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n);
    if (!q)
        die("out of memory");
    return q;
}

static void note_first(char *dst, size_t cap, const char *fmt, ...)
{
    if (dst[0])
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(dst, cap, fmt, ap);
    va_end(ap);
}

/* The output of one read, written to its connection at once. */
static void out_add(const char *s, size_t n)
{
    if (g.olen + n > g.ocap) {
        g.ocap = (g.olen + n) * 2;
        g.obuf = xrealloc(g.obuf, g.ocap);
    }
    memcpy(g.obuf + g.olen, s, n);
    g.olen += n;
}

static void out_fmt(const char *fmt, ...)
{
    char tmp[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    out_add(tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

/* JSON output (results on stdout) */
static void json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            fprintf(f, "\\%c", ch);
        else if (ch < 0x20)
            fprintf(f, "\\u%04x", ch);
        else
            fputc(ch, f);
    }
    fputc('"', f);
}

/* -- CPU accounting ---------------------------------------------------------------------- */

static double pid_cpu(int pid)
{
    char path[64], buf[2048];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return 0.0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* the command name may hold spaces */
    if (!p)
        return 0.0;
    unsigned long long utime = 0, stime = 0;
    /* after ")": state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime */
    if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &utime, &stime) != 2)
        return 0.0;
    return (double)(utime + stime) / (double)g.hz;
}

static void take_mark(struct mark *m)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    m->self_user = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6;
    m->self_sys = (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
    for (int i = 0; i < g.npids; i++)
        m->pid_cpu[i] = pid_cpu(g.pids[i]);
    memset(m->stat, 0, sizeof m->stat);
    FILE *f = fopen("/proc/stat", "r");
    if (f) {
        unsigned long long *s = m->stat;
        if (fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &s[0], &s[1], &s[2], &s[3],
                   &s[4], &s[5], &s[6], &s[7]) != 8)
            memset(m->stat, 0, sizeof m->stat);
        fclose(f);
    }
    m->waits = g.sys.waits;
    m->ready = g.sys.ready;
    m->reads = g.sys.reads;
    m->writes = g.sys.writes;
    m->t = now_s();
}

/* The CPU figures between two marks, as JSON fields (no braces), in % of one core:
 * this process, the --pids processes (the server), the machine's user + nice + system (as
 * psutil counts busy time), softirq, irq, idle and steal, and "other": the machine's busy
 * time used by neither this process nor the server. */
static void print_cpu(FILE *f, const struct mark *a, const struct mark *b)
{
    double el = b->t - a->t > 1e-9 ? b->t - a->t : 1e-9;
    double user = 100 * (b->self_user - a->self_user) / el;
    double sys = 100 * (b->self_sys - a->self_sys) / el;
    double server = 0;
    fprintf(f, "\"pid_cpu_pct\":{");
    for (int i = 0; i < g.npids; i++) {
        double d = 100 * (b->pid_cpu[i] - a->pid_cpu[i]) / el;
        server += d;
        fprintf(f, "%s\"%d\":%.2f", i ? "," : "", g.pids[i], d);
    }
    double st[8];
    for (int i = 0; i < 8; i++)
        st[i] = (double)(b->stat[i] - a->stat[i]) * 100.0 / (double)g.hz / el;
    double machine = st[0] + st[1] + st[2];
    double other = machine - user - sys - server;
    fprintf(f,
            "},\"client_cpu_pct\":%.2f,\"client_user_pct\":%.2f,\"client_sys_pct\":%.2f,"
            "\"server_cpu_pct\":%.2f,\"machine_cpu_pct\":%.2f,\"softirq_pct\":%.2f,"
            "\"irq_pct\":%.2f,\"idle_pct\":%.2f,\"steal_pct\":%.2f,\"other_cpu_pct\":%.2f",
            user + sys, user, sys, server, machine, st[6], st[5], st[3] + st[4], st[7],
            other > 0 ? other : 0.0);
    fprintf(f, ",\"client_calls\":{\"epoll_wait\":%llu,\"ready\":%llu,\"read\":%llu,"
               "\"write\":%llu}",
            (unsigned long long)(b->waits - a->waits), (unsigned long long)(b->ready - a->ready),
            (unsigned long long)(b->reads - a->reads), (unsigned long long)(b->writes - a->writes));
}

/* -- connections ------------------------------------------------------------------------- */

static void want_out(struct conn *c, int on)
{
    if (c->want_out == on)
        return;
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.ptr = c};
    if (epoll_ctl(g.ep, EPOLL_CTL_MOD, c->fd, &ev) < 0)
        die("epoll_ctl: %s", strerror(errno));
    c->want_out = (unsigned char)on;
}

static void conn_close(struct conn *c)
{
    if (!c->open)
        return;
    epoll_ctl(g.ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->open = 0;
    free(c->in);
    free(c->out);
    c->in = c->out = NULL;
    c->in_len = c->out_len = c->out_cap = 0;
    if (c->setting_up) {
        c->setting_up = 0;
        g.setting_up--;
    }
}

/* A connection that failed while it was being set up. */
static void conn_fail(struct conn *c, const char *why, size_t n)
{
    if (c->setting_up)
        g.failed++;
    else
        g.disconnected++;
    note_first(g.first_failure, sizeof g.first_failure, "%.*s", (int)(n > 300 ? 300 : n), why);
    conn_close(c);
}

/* Lost after it was set up (or a write failed). */
static void conn_lost(struct conn *c, const char *why)
{
    if (!c->open)
        return;
    if (c->setting_up) {
        conn_fail(c, why, strlen(why));
        return;
    }
    g.disconnected++;
    note_first(g.first_error, sizeof g.first_error, "%s", why);
    conn_close(c);
}

static void conn_write(struct conn *c, const char *s, size_t n)
{
    if (!c->open || n == 0)
        return;
    if (c->out_len == 0) {
        ssize_t w = write(c->fd, s, n);
        g.sys.writes++;
        if (w < 0) {
            if (errno != EAGAIN && errno != EINTR) {
                conn_lost(c, strerror(errno));
                return;
            }
            w = 0;
        }
        s += w;
        n -= (size_t)w;
        if (n == 0)
            return;
    }
    if (c->out_len + n > c->out_cap) {
        c->out_cap = (uint32_t)((c->out_len + n) * 2);
        c->out = xrealloc(c->out, c->out_cap);
    }
    memcpy(c->out + c->out_len, s, n);
    c->out_len += (uint32_t)n;
    want_out(c, 1);
}

static void conn_flush(struct conn *c)
{
    while (c->out_len) {
        ssize_t w = write(c->fd, c->out, c->out_len);
        g.sys.writes++;
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return;
            conn_lost(c, strerror(errno));
            return;
        }
        memmove(c->out, c->out + w, c->out_len - (size_t)w);
        c->out_len -= (uint32_t)w;
    }
    want_out(c, 0);
}

static void conn_open(struct conn *c)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        g.failed++;
        note_first(g.first_failure, sizeof g.first_failure, "socket: %s", strerror(errno));
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)g.port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    c->fd = fd;
    c->open = 1;
    c->setting_up = 1;
    g.setting_up++;
    c->proc = -1;
    c->next_tid = TID_FIRST;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    c->want_out = 1;
    if (epoll_ctl(g.ep, EPOLL_CTL_ADD, fd, &ev) < 0)
        die("epoll_ctl: %s", strerror(errno));
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS) {
        char why[128];
        snprintf(why, sizeof why, "connect: %s", strerror(errno));
        conn_fail(c, why, strlen(why));
        return;
    }
    c->connecting = 1;
}

/* Connected: log in, subscribe (subscribers), and ask which process holds the session. */
static void conn_connected(struct conn *c)
{
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
        char why[128];
        snprintf(why, sizeof why, "connect: %s", strerror(err));
        conn_fail(c, why, strlen(why));
        return;
    }
    c->connecting = 0;
    want_out(c, 0);
    g.olen = 0;
    out_fmt("{\"class\":\"core\",\"subclass\":\"user\",\"cmd\":\"login\",\"tid\":%d,"
            "\"data\":{\"user\":\"%s\",\"password\":\"%s\"}}\n",
            TID_LOGIN, g.user, g.password);
    if (c->role == ROLE_SUB)
        out_fmt("{\"class\":\"core\",\"subclass\":\"event\",\"cmd\":\"subscribe\",\"tid\":%d,"
                "\"data\":{\"class\":\"bench\"}}\n",
                TID_SUBSCRIBE);
    out_fmt("{\"class\":\"core\",\"cmd\":\"ping\",\"tid\":%d}\n", TID_PROBE);
    conn_write(c, g.obuf, g.olen);
    g.olen = 0;
}

static void maybe_ready(struct conn *c)
{
    if (c->ready || !c->logged_in || !c->probed || (c->role == ROLE_SUB && !c->subscribed))
        return;
    c->ready = 1;
    c->setting_up = 0;
    g.setting_up--;
    g.ready++;
}

/* The value of "process":"…" in a probe's answer, or "single" (a node without a cluster). */
static short proc_index(const char *s, size_t n)
{
    static const char key[] = "\"process\":\"";
    const char *name = "single";
    size_t len = 6;
    const char *p = memmem(s, n, key, sizeof key - 1);
    if (p) {
        p += sizeof key - 1;
        const char *e = memchr(p, '"', (size_t)(s + n - p));
        if (e) {
            name = p;
            len = (size_t)(e - p);
        }
    }
    for (int i = 0; i < g.nprocs; i++)
        if (strlen(g.procs[i]) == len && memcmp(g.procs[i], name, len) == 0)
            return (short)i;
    if (g.nprocs == MAX_PROCS)
        return MAX_PROCS - 1;
    g.procs[g.nprocs] = strndup(name, len);
    return (short)g.nprocs++;
}

/* -- requests ---------------------------------------------------------------------------- */

static void send_ping(struct conn *c, uint64_t t)
{
    uint64_t tid = c->next_tid++;
    c->sent_ns[tid % RING] = t;
    c->inflight++;
    out_fmt("{\"class\":\"core\",\"cmd\":\"ping\",\"tid\":%llu}\n", (unsigned long long)tid);
}

#define PAD "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"

/* One publish, the same message as bench/eventmsgs.py's PUBLISH (body about 100 bytes). */
static void out_publish(struct conn *c)
{
    uint64_t tid = c->next_tid++;
    c->inflight++;
    out_fmt("{\"class\":\"core\",\"subclass\":\"event\",\"cmd\":\"send\",\"tid\":%llu,"
            "\"data\":{\"class\":\"bench\",\"body\":{\"seq\":%llu,\"pad\":\"" PAD "\"}}}\n",
            (unsigned long long)tid, (unsigned long long)tid);
}

/* -- lines from the server --------------------------------------------------------------- */

static long long parse_int(const char *p, const char *end)
{
    long long v = 0;
    int neg = 0;
    if (p < end && *p == '-') {
        neg = 1;
        p++;
    }
    while (p < end && *p >= '0' && *p <= '9')
        v = v * 10 + (*p++ - '0');
    return neg ? -v : v;
}

/* The raw token after "tid": (a number, a string or null), up to ',' or '}'. */
static size_t tid_token(const char *p, const char *end)
{
    const char *q = p;
    if (q < end && *q == '"') {
        q++;
        while (q < end && *q != '"')
            q += (*q == '\\') ? 2 : 1;
        return (size_t)(q + 1 - p);
    }
    while (q < end && *q != ',' && *q != '}')
        q++;
    return (size_t)(q - p);
}

static void on_answer(struct conn *c, long long tid, int ok, const char *s, size_t n)
{
    if (tid == TID_LOGIN && !c->logged_in) {
        if (!ok || !memmem(s, n, "\"session_id\"", 12)) {
            conn_fail(c, s, n);
            return;
        }
        c->logged_in = 1;
    } else if (tid == TID_SUBSCRIBE && c->role == ROLE_SUB && !c->subscribed) {
        if (!ok) {
            conn_fail(c, s, n);
            return;
        }
        c->subscribed = 1;
    } else if (tid == TID_PROBE && !c->probed) {
        if (!ok) {
            conn_fail(c, s, n);
            return;
        }
        c->probed = 1;
        c->proc = proc_index(s, n);
    } else if (tid >= TID_FIRST && c->inflight) {
        c->inflight--;
        if (c->role == ROLE_PUB) {
            if (ok) {
                g.pub_ok++;
            } else {
                g.pub_err++;
                note_first(g.first_error, sizeof g.first_error, "%.*s", (int)(n > 300 ? 300 : n), s);
            }
            return;
        }
        if (!ok) {
            g.errors++;
            note_first(g.first_error, sizeof g.first_error, "%.*s", (int)(n > 300 ? 300 : n), s);
        } else {
            g.answers++;
        }
        if (g.measuring && ok) {
            uint64_t us = (g.read_ns - c->sent_ns[tid % RING]) / 1000;
            if (us < HIST_US)
                g.hist[us]++;
            else
                g.hist_over++;
            g.hist_n++;
        }
        if (g.running)
            send_ping(c, g.read_ns);
        return;
    } else {
        g.unexpected++;
        return;
    }
    maybe_ready(c);
}

static const char EVENT_PREFIX[] = "{\"class\":\"core\",\"cmd\":\"event\",\"tid\":";
static const char OK_PREFIX[] = "{\"result\":\"ok\",\"tid\":";
static const char ERR_PREFIX[] = "{\"result\":\"error\",\"tid\":";

static void on_line(struct conn *c, const char *s, size_t n)
{
    const char *end = s + n;
    if (n > sizeof EVENT_PREFIX - 1 && memcmp(s, EVENT_PREFIX, sizeof EVENT_PREFIX - 1) == 0) {
        const char *p = s + sizeof EVENT_PREFIX - 1;
        size_t tl = tid_token(p, end);
        out_add("{\"result\":\"ok\",\"tid\":", sizeof OK_PREFIX - 1);
        out_add(p, tl);
        out_add("}\n", 2);
        if (c->role != ROLE_SUB) { /* answered, not counted as a delivery */
            g.unexpected++;
            return;
        }
        if (++g.events == g.target)
            g.reached_ns = now_ns();
        return;
    }
    if (n > sizeof OK_PREFIX - 1 && memcmp(s, OK_PREFIX, sizeof OK_PREFIX - 1) == 0) {
        on_answer(c, parse_int(s + sizeof OK_PREFIX - 1, end), 1, s, n);
        return;
    }
    if (n > sizeof ERR_PREFIX - 1 && memcmp(s, ERR_PREFIX, sizeof ERR_PREFIX - 1) == 0) {
        const char *p = s + sizeof ERR_PREFIX - 1;
        if (*p >= '0' && *p <= '9') {
            on_answer(c, parse_int(p, end), 0, s, n);
            return;
        }
        /* tid null: the connection is about to be closed, or a line was not understood */
        note_first(g.first_error, sizeof g.first_error, "%.*s", (int)(n > 300 ? 300 : n), s);
        g.unexpected++;
        return;
    }
    if (n > 9 && memcmp(s, "{\"class\":", 9) == 0) { /* another request: answer ok */
        const char *p = memmem(s, n, "\"tid\":", 6);
        g.server_requests++;
        if (p) {
            p += 6;
            out_add("{\"result\":\"ok\",\"tid\":", sizeof OK_PREFIX - 1);
            out_add(p, tid_token(p, end));
            out_add("}\n", 2);
        }
        return;
    }
    if (n > 7 && memcmp(s, "{\"ack\":", 7) == 0)
        return;
    if (n == 0 || (n == 1 && s[0] == '\r'))
        return;
    g.unexpected++;
    note_first(g.first_error, sizeof g.first_error, "unexpected: %.*s", (int)(n > 300 ? 300 : n), s);
}

static void conn_readable(struct conn *c)
{
    size_t have = c->in_len;
    if (have)
        memcpy(g.rbuf, c->in, have);
    ssize_t r = read(c->fd, g.rbuf + have, READ_SIZE - have);
    g.sys.reads++;
    if (r <= 0) {
        if (r < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        conn_lost(c, r == 0 ? "closed by the server" : strerror(errno));
        return;
    }
    if (g.running || g.measuring)
        g.read_ns = now_ns(); /* the arrival time of every answer in this read */
    size_t total = have + (size_t)r;
    const char *p = g.rbuf, *end = g.rbuf + total;
    g.olen = 0;
    for (;;) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        if (!nl)
            break;
        on_line(c, p, (size_t)(nl - p));
        if (!c->open)
            return;
        p = nl + 1;
    }
    size_t rest = (size_t)(end - p);
    if (rest == READ_SIZE) {
        conn_lost(c, "a line longer than the read buffer");
        return;
    }
    if (rest) {
        if (rest > c->in_len || !c->in)
            c->in = xrealloc(c->in, rest);
        memmove(c->in, p, rest); /* p may point into rbuf, never into c->in */
    }
    c->in_len = (uint32_t)rest;
    if (g.olen)
        conn_write(c, g.obuf, g.olen);
    g.olen = 0;
}

/* -- the loop ---------------------------------------------------------------------------- */

static struct conn stdin_conn; /* data.ptr of stdin's epoll entry */

static void stdin_readable(void)
{
    if (g.cmd_len == sizeof g.cmd)
        g.cmd_len = 0; /* a line too long: dropped */
    ssize_t r = read(0, g.cmd + g.cmd_len, sizeof g.cmd - g.cmd_len);
    if (r <= 0) {
        if (r < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        g.stdin_eof = 1;
        epoll_ctl(g.ep, EPOLL_CTL_DEL, 0, NULL);
        return;
    }
    g.cmd_len += (size_t)r;
}

/* Open more connections while fewer than SETUP_CONCURRENCY are being set up. */
static void open_more(void)
{
    while (g.opened < g.nconns && g.setting_up < SETUP_CONCURRENCY)
        conn_open(&g.conns[g.opened++]);
}

static void poll_once(double timeout_s)
{
    static struct epoll_event evs[MAX_EVENTS];
    int ms = timeout_s <= 0 ? 0 : (int)(timeout_s * 1000) + 1;
    int n = epoll_wait(g.ep, evs, MAX_EVENTS, ms);
    if (n < 0) {
        if (errno == EINTR)
            return;
        die("epoll_wait: %s", strerror(errno));
    }
    g.sys.waits++;
    g.sys.ready += (uint64_t)n;
    for (int i = 0; i < n; i++) {
        struct conn *c = evs[i].data.ptr;
        if (c == &stdin_conn) {
            stdin_readable();
            continue;
        }
        if (!c->open)
            continue;
        uint32_t e = evs[i].events;
        if (c->connecting) {
            if (e & (EPOLLOUT | EPOLLERR | EPOLLHUP))
                conn_connected(c);
            continue;
        }
        if (e & (EPOLLIN | EPOLLERR | EPOLLHUP))
            conn_readable(c);
        if (c->open && (e & EPOLLOUT))
            conn_flush(c);
    }
    open_more();
}

/* Run the loop until done() or the deadline (an absolute now_s()); 1 if done() came. */
static int run_until(int (*done)(void), double deadline)
{
    for (;;) {
        if (done && done())
            return 1;
        double left = deadline - now_s();
        if (left <= 0)
            return done ? done() : 1;
        poll_once(left > 0.1 ? 0.1 : left);
    }
}

static int setup_done(void) { return g.opened == g.nconns && g.setting_up == 0; }

/* -- rtt ------------------------------------------------------------------------------------ */

static int drained(void)
{
    for (int i = 0; i < g.nconns; i++)
        if (g.conns[i].open && g.conns[i].inflight)
            return 0;
    return 1;
}

static double percentile_us(double q)
{
    if (!g.hist_n)
        return -1;
    uint64_t want = (uint64_t)(q * (double)g.hist_n), seen = 0;
    if (want >= g.hist_n)
        want = g.hist_n - 1;
    for (int us = 0; us < HIST_US; us++) {
        seen += g.hist[us];
        if (seen > want)
            return us;
    }
    return HIST_US;
}

static void print_procs(FILE *f, int role)
{
    int counts[MAX_PROCS] = {0};
    for (int i = 0; i < g.nconns; i++) {
        struct conn *c = &g.conns[i];
        if (c->ready && c->role == role && c->proc >= 0)
            counts[c->proc]++;
    }
    fprintf(f, "{");
    int first = 1;
    for (int i = 0; i < g.nprocs; i++) {
        if (!counts[i])
            continue;
        fprintf(f, "%s", first ? "" : ",");
        json_str(f, g.procs[i]);
        fprintf(f, ":%d", counts[i]);
        first = 0;
    }
    fprintf(f, "}");
}

static struct conn *alloc_conns(int n)
{
    struct conn *cs = calloc((size_t)n, sizeof *cs);
    if (!cs)
        die("out of memory");
    for (int i = 0; i < n; i++)
        cs[i].fd = -1;
    return cs;
}

static void close_all(void)
{
    for (int i = 0; i < g.nconns; i++)
        conn_close(&g.conns[i]);
}

static int run_rtt(void)
{
    g.nconns = g.conn_count;
    g.conns = alloc_conns(g.nconns);
    for (int i = 0; i < g.nconns; i++) {
        g.conns[i].role = ROLE_RTT;
        g.conns[i].sent_ns = calloc(RING, sizeof(uint64_t));
        if (!g.conns[i].sent_ns)
            die("out of memory");
    }
    g.hist = calloc(HIST_US, sizeof(uint32_t));
    if (!g.hist)
        die("out of memory");
    double t0 = now_s();
    open_more();
    if (!run_until(setup_done, t0 + g.setup_timeout))
        die("%d of %d connections not set up after %g s", g.setting_up, g.nconns, g.setup_timeout);
    if (g.failed)
        die("%d of %d connections failed; first: %s", g.failed, g.nconns, g.first_failure);
    double setup_s = now_s() - t0;

    /* every connection: its window of pings in one write */
    g.running = 1;
    uint64_t t = now_ns();
    for (int i = 0; i < g.nconns; i++) {
        struct conn *c = &g.conns[i];
        g.olen = 0;
        for (int k = 0; k < g.window; k++)
            send_ping(c, t);
        conn_write(c, g.obuf, g.olen);
        g.olen = 0;
    }
    run_until(NULL, now_s() + g.warmup);

    struct mark a, b;
    uint64_t answers0 = g.answers, errors0 = g.errors;
    take_mark(&a);
    g.measuring = 1;
    run_until(NULL, a.t + g.duration);
    g.measuring = 0;
    take_mark(&b);
    uint64_t answers = g.answers - answers0, errors = g.errors - errors0;

    g.running = 0;
    int drained_ok = run_until(drained, now_s() + 10.0);
    int dropped = (int)g.disconnected;
    close_all();

    double el = b.t - a.t;
    FILE *f = stdout;
    fprintf(f, "{\"requests\":%llu,\"errors\":%llu,\"seconds\":%.4f,\"rps\":%.1f,",
            (unsigned long long)answers, (unsigned long long)errors, el, (double)answers / el);
    fprintf(f, "\"p50_us\":%.0f,\"p99_us\":%.0f,\"latency_samples\":%llu,\"latency_over_1s\":%llu,",
            percentile_us(0.50), percentile_us(0.99), (unsigned long long)g.hist_n,
            (unsigned long long)g.hist_over);
    fprintf(f, "\"conns\":%d,\"window\":%d,\"setup_seconds\":%.3f,\"processes\":", g.nconns,
            g.window, setup_s);
    print_procs(f, ROLE_RTT);
    fprintf(f, ",\"server_requests\":%llu,\"unexpected\":%llu,\"disconnected\":%d,\"drained\":%s,",
            (unsigned long long)g.server_requests, (unsigned long long)g.unexpected, dropped,
            drained_ok ? "true" : "false");
    fprintf(f, "\"first_error\":");
    json_str(f, g.first_error);
    fprintf(f, ",");
    print_cpu(f, &a, &b);
    fprintf(f, "}\n");
    fflush(f);
    return 0;
}

/* -- fanout ------------------------------------------------------------------------------- */

static int published(void) { return g.events >= g.target && g.publisher->inflight == 0; }

static int command_ready(void) { return g.stdin_eof || memchr(g.cmd, '\n', g.cmd_len) != NULL; }

static int alive(void)
{
    int n = 0;
    for (int i = 0; i < g.nconns; i++)
        n += g.conns[i].open;
    return n;
}

static void print_health(FILE *f)
{
    fprintf(f, "\"disconnected\":%llu,\"error_answers\":%llu,\"server_requests\":%llu,"
               "\"unexpected_events\":%lld,\"unexpected\":%llu,\"first_error\":",
            (unsigned long long)g.disconnected, (unsigned long long)g.pub_err,
            (unsigned long long)g.server_requests,
            (long long)(g.events - g.expected_events), (unsigned long long)g.unexpected);
    json_str(f, g.first_error);
}

static void emit_error(const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    printf("{\"error\":");
    json_str(stdout, msg);
    printf(",");
    print_health(stdout);
    printf("}\n");
    fflush(stdout);
}

/* Send `k` publishes in one write and wait for every delivery and every ok. Returns the ns
 * from the write to the last delivery, or 0 on a timeout (reported). */
static uint64_t publish_and_wait(int k)
{
    struct conn *pub = g.publisher;
    if (!pub->open) {
        emit_error("the publisher's connection is closed");
        return 0;
    }
    uint64_t receivers = (uint64_t)g.ready - 1; /* every ready connection but the publisher */
    g.target = g.events + receivers * (uint64_t)k;
    g.expected_events += receivers * (uint64_t)k;
    g.olen = 0;
    for (int i = 0; i < k; i++)
        out_publish(pub);
    uint64_t t0 = now_ns();
    g.reached_ns = 0;
    conn_write(pub, g.obuf, g.olen);
    g.olen = 0;
    if (g.events >= g.target)
        g.reached_ns = t0;
    if (!run_until(published, now_s() + g.op_timeout)) {
        emit_error("%llu of %llu deliveries missing (and %u oks) after %g s",
                   (unsigned long long)(g.target - (g.events < g.target ? g.events : g.target)),
                   (unsigned long long)(receivers * (uint64_t)k), pub->inflight, g.op_timeout);
        return 0;
    }
    return g.reached_ns - t0;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void fanout_sequential(int publishes, int warmup)
{
    for (int i = 0; i < warmup; i++)
        if (!publish_and_wait(1))
            return;
    uint64_t *times = calloc((size_t)publishes + 1, sizeof *times);
    struct mark a, b;
    uint64_t events0 = g.events;
    take_mark(&a);
    for (int i = 0; i < publishes; i++)
        if (!(times[i] = publish_and_wait(1))) {
            free(times);
            return;
        }
    take_mark(&b);
    uint64_t deliveries = g.events - events0;
    qsort(times, (size_t)publishes, sizeof *times, cmp_u64);
    double el = b.t - a.t;
    printf("{\"deliveries\":%llu,\"seconds\":%.4f,\"dps\":%.1f,\"last_p50_ms\":%.3f,"
           "\"last_max_ms\":%.3f,",
           (unsigned long long)deliveries, el, (double)deliveries / el,
           (double)times[publishes / 2] / 1e6, (double)times[publishes - 1] / 1e6);
    print_cpu(stdout, &a, &b);
    printf(",");
    print_health(stdout);
    printf("}\n");
    fflush(stdout);
    free(times);
}

static void fanout_pipelined(int events)
{
    struct mark a, b;
    uint64_t events0 = g.events;
    take_mark(&a);
    uint64_t to_last = publish_and_wait(events);
    take_mark(&b);
    if (!to_last)
        return;
    uint64_t deliveries = g.events - events0;
    double s = (double)to_last / 1e9;
    printf("{\"deliveries\":%llu,\"seconds\":%.4f,\"dps\":%.1f,\"last_p50_ms\":%.3f,"
           "\"last_max_ms\":%.3f,",
           (unsigned long long)deliveries, s, (double)deliveries / s, s * 1e3, s * 1e3);
    print_cpu(stdout, &a, &b);
    printf(",");
    print_health(stdout);
    printf("}\n");
    fflush(stdout);
}

static int run_fanout(void)
{
    g.nconns = g.subscribers + 1;
    g.conns = alloc_conns(g.nconns);
    for (int i = 0; i < g.subscribers; i++)
        g.conns[i].role = ROLE_SUB;
    g.publisher = &g.conns[g.subscribers]; /* opened last */
    g.publisher->role = ROLE_PUB;
    g.target = UINT64_MAX;

    double t0 = now_s();
    open_more();
    run_until(setup_done, t0 + g.setup_timeout);
    int pending = g.nconns - g.ready - g.failed; /* not set up in time: failed too */
    printf("{\"receivers\":%d,\"failed\":%d,\"pending\":%d,\"first_failure\":",
           g.ready - (g.publisher->ready ? 1 : 0), g.failed + pending, pending);
    json_str(stdout, g.first_failure);
    printf(",\"setup_seconds\":%.3f,\"processes\":", now_s() - t0);
    print_procs(stdout, ROLE_SUB);
    printf(",\"publisher_process\":");
    json_str(stdout, g.publisher->ready ? g.procs[g.publisher->proc] : "");
    printf("}\n");
    fflush(stdout);

    int fl = fcntl(0, F_GETFL);
    fcntl(0, F_SETFL, fl | O_NONBLOCK);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &stdin_conn};
    if (epoll_ctl(g.ep, EPOLL_CTL_ADD, 0, &ev) < 0)
        die("epoll_ctl(stdin): %s", strerror(errno));

    for (;;) {
        if (!run_until(command_ready, now_s() + g.command_wait))
            break;
        char *nl = memchr(g.cmd, '\n', g.cmd_len);
        if (!nl)
            break; /* end of input */
        *nl = 0;
        char op[32] = "";
        int x = 0, y = 0;
        int got = sscanf(g.cmd, "%31s %d %d", op, &x, &y);
        size_t used = (size_t)(nl + 1 - g.cmd);
        memmove(g.cmd, nl + 1, g.cmd_len - used);
        g.cmd_len -= used;
        if (got < 1 || strcmp(op, "close") == 0)
            break;
        if (!g.publisher->ready || g.failed) {
            emit_error("not set up: %d failed; first: %s", g.failed, g.first_failure);
        } else if (strcmp(op, "sequential") == 0 && got == 3 && x > 0 && y >= 0) {
            fanout_sequential(x, y);
        } else if (strcmp(op, "pipelined") == 0 && got == 2 && x > 0) {
            fanout_pipelined(x);
        } else if (strcmp(op, "count") == 0) {
            printf("{\"open\":%d,", alive());
            print_health(stdout);
            printf("}\n");
            fflush(stdout);
        } else {
            emit_error("unknown command: %s", op);
        }
    }
    g.target = UINT64_MAX;
    close_all();
    printf("{\"closed\":true,");
    print_health(stdout);
    printf("}\n");
    fflush(stdout);
    return 0;
}

/* -- arguments ---------------------------------------------------------------------------- */

static void usage(void)
{
    fputs("usage: loadgen rtt --port P [--conns 50] [--window 32] [--warmup 1] [--duration 4]\n"
          "               [--pids A,B,...] [--user admin] [--password admin]\n"
          "       loadgen fanout --port P [--subscribers 10000] [--pids A,B,...] [--command-wait S]\n"
          "               (then commands on stdin: sequential P W | pipelined K | count | close)\n",
          stderr);
    exit(2);
}

static void parse_pids(const char *s)
{
    while (*s && g.npids < MAX_PIDS) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s)
            usage();
        g.pids[g.npids++] = (int)v;
        s = *end == ',' ? end + 1 : end;
    }
}

static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

int main(int argc, char **argv)
{
    if (argc < 2)
        usage();
    g.rtt = strcmp(argv[1], "rtt") == 0;
    if (!g.rtt && strcmp(argv[1], "fanout") != 0)
        usage();
    g.conn_count = 50;
    g.window = 32;
    g.warmup = 1.0;
    g.duration = 4.0;
    g.subscribers = 10000;
    g.setup_timeout = 120.0;
    g.op_timeout = 20.0;
    g.command_wait = 300.0;
    g.user = "admin";
    g.password = "admin";
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc)
            usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--port"))
            g.port = atoi(v);
        else if (!strcmp(a, "--conns"))
            g.conn_count = atoi(v);
        else if (!strcmp(a, "--window"))
            g.window = atoi(v);
        else if (!strcmp(a, "--warmup"))
            g.warmup = atof(v);
        else if (!strcmp(a, "--duration"))
            g.duration = atof(v);
        else if (!strcmp(a, "--subscribers"))
            g.subscribers = atoi(v);
        else if (!strcmp(a, "--setup-timeout"))
            g.setup_timeout = atof(v);
        else if (!strcmp(a, "--op-timeout"))
            g.op_timeout = atof(v);
        else if (!strcmp(a, "--command-wait"))
            g.command_wait = atof(v);
        else if (!strcmp(a, "--pids"))
            parse_pids(v);
        else if (!strcmp(a, "--user"))
            g.user = v;
        else if (!strcmp(a, "--password"))
            g.password = v;
        else
            usage();
    }
    if (g.port <= 0 || g.conn_count <= 0 || g.window <= 0 || g.window > RING ||
        g.subscribers <= 0)
        usage();
    signal(SIGPIPE, SIG_IGN);
    raise_nofile();
    g.hz = sysconf(_SC_CLK_TCK);
    g.ep = epoll_create1(EPOLL_CLOEXEC);
    if (g.ep < 0)
        die("epoll_create1: %s", strerror(errno));
    g.rbuf = malloc(READ_SIZE);
    g.ocap = 64 * 1024;
    g.obuf = malloc(g.ocap);
    if (!g.rbuf || !g.obuf)
        die("out of memory");
    return g.rtt ? run_rtt() : run_fanout();
}
