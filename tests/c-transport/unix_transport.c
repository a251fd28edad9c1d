/*
 * unix-c: a Sheaf transport written in C against include/sheaf_transport.h, over Unix
 * stream sockets in the abstract namespace (so its ranks share one host).
 *
 * Every pair of ranks holds one connection: rank r listens at
 * "\0sheaf-unix-c-<master_addr>-<master_port>-<r>", connects to every lower rank and
 * accepts every higher one. A connection is accepted only from a process of this
 * user (SO_PEERCRED) that knows the job's secret. One reader thread per peer drains
 * its socket into a queue, so a `send` never waits on the peer's `recv` (both ranks of
 * a ring send before they receive); `recv` takes the first queued message with its
 * tag, waiting on a condition variable until the deadline.
 *
 * Frames: a 24-byte header (kind, zero, tag, length) and the payload. Kinds: data;
 * bye (the peer closed: everything it sent came before); abort (a culprit rank and a
 * reason). Anything else is a protocol error naming the peer.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "sheaf_transport.h"

enum { KIND_DATA = 1, KIND_BYE = 2, KIND_ABORT = 3 };
enum { PEER_OPEN = 0, PEER_BYE = 1, PEER_FAILED = 2 };
#define MAX_FRAME (1ull << 34)

typedef struct frame_header {
    uint32_t kind;
    uint32_t zero;
    uint64_t tag;
    uint64_t len;
} frame_header;

typedef struct msg {
    uint64_t tag;
    uint64_t len;
    uint8_t *data;
    struct msg *next;
} msg;

typedef struct peer {
    int fd;
    int state;
    int32_t fail_code;
    char why[200];
    msg *head, *tail;
    pthread_t reader;
    int has_reader;
    pthread_mutex_t send_lock;
} peer_t;

struct sheaf_transport_link {
    uint32_t rank, world;
    peer_t *peers;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int aborted;
    uint32_t culprit;
    char abort_reason[200];
    int closed;
};

typedef struct reader_arg {
    sheaf_transport_link *link;
    uint32_t peer;
} reader_arg;

static int32_t fail(sheaf_status *s, int32_t code, uint32_t rank, const char *fmt, ...) {
    if (s) {
        va_list ap;
        va_start(ap, fmt);
        s->code = code;
        s->rank = rank;
        s->needed = 0;
        vsnprintf(s->message, sizeof s->message, fmt, ap);
        va_end(ap);
    }
    return code;
}

static int64_t now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* ---- a minimal reader of the flat JSON object Sheaf passes ---- */

static const char *json_key(const char *json, size_t len, const char *key) {
    char pattern[64];
    int n = snprintf(pattern, sizeof pattern, "\"%s\"", key);
    const char *end = json + len;
    for (const char *p = json; p && p + n <= end; p++) {
        p = memmem(p, (size_t)(end - p), pattern, (size_t)n);
        if (!p) return NULL;
        const char *q = p + n;
        while (q < end && (*q == ' ' || *q == '\t' || *q == '\n')) q++;
        if (q < end && *q == ':') {
            q++;
            while (q < end && (*q == ' ' || *q == '\t' || *q == '\n')) q++;
            return q;
        }
    }
    return NULL;
}

static int json_u64(const char *json, size_t len, const char *key, uint64_t *out) {
    const char *v = json_key(json, len, key);
    if (!v || *v < '0' || *v > '9') return -1;
    *out = strtoull(v, NULL, 10);
    return 0;
}

/* A string value (no escapes needed for addresses and hex tokens); "" for null. */
static int json_str(const char *json, size_t len, const char *key, char *out, size_t cap) {
    const char *v = json_key(json, len, key);
    out[0] = 0;
    if (!v) return -1;
    if (strncmp(v, "null", 4) == 0) return 0;
    if (*v != '"') return -1;
    const char *end = memchr(v + 1, '"', (size_t)(json + len - v - 1));
    if (!end || (size_t)(end - v - 1) >= cap) return -1;
    memcpy(out, v + 1, (size_t)(end - v - 1));
    out[end - v - 1] = 0;
    return 0;
}

/* ---- sockets ---- */

static socklen_t address(struct sockaddr_un *a, const char *master, uint64_t port, uint32_t rank) {
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    int n = snprintf(a->sun_path + 1, sizeof a->sun_path - 1, "sheaf-unix-c-%s-%llu-%u", master,
                     (unsigned long long)port, rank);
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + (size_t)n);
}

/* Reads exactly `len` bytes within `timeout_ms` (-1: no limit). 0, or -1 on EOF,
   error or timeout (errno ETIMEDOUT). */
static int read_all(int fd, void *buf, size_t len, int64_t timeout_ms) {
    uint8_t *p = buf;
    int64_t until = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
    while (len > 0) {
        if (until >= 0) {
            int64_t left = until - now_ms();
            struct pollfd pfd = {fd, POLLIN, 0};
            if (left <= 0 || poll(&pfd, 1, (int)left) == 0) {
                errno = ETIMEDOUT;
                return -1;
            }
        }
        ssize_t n = read(fd, p, len);
        if (n == 0) {
            errno = ECONNRESET;
            return -1;
        }
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Writes all of `buf` within `timeout_ms`; 0, or -1 (errno ETIMEDOUT on a timeout). */
static int write_all(int fd, const void *buf, size_t len, int64_t timeout_ms) {
    const uint8_t *p = buf;
    int64_t until = now_ms() + timeout_ms;
    while (len > 0) {
        int64_t left = until - now_ms();
        struct pollfd pfd = {fd, POLLOUT, 0};
        if (left <= 0 || poll(&pfd, 1, (int)left) == 0) {
            errno = ETIMEDOUT;
            return -1;
        }
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* ---- the reader threads ---- */

static void peer_failed(sheaf_transport_link *l, uint32_t q, int32_t code, const char *why) {
    pthread_mutex_lock(&l->mu);
    if (l->peers[q].state == PEER_OPEN) {
        l->peers[q].state = PEER_FAILED;
        l->peers[q].fail_code = code;
        snprintf(l->peers[q].why, sizeof l->peers[q].why, "%s", why);
    }
    pthread_cond_broadcast(&l->cv);
    pthread_mutex_unlock(&l->mu);
}

static void *reader(void *arg) {
    reader_arg a = *(reader_arg *)arg;
    free(arg);
    sheaf_transport_link *l = a.link;
    peer_t *p = &l->peers[a.peer];
    for (;;) {
        frame_header h;
        if (read_all(p->fd, &h, sizeof h, -1) != 0) {
            peer_failed(l, a.peer, SHEAF_PEER_FAILED, "connection lost (the process died?)");
            return NULL;
        }
        if (h.zero != 0 || h.len > MAX_FRAME || h.kind < KIND_DATA || h.kind > KIND_ABORT) {
            peer_failed(l, a.peer, SHEAF_PROTOCOL, "a malformed frame header");
            return NULL;
        }
        uint8_t *data = h.len ? malloc(h.len) : NULL;
        if (h.len && !data) {
            peer_failed(l, a.peer, SHEAF_PROTOCOL, "a frame larger than this process can hold");
            return NULL;
        }
        if (h.len && read_all(p->fd, data, h.len, -1) != 0) {
            free(data);
            peer_failed(l, a.peer, SHEAF_PEER_FAILED, "connection lost in the middle of a message");
            return NULL;
        }
        pthread_mutex_lock(&l->mu);
        if (h.kind == KIND_DATA) {
            msg *m = malloc(sizeof *m);
            if (!m) {
                free(data);
                pthread_mutex_unlock(&l->mu);
                peer_failed(l, a.peer, SHEAF_ERROR, "out of memory");
                return NULL;
            }
            *m = (msg){h.tag, h.len, data, NULL};
            if (p->tail) p->tail->next = m; else p->head = m;
            p->tail = m;
        } else if (h.kind == KIND_BYE) {
            p->state = PEER_BYE;
            free(data);
            pthread_cond_broadcast(&l->cv);
            pthread_mutex_unlock(&l->mu);
            return NULL;
        } else {
            uint32_t culprit = a.peer;
            if (h.len >= 4) memcpy(&culprit, data, 4);
            if (!l->aborted) {
                l->aborted = 1;
                l->culprit = culprit < l->world ? culprit : a.peer;
                snprintf(l->abort_reason, sizeof l->abort_reason, "%.*s", h.len > 4 ? (int)(h.len - 4) : 0,
                         h.len > 4 ? (char *)data + 4 : "");
            }
            free(data);
        }
        pthread_cond_broadcast(&l->cv);
        pthread_mutex_unlock(&l->mu);
    }
}

/* ---- the table's functions ---- */

static void destroy(sheaf_transport_link *l);

static int accept_one(sheaf_transport_link *l, int lfd, const char *token, int64_t until, sheaf_status *s) {
    for (;;) {
        int64_t left = until - now_ms();
        struct pollfd pfd = {lfd, POLLIN, 0};
        if (left <= 0 || poll(&pfd, 1, (int)left) == 0) return -1;
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0) continue;
        struct ucred cred;
        socklen_t cl = sizeof cred;
        uint32_t hello[2];
        char theirs[256];
        int ok = getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl) == 0 && cred.uid == getuid() &&
                 read_all(fd, hello, sizeof hello, 2000) == 0 && hello[0] > l->rank && hello[0] < l->world &&
                 hello[1] == strlen(token) && hello[1] < sizeof theirs &&
                 read_all(fd, theirs, hello[1], 2000) == 0 && memcmp(theirs, token, hello[1]) == 0 &&
                 l->peers[hello[0]].fd < 0;
        if (!ok) {
            /* A stranger, or a rank of another job: not ours. */
            close(fd);
            continue;
        }
        l->peers[hello[0]].fd = fd;
        (void)s;
        return 0;
    }
}

static sheaf_transport_link *init(const char *config, size_t len, sheaf_status *s) {
    uint64_t rank, world, port, timeout_ms;
    char master[128], token[256];
    if (json_u64(config, len, "rank", &rank) || json_u64(config, len, "world_size", &world) ||
        json_u64(config, len, "master_port", &port) || json_u64(config, len, "connect_timeout_ms", &timeout_ms) ||
        json_str(config, len, "master_addr", master, sizeof master) ||
        json_str(config, len, "job_token", token, sizeof token)) {
        fail(s, SHEAF_INVALID, 0, "unix-c: the config lacks rank, world_size, master_addr, master_port, "
                                  "connect_timeout_ms or job_token");
        return NULL;
    }
    if (world == 0 || rank >= world) {
        fail(s, SHEAF_INVALID, 0, "unix-c: rank %llu is outside a world of %llu", (unsigned long long)rank,
             (unsigned long long)world);
        return NULL;
    }
    sheaf_transport_link *l = calloc(1, sizeof *l);
    if (!l) return NULL;
    l->rank = (uint32_t)rank;
    l->world = (uint32_t)world;
    l->peers = calloc(world, sizeof *l->peers);
    pthread_mutex_init(&l->mu, NULL);
    /* Deadlines are on the monotonic clock, which the wall clock's steps never move. */
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&l->cv, &ca);
    pthread_condattr_destroy(&ca);
    for (uint32_t q = 0; q < world; q++) {
        l->peers[q].fd = -1;
        pthread_mutex_init(&l->peers[q].send_lock, NULL);
    }
    if (world == 1) return l;

    int64_t until = now_ms() + (int64_t)timeout_ms;
    struct sockaddr_un a;
    socklen_t alen = address(&a, master, port, l->rank);
    int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&a, alen) != 0 || listen(lfd, 128) != 0) {
        fail(s, SHEAF_ERROR, l->rank, "unix-c: rank %u cannot listen: %s", l->rank, strerror(errno));
        if (lfd >= 0) close(lfd);
        destroy(l);
        return NULL;
    }
    /* Lower ranks: connect (they may not listen yet), and say who this is. */
    for (uint32_t q = 0; q < l->rank; q++) {
        socklen_t qlen = address(&a, master, port, q);
        int fd = -1;
        while (fd < 0) {
            fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
            if (connect(fd, (struct sockaddr *)&a, qlen) == 0) break;
            close(fd);
            fd = -1;
            if (now_ms() >= until) {
                fail(s, SHEAF_TIMEOUT, q, "unix-c: rank %u could not reach rank %u within %llu ms", l->rank, q,
                     (unsigned long long)timeout_ms);
                close(lfd);
                destroy(l);
                return NULL;
            }
            usleep(10000);
        }
        uint32_t hello[2] = {l->rank, (uint32_t)strlen(token)};
        if (write_all(fd, hello, sizeof hello, 2000) || write_all(fd, token, hello[1], 2000)) {
            fail(s, SHEAF_PEER_FAILED, q, "unix-c: rank %u lost rank %u while meeting", l->rank, q);
            close(fd);
            close(lfd);
            destroy(l);
            return NULL;
        }
        l->peers[q].fd = fd;
    }
    /* Higher ranks: accept, whatever order they come in. */
    for (uint32_t k = l->rank + 1; k < world; k++) {
        if (accept_one(l, lfd, token, until, s) != 0) {
            uint32_t missing = l->rank + 1;
            while (missing < world && l->peers[missing].fd >= 0) missing++;
            fail(s, SHEAF_TIMEOUT, missing, "unix-c: rank %u waited %llu ms for rank %u, which never came",
                 l->rank, (unsigned long long)timeout_ms, missing);
            close(lfd);
            destroy(l);
            return NULL;
        }
    }
    close(lfd);
    for (uint32_t q = 0; q < world; q++) {
        if (q == l->rank) continue;
        reader_arg *ra = malloc(sizeof *ra);
        *ra = (reader_arg){l, q};
        if (pthread_create(&l->peers[q].reader, NULL, reader, ra) == 0) l->peers[q].has_reader = 1;
    }
    return l;
}

static int32_t check_peer(sheaf_transport_link *l, uint32_t peer, sheaf_status *s) {
    if (peer >= l->world || peer == l->rank)
        return fail(s, SHEAF_INVALID, 0, "no peer rank %u in a world of %u (this is rank %u)", peer, l->world,
                    l->rank);
    return SHEAF_OK;
}

static int32_t send_frame(sheaf_transport_link *l, uint32_t peer, uint32_t kind, uint64_t tag, const void *data,
                          size_t len, int64_t timeout_ms, sheaf_status *s) {
    peer_t *p = &l->peers[peer];
    frame_header h = {kind, 0, tag, len};
    pthread_mutex_lock(&p->send_lock);
    int rc = write_all(p->fd, &h, sizeof h, timeout_ms);
    if (rc == 0 && len) rc = write_all(p->fd, data, len, timeout_ms);
    int err = errno;
    pthread_mutex_unlock(&p->send_lock);
    if (rc == 0) return SHEAF_OK;
    if (err == ETIMEDOUT)
        return fail(s, SHEAF_TIMEOUT, peer, "rank %u's socket stayed full for %lld ms", peer, (long long)timeout_ms);
    return fail(s, SHEAF_PEER_FAILED, peer, "sending to rank %u: %s", peer, strerror(err));
}

static int32_t tsend(sheaf_transport_link *l, uint32_t peer, uint64_t tag, const uint8_t *data, size_t len,
                     int64_t timeout_ms, sheaf_status *s) {
    if (check_peer(l, peer, s)) return SHEAF_INVALID;
    int32_t rc = SHEAF_OK;
    pthread_mutex_lock(&l->mu);
    if (l->aborted)
        rc = fail(s, SHEAF_ABORTED, l->culprit, "%s", l->abort_reason);
    else if (l->closed)
        rc = fail(s, SHEAF_CLOSED, 0, "the link is closed");
    else if (l->peers[peer].state == PEER_FAILED)
        rc = fail(s, l->peers[peer].fail_code, peer, "%s", l->peers[peer].why);
    else if (l->peers[peer].state == PEER_BYE)
        /* Nobody would read it: say so rather than lose it. */
        rc = fail(s, SHEAF_PEER_FAILED, peer, "rank %u closed its link", peer);
    pthread_mutex_unlock(&l->mu);
    if (rc != SHEAF_OK) return rc;
    return send_frame(l, peer, KIND_DATA, tag, data, len, timeout_ms, s);
}

static int32_t trecv(sheaf_transport_link *l, uint32_t peer, uint64_t tag, uint8_t *buf, size_t capacity,
                     size_t *received, int64_t timeout_ms, sheaf_status *s) {
    if (check_peer(l, peer, s)) return SHEAF_INVALID;
    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until);
    until.tv_sec += timeout_ms / 1000;
    until.tv_nsec += (timeout_ms % 1000) * 1000000;
    if (until.tv_nsec >= 1000000000) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000;
    }
    peer_t *p = &l->peers[peer];
    pthread_mutex_lock(&l->mu);
    for (;;) {
        if (l->aborted) {
            pthread_mutex_unlock(&l->mu);
            return fail(s, SHEAF_ABORTED, l->culprit, "%s", l->abort_reason);
        }
        msg *prev = NULL, *m = p->head;
        while (m && m->tag != tag) {
            prev = m;
            m = m->next;
        }
        if (m) {
            if (m->len > capacity) {
                pthread_mutex_unlock(&l->mu);
                int32_t rc = fail(s, SHEAF_TRUNCATED, peer, "a message of %llu bytes, a buffer of %zu",
                                  (unsigned long long)m->len, capacity);
                s->needed = m->len;
                return rc;
            }
            if (prev) prev->next = m->next; else p->head = m->next;
            if (p->tail == m) p->tail = prev;
            pthread_mutex_unlock(&l->mu);
            if (m->len) memcpy(buf, m->data, m->len);
            *received = m->len;
            free(m->data);
            free(m);
            return SHEAF_OK;
        }
        if (p->state == PEER_FAILED) {
            pthread_mutex_unlock(&l->mu);
            return fail(s, p->fail_code, peer, "%s", p->why);
        }
        if (p->state == PEER_BYE) {
            pthread_mutex_unlock(&l->mu);
            return fail(s, SHEAF_PEER_FAILED, peer, "rank %u closed its link with nothing more to send", peer);
        }
        if (pthread_cond_timedwait(&l->cv, &l->mu, &until) == ETIMEDOUT) {
            pthread_mutex_unlock(&l->mu);
            return fail(s, SHEAF_TIMEOUT, peer, "no message from rank %u within %lld ms", peer,
                        (long long)timeout_ms);
        }
    }
}

static void tabort(sheaf_transport_link *l, uint32_t culprit, const char *reason) {
    pthread_mutex_lock(&l->mu);
    if (!l->aborted) {
        l->aborted = 1;
        l->culprit = culprit;
        snprintf(l->abort_reason, sizeof l->abort_reason, "%s", reason);
    }
    pthread_cond_broadcast(&l->cv);
    pthread_mutex_unlock(&l->mu);
    uint8_t body[4 + 196];
    size_t n = strlen(reason) > 196 ? 196 : strlen(reason);
    memcpy(body, &culprit, 4);
    memcpy(body + 4, reason, n);
    for (uint32_t q = 0; q < l->world; q++)
        if (q != l->rank && l->peers[q].fd >= 0) send_frame(l, q, KIND_ABORT, 0, body, 4 + n, 100, NULL);
}

static int32_t tclose(sheaf_transport_link *l, int64_t timeout_ms, sheaf_status *s) {
    pthread_mutex_lock(&l->mu);
    l->closed = 1;
    pthread_mutex_unlock(&l->mu);
    for (uint32_t q = 0; q < l->world; q++)
        if (q != l->rank && l->peers[q].fd >= 0) send_frame(l, q, KIND_BYE, 0, NULL, 0, timeout_ms, NULL);
    /* Every peer's bye means it has read all this rank sent before it; a failed peer
       has nothing more to wait for. */
    int64_t until = now_ms() + timeout_ms;
    pthread_mutex_lock(&l->mu);
    for (uint32_t q = 0; q < l->world; q++) {
        while (q != l->rank && l->peers[q].state == PEER_OPEN) {
            int64_t left = until - now_ms();
            if (left <= 0) {
                pthread_mutex_unlock(&l->mu);
                return fail(s, SHEAF_TIMEOUT, q, "rank %u did not close within %lld ms", q, (long long)timeout_ms);
            }
            struct timespec t;
            clock_gettime(CLOCK_MONOTONIC, &t);
            t.tv_sec += left / 1000;
            t.tv_nsec += (left % 1000) * 1000000;
            if (t.tv_nsec >= 1000000000) {
                t.tv_sec++;
                t.tv_nsec -= 1000000000;
            }
            pthread_cond_timedwait(&l->cv, &l->mu, &t);
        }
    }
    pthread_mutex_unlock(&l->mu);
    return SHEAF_OK;
}

static void destroy(sheaf_transport_link *l) {
    if (!l) return;
    for (uint32_t q = 0; q < l->world; q++)
        if (l->peers[q].fd >= 0) shutdown(l->peers[q].fd, SHUT_RDWR);
    for (uint32_t q = 0; q < l->world; q++) {
        peer_t *p = &l->peers[q];
        if (p->has_reader) pthread_join(p->reader, NULL);
        if (p->fd >= 0) close(p->fd);
        for (msg *m = p->head, *next; m; m = next) {
            next = m->next;
            free(m->data);
            free(m);
        }
        pthread_mutex_destroy(&p->send_lock);
    }
    pthread_cond_destroy(&l->cv);
    pthread_mutex_destroy(&l->mu);
    free(l->peers);
    free(l);
}

static const sheaf_transport_v1 TABLE = {
    .version = SHEAF_TRANSPORT_VERSION,
    .struct_size = sizeof(sheaf_transport_v1),
    .name = "unix-c",
    .plugin_version = "0.1.0",
    .init = init,
    .send = tsend,
    .recv = trecv,
    .abort = tabort,
    .close = tclose,
    .destroy = destroy,
};

const sheaf_transport_v1 *sheaf_transport_plugin_v1(void) { return &TABLE; }
