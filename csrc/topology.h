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

/*
 * Cluster: the slot map and its nodes.
 *
 * The map owns the masters it names (rg_node), the question that reads it
 * (CLUSTER SLOTS, asked of the seeds and the nodes in turn, each asked
 * with a deadline) and when to ask it again.  A reply is validated whole,
 * every number checked as the 64-bit value it arrived as, before it
 * replaces the map; a rejected reply leaves the map as it was and the
 * next node is asked.  Nodes the new map does not name are forgotten (the
 * owner lets their connections go first), so the table holds what the
 * map names, however often the masters move.
 *
 * The engine asks it where a slot goes (rg_map_route) and tells it what a
 * server answered: MOVED (rg_map_moved), ASK (rg_map_node), READONLY
 * (rg_map_readonly), a connection ready or lost (rg_map_ready).  The map
 * reports through the callbacks it was given, from inside the callbacks of
 * its own connection or timer, never from inside an rg_map_* call but
 * for added() from rg_map_moved and rg_map_node (the owner asked for it):
 *
 * added(owner, n): n is a master to talk to (new): the owner sets n->data.
 * removed(owner, n): n is no longer named: the owner lets n->data go; n is
 *     freed when this returns.
 * changed(owner): the map was read (or reading it failed): route again.
 * settle(owner): the end of an event (flush what finished).
 */
typedef struct rg_node {
    char host[256];
    int port;
    void *data;     /* the owner's (its connection to the node) */
    int in_map;     /* the current map names it (a slot's master, or a MOVED target) */
    int stale;      /* answered READONLY since the map was read: nothing goes there */
    int ready;      /* the owner's connection to it is ready (rg_map_ready) */
    rg_conn_cfg ask_cfg; /* how to ask it for the map (no database, no script) */
    rg_conn_memo memo;   /* what ask_cfg's connections remember */
} rg_node;

typedef struct rg_map rg_map;
typedef struct rg_map_ops {
    void (*added)(void *owner, rg_node *n);
    void (*removed)(void *owner, rg_node *n);
    void (*changed)(void *owner);
    void (*settle)(void *owner);
} rg_map_ops;

/* A map over the seeds cfgs[0..n) (the URL's nodes; connection settings
 * with no database and no script, which the nodes' questions use too; they
 * must outlive the map).  Asks for the map at once.  NULL: out of memory. */
rg_map *rg_map_new(uv_loop_t *loop, const rg_conn_cfg *seeds, int nseeds,
                   const rg_map_ops *ops, void *owner);
/* Close its connection, stop its timer and free it, and its nodes, with
 * no callback (the owner has let every n->data go). */
void rg_map_free(rg_map *m);
/* Ask for the map within ms (sooner than planned; a no-op while asking). */
void rg_map_refresh(rg_map *m, uint64_t ms);
/* The master of slot, or NULL: then *wait says whether that is for now (no
 * map read yet, or the slot's master answered READONLY: a new map is being
 * read) or for good (no master serves it, or no node answered). */
rg_node *rg_map_route(rg_map *m, int slot, int *wait);
/* The node serving slot in the map as read (stale or not), for a person. */
rg_node *rg_map_owner(const rg_map *m, int slot);
/* MOVED slot host:port: slot is served there now (noted at once; the whole
 * map is read again).  The node, or NULL out of memory. */
rg_node *rg_map_moved(rg_map *m, int slot, const char *host, int port);
/* ASK host:port: the node there (added if new, named by no slot).  NULL:
 * out of memory. */
rg_node *rg_map_node(rg_map *m, const char *host, int port);
/* n answered READONLY (a master demoted under us): nothing goes to it
 * until a new map is read, which is asked for now. */
void rg_map_readonly(rg_map *m, rg_node *n);
/* The owner's connection to n is ready, or not (lost, refused): a node of
 * the map that is not ready has the map read again soon (a failover). */
void rg_map_ready(rg_map *m, rg_node *n, int ready);
/* 1 a map was read; 0 not yet; -1 no node answered before any map (why
 * names the last cause). */
int rg_map_state(const rg_map *m);
const char *rg_map_why(const rg_map *m);
/* The nodes (in the map, or ASK targets): count and each. */
int rg_map_count(const rg_map *m);
rg_node *rg_map_at(const rg_map *m, int i);

enum { RG_REDIRECT_NONE = 0, RG_REDIRECT_MOVED, RG_REDIRECT_ASK };
/* An error "MOVED <slot> <host>:<port>" or "ASK ..." (RG_REDIRECT_*). */
int rg_cluster_redirect(const char *err, int *slot, char *host, size_t hostlen, int *port);

#endif
