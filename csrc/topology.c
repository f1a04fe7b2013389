/*
 * topology.c: Sentinel discovery (see topology.h).  Loop thread only.
 */
#include "topology.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <hiredis/hiredis.h>

#include "check.h"

/* ---- asking the first of several servers that answers ------------------------- */

struct rg_ask {
    uv_loop_t *loop;
    const rg_ask_ops *ops;
    void *owner;
    const rg_conn_cfg *cfgs[RG_ASK_MAX];
    int n;
    int cur;          /* the server being asked */
    int tried;        /* servers tried in this round */
    rg_conn *q;       /* the connection asking, or NULL */
    uv_timer_t *timer; /* the question's deadline (its own allocation: closed async) */
    rg_buf cmd;       /* the question (RESP), kept for each server in turn */
    char why[300];    /* the last failure, for failed() */
};

static void ask_next(rg_ask *a);

/* A handle allocated on its own: freed once closed. */
static void
free_handle(uv_handle_t *h)
{
    free(h);
}

static void
ask_why(rg_ask *a, const char *what)
{
    const rg_conn_cfg *c = a->cfgs[a->cur];
    rg_msgf(a->why, sizeof(a->why), "%s:%d: %s", c->host, c->port, what);
}

/* The server could not answer: move on to the next. */
static void
ask_skip(rg_ask *a)
{
    a->cur = (a->cur + 1) % a->n;
    ask_next(a);
}

/* The server answered the handshake but not the question in time (a
 * half-dead server): drop it, ask the next. */
static void
ask_late(uv_timer_t *t)
{
    rg_ask *a = t->data;
    rg_conn *c = a->q;
    char what[120];

    if (c == NULL)
        return;
    a->q = NULL;
    rg_conn_close(c);
    rg_msgf(what, sizeof(what), "no answer within connect_timeout (%llu ms)",
            (unsigned long long)(a->cfgs[a->cur]->connect_timeout_ns / 1000000u));
    ask_why(a, what);
    ask_skip(a);
    a->ops->settle(a->owner);
}

static void
ask_ready(void *owner, rg_conn *c, const char *sha)
{
    rg_ask *a = owner;
    rg_buf b = {0};
    (void)sha;

    if (rg_buf_reserve(&b, a->cmd.len) == 0) {
        memcpy(b.p, a->cmd.p, a->cmd.len);
        b.len = a->cmd.len;
        if (rg_conn_send(c, &b, a) == 0) {
            /* Every question has a deadline: connect_timeout, from here. */
            uv_timer_start(a->timer, ask_late,
                           (a->cfgs[a->cur]->connect_timeout_ns + 999999) / 1000000, 0);
            return;
        }
    }
    rg_buf_free(&b);
    ask_why(a, "out of memory");
    a->q = NULL;
    rg_conn_close(c);
    ask_skip(a);
}

static void
ask_reply(void *owner, rg_conn *c, void *priv, redisReply *r)
{
    rg_ask *a = owner;
    char why[256];
    (void)priv;

    if (r == NULL || c != a->q)
        return; /* closed by us, or lost: ask_lost moves on */
    a->q = NULL;
    uv_timer_stop(a->timer);
    rg_conn_close(c);
    why[0] = '\0';
    if (r->type == REDIS_REPLY_ERROR) {
        rg_msgf(why, sizeof(why), "%.*s", (int)(r->len > 200 ? 200 : r->len), r->str);
    } else {
        /* The round is over while answer() runs (it may look at
         * rg_ask_busy); back on if the answer is no use. */
        int n = a->n;
        a->n = 0;
        if (a->ops->answer(a->owner, a->cur, r, why, sizeof(why)))
            return;
        a->n = n;
    }
    ask_why(a, why[0] ? why : "an answer that is no use");
    ask_skip(a);
}

static void
ask_lost(void *owner, rg_conn *c, int was_ready, const char *why)
{
    rg_ask *a = owner;
    (void)c;
    (void)was_ready;

    rg_msgf(a->why, sizeof(a->why), "%s", why);
    a->q = NULL;
    uv_timer_stop(a->timer);
    ask_skip(a);
}

static void
ask_settle(void *owner)
{
    rg_ask *a = owner;
    a->ops->settle(a->owner);
}

static const rg_conn_ops ask_ops = {ask_ready, ask_reply, ask_lost, ask_settle, NULL};

/* Ask the next server not yet tried in this round; failed() once each was. */
static void
ask_next(rg_ask *a)
{
    char err[200];

    while (a->tried < a->n) {
        a->tried++;
        a->q = rg_conn_open(a->loop, a->cfgs[a->cur], &ask_ops, a, err, sizeof(err));
        if (a->q != NULL)
            return;
        ask_why(a, err);
        a->cur = (a->cur + 1) % a->n;
    }
    a->n = 0; /* not asking */
    a->ops->failed(a->owner, a->why);
}

rg_ask *
rg_ask_new(uv_loop_t *loop, const rg_ask_ops *ops, void *owner)
{
    rg_ask *a = calloc(1, sizeof(*a));

    if (a == NULL || (a->timer = malloc(sizeof(*a->timer))) == NULL) {
        free(a);
        return NULL;
    }
    uv_timer_init(loop, a->timer); /* cannot fail on a live loop */
    a->timer->data = a;
    a->loop = loop;
    a->ops = ops;
    a->owner = owner;
    return a;
}

int
rg_ask_busy(const rg_ask *a)
{
    return a->n > 0;
}

int
rg_ask_start(rg_ask *a, const rg_conn_cfg *const *cfgs, int n, const rg_buf *cmd)
{
    int i;

    if (a->n > 0)
        return 0;
    if (n > RG_ASK_MAX)
        n = RG_ASK_MAX;
    a->cmd.len = 0;
    if (n < 1 || rg_buf_reserve(&a->cmd, cmd->len) != 0)
        return -1;
    memcpy(a->cmd.p, cmd->p, cmd->len);
    a->cmd.len = cmd->len;
    for (i = 0; i < n; i++)
        a->cfgs[i] = cfgs[i];
    /* Start where the last round ended well (the last server that answered). */
    if (a->cur >= n)
        a->cur = 0;
    a->n = n;
    a->tried = 0;
    ask_next(a);
    return 0;
}

/* Close *p's connection, forgotten first: its close answers reply(NULL),
 * which must not find it. */
static void
let_go(rg_conn **p)
{
    rg_conn *c = *p;

    *p = NULL;
    if (c != NULL)
        rg_conn_close(c);
}

void
rg_ask_free(rg_ask *a)
{
    let_go(&a->q);
    uv_close((uv_handle_t *)a->timer, free_handle);
    rg_buf_free(&a->cmd);
    free(a);
}

/* ---- Sentinel ------------------------------------------------------------------ */

struct rg_disc {
    uv_loop_t *loop;
    const rg_conn_cfg *cfgs;
    int n;
    const char *name;
    size_t name_len;
    const rg_disc_ops *ops;
    void *owner;
    rg_ask *ask;      /* SENTINEL get-master-addr-by-name */
    rg_conn *sub;     /* SUBSCRIBEd to +switch-master, or NULL */
    int sub_idx;
    int named;        /* the Sentinel that last named the master, or -1 */
};

static void sub_open(rg_disc *d, int idx);

/* A port in a bulk string; 0 if it is not one. */
static int
parse_port(const redisReply *r)
{
    char buf[8];
    long v;
    char *end;

    if (r->type == REDIS_REPLY_INTEGER)
        return r->integer >= 1 && r->integer <= 65535 ? (int)r->integer : 0;
    if (r->type != REDIS_REPLY_STRING || r->len == 0 || r->len >= sizeof(buf))
        return 0;
    memcpy(buf, r->str, r->len);
    buf[r->len] = '\0';
    v = strtol(buf, &end, 10);
    return *end == '\0' && v >= 1 && v <= 65535 ? (int)v : 0;
}

/* A host name in a bulk string into host (hostlen > 0); 0 if it is not one. */
static int
parse_host(const redisReply *r, char *host, size_t hostlen)
{
    if (r->type != REDIS_REPLY_STRING || r->len >= hostlen || memchr(r->str, '\0', r->len))
        return 0;
    memcpy(host, r->str, r->len);
    host[r->len] = '\0';
    return 1;
}

static int
disc_answer(void *owner, int idx, const redisReply *r, char *why, size_t whylen)
{
    rg_disc *d = owner;
    char host[256];
    int port = 0;

    if (r->type == REDIS_REPLY_ARRAY && r->elements == 2 &&
        parse_host(r->element[0], host, sizeof(host)) && host[0] != '\0')
        port = parse_port(r->element[1]);
    if (port == 0) {
        rg_msgf(why, whylen, "does not know the master name (check the name in the URL's path)");
        return 0;
    }
    if (d->sub == NULL)
        sub_open(d, idx);
    d->named = idx;
    d->ops->found(d->owner, host, port);
    return 1;
}

static void
disc_failed(void *owner, const char *why)
{
    rg_disc *d = owner;
    char msg[400];

    rg_msgf(msg, sizeof(msg), "Sentinel %s", why);
    d->ops->failed(d->owner, msg);
}

static void
disc_settle(void *owner)
{
    rg_disc *d = owner;
    d->ops->settle(d->owner);
}

static const rg_ask_ops disc_ask_ops = {disc_answer, disc_failed, disc_settle};

void
rg_disc_find(rg_disc *d)
{
    const rg_conn_cfg *cfgs[RG_ASK_MAX];
    rg_buf b = {0};
    int i;

    if (rg_ask_busy(d->ask))
        return;
    for (i = 0; i < d->n; i++)
        cfgs[i] = &d->cfgs[i];
    if (rg_buf_reserve(&b, 96 + RG_RESP_BULK_MAX(d->name_len)) == 0) {
        rg_resp_array(&b, 3);
        rg_resp_bulk(&b, "SENTINEL", 8);
        rg_resp_bulk(&b, "get-master-addr-by-name", 23);
        rg_resp_bulk(&b, d->name, d->name_len);
        if (rg_ask_start(d->ask, cfgs, d->n, &b) == 0) {
            rg_buf_free(&b);
            return;
        }
    }
    rg_buf_free(&b);
    d->ops->failed(d->owner, "out of memory asking the Sentinels");
}

/* ---- the subscription: +switch-master --------------------------------------- */

static void
sub_ready(void *owner, rg_conn *c, const char *sha)
{
    rg_disc *d = owner;
    rg_buf b = {0};
    (void)sha;

    if (rg_buf_reserve(&b, 64) == 0) {
        rg_resp_array(&b, 2);
        rg_resp_bulk(&b, "SUBSCRIBE", 9);
        rg_resp_bulk(&b, "+switch-master", 14);
        if (rg_conn_send(c, &b, d) == 0)
            return;
    }
    rg_buf_free(&b);
    d->sub = NULL; /* out of memory: the next find tries again */
    rg_conn_close(c);
}

static void
sub_reply(void *owner, rg_conn *c, void *priv, redisReply *r)
{
    (void)owner;
    (void)c;
    (void)priv;
    (void)r; /* the SUBSCRIBE confirmation (or NULL): nothing to do */
}

/*
 * A message: ["message", "+switch-master", "<name> <old ip> <old port>
 * <new ip> <new port>"].  Anything else, or another master's name, is
 * ignored.
 */
static void
sub_push(void *owner, rg_conn *c, redisReply *r)
{
    rg_disc *d = owner;
    char text[600], name[256], oldh[256], newh[256];
    int oldp, newp;
    const redisReply *m;
    (void)c;

    if (r->type != REDIS_REPLY_ARRAY || r->elements != 3)
        return;
    m = r->element[2];
    if (m->type != REDIS_REPLY_STRING || m->len >= sizeof(text))
        return;
    memcpy(text, m->str, m->len);
    text[m->len] = '\0';
    if (sscanf(text, "%255s %255s %d %255s %d", name, oldh, &oldp, newh, &newp) != 5)
        return;
    if (strcmp(name, d->name) != 0 || newp < 1 || newp > 65535)
        return;
    d->named = d->sub_idx;
    d->ops->switched(d->owner, newh, newp);
}

static void
sub_lost(void *owner, rg_conn *c, int was_ready, const char *why)
{
    rg_disc *d = owner;
    (void)c;
    (void)why;

    d->sub = NULL;
    /* That Sentinel went away: subscribe on the next one at once.  A
     * subscription that never came up waits for the next find instead, so
     * Sentinels that are all down cost no tight loop. */
    if (was_ready && d->n > 1)
        sub_open(d, (d->sub_idx + 1) % d->n);
}

static const rg_conn_ops sub_ops = {sub_ready, sub_reply, sub_lost, disc_settle, sub_push};

static void
sub_open(rg_disc *d, int idx)
{
    char err[200];

    d->sub_idx = idx;
    d->sub = rg_conn_open(d->loop, &d->cfgs[idx], &sub_ops, d, err, sizeof(err));
}

/* ---- life ---------------------------------------------------------------------- */

rg_disc *
rg_disc_new(uv_loop_t *loop, const rg_conn_cfg *cfgs, int n, const char *name,
            const rg_disc_ops *ops, void *owner)
{
    rg_disc *d = calloc(1, sizeof(*d));

    if (d == NULL)
        return NULL;
    d->ask = rg_ask_new(loop, &disc_ask_ops, d);
    if (d->ask == NULL) {
        free(d);
        return NULL;
    }
    d->loop = loop;
    d->cfgs = cfgs;
    d->n = n > RG_ASK_MAX ? RG_ASK_MAX : n;
    d->name = name;
    d->name_len = strlen(name);
    d->ops = ops;
    d->owner = owner;
    d->named = -1;
    return d;
}

void
rg_disc_named(const rg_disc *d, char *buf, size_t len)
{
    const rg_conn_cfg *c = d->named >= 0 ? &d->cfgs[d->named] : NULL;

    if (c == NULL)
        rg_msgf(buf, len, "%s", "");
    else if (strchr(c->host, ':') != NULL)
        rg_msgf(buf, len, "[%s]:%d", c->host, c->port);
    else
        rg_msgf(buf, len, "%s:%d", c->host, c->port);
}

void
rg_disc_free(rg_disc *d)
{
    let_go(&d->sub);
    rg_ask_free(d->ask);
    free(d);
}

/* ---- Cluster: the slot map ------------------------------------------------------- */

struct rg_map {
    uv_loop_t *loop;
    const rg_map_ops *ops;
    void *owner;
    const rg_conn_cfg *seeds;
    int nseeds;
    rg_ask *ask;              /* CLUSTER SLOTS */
    uv_timer_t *timer;        /* when to ask again (its own allocation: closed async) */
    const char *asked[RG_ASK_MAX]; /* the round's hosts, for an empty host in a reply */
    rg_node **nodes;          /* the masters named, and ASK targets */
    int n, cap;
    rg_node *slot[16384];     /* the map as read: slot -> master, or NULL */
    int state;                /* rg_map_state */
    uint64_t backoff_ms;      /* between rounds that failed */
    char why[300];
};

/* One range of CLUSTER SLOTS: [first, last, [host, port, id, ...], replicas...],
 * each number range-checked as the 64-bit value it arrived as. */
static int
slot_range(const redisReply *e, const char *asked, int *first, int *last, char *host,
           size_t hostlen, int *port)
{
    const redisReply *m;
    long long f, l;

    if (e->type != REDIS_REPLY_ARRAY || e->elements < 3 ||
        e->element[0]->type != REDIS_REPLY_INTEGER || e->element[1]->type != REDIS_REPLY_INTEGER)
        return 0;
    f = e->element[0]->integer;
    l = e->element[1]->integer;
    if (f < 0 || f > 16383 || l < 0 || l > 16383 || f > l)
        return 0;
    *first = (int)f;
    *last = (int)l;
    m = e->element[2];
    if (m->type != REDIS_REPLY_ARRAY || m->elements < 2 || !parse_host(m->element[0], host, hostlen))
        return 0;
    if (host[0] == '\0' || strcmp(host, "?") == 0)
        rg_msgf(host, hostlen, "%s", asked);
    return (*port = parse_port(m->element[1])) != 0;
}

static rg_node *
map_find(const rg_map *m, const char *host, int port)
{
    int i;
    for (i = 0; i < m->n; i++)
        if (m->nodes[i]->port == port && strcmp(m->nodes[i]->host, host) == 0)
            return m->nodes[i];
    return NULL;
}

/* The node at host:port, added if new (not in the map, no callback yet:
 * the caller says added()).  NULL: out of memory. */
static rg_node *
map_add(rg_map *m, const char *host, int port, int *isnew)
{
    rg_node *n = map_find(m, host, port);

    *isnew = 0;
    if (n != NULL)
        return n;
    if (m->n == m->cap) {
        int cap = m->cap ? m->cap * 2 : 8;
        rg_node **p = realloc(m->nodes, (size_t)cap * sizeof(*p));
        if (p == NULL)
            return NULL;
        m->nodes = p;
        m->cap = cap;
    }
    if ((n = calloc(1, sizeof(*n))) == NULL)
        return NULL;
    rg_msgf(n->host, sizeof(n->host), "%s", host);
    n->port = port;
    /* Asked for the map like a seed: the seeds' settings, its address. */
    n->ask_cfg = m->seeds[0];
    n->ask_cfg.host = n->host;
    n->ask_cfg.port = port;
    n->ask_cfg.memo = &n->memo;
    m->nodes[m->n++] = n;
    *isnew = 1;
    return n;
}

static void map_cb(uv_timer_t *t);

static void
map_at(rg_map *m, uint64_t ms)
{
    uv_timer_start(m->timer, map_cb, ms, 0);
}

void
rg_map_refresh(rg_map *m, uint64_t ms)
{
    if (rg_ask_busy(m->ask))
        return; /* the answer comes soon anyway */
    if (uv_is_active((uv_handle_t *)m->timer) && uv_timer_get_due_in(m->timer) <= ms)
        return;
    map_at(m, ms);
}

/*
 * A reply to CLUSTER SLOTS from the server asked (idx in the round):
 * checked whole (a range out of bounds, a slot named twice, an empty map,
 * a bad address: rejected, the next server is asked, the map stays); then
 * swapped in; nodes it no longer names are removed, new ones added.
 */
static int
map_answer(void *owner, int idx, const redisReply *r, char *why, size_t whylen)
{
    rg_map *m = owner;
    unsigned char seen[16384 / 8];
    char host[256];
    int first, last, port, isnew, i, j;
    rg_node *n, *added[64];
    int nadded = 0, more = 0;
    size_t k;

    memset(seen, 0, sizeof(seen));
    if (r->type != REDIS_REPLY_ARRAY || r->elements == 0) {
        rg_msgf(why, whylen, "%s", r->type == REDIS_REPLY_ARRAY ? "an empty slot map (a node that holds no slot?)"
                                                                : "an unexpected reply to CLUSTER SLOTS");
        return 0;
    }
    for (k = 0; k < r->elements; k++) {
        if (!slot_range(r->element[k], m->asked[idx], &first, &last, host, sizeof(host), &port)) {
            rg_msgf(why, whylen, "an unexpected reply to CLUSTER SLOTS (range %zu)", k);
            return 0;
        }
        for (i = first; i <= last; i++) {
            if (seen[i / 8] & (1u << (i % 8))) {
                rg_msgf(why, whylen, "a slot map that names slot %d twice", i);
                return 0;
            }
            seen[i / 8] |= (unsigned char)(1u << (i % 8));
        }
    }
    /* Valid: every node it names exists before the map changes. */
    for (k = 0; k < r->elements; k++) {
        slot_range(r->element[k], m->asked[idx], &first, &last, host, sizeof(host), &port);
        if (map_add(m, host, port, &isnew) == NULL) {
            rg_msgf(why, whylen, "out of memory");
            return 0;
        }
    }
    for (i = 0; i < m->n; i++)
        m->nodes[i]->in_map = 0;
    memset(m->slot, 0, sizeof(m->slot));
    for (k = 0; k < r->elements; k++) {
        slot_range(r->element[k], m->asked[idx], &first, &last, host, sizeof(host), &port);
        n = map_find(m, host, port);
        n->in_map = 1;
        for (i = first; i <= last; i++)
            m->slot[i] = n;
    }
    m->state = 1;
    m->backoff_ms = 10;
    m->why[0] = '\0';
    /* Forget the nodes it does not name (their owner lets go first); the
     * new ones are announced after, so the owner sees the map whole. */
    for (i = 0, j = 0; i < m->n; i++) {
        n = m->nodes[i];
        if (!n->in_map) {
            if (n->data != NULL)
                m->ops->removed(m->owner, n);
            rg_conn_memo_clear(&n->memo);
            free(n);
            continue;
        }
        n->stale = 0;
        m->nodes[j++] = n;
        if (n->data == NULL) {
            if (nadded < 64)
                added[nadded++] = n;
            else
                more = 1;
        }
    }
    m->n = j;
    for (i = 0; i < nadded; i++)
        m->ops->added(m->owner, added[i]);
    for (i = 0; more && i < m->n; i++)
        if (m->nodes[i]->data == NULL)
            m->ops->added(m->owner, m->nodes[i]);
    /* Routine refresh every 5 s; every 100 ms while a master of the map
     * is not ready (a failover under way: heal soon after it ends). */
    for (i = 0, j = 1; i < m->n; i++)
        j &= m->nodes[i]->ready;
    map_at(m, j ? 5000 : 100);
    m->ops->changed(m->owner);
    return 1;
}

static void
map_failed(void *owner, const char *why)
{
    rg_map *m = owner;

    rg_msgf(m->why, sizeof(m->why), "no cluster node answered CLUSTER SLOTS: %s", why);
    if (m->state == 0)
        m->state = -1; /* answer at once until a map comes; a map read keeps serving */
    map_at(m, m->backoff_ms);
    m->backoff_ms = m->backoff_ms * 2 > 500 ? 500 : m->backoff_ms * 2;
    m->ops->changed(m->owner);
}

static void
map_settle(void *owner)
{
    rg_map *m = owner;
    m->ops->settle(m->owner);
}

static const rg_ask_ops map_ask_ops = {map_answer, map_failed, map_settle};

/* Ask the seeds, then every node known, for CLUSTER SLOTS. */
static void
map_cb(uv_timer_t *t)
{
    rg_map *m = t->data;
    const rg_conn_cfg *cfgs[RG_ASK_MAX];
    rg_buf b = {0};
    int i, n = 0;

    if (rg_ask_busy(m->ask))
        return;
    for (i = 0; i < m->nseeds && n < RG_ASK_MAX; i++, n++) {
        cfgs[n] = &m->seeds[i];
        m->asked[n] = m->seeds[i].host;
    }
    for (i = 0; i < m->n && n < RG_ASK_MAX; i++)
        if (m->nodes[i]->in_map) {
            cfgs[n] = &m->nodes[i]->ask_cfg;
            m->asked[n++] = m->nodes[i]->host;
        }
    if (rg_buf_reserve(&b, 64) == 0) {
        rg_resp_array(&b, 2);
        rg_resp_bulk(&b, "CLUSTER", 7);
        rg_resp_bulk(&b, "SLOTS", 5);
        if (rg_ask_start(m->ask, cfgs, n, &b) == 0) {
            rg_buf_free(&b);
            return;
        }
    }
    rg_buf_free(&b);
    map_failed(m, "out of memory");
    map_settle(m);
}

rg_map *
rg_map_new(uv_loop_t *loop, const rg_conn_cfg *seeds, int nseeds, const rg_map_ops *ops, void *owner)
{
    rg_map *m = calloc(1, sizeof(*m));

    if (m == NULL)
        return NULL;
    m->timer = malloc(sizeof(*m->timer));
    m->ask = rg_ask_new(loop, &map_ask_ops, m);
    if (m->timer == NULL || m->ask == NULL) {
        free(m->timer);
        if (m->ask != NULL)
            rg_ask_free(m->ask);
        free(m);
        return NULL;
    }
    m->loop = loop;
    m->ops = ops;
    m->owner = owner;
    m->seeds = seeds;
    m->nseeds = nseeds;
    m->backoff_ms = 10;
    uv_timer_init(loop, m->timer); /* cannot fail on a live loop */
    m->timer->data = m;
    map_at(m, 0);
    return m;
}

void
rg_map_free(rg_map *m)
{
    int i;

    rg_ask_free(m->ask);
    uv_close((uv_handle_t *)m->timer, free_handle);
    for (i = 0; i < m->n; i++) {
        rg_conn_memo_clear(&m->nodes[i]->memo);
        free(m->nodes[i]);
    }
    free(m->nodes);
    free(m);
}

rg_node *
rg_map_route(rg_map *m, int slot, int *wait)
{
    rg_node *n = m->slot[slot];

    if (n != NULL && n->stale) {
        *wait = 1; /* a new map is being read */
        return NULL;
    }
    *wait = m->state == 0;
    return n;
}

rg_node *
rg_map_owner(const rg_map *m, int slot)
{
    return m->slot[slot];
}

/* A node added outside a map answer: announced at once (the caller is the
 * owner, inside its own event). */
static rg_node *
map_node(rg_map *m, const char *host, int port)
{
    int isnew;
    rg_node *n = map_add(m, host, port, &isnew);

    if (n != NULL && isnew)
        m->ops->added(m->owner, n);
    return n;
}

rg_node *
rg_map_moved(rg_map *m, int slot, const char *host, int port)
{
    rg_node *n = map_node(m, host, port);

    if (n != NULL) {
        n->in_map = 1;
        m->slot[slot] = n;
    }
    rg_map_refresh(m, 0);
    return n;
}

rg_node *
rg_map_node(rg_map *m, const char *host, int port)
{
    return map_node(m, host, port);
}

void
rg_map_readonly(rg_map *m, rg_node *n)
{
    n->stale = 1;
    rg_map_refresh(m, 0);
}

void
rg_map_ready(rg_map *m, rg_node *n, int ready)
{
    n->ready = ready;
    if (!ready && n->in_map)
        rg_map_refresh(m, 0); /* a failover, perhaps: who serves its slots now? */
}

int
rg_map_state(const rg_map *m)
{
    return m->state;
}

const char *
rg_map_why(const rg_map *m)
{
    return m->why;
}

int
rg_map_count(const rg_map *m)
{
    return m->n;
}

rg_node *
rg_map_at(const rg_map *m, int i)
{
    return m->nodes[i];
}

int
rg_cluster_redirect(const char *err, int *slot, char *host, size_t hostlen, int *port)
{
    const char *p, *colon;
    int kind;
    char *end;
    long v;
    size_t n;

    if (strncmp(err, "MOVED ", 6) == 0) {
        kind = RG_REDIRECT_MOVED;
        p = err + 6;
    } else if (strncmp(err, "ASK ", 4) == 0) {
        kind = RG_REDIRECT_ASK;
        p = err + 4;
    } else {
        return RG_REDIRECT_NONE;
    }
    v = strtol(p, &end, 10);
    if (end == p || *end != ' ' || v < 0 || v > 16383)
        return RG_REDIRECT_NONE;
    *slot = (int)v;
    p = end + 1;
    colon = strrchr(p, ':');
    if (colon == NULL || (n = (size_t)(colon - p)) >= hostlen)
        return RG_REDIRECT_NONE;
    memcpy(host, p, n);
    host[n] = '\0';
    v = strtol(colon + 1, &end, 10);
    if (end == colon + 1 || (*end != '\0' && *end != ' ') || v < 1 || v > 65535)
        return RG_REDIRECT_NONE;
    if (n == 0)
        return RG_REDIRECT_NONE; /* "MOVED 1 :6380": the client's own address; not from Redis 7 */
    *port = (int)v;
    return kind;
}
