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
    rg_buf cmd;       /* the question (RESP), kept for each server in turn */
    char why[300];    /* the last failure, for failed() */
};

static void ask_next(rg_ask *a);

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

static void
ask_ready(void *owner, rg_conn *c, const char *sha)
{
    rg_ask *a = owner;
    rg_buf b = {0};
    (void)sha;

    if (rg_buf_reserve(&b, a->cmd.len) == 0) {
        memcpy(b.p, a->cmd.p, a->cmd.len);
        b.len = a->cmd.len;
        if (rg_conn_send(c, &b, a) == 0)
            return;
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

    if (a == NULL)
        return NULL;
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

/* ---- ROLE ------------------------------------------------------------------------ */

int
rg_role_cmd(rg_buf *b)
{
    if (rg_buf_reserve(b, 32) != 0)
        return -1;
    rg_resp_array(b, 1);
    rg_resp_bulk(b, "ROLE", 4);
    return 0;
}

int
rg_role_master(const redisReply *r, char *role, size_t rolelen)
{
    const redisReply *e;

    if (r->type != REDIS_REPLY_ARRAY || r->elements == 0 ||
        r->element[0]->type != REDIS_REPLY_STRING) {
        rg_msgf(role, rolelen, "%s", r->type == REDIS_REPLY_ERROR ? "an error" : "unexpected");
        return 0;
    }
    e = r->element[0];
    if (e->len == 6 && memcmp(e->str, "master", 6) == 0)
        return 1;
    rg_msgf(role, rolelen, "%.*s", (int)(e->len > 40 ? 40 : e->len), e->str);
    return 0;
}

/* ---- Cluster ----------------------------------------------------------------------- */

/* One range of CLUSTER SLOTS: [first, last, [host, port, id, ...], replicas...]. */
static int
slot_range(const redisReply *e, const char *asked, int *first, int *last, char *host,
           size_t hostlen, int *port)
{
    const redisReply *m;

    if (e->type != REDIS_REPLY_ARRAY || e->elements < 3 ||
        e->element[0]->type != REDIS_REPLY_INTEGER || e->element[1]->type != REDIS_REPLY_INTEGER)
        return 0;
    *first = (int)e->element[0]->integer;
    *last = (int)e->element[1]->integer;
    if (e->element[0]->integer < 0 || e->element[1]->integer > 16383 || *first > *last)
        return 0;
    m = e->element[2];
    if (m->type != REDIS_REPLY_ARRAY || m->elements < 2 || !parse_host(m->element[0], host, hostlen))
        return 0;
    if (host[0] == '\0' || strcmp(host, "?") == 0)
        rg_msgf(host, hostlen, "%s", asked);
    return (*port = parse_port(m->element[1])) != 0;
}

int
rg_cluster_slots(const redisReply *r, const char *asked,
                 void (*fn)(void *arg, int first, int last, const char *host, int port), void *arg)
{
    char host[256];
    int first, last, port;
    size_t i;

    if (r->type != REDIS_REPLY_ARRAY || r->elements == 0)
        return -1;
    for (i = 0; i < r->elements; i++)
        if (!slot_range(r->element[i], asked, &first, &last, host, sizeof(host), &port))
            return -1;
    for (i = 0; i < r->elements; i++) {
        slot_range(r->element[i], asked, &first, &last, host, sizeof(host), &port);
        fn(arg, first, last, host, port);
    }
    return 0;
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
