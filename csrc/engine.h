/*
 * engine.h: the loop threads that run checks against Redis.
 *
 * An engine has one or more shards; each shard is one thread running one
 * libuv loop that owns its connections (conn.h) to its destinations.  Keys are spread over
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

#include "batch.h"
#include "conn.h"

struct ssl_ctx_st;
struct rg_disc;
struct rg_map;
struct rg_node;

#define RG_MAX_SEEDS 16   /* Sentinels, or cluster nodes, in a URL */

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
    uint64_t connect_timeout_ns; /* resolve + connect + TLS + handshake */
    uint64_t stall_ns;           /* no reply for this long: drop the connection */
    long max_pending;            /* bound on outstanding checks */
    uint64_t spin_ns;            /* poll instead of sleeping while replies are owed (0: never) */
    int nshards;
    struct ssl_ctx_st *tls;      /* rediss://: made by rg_tls_ctx_new, freed with the cfg */
    int tls_check_hostname;
    /* redis+sentinel:// (service set) or redis+cluster:// (cluster set):
     * nseeds > 0, and host/port/path are unused: the seeds are the
     * Sentinels, or the cluster nodes to ask for the slot map. */
    int nseeds;
    char *seed_hosts[RG_MAX_SEEDS];
    int seed_ports[RG_MAX_SEEDS];
    int cluster;
    char *service;               /* the master's name (Sentinel) */
    char *sentinel_username;     /* or NULL */
    size_t sentinel_username_len;
    char *sentinel_password;     /* or NULL */
    size_t sentinel_password_len;
} rg_engine_cfg;

/* Doubly linked list with a sentinel, of checks (loop thread only), kept in
 * deadline order (see list_insert in engine.c). */
typedef struct rg_list {
    rg_check head;
} rg_list;

enum rg_dest_state { RG_DOWN, RG_CONNECTING, RG_READY };

/* What a shard learned about whether polling pays (loop thread only; see
 * spin_pays in engine.c).  Fractions are fixed point, RG_SPIN_ONE = 1. */
typedef struct rg_spin_state {
    uint64_t reply_ns;   /* EWMA of a script call's send -> reply time */
    unsigned hits;       /* EWMA of "a poll caught a submit" */
    unsigned busy;       /* EWMA of "every core had a runnable thread" */
    unsigned skipped;    /* polls skipped for a low hit rate since the last probe */
    uint64_t sampled_ns; /* when `busy` was last sampled */
} rg_spin_state;

/*
 * One destination of a shard: one Redis server, the connection to it and
 * the script calls it owes replies to.  One per shard for one server or
 * Sentinel (whose master it follows, see topology.h); one per master node
 * on a Cluster (the shard's slot map picks it).  Loop thread only.
 *
 * A connection that was ready and drops is replaced at once: checks wait
 * for the new one within their deadline, and the checks of the calls lost
 * with it are sent again once (see on_reply).  Only a connect attempt
 * that fails marks it `failing` (and one server's shard `down`): its
 * checks are answered at once, and it backs off.
 */
typedef struct rg_dest {
    struct rg_shard *shard;
    rg_conn *conn;             /* NULL between attempts */
    int state;                 /* enum rg_dest_state */
    int ever_ready;
    int again;                 /* connecting at once after a ready connection dropped */
    int answered;              /* the connection answered a script call since ready */
    int failing;               /* a connect failed, none succeeded since: answer at once
                                * (the shard's `down` for one server; per node on a cluster) */
    uint64_t ready_ns;         /* when it became ready */
    uint64_t first_ns;         /* when its first connect began (the first-connection rule) */
    char why[300];             /* why its last connect failed, for connect() */
    uint64_t backoff_ms;
    uv_timer_t retry_timer;    /* reconnect after the backoff */
    char sha[41];
    rg_batch bsentinel;        /* unreplied script calls, oldest first */
    /* Behind Sentinel (disc != NULL): where the master is, asked of the
     * discovery when not known (have_addr 0), confirmed with ROLE before
     * the destination is ready; ccfg is the engine's connection
     * configuration with this address. */
    struct rg_disc *disc;
    rg_conn_cfg ccfg;
    char host[256];
    int have_addr;
    int index;                 /* in the shard's dests[] */
    struct rg_node *node;      /* Cluster: the master of the map it talks to */
    int node_pos;              /* scratch, for topo_publish */
    int drops;                 /* ready connections lost before they answered, in a row */
    rg_conn_memo memo;         /* what its connections remember (TLS session) */
    rg_check *pend[RG_BATCH_MAX]; /* checks for the next script call (dispatch) */
    int npend;
} rg_dest;

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
    pthread_t thread;
    int thread_started;
    int closing;
    unsigned int rand_state;
    rg_dest dest;
    /* The destinations: &dest alone, or (Cluster) one per node the slot
     * map names (topology.h's rg_map owns the nodes and the map; a node it
     * forgets takes its destination with it), a growing array. */
    rg_dest **dests;
    int ndests, dcap;
    struct rg_map *map;        /* Cluster */
    rg_conn_cfg seeds[RG_MAX_SEEDS]; /* the engine's seed_conn, each with its memo */
    rg_conn_memo seed_memo[RG_MAX_SEEDS];
    uv_check_t after_poll;     /* the deadline pass, after the poll phase (see deadline_cb) */
    uv_idle_t poll_now;        /* makes that poll not block when a deadline is due */
    int due;                   /* a deadline or stall check is due */
    int no_xslot;              /* a node cannot run rg_script_xslot (Redis < 7.0) */
    rg_list waiting;           /* queued while connecting */
    rg_list sent;              /* in a batch, awaiting the reply */
    rg_check *done_head, *done_tail; /* finished, pushed to ports at flush */
    rg_spin_state spin;        /* whether polling pays (see spin_pays in engine.c) */
    uint64_t start_ns;         /* when the thread began (a cluster's first map) */
    char why[400];             /* the shard's last failure, for connect() and commands */
    int topo_dirty;            /* what topology() shows changed: publish at the next flush */
} rg_shard;

enum rg_kind { RG_KIND_SERVER = 0, RG_KIND_SENTINEL, RG_KIND_CLUSTER };

/*
 * What Engine.topology() shows: shard 0's view of the store, published by
 * its loop thread whenever it changes.  Immutable once published, reference
 * counted (atomic): the Python thread takes a reference under topo_mu and
 * reads it after letting go of the mutex.
 */
typedef struct rg_topo_master {
    char addr[300];  /* "host:port" ("[v6]:port"), or the unix socket path */
    int connected;
    int nranges;
    int (*ranges)[2]; /* [first, last] slot ranges (Cluster), in the snapshot's block */
} rg_topo_master;

typedef struct rg_topo_snap {
    atomic_int refcnt;
    char sentinel[300];       /* the Sentinel that last named the master, or "" */
    int nmasters;
    rg_topo_master *masters;  /* in the snapshot's block */
} rg_topo_snap;

typedef struct rg_engine {
    rg_engine_cfg cfg;
    rg_shard *shards;
    int started;
    atomic_long outstanding; /* queued + waiting + sent-and-unreplied */
    atomic_long reconnects;
    /* Counted by the loop threads and submit, read by stats (relaxed). */
    atomic_long wakeups_loop;  /* uv_async_send calls waking a shard (<= 1 eventfd write each) */
    atomic_long wakeups_port;  /* eventfd writes waking asyncio (port.c) */
    atomic_long spins;         /* polls started (shard_main) */
    atomic_long spin_hits;     /* polls that took a check submitted meanwhile */
    /* Fixed at start from the environment (see rg_engine_start). */
    int spin_fixed;            /* RATEGATE_SPIN_ADAPTIVE=0: poll whenever replies are owed */
    int ncpu;                  /* online cores */
    char loadavg[128];         /* where the running-thread count is read (/proc/loadavg) */
    rg_conn_cfg conn;        /* from cfg, for every connection (set at start) */
    rg_conn_cfg seed_conn[RG_MAX_SEEDS]; /* one per seed (set at start) */
    char xslot_sha[41];      /* SHA1 of rg_script_xslot, hex (set at start) */
    pthread_mutex_t err_mu;
    char last_error[256];    /* last Redis error text, for stats (under err_mu) */
    pthread_mutex_t topo_mu; /* guards topo (the pointer, not what it points to) */
    rg_topo_snap *topo;      /* shard 0's view, or NULL before it published one */
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
 * their locks (their memory is leaked on purpose: it may be mid-update);
 * err_mu is made anew (a parent thread may have held it at the fork), and
 * the fds the parent's loop threads owned were closed by the fork handler
 * (rg_fd_own). */
void rg_engine_abandon(rg_engine *e);
void rg_engine_free_cfg(rg_engine_cfg *cfg);
/* The kind of store the configuration names. */
int rg_engine_kind(const rg_engine *e);
/* A reference to the last topology shard 0 published, or NULL (none yet);
 * any thread.  Let go with rg_topo_snap_decref. */
rg_topo_snap *rg_engine_topology(rg_engine *e);
void rg_topo_snap_decref(rg_topo_snap *t);
void rg_engine_set_error(rg_engine *e, const char *msg, size_t len);

#endif
