/*
 * topology.c: Sentinel discovery (see topology.h).  Loop thread only.
 */
#include "topology.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <hiredis/hiredis.h>

struct rg_disc {
    uv_loop_t *loop;
    const rg_conn_cfg *cfgs;
    int n;
    const char *name;
    size_t name_len;
    const rg_disc_ops *ops;
    void *owner;
    rg_conn *q;       /* the question being asked, or NULL */
    int finding;      /* a find is out: found() or failed() is owed */
    int cur;          /* the Sentinel to ask next (the last that answered first) */
    int tried;        /* Sentinels tried in this find */
    rg_conn *sub;     /* SUBSCRIBEd to +switch-master, or NULL */
    int sub_idx;
    char why[300];    /* the last failure, for failed() */
};

static void
why_set(rg_disc *d, int idx, const char *what)
{
    snprintf(d->why, sizeof(d->why), "Sentinel %s:%d: %s", d->cfgs[idx].host, d->cfgs[idx].port,
             what);
}

/* ---- the question: SENTINEL get-master-addr-by-name ------------------------ */

static void try_next(rg_disc *d);

static void
q_ready(void *owner, rg_conn *c, const char *sha)
{
    rg_disc *d = owner;
    rg_buf b = {0};
    (void)sha;

    if (rg_buf_reserve(&b, 96 + RG_RESP_BULK_MAX(d->name_len)) == 0) {
        rg_resp_array(&b, 3);
        rg_resp_bulk(&b, "SENTINEL", 8);
        rg_resp_bulk(&b, "get-master-addr-by-name", 23);
        rg_resp_bulk(&b, d->name, d->name_len);
        if (rg_conn_send(c, &b, d) == 0)
            return;
    }
    rg_buf_free(&b);
    why_set(d, d->cur, "out of memory asking for the master");
    d->q = NULL;
    rg_conn_close(c);
    d->cur = (d->cur + 1) % d->n;
    try_next(d);
}

static void sub_open(rg_disc *d, int idx);

/* A port in a bulk string; 0 if it is not one. */
static int
parse_port(const redisReply *r)
{
    char buf[8];
    long v;
    char *end;

    if (r->type != REDIS_REPLY_STRING || r->len == 0 || r->len >= sizeof(buf))
        return 0;
    memcpy(buf, r->str, r->len);
    buf[r->len] = '\0';
    v = strtol(buf, &end, 10);
    return *end == '\0' && v >= 1 && v <= 65535 ? (int)v : 0;
}

static void
q_reply(void *owner, rg_conn *c, void *priv, redisReply *r)
{
    rg_disc *d = owner;
    char host[256];
    int port = 0, idx = d->cur;
    (void)priv;

    if (r == NULL || c != d->q)
        return; /* closed by us, or lost: q_lost moves on */
    if (r->type == REDIS_REPLY_ARRAY && r->elements == 2 &&
        r->element[0]->type == REDIS_REPLY_STRING && r->element[0]->len > 0 &&
        r->element[0]->len < sizeof(host))
        port = parse_port(r->element[1]);
    d->q = NULL;
    rg_conn_close(c);
    if (port == 0) {
        if (r->type == REDIS_REPLY_ERROR) {
            char what[256];
            snprintf(what, sizeof(what), "%.*s", (int)(r->len > 200 ? 200 : r->len), r->str);
            why_set(d, idx, what);
        } else {
            why_set(d, idx, "does not know the master name (check the name in the URL's path)");
        }
        d->cur = (d->cur + 1) % d->n;
        try_next(d);
        return;
    }
    memcpy(host, r->element[0]->str, r->element[0]->len);
    host[r->element[0]->len] = '\0';
    d->finding = 0;
    if (d->sub == NULL)
        sub_open(d, idx);
    d->ops->found(d->owner, host, port);
}

static void
q_lost(void *owner, rg_conn *c, int was_ready, const char *why)
{
    rg_disc *d = owner;
    (void)c;
    (void)was_ready;

    snprintf(d->why, sizeof(d->why), "%s", why);
    d->q = NULL;
    d->cur = (d->cur + 1) % d->n;
    try_next(d);
}

static void
disc_settle(void *owner)
{
    rg_disc *d = owner;
    d->ops->settle(d->owner);
}

static const rg_conn_ops q_ops = {q_ready, q_reply, q_lost, disc_settle, NULL};

/* Ask the next Sentinel not yet tried in this find; failed() once each was. */
static void
try_next(rg_disc *d)
{
    char err[200];

    while (d->tried < d->n) {
        int idx = d->cur;
        d->tried++;
        d->q = rg_conn_open(d->loop, &d->cfgs[idx], &q_ops, d, err, sizeof(err));
        if (d->q != NULL)
            return;
        why_set(d, idx, err);
        d->cur = (d->cur + 1) % d->n;
    }
    d->finding = 0;
    d->ops->failed(d->owner, d->why);
}

void
rg_disc_find(rg_disc *d)
{
    if (d->finding)
        return;
    d->finding = 1;
    d->tried = 0;
    try_next(d);
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
    d->loop = loop;
    d->cfgs = cfgs;
    d->n = n;
    d->name = name;
    d->name_len = strlen(name);
    d->ops = ops;
    d->owner = owner;
    return d;
}

void
rg_disc_free(rg_disc *d)
{
    rg_conn *q = d->q, *sub = d->sub;

    /* Forget them first: their close answers reply(NULL), which must not
     * find them (nor move on to another Sentinel). */
    d->q = d->sub = NULL;
    if (q != NULL)
        rg_conn_close(q);
    if (sub != NULL)
        rg_conn_close(sub);
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
        snprintf(role, rolelen, "%s", r->type == REDIS_REPLY_ERROR ? "an error" : "unexpected");
        return 0;
    }
    e = r->element[0];
    if (e->len == 6 && memcmp(e->str, "master", 6) == 0)
        return 1;
    snprintf(role, rolelen, "%.*s", (int)(e->len > 40 ? 40 : e->len), e->str);
    return 0;
}
