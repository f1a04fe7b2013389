/*
 * check.h: the plain C structs that cross the thread boundary.
 *
 * A check is allocated by the Python thread (under the GIL), handed to a loop
 * thread through its request queue, and handed back through a port's
 * completion queue; whoever holds it owns it, and no PyObject is reachable
 * from it.  A spec is immutable after creation and shared by reference count
 * (atomic: the last check holding it may be freed on a loop thread).
 */
#ifndef RG_CHECK_H
#define RG_CHECK_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "gcra.h"

/* Why a check got a failure decision instead of an answer from the store. */
enum rg_err {
    RG_ERR_NONE = 0,
    RG_ERR_TIMEOUT,     /* deadline passed before the reply */
    RG_ERR_UNAVAILABLE, /* not connected, or the connection dropped */
    RG_ERR_OVERLOADED,  /* too many checks outstanding */
    RG_ERR_CLOSED,      /* the limiter was closed with the check in flight */
    RG_ERR_REDIS,       /* Redis answered with an error */
    RG_ERR__COUNT
};

/* What a check asks of the store. */
enum rg_op {
    RG_OP_HIT = 0, /* decide, consuming cost if allowed (cost 0: peek); with the
                    * spec's concurrency limit, also take a slot (check->sid) */
    RG_OP_RESET,   /* delete the key's buckets for the spec's rates; answered allowed */
    RG_OP_CHARGE,  /* consume cost (may be negative: a refund) without denying;
                    * a bucket may go into debt, never above full */
    RG_OP_RELEASE, /* give back the concurrency slot check->sid; nobody waits
                    * for the answer (the check has no port) */
    RG_OP_COMMAND, /* an operator's command (check->cmd), sent as it is on its
                    * own; no spec, never in a script call, never cached */
    RG_OP_CONNECT, /* wait until the shard's store has answered (check->cmd
                    * says why not); no spec, sent nowhere */
};

/* The script's op argument: the op, plus this flag when the check carries a
 * concurrency part (its key, limit, ttl and slot id follow the rates). */
#define RG_OP_CONC_FLAG 4
/* ... and this one on a hit that takes a lease (lease.h): the script takes
 * as many tokens as every rate allows, up to the cost, at least 1, and
 * answers the number taken as "allowed". */
#define RG_OP_LEASE_FLAG 8

/* A compiled list of rates, with the strings the Redis script needs. */
typedef struct rg_spec {
    atomic_int refcnt;
    int n;
    uint64_t id;                    /* unique in the process, never reused */
    rg_rate rates[RG_MAX_RATES];
    char arg_T[RG_MAX_RATES][32];   /* "%.17g" of T, tau: script arguments */
    char arg_tau[RG_MAX_RATES][32];
    uint8_t arg_T_len[RG_MAX_RATES];
    uint8_t arg_tau_len[RG_MAX_RATES];
    char key_id[RG_MAX_RATES][48];  /* the rate's part of the key, "100/60000" */
    uint8_t key_id_len[RG_MAX_RATES];
    /* A concurrency limit (0: none): at most conc_limit slots of one key
     * held at once, each for at most conc_ttl_us.  It reports as rate
     * number n: rates[n].burst is conc_limit (so n < RG_MAX_RATES). */
    int64_t conc_limit;
    double conc_ttl_us;
    char arg_conc[2][24];           /* the script's limit and ttl (us) arguments */
    uint8_t arg_conc_len[2];
    /* Token leases (lease.h): a check of cost 1 is answered from a block
     * of at most lease_max tokens taken from Redis, usable lease_ttl_ns. */
    int lease;
    int64_t lease_max;
    uint64_t lease_ttl_ns;
} rg_spec;

struct rg_port;
struct rg_batch;

/*
 * A reply as plain C: what the loop thread copies out of hiredis's reply
 * for an operator's command, and what the Python thread turns into Python
 * objects (under the GIL, pyengine.c).  Owned by its command.
 */
enum rg_reply_type {
    RG_REPLY_NIL = 0,
    RG_REPLY_INT,    /* integer */
    RG_REPLY_BULK,   /* str[0..len) */
    RG_REPLY_STATUS, /* str[0..len) */
    RG_REPLY_ERROR,  /* str[0..len): the server's error text */
    RG_REPLY_ARRAY,  /* elem[0..n) */
};

typedef struct rg_reply {
    int type;
    long long integer;
    size_t len;  /* STRING, STATUS, ERROR */
    char *str;
    size_t n;    /* ARRAY */
    struct rg_reply *elem;
} rg_reply;

void rg_reply_free(rg_reply *r);

/*
 * A connect() waits on one future for every shard: the shards' CONNECT
 * checks share it.  `left` and `done` are the Python thread's (under the
 * GIL); the reference count is atomic, because the last check holding the
 * group may be freed on a loop thread.
 */
typedef struct rg_group {
    atomic_int refcnt;
    int left; /* shards that have not answered */
    int done; /* the future was taken (resolved, or let go) */
} rg_group;

/* How an operator's command is routed (rg_cmd.route). */
enum { RG_CMD_ANY = 0, RG_CMD_KEY, RG_CMD_NODE };

/*
 * The operator's part of a COMMAND or CONNECT check (check.h's rg_check
 * owns it).  Made by the Python thread, routed and answered by a loop
 * thread, read back by the Python thread: one owner at a time.
 */
typedef struct rg_cmd {
    char *resp;          /* the command in RESP */
    size_t resp_len;
    int route;           /* RG_CMD_* */
    int slot;            /* RG_CMD_KEY on a cluster: the key's hash slot */
    char *node;          /* RG_CMD_NODE: "host:port" as topology() lists it */
    int redirects;       /* MOVED / ASK followed so far */
    double timeout;      /* seconds, for messages */
    rg_group *group;     /* CONNECT: the connect() this shard answers */
    rg_reply *reply;     /* the answer (RG_ERR_NONE), or NULL */
    char where[300];     /* the server it went to or waits for, for messages */
    char why[400];       /* the cause, when it failed */
} rg_cmd;

void rg_cmd_free(rg_cmd *cmd);

typedef struct rg_check {
    struct rg_check *next; /* request queue, then the sent/waiting list, then the port */
    struct rg_check *prev; /* sent/waiting list (loop thread only) */
    struct rg_port *port;  /* owns a reference */
    rg_spec *spec;         /* owns a reference */
    struct rg_batch *batch; /* while sent: the batch and our index in it */
    uint32_t bidx;
    int cslot;             /* Cluster: the hash slot (loop thread, at dispatch) */
    int declared;          /* Cluster: send in a call of its slot alone, keys declared */
    uint32_t slot;         /* the port's future slot, meaningful to Python only */
    uint64_t hash;         /* rg_hash(key), for the over-limit cache */
    uint64_t submit_ns;    /* CLOCK_MONOTONIC */
    uint64_t done_ns;      /* when a loop thread finished it (0: not by one) */
    uint64_t deadline_ns;
    int64_t cost;
    int op;                /* enum rg_op */
    int resent;            /* sent again after its connection dropped (at most once) */
    int lease;             /* a hit that takes a lease of up to `cost` tokens (lease.h) */
    int err;               /* enum rg_err */
    rg_cmd *cmd;           /* COMMAND / CONNECT: owned; NULL otherwise */
    rg_result res;
    uint32_t keylen;
    uint32_t sidlen;       /* the concurrency slot id, after the key in key[] */
    char key[];
} rg_check;

static inline void
rg_spec_incref(rg_spec *s)
{
    atomic_fetch_add_explicit(&s->refcnt, 1, memory_order_relaxed);
}

void rg_spec_decref(rg_spec *s);

/* Allocate a check with a copy of the key and of the slot id (sid, may be
 * NULL with sidlen 0); NULL on out of memory. */
rg_check *rg_check_new(const char *key, size_t keylen, const char *sid, size_t sidlen);

static inline const char *
rg_check_sid(const rg_check *c)
{
    return c->key + c->keylen;
}
/* Drop the check's references and free it.  Any thread. */
void rg_check_free(rg_check *c);

uint64_t rg_now_ns(void);

/* snprintf for messages: cut to the buffer, silently (a long host name or
 * a server's error text must not cost the message); "" on a format error. */
__attribute__((format(printf, 3, 4))) void rg_msgf(char *buf, size_t len, const char *f, ...);

/*
 * The file descriptors the loop threads own (epoll, wake-up eventfds,
 * sockets), process-wide and lock-free, so that a child of fork() closes
 * them at once (pthread_atfork) without touching the parent's structures,
 * which may be mid-update.  Own an fd after it is opened and disown it before
 * it is closed: an fd missed in between is only leaked by a child, never
 * closed while it means something else.
 */
void rg_fd_own(int fd);
void rg_fd_disown(int fd);
/* Install the fork handler (idempotent; any thread). */
void rg_fd_install_atfork(void);

/* Live objects, for the leak tests (always on: two relaxed atomics). */
extern atomic_long rg_live_checks;
extern atomic_long rg_live_ports;
extern atomic_long rg_live_conns; /* connections (conn.c), open or closing */

#endif
