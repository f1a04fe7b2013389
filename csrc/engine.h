/*
 * engine.h: the loop threads that run checks against Redis.
 *
 * An engine has one or more shards; each shard is one thread running one
 * libuv loop that owns one hiredis async connection.  Keys are spread over
 * shards by hash.  The Python thread talks to a shard only through
 * rg_engine_submit() (a mutex-protected queue plus uv_async_send) and reads
 * only the atomic fields marked below.  A loop thread never touches a
 * PyObject and never takes the GIL: what it needs arrives as plain C structs
 * (check.h), and what it produces leaves through a port (port.h).
 */
#ifndef RG_ENGINE_H
#define RG_ENGINE_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <uv.h>

#include "check.h"

struct redisAsyncContext;

#define RG_BATCH_MAX 100 /* checks in one script call */

typedef struct rg_engine_cfg {
    char *host;       /* TCP host, or NULL */
    int port;
    char *path;       /* unix socket path, or NULL */
    char *password;   /* or NULL */
    size_t password_len;
    char *username;   /* ACL user (Redis 6+), or NULL */
    size_t username_len;
    int db;
    uint64_t timeout_ns;         /* per-check deadline */
    uint64_t connect_timeout_ns; /* connect + handshake */
    uint64_t stall_ns;           /* no reply for this long: drop the connection */
    long max_pending;            /* bound on outstanding checks */
    uint64_t spin_ns;            /* poll instead of sleeping while replies are owed (0: never) */
    int nshards;
} rg_engine_cfg;

/* Doubly linked list with a sentinel, of checks (loop thread only). */
typedef struct rg_list {
    rg_check head;
} rg_list;

/* One script call in flight: the checks it carries (NULL once answered by
 * the deadline; the late reply is then ignored for that check). */
typedef struct rg_batch {
    struct rg_shard *shard;
    struct rg_batch *prev, *next; /* unreplied batches, oldest first */
    uint64_t sent_ns;
    int n;
    int evaled; /* resent with EVAL after NOSCRIPT */
    rg_check *checks[];
} rg_batch;

enum rg_conn_state { RG_DOWN, RG_CONNECTING, RG_READY };

typedef struct rg_shard {
    struct rg_engine *eng;
    int index;

    /* Shared with the Python thread. */
    pthread_mutex_t mu;
    rg_check *qhead, *qtail; /* request queue (under mu) */
    int stopping;            /* (under mu) */
    atomic_int down;         /* 1: answer "unavailable" at once, do not queue */
    atomic_int connected;
    atomic_int spinning;     /* the thread is polling: no wake-up needed (see shard_main) */

    /* Loop thread only, after start. */
    uv_loop_t loop;
    uv_async_t wake;
    uv_timer_t deadline_timer; /* check deadlines and stall detection */
    uv_timer_t conn_timer;     /* connect timeout, then reconnect backoff */
    pthread_t thread;
    int thread_started;
    int closing;
    struct redisAsyncContext *ac;
    int state;                 /* enum rg_conn_state */
    int ever_ready;
    uint64_t backoff_ms;
    unsigned int rand_state;
    char sha[41];
    rg_list waiting;           /* queued while connecting */
    rg_list sent;              /* in a batch, awaiting the reply */
    rg_batch bsentinel;        /* list of unreplied batches */
    rg_check *done_head, *done_tail; /* finished, pushed to ports at flush */
    /* scratch for building a script call */
    const char **argv;
    size_t *argvlen;
    size_t argcap;
    char *kbuf;
    size_t kbufcap;
} rg_shard;

typedef struct rg_engine {
    rg_engine_cfg cfg;
    rg_shard *shards;
    int started;
    atomic_long outstanding; /* queued + waiting + sent-and-unreplied */
    atomic_long reconnects;
    pthread_mutex_t err_mu;
    char last_error[256];    /* last Redis error text, for stats (under err_mu) */
} rg_engine;

/* Start the shard threads.  0, or -1 with a message in errbuf. */
int rg_engine_start(rg_engine *e, char *errbuf, size_t errlen);
/* Hand a check to its shard (owned by the engine from here).  The caller
 * has already counted it in `outstanding`.  Returns 1 if the queue was
 * empty: then the caller must rg_engine_wake() the shard (a non-empty queue
 * already has a wake-up coming, since the shard takes the whole queue). */
int rg_engine_submit(rg_engine *e, rg_shard *s, rg_check *c);
/* Wake a shard to take its queue (uv_async_send: coalesced, any thread). */
void rg_engine_wake(rg_shard *s);
/* After a push onto an empty queue: whether the shard must be woken (it is
 * not polling).  Contains the full fence of the hand-over (see engine.c). */
int rg_shard_needs_wake(rg_shard *s);
/* Stop every shard and join its thread; every check still held is answered
 * RG_ERR_CLOSED through its port.  Call without the GIL. */
void rg_engine_stop(rg_engine *e);
/* After fork() in the child: forget the parent's threads without touching
 * their locks (their memory is leaked on purpose: it may be mid-update). */
void rg_engine_abandon(rg_engine *e);
void rg_engine_free_cfg(rg_engine_cfg *cfg);
void rg_engine_set_error(rg_engine *e, const char *msg, size_t len);

/* Loop-thread internals shared with redis.c. */
void rg_shard_complete(rg_shard *s, rg_check *c, int err);
void rg_shard_flush(rg_shard *s);
void rg_shard_send_waiting(rg_shard *s);
void rg_shard_fail_waiting(rg_shard *s, int err);
void rg_shard_arm(rg_shard *s);
void rg_list_remove(rg_check *c);

#endif
