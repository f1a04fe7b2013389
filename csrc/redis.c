/*
 * redis.c: the hiredis async connection of one shard (see redis.h).
 * Loop thread only.
 */
#include "redis.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>

#include "port.h"
#include "script.h"


/* ---- our libuv adapter ---------------------------------------------------- */

/*
 * Like hiredis's adapters/libuv.h, with two differences that matter:
 * - libuv reports POLLERR as a negative status and stops the watcher; the
 *   stock adapter returns there, so a refused connect is never reported and
 *   the connection hangs.  We let hiredis look at the socket instead: a
 *   write on a connecting socket reads SO_ERROR, a read returns the error.
 * - after hiredis has run the callbacks of everything it read, we flush the
 *   finished checks to their ports: one wake-up of asyncio per read.
 * The adapter's memory is freed only in the poll handle's close callback.
 */
typedef struct rg_uvev {
    redisAsyncContext *ac; /* NULL once hiredis has called cleanup */
    rg_shard *shard;
    uv_poll_t poll;
    int events;
} rg_uvev;

static void
ev_poll_cb(uv_poll_t *h, int status, int events)
{
    rg_uvev *p = h->data;
    rg_shard *s = p->shard;

    if (p->ac == NULL)
        return;
    if (status < 0) {
        if (!(p->ac->c.flags & REDIS_CONNECTED))
            redisAsyncHandleWrite(p->ac);
        else
            redisAsyncHandleRead(p->ac);
    } else {
        if (events & UV_READABLE)
            redisAsyncHandleRead(p->ac);
        /* The read may have freed the context: cleanup cleared p->ac. */
        if (p->ac != NULL && (events & UV_WRITABLE))
            redisAsyncHandleWrite(p->ac);
    }
    rg_shard_flush(s);
    rg_shard_arm(s);
}

static void
ev_update(rg_uvev *p)
{
    if (p->events)
        uv_poll_start(&p->poll, p->events, ev_poll_cb);
    else
        uv_poll_stop(&p->poll);
}

static void
ev_add_read(void *d)
{
    rg_uvev *p = d;
    p->events |= UV_READABLE;
    ev_update(p);
}

static void
ev_del_read(void *d)
{
    rg_uvev *p = d;
    p->events &= ~UV_READABLE;
    ev_update(p);
}

static void
ev_add_write(void *d)
{
    rg_uvev *p = d;
    p->events |= UV_WRITABLE;
    ev_update(p);
}

static void
ev_del_write(void *d)
{
    rg_uvev *p = d;
    p->events &= ~UV_WRITABLE;
    ev_update(p);
}

static void
ev_close_cb(uv_handle_t *h)
{
    free(h->data);
}

static void
ev_cleanup(void *d)
{
    rg_uvev *p = d;
    p->ac = NULL;
    uv_close((uv_handle_t *)&p->poll, ev_close_cb);
}

static int
rg_attach(redisAsyncContext *ac, rg_shard *s)
{
    rg_uvev *p = calloc(1, sizeof(*p));
    if (p == NULL)
        return -1;
    if (uv_poll_init(&s->loop, &p->poll, ac->c.fd) != 0) {
        free(p); /* never initialised: no close callback will come */
        return -1;
    }
    p->ac = ac;
    p->shard = s;
    p->poll.data = p;
    ac->ev.data = p;
    ac->ev.addRead = ev_add_read;
    ac->ev.delRead = ev_del_read;
    ac->ev.addWrite = ev_add_write;
    ac->ev.delWrite = ev_del_write;
    ac->ev.cleanup = ev_cleanup;
    return 0;
}

/* ---- connection state ------------------------------------------------------ */

static void
set_error(rg_shard *s, const char *what, const char *detail)
{
    char buf[256];
    int n = snprintf(buf, sizeof(buf), "%s%s%s", what, detail ? ": " : "", detail ? detail : "");
    if (n < 0)
        return;
    rg_engine_set_error(s->eng, buf, (size_t)n < sizeof(buf) ? (size_t)n : sizeof(buf) - 1);
}

/* The connection is gone (its context already freed or being freed): fail
 * what waits for it, and try again after a backoff. */
static void
conn_lost(rg_shard *s)
{
    uint64_t ms;

    s->state = RG_DOWN;
    atomic_store(&s->connected, 0);
    if (s->closing)
        return;
    atomic_store(&s->down, 1);
    rg_shard_fail_waiting(s, RG_ERR_UNAVAILABLE);
    /* Jitter (75% to 125%) keeps many app servers from reconnecting in step. */
    ms = s->backoff_ms * (75 + (uint64_t)(rand_r(&s->rand_state) % 51)) / 100;
    uv_timer_start(&s->conn_timer, rg_conn_timer_cb, ms, 0);
    s->backoff_ms = s->backoff_ms * 2 > 500 ? 500 : s->backoff_ms * 2;
}

static void
conn_ready(rg_shard *s)
{
    s->state = RG_READY;
    if (s->ever_ready)
        atomic_fetch_add(&s->eng->reconnects, 1);
    s->ever_ready = 1;
    s->backoff_ms = 10;
    uv_timer_stop(&s->conn_timer);
    atomic_store(&s->connected, 1);
    atomic_store(&s->down, 0);
    rg_shard_send_waiting(s);
}

static void
on_connect(const redisAsyncContext *ac, int status)
{
    rg_shard *s = ac->data;
    if (status == REDIS_OK || ac != s->ac)
        return;
    /* hiredis frees the context when we return. */
    set_error(s, "connect failed", ac->errstr);
    s->ac = NULL;
    conn_lost(s);
}

static void
on_disconnect(const redisAsyncContext *ac, int status)
{
    rg_shard *s = ac->data;
    (void)status;
    if (ac != s->ac)
        return; /* rg_conn_drop() took it: already handled */
    if (ac->err)
        set_error(s, "disconnected", ac->errstr);
    s->ac = NULL;
    conn_lost(s);
}

/* Replies to AUTH, SELECT and SCRIPT LOAD; privdata is non-NULL for the
 * last, whose success makes the connection ready. */
static void
on_handshake(redisAsyncContext *ac, void *r, void *last)
{
    rg_shard *s = ac->data;
    redisReply *reply = r;

    if (reply == NULL || ac != s->ac || s->state != RG_CONNECTING)
        return;
    if (reply->type == REDIS_REPLY_ERROR) {
        set_error(s, "Redis refused the connection set-up", reply->str);
        redisAsyncDisconnect(ac); /* safe in a callback: runs after it */
        s->state = RG_DOWN;
        return;
    }
    if (last != NULL) {
        if (reply->type != REDIS_REPLY_STRING || reply->len != 40) {
            set_error(s, "unexpected reply to SCRIPT LOAD", NULL);
            redisAsyncDisconnect(ac);
            s->state = RG_DOWN;
            return;
        }
        memcpy(s->sha, reply->str, 40);
        s->sha[40] = '\0';
        conn_ready(s);
    }
}

void
rg_conn_start(rg_shard *s)
{
    const rg_engine_cfg *cfg = &s->eng->cfg;
    redisAsyncContext *ac;

    if (s->closing)
        return;
    ac = cfg->path ? redisAsyncConnectUnix(cfg->path) : redisAsyncConnect(cfg->host, cfg->port);
    if (ac == NULL) {
        set_error(s, "connect failed", "out of memory");
        conn_lost(s);
        return;
    }
    if (ac->err) {
        set_error(s, "connect failed", ac->errstr);
        redisAsyncFree(ac);
        conn_lost(s);
        return;
    }
    ac->data = s;
    if (rg_attach(ac, s) != 0) {
        set_error(s, "connect failed", "cannot watch the socket");
        redisAsyncFree(ac);
        conn_lost(s);
        return;
    }
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    s->ac = ac;
    s->state = RG_CONNECTING;

    /* Pipelined behind the connect; Redis answers them in order. */
    if (cfg->password != NULL) {
        const char *argv[3];
        size_t lens[3];
        int argc = 0;
        argv[argc] = "AUTH";
        lens[argc++] = 4;
        if (cfg->username != NULL) {
            argv[argc] = cfg->username;
            lens[argc++] = cfg->username_len;
        }
        argv[argc] = cfg->password;
        lens[argc++] = cfg->password_len;
        redisAsyncCommandArgv(ac, on_handshake, NULL, argc, argv, lens);
    }
    if (cfg->db != 0)
        redisAsyncCommand(ac, on_handshake, NULL, "SELECT %d", cfg->db);
    redisAsyncCommand(ac, on_handshake, (void *)1, "SCRIPT LOAD %s", rg_script);
    uv_timer_start(&s->conn_timer, rg_conn_timer_cb,
                   (cfg->connect_timeout_ns + 999999) / 1000000, 0);
}

void
rg_conn_timer_cb(uv_timer_t *t)
{
    rg_shard *s = t->data;
    if (s->ac == NULL) {
        rg_conn_start(s); /* first connect, or the backoff has passed */
    } else if (s->state != RG_READY) {
        set_error(s, "connect timeout", NULL);
        rg_conn_drop(s, RG_ERR_UNAVAILABLE);
    }
    rg_shard_flush(s);
    rg_shard_arm(s);
}

void
rg_conn_drop(rg_shard *s, int err)
{
    redisAsyncContext *ac = s->ac;
    if (ac == NULL)
        return;
    /* Take it first: the callbacks run by redisAsyncFree see s->ac == NULL
     * and leave the state to us. */
    s->ac = NULL;
    (void)err; /* the batches tell closing (s->closing) from lost */
    redisAsyncFree(ac);
    conn_lost(s);
}

/* ---- batches --------------------------------------------------------------- */

static void
batch_retire(rg_shard *s, rg_batch *b, int total)
{
    b->prev->next = b->next;
    b->next->prev = b->prev;
    atomic_fetch_sub_explicit(&s->eng->outstanding, total, memory_order_relaxed);
    free(b);
}

static void
batch_fail(rg_shard *s, rg_batch *b, int err)
{
    int i;
    for (i = 0; i < b->n; i++) {
        rg_check *c = b->checks[i];
        if (c == NULL)
            continue;
        b->checks[i] = NULL;
        rg_list_remove(c);
        rg_shard_complete(s, c, err);
    }
}

static int batch_write(rg_shard *s, rg_batch *b);

static int64_t
int_at(redisReply *r, size_t i, int *ok)
{
    redisReply *e = r->element[i];
    if (e->type != REDIS_REPLY_INTEGER) {
        *ok = 0;
        return 0;
    }
    return e->integer;
}

/*
 * The reply to one script call.  reply == NULL: the context is being freed
 * (dropped, lost, or the engine closing); every check still live fails.
 * The batch's `total` (how many it counted in `outstanding`) rides in the
 * last slot of the allocation, see rg_conn_send.
 */
static void
on_batch_reply(redisAsyncContext *ac, void *r, void *priv)
{
    rg_batch *b = priv;
    rg_shard *s = b->shard;
    redisReply *reply = r;
    int total = (int)(intptr_t)b->checks[b->n];
    int i;
    (void)ac;

    if (reply == NULL) {
        batch_fail(s, b, s->closing ? RG_ERR_CLOSED : RG_ERR_UNAVAILABLE);
        batch_retire(s, b, total);
        return;
    }
    if (reply->type == REDIS_REPLY_ERROR) {
        if (!b->evaled && strncmp(reply->str, "NOSCRIPT", 8) == 0) {
            /* SCRIPT FLUSH or a failover to a replica without the script:
             * send the body once; EVAL caches it for the next EVALSHA. */
            b->evaled = 1;
            if (batch_write(s, b) == 0)
                return;
        }
        set_error(s, "script error", reply->str);
        batch_fail(s, b, RG_ERR_REDIS);
        batch_retire(s, b, total);
        return;
    }
    if (reply->type != REDIS_REPLY_ARRAY || reply->elements != (size_t)b->n * 6) {
        set_error(s, "unexpected reply to the script", NULL);
        batch_fail(s, b, RG_ERR_REDIS);
        batch_retire(s, b, total);
        return;
    }
    for (i = 0; i < b->n; i++) {
        rg_check *c = b->checks[i];
        size_t o = (size_t)i * 6;
        int ok = 1;
        if (c == NULL)
            continue; /* answered by its deadline: the late reply is ignored */
        c->res.allowed = (int)int_at(reply, o, &ok);
        c->res.rate = (int)int_at(reply, o + 1, &ok);
        c->res.remaining = int_at(reply, o + 2, &ok);
        c->res.reset_us = int_at(reply, o + 3, &ok);
        c->res.retry_us = int_at(reply, o + 4, &ok);
        c->res.block_us = int_at(reply, o + 5, &ok);
        if (c->res.rate < 0 || c->res.rate >= c->spec->n || c->res.allowed < 0 ||
            c->res.allowed > 1)
            ok = 0;
        if (c->res.allowed < 0)
            set_error(s, "Redis refused a command of the script (a key of the wrong type?)", NULL);
        b->checks[i] = NULL;
        rg_list_remove(c);
        rg_shard_complete(s, c, ok ? RG_ERR_NONE : RG_ERR_REDIS);
    }
    batch_retire(s, b, total);
}

static int
grow(rg_shard *s, size_t argc, size_t bytes)
{
    if (argc > s->argcap) {
        size_t cap = argc * 2;
        const char **a = realloc(s->argv, cap * sizeof(*a));
        if (a == NULL)
            return -1;
        s->argv = a;
        size_t *l = realloc(s->argvlen, cap * sizeof(*l));
        if (l == NULL)
            return -1;
        s->argvlen = l;
        s->argcap = cap;
    }
    if (bytes > s->kbufcap) {
        char *k = realloc(s->kbuf, bytes * 2);
        if (k == NULL)
            return -1;
        s->kbuf = k;
        s->kbufcap = bytes * 2;
    }
    return 0;
}

/* Write (or rewrite, after NOSCRIPT) the script call for the live checks of
 * b, compacting out those already answered by their deadline. */
static int
batch_write(rg_shard *s, rg_batch *b)
{
    size_t argc = 4, bytes = 64, nkeys = 0;
    int i, j, n = 0;
    char *p;

    if (s->ac == NULL)
        return -1;
    for (i = 0; i < b->n; i++) {
        rg_check *c = b->checks[i];
        if (c == NULL)
            continue;
        b->checks[n] = c;
        c->bidx = (uint32_t)n++;
        nkeys += (size_t)c->spec->n;
        argc += 2 + 3 * (size_t)c->spec->n;
        bytes += 48 + (size_t)c->spec->n * (8 + c->keylen + 48);
    }
    /* keep the total for batch_retire in the slot after the live ones */
    b->checks[n] = b->checks[b->n];
    b->n = n;
    if (n == 0)
        return -1;
    if (grow(s, argc, bytes) != 0)
        return -1;

    p = s->kbuf;
    argc = 0;
    if (b->evaled) {
        s->argv[argc] = "EVAL";
        s->argvlen[argc++] = 4;
        s->argv[argc] = rg_script;
        s->argvlen[argc++] = rg_script_len;
    } else {
        s->argv[argc] = "EVALSHA";
        s->argvlen[argc++] = 7;
        s->argv[argc] = s->sha;
        s->argvlen[argc++] = 40;
    }
    s->argv[argc] = p;
    s->argvlen[argc++] = (size_t)sprintf(p, "%zu", nkeys);
    p += s->argvlen[argc - 1] + 1;
    for (i = 0; i < n; i++) {
        rg_check *c = b->checks[i];
        for (j = 0; j < c->spec->n; j++) {
            /* rg:{<key>}:<rate>: one hash tag for all keys of a check, so a
             * check never spans two Redis Cluster slots.  Binary-safe: the
             * key travels as an argv element, never through a format. */
            char *k = p;
            memcpy(p, "rg:{", 4);
            p += 4;
            memcpy(p, c->key, c->keylen);
            p += c->keylen;
            *p++ = '}';
            *p++ = ':';
            memcpy(p, c->spec->key_id[j], c->spec->key_id_len[j]);
            p += c->spec->key_id_len[j];
            s->argv[argc] = k;
            s->argvlen[argc++] = (size_t)(p - k);
        }
    }
    s->argv[argc] = p;
    s->argvlen[argc++] = (size_t)sprintf(p, "%d", n);
    p += s->argvlen[argc - 1] + 1;
    for (i = 0; i < n; i++) {
        rg_check *c = b->checks[i];
        s->argv[argc] = p;
        s->argvlen[argc++] = (size_t)sprintf(p, "%lld", (long long)c->cost);
        p += s->argvlen[argc - 1] + 1;
        s->argv[argc] = p;
        s->argvlen[argc++] = (size_t)sprintf(p, "%d", c->spec->n);
        p += s->argvlen[argc - 1] + 1;
        for (j = 0; j < c->spec->n; j++) {
            s->argv[argc] = c->spec->arg_T[j];
            s->argvlen[argc++] = c->spec->arg_T_len[j];
            s->argv[argc] = c->spec->arg_tau[j];
            s->argvlen[argc++] = c->spec->arg_tau_len[j];
        }
    }
    if (redisAsyncCommandArgv(s->ac, on_batch_reply, b, (int)argc, s->argv, s->argvlen) != REDIS_OK)
        return -1;
    b->sent_ns = rg_now_ns();
    return 0;
}

void
rg_conn_send(rg_shard *s, rg_check **checks, int n)
{
    /* n + 1 slots: the last carries the count for `outstanding`. */
    rg_batch *b = malloc(sizeof(*b) + (size_t)(n + 1) * sizeof(rg_check *));
    int i;

    if (b == NULL) {
        for (i = 0; i < n; i++) {
            rg_list_remove(checks[i]);
            checks[i]->batch = NULL; /* never sent: counts down on completion */
            rg_shard_complete(s, checks[i], RG_ERR_OVERLOADED);
        }
        return;
    }
    b->shard = s;
    b->n = n;
    b->evaled = 0;
    b->sent_ns = rg_now_ns();
    for (i = 0; i < n; i++) {
        b->checks[i] = checks[i];
        checks[i]->batch = b;
        checks[i]->bidx = (uint32_t)i;
    }
    b->checks[n] = (rg_check *)(intptr_t)n;
    b->prev = s->bsentinel.prev;
    b->next = &s->bsentinel;
    s->bsentinel.prev->next = b;
    s->bsentinel.prev = b;
    if (batch_write(s, b) != 0) {
        batch_fail(s, b, RG_ERR_UNAVAILABLE);
        batch_retire(s, b, n);
    }
}
