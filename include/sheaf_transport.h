/*
 * sheaf_transport.h: the C ABI of Sheaf transport plugins.
 *
 * A transport moves tagged bytes between the ranks of a world; Sheaf builds every
 * collective, algorithm and law on top (see ARCHITECTURE.md, "Link"). Write one in
 * any language that can export a C function: a shared library whose file name starts
 * with `libsheaf_` (or any name in a directory given with --plugin-dir or
 * SHEAF_PLUGIN_PATH) exporting
 *
 *     const sheaf_transport_v1 *sheaf_transport_plugin_v1(void);
 *
 * which returns a table that lives as long as the library. A job selects it with
 * `transport.plugin = "<name>"`. Check it with `sheaf plugin check LIBRARY`.
 *
 * Versions. This is version 1. A later version of this header adds a new symbol
 * (`sheaf_transport_plugin_v2`) returning a new struct; Sheaf looks for the newest
 * symbol it knows first and keeps loading libraries that export only an older one,
 * adapting their table (as NCCL does with ncclNet_vN). Within one version the struct
 * never changes; `struct_size` lets Sheaf refuse a table that is not what it says.
 *
 * Threads. Sheaf calls `send` and `recv` from several threads at once (a
 * communication thread overlaps the backward pass), for different (peer, tag) pairs
 * and for the same; `abort` may come from any thread at any time. Every function but
 * `destroy` must be thread-safe.
 *
 * The contract Sheaf's conformance suite checks (`sheaf plugin check`):
 * - `send` is buffered: it returns once the transport owns the bytes and never waits
 *   for the matching `recv`. It may wait for flow control, no longer than its timeout.
 * - Messages from one rank with one tag arrive in the order they were sent; different
 *   tags never match each other.
 * - `recv` returns within its timeout with the message, or with a status naming the
 *   rank responsible. Once a peer is dead, or any rank called `abort`, pending and
 *   later calls fail with SHEAF_PEER_FAILED or SHEAF_ABORTED naming the culprit.
 * - A garbage byte from the network is SHEAF_PROTOCOL naming the sender, never a crash.
 */
#ifndef SHEAF_TRANSPORT_H
#define SHEAF_TRANSPORT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SHEAF_TRANSPORT_VERSION 1

/* What a call returns, and `sheaf_status.code`. */
typedef enum sheaf_status_code {
    SHEAF_OK = 0,
    /* The timeout passed waiting for `rank`. */
    SHEAF_TIMEOUT = 1,
    /* `rank` died, or left without closing. */
    SHEAF_PEER_FAILED = 2,
    /* A rank called `abort` blaming `rank`. */
    SHEAF_ABORTED = 3,
    /* `rank` sent something malformed. */
    SHEAF_PROTOCOL = 4,
    /* A bad argument: a peer outside the world or this rank itself, a bad config. */
    SHEAF_INVALID = 5,
    /* The link was closed. */
    SHEAF_CLOSED = 6,
    /* recv: the message is longer than the buffer. `needed` is its length; it stays
       queued, and the next recv of that peer and tag with a large enough buffer
       returns it. */
    SHEAF_TRUNCATED = 7,
    /* Anything else; `message` says what. */
    SHEAF_ERROR = 8
} sheaf_status_code;

/* Filled by a call that does not return SHEAF_OK. */
typedef struct sheaf_status {
    int32_t code;      /* a sheaf_status_code */
    uint32_t rank;     /* the rank responsible: TIMEOUT, PEER_FAILED, ABORTED, PROTOCOL */
    uint64_t needed;   /* TRUNCATED: the message's length in bytes */
    char message[256]; /* a NUL-terminated explanation, for the user */
} sheaf_status;

/* One rank's link, opaque to Sheaf. */
typedef struct sheaf_transport_link sheaf_transport_link;

typedef struct sheaf_transport_v1 {
    /* SHEAF_TRANSPORT_VERSION as the library was built (1). */
    uint32_t version;
    /* sizeof(sheaf_transport_v1) as the library was built. */
    uint32_t struct_size;
    /* The name a job selects it by, e.g. "unix-c"; the vendor's version string. */
    const char *name;
    const char *plugin_version;

    /* This rank's link: meets every other rank before returning. `config_json` (not
       NUL-terminated; `config_len` bytes) is a JSON object:
         rank, world_size          this rank and the world's size
         master_addr, master_port  where rank 0 meets the others (a rendezvous)
         connect_timeout_ms        how long meeting may take
         peer_timeout_ms           a peer silent this long counts as dead
         advertise_addr            the address others reach this rank at, or null
         job_token                 the job's secret, the same on every rank, or null
                                   for a world of one: refuse strangers with it
       Unknown keys must be ignored (later Sheaf releases may add some). Returns NULL
       and fills `status` on failure. */
    sheaf_transport_link *(*init)(const char *config_json, size_t config_len, sheaf_status *status);

    /* Sends `len` bytes to `peer` with `tag`. */
    int32_t (*send)(sheaf_transport_link *link, uint32_t peer, uint64_t tag, const uint8_t *data, size_t len,
                    int64_t timeout_ms, sheaf_status *status);

    /* Receives the next message from `peer` with `tag` into `buf` (`capacity` bytes);
       its length goes to `*received`. */
    int32_t (*recv)(sheaf_transport_link *link, uint32_t peer, uint64_t tag, uint8_t *buf, size_t capacity,
                    size_t *received, int64_t timeout_ms, sheaf_status *status);

    /* Declares the world failed because of `culprit` (NUL-terminated `reason`): every
       rank's pending and later calls fail with SHEAF_ABORTED. Best effort; must not
       block for long. */
    void (*abort)(sheaf_transport_link *link, uint32_t culprit, const char *reason);

    /* Flushes what was sent and leaves the world: returns once the peers have
       everything this rank sent, or at the timeout. */
    int32_t (*close)(sheaf_transport_link *link, int64_t timeout_ms, sheaf_status *status);

    /* Frees the link (after `close`, or without it when the world failed). */
    void (*destroy)(sheaf_transport_link *link);
} sheaf_transport_v1;

/* The symbol Sheaf looks for. */
const sheaf_transport_v1 *sheaf_transport_plugin_v1(void);

#ifdef __cplusplus
}
#endif

#endif /* SHEAF_TRANSPORT_H */
