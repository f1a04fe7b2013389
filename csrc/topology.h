/*
 * topology.h: who to talk to (loop thread only).
 *
 * One server needs nothing from here: the engine connects to the address of
 * its configuration.  Behind Sentinel, a destination asks an rg_disc where
 * the master is: the discovery tries each Sentinel in turn with
 * SENTINEL get-master-addr-by-name, and keeps one more connection to a
 * Sentinel SUBSCRIBEd to +switch-master, so a failover is known the moment
 * Sentinel announces it.  The discovery knows nothing of checks or
 * batches; it reports to its owner through the callbacks it was given, from
 * inside the callbacks of its own connections (never from inside an
 * rg_disc_* call).
 */
#ifndef RG_TOPOLOGY_H
#define RG_TOPOLOGY_H

#include <uv.h>

#include "conn.h"

struct redisReply;

/*
 * rg_ask: ask a question (one command) of the first of several servers that
 * answers it usefully: each in turn, from the last that answered, on a
 * fresh connection closed after the answer.  Behind both Sentinel (where
 * is the master?) and Cluster (who owns which slots?).
 *
 * answer(owner, idx, r, why, whylen): a reply (not an error) from server
 *     idx: 1 takes it (the round ends), 0 moves on to the next server, with
 *     why saying what was wrong.  It must not start another round.
 * failed(owner, why): no server answered usefully; why names the last cause.
 */
#define RG_ASK_MAX 80

typedef struct rg_ask rg_ask;
typedef struct rg_ask_ops {
    int (*answer)(void *owner, int idx, const struct redisReply *r, char *why, size_t whylen);
    void (*failed)(void *owner, const char *why);
    void (*settle)(void *owner);
} rg_ask_ops;

rg_ask *rg_ask_new(uv_loop_t *loop, const rg_ask_ops *ops, void *owner);
/* Start a round over cfgs[0..n) (at most RG_ASK_MAX; the cfgs must outlive
 * the round) with cmd (copied).  A no-op while a round is out.  0, or -1
 * (out of memory, or n < 1): then no callback follows. */
int rg_ask_start(rg_ask *a, const rg_conn_cfg *const *cfgs, int n, const rg_buf *cmd);
int rg_ask_busy(const rg_ask *a);
/* Close its connection (no more callbacks) and free it. */
void rg_ask_free(rg_ask *a);

typedef struct rg_disc rg_disc;

/*
 * found(owner, host, port): the answer to rg_disc_find: a Sentinel names the
 *     master there (not yet confirmed: the owner asks the master's ROLE).
 * failed(owner, why): no Sentinel answered rg_disc_find; why names the last
 *     cause for a person.
 * switched(owner, host, port): a Sentinel announced +switch-master for our
 *     master name: the master is now there.  May come at any time.
 * settle(owner): as rg_conn_ops.settle (the end of an event).
 */
typedef struct rg_disc_ops {
    void (*found)(void *owner, const char *host, int port);
    void (*failed)(void *owner, const char *why);
    void (*switched)(void *owner, const char *host, int port);
    void (*settle)(void *owner);
} rg_disc_ops;

/*
 * A discovery over the n Sentinels of cfgs (each a connection
 * configuration with the Sentinel's address and credentials and no script;
 * cfgs and name must outlive the discovery).  No handle is opened until
 * rg_disc_find.  NULL: out of memory.
 */
rg_disc *rg_disc_new(uv_loop_t *loop, const rg_conn_cfg *cfgs, int n, const char *name,
                     const rg_disc_ops *ops, void *owner);
/* Ask where the master is (found() or failed() follows, later); a no-op
 * while a question is already out. */
void rg_disc_find(rg_disc *d);
/* Close its connections (no more callbacks) and free it. */
void rg_disc_free(rg_disc *d);
/* "host:port" of the Sentinel that last named the master (an answer or a
 * +switch-master), or "" if none has. */
void rg_disc_named(const rg_disc *d, char *buf, size_t len);

/* The ROLE command into b: 0, or -1 out of memory. */
int rg_role_cmd(rg_buf *b);
/* Whether r, the reply to ROLE, says "master"; if not, what it says goes
 * into role (for a message). */
int rg_role_master(const struct redisReply *r, char *role, size_t rolelen);

/*
 * Cluster: a reply to CLUSTER SLOTS, checked whole first (-1 if it is not
 * one, nothing called), then fn(arg, first, last, host, port) for each
 * range and its master.  An empty host means the server asked (`asked`).
 */
int rg_cluster_slots(const struct redisReply *r, const char *asked,
                     void (*fn)(void *arg, int first, int last, const char *host, int port),
                     void *arg);
enum { RG_REDIRECT_NONE = 0, RG_REDIRECT_MOVED, RG_REDIRECT_ASK };
/* An error "MOVED <slot> <host>:<port>" or "ASK ..." (RG_REDIRECT_*). */
int rg_cluster_redirect(const char *err, int *slot, char *host, size_t hostlen, int *port);

#endif
