/*
 * engine.c: shard threads, the request queue, deadlines, completions.
 *
 * Threading contract (see engine.h): fields under "Loop thread only" are
 * touched by the shard's thread once it runs; before that (start) and after
 * it is joined (stop) by the Python thread, which the thread's creation and
 * pthread_join order with it.  Nothing here touches a PyObject.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* pthread_setname_np */
#endif
#include "engine.h"

#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <hiredis/async.h>

#include "port.h"
#include "redis.h"

/* ---- lists ------------------------------------------------------------ */

static void
list_init(rg_list *l)
{
    l->head.next = l->head.prev = &l->head;
}

static rg_check *
list_first(rg_list *l)
{
    return l->head.next == &l->head ? NULL : l->head.next;
}

static void
list_push(rg_list *l, rg_check *c)
{
    c->prev = l->head.prev;
    c->next = &l->head;
    l->head.prev->next = c;
    l->head.prev = c;
}

void
rg_list_remove(rg_check *c)
{
    c->prev->next = c->next;
    c->next->prev = c->prev;
    c->next = c->prev = NULL;
}

/* ---- completions --------------------------------------------------------- */

/*
 * Answer a check: it leaves the engine at the next flush.  A check that was
 * never written to Redis stops counting as outstanding now; one that was
 * (c->batch set) counts until its batch's reply or the connection's end,
 * because until then its bytes are still held by hiredis.
 */
void
rg_shard_complete(rg_shard *s, rg_check *c, int err)
{
    c->err = err;
    if (c->batch == NULL)
        atomic_fetch_sub_explicit(&s->eng->outstanding, 1, memory_order_relaxed);
    c->batch = NULL;
    c->next = NULL;
    if (s->done_tail != NULL)
        s->done_tail->next = c;
    else
        s->done_head = c;
    s->done_tail = c;
}

/* Push finished checks to their ports: one lock and at most one eventfd
 * write per run of checks bound for the same port. */
void
rg_shard_flush(rg_shard *s)
{
    rg_check *c = s->done_head;

    s->done_head = s->done_tail = NULL;
    while (c != NULL) {
        rg_check *first = c, *last = c;
        while (last->next != NULL && last->next->port == first->port)
            last = last->next;
        c = last->next;
        rg_port_push(first->port, first, last);
    }
}

/* ---- deadlines ----------------------------------------------------------- */

static void
deadline_cb(uv_timer_t *t)
{
    rg_shard *s = t->data;
    uint64_t now = rg_now_ns();
    rg_check *c;
    rg_batch *b;

    while ((c = list_first(&s->waiting)) != NULL && c->deadline_ns <= now) {
        rg_list_remove(c);
        rg_shard_complete(s, c, RG_ERR_TIMEOUT);
    }
    while ((c = list_first(&s->sent)) != NULL && c->deadline_ns <= now) {
        rg_list_remove(c);
        /* The reply may still come: the batch must not see this check. */
        c->batch->checks[c->bidx] = NULL;
        rg_shard_complete(s, c, RG_ERR_TIMEOUT);
    }
    rg_shard_flush(s);

    /* Replies are owed and none came for stall_ns: the connection is dead
     * or Redis is stuck; drop it rather than let checks pile up behind it. */
    b = s->bsentinel.next;
    if (b != &s->bsentinel && now - b->sent_ns >= s->eng->cfg.stall_ns) {
        rg_engine_set_error(s->eng, "no reply from Redis within the stall timeout", 44);
        rg_conn_drop(s, RG_ERR_UNAVAILABLE);
        rg_shard_flush(s);
    }
    rg_shard_arm(s);
}

/* Set the deadline timer for the earliest deadline or stall check. */
void
rg_shard_arm(rg_shard *s)
{
    uint64_t next = UINT64_MAX, now;
    rg_check *c;

    if (s->closing)
        return;
    if ((c = list_first(&s->waiting)) != NULL)
        next = c->deadline_ns;
    if ((c = list_first(&s->sent)) != NULL && c->deadline_ns < next)
        next = c->deadline_ns;
    if (s->bsentinel.next != &s->bsentinel) {
        uint64_t st = s->bsentinel.next->sent_ns + s->eng->cfg.stall_ns;
        if (st < next)
            next = st;
    }
    if (next == UINT64_MAX) {
        uv_timer_stop(&s->deadline_timer);
        return;
    }
    now = rg_now_ns();
    /* libuv timers count whole milliseconds: round up, never fire early. */
    uv_update_time(&s->loop);
    uv_timer_start(&s->deadline_timer, deadline_cb,
                   next <= now ? 0 : (next - now + 999999) / 1000000, 0);
}

/* ---- dispatch ------------------------------------------------------------ */

typedef struct dispatch {
    rg_check *b[RG_BATCH_MAX];
    int n;
} dispatch;

static void
dispatch_flush(rg_shard *s, dispatch *d)
{
    if (d->n > 0)
        rg_conn_send(s, d->b, d->n);
    d->n = 0;
}

/* Route one check by connection state: into a batch, to the waiting list,
 * or answered at once. */
static void
dispatch_one(rg_shard *s, dispatch *d, rg_check *c, uint64_t now)
{
    if (c->deadline_ns <= now) {
        /* Late already (the thread was starved): do not spend a token the
         * caller will never learn about. */
        rg_shard_complete(s, c, RG_ERR_TIMEOUT);
    } else if (s->state == RG_READY) {
        list_push(&s->sent, c);
        d->b[d->n++] = c;
        if (d->n == RG_BATCH_MAX)
            dispatch_flush(s, d);
    } else if (s->state == RG_CONNECTING && !atomic_load(&s->down)) {
        list_push(&s->waiting, c);
    } else {
        rg_shard_complete(s, c, RG_ERR_UNAVAILABLE);
    }
}

void
rg_shard_send_waiting(rg_shard *s)
{
    dispatch d;
    rg_check *c;
    uint64_t now = rg_now_ns();

    d.n = 0;
    while ((c = list_first(&s->waiting)) != NULL) {
        rg_list_remove(c);
        dispatch_one(s, &d, c, now);
    }
    dispatch_flush(s, &d);
}

void
rg_shard_fail_waiting(rg_shard *s, int err)
{
    rg_check *c;
    while ((c = list_first(&s->waiting)) != NULL) {
        rg_list_remove(c);
        rg_shard_complete(s, c, err);
    }
}

static void
close_noop(uv_handle_t *h)
{
    (void)h; /* the handles live inside the shard, freed after the join */
}

/* Stop: answer everything held with RG_ERR_CLOSED and close every handle;
 * uv_run then returns once their close callbacks have run. */
static void
shutdown_shard(rg_shard *s, rg_check *queued)
{
    s->closing = 1;
    while (queued != NULL) {
        rg_check *next = queued->next;
        rg_shard_complete(s, queued, RG_ERR_CLOSED);
        queued = next;
    }
    rg_shard_fail_waiting(s, RG_ERR_CLOSED);
    rg_conn_drop(s, RG_ERR_CLOSED); /* answers every sent check */
    rg_shard_flush(s);
    uv_close((uv_handle_t *)&s->wake, close_noop);
    uv_close((uv_handle_t *)&s->deadline_timer, close_noop);
    uv_close((uv_handle_t *)&s->conn_timer, close_noop);
}

static void
wake_cb(uv_async_t *a)
{
    rg_shard *s = a->data;
    rg_check *c;
    int stopping;
    dispatch d;
    uint64_t now;

    pthread_mutex_lock(&s->mu);
    c = s->qhead;
    s->qhead = s->qtail = NULL;
    stopping = s->stopping;
    pthread_mutex_unlock(&s->mu);

    if (s->closing)
        return;
    if (stopping) {
        shutdown_shard(s, c);
        return;
    }
    d.n = 0;
    now = rg_now_ns();
    while (c != NULL) {
        rg_check *next = c->next;
        dispatch_one(s, &d, c, now);
        c = next;
    }
    dispatch_flush(s, &d);
    rg_shard_flush(s);
    rg_shard_arm(s);
}

/* Checks queued (or a stop requested) that the thread has not taken yet. */
static int
queue_pending(rg_shard *s)
{
    int r;
    pthread_mutex_lock(&s->mu);
    r = s->qhead != NULL || s->stopping;
    pthread_mutex_unlock(&s->mu);
    return r;
}

/*
 * The thread.  Normally it sleeps in uv_run until an event.  With spin_ns,
 * while Redis owes replies (they are microseconds away) it polls instead:
 * uv_run without blocking, the queue, sched_yield, for at most spin_ns.
 * Meanwhile `spinning` tells the Python thread that a wake-up syscall is not
 * needed.  The hand-over is Dekker's: submit() pushes then reads `spinning`;
 * this thread clears `spinning` then re-reads the queue, each with a full
 * fence between, so at least one of the two sees the other and no check is
 * left in the queue unseen.
 */
static void *
shard_main(void *arg)
{
    rg_shard *s = arg;
    uint64_t spin = s->eng->cfg.spin_ns;
    char name[16]; /* the kernel keeps 15 bytes of a thread's name */

    /* Named so that top -H, profilers and the benchmark tell the loop
     * threads apart; a failure only loses the name. */
    snprintf(name, sizeof(name), "rategate-loop-%d", s->index);
    (void)pthread_setname_np(pthread_self(), name);

    for (;;) {
        if (spin != 0 && !s->closing && s->bsentinel.next != &s->bsentinel) {
            uint64_t until = rg_now_ns() + spin;
            atomic_store(&s->spinning, 1);
            while (!s->closing && rg_now_ns() < until) {
                int queued = queue_pending(s);
                if (queued)
                    wake_cb(&s->wake);
                if (uv_run(&s->loop, UV_RUN_NOWAIT) == 0)
                    break;
                /* Nothing owed: sleep.  Checks queued since `queued` was read
                 * are caught by the re-check after `spinning` is cleared. */
                if (!queued && s->bsentinel.next == &s->bsentinel)
                    break;
                sched_yield();
            }
            atomic_store(&s->spinning, 0);
            atomic_thread_fence(memory_order_seq_cst);
            if (queue_pending(s)) {
                wake_cb(&s->wake);
                continue;
            }
        }
        if (uv_run(&s->loop, UV_RUN_ONCE) == 0)
            break; /* every handle closed: stopped */
    }
    return NULL;
}

int
rg_shard_needs_wake(rg_shard *s)
{
    atomic_thread_fence(memory_order_seq_cst);
    return !atomic_load_explicit(&s->spinning, memory_order_relaxed);
}

/* ---- the Python thread's side -------------------------------------------- */

void
rg_engine_set_error(rg_engine *e, const char *msg, size_t len)
{
    if (len >= sizeof(e->last_error))
        len = sizeof(e->last_error) - 1;
    pthread_mutex_lock(&e->err_mu);
    memcpy(e->last_error, msg, len);
    e->last_error[len] = '\0';
    pthread_mutex_unlock(&e->err_mu);
}

static int
shard_init(rg_engine *e, rg_shard *s, int i, char *errbuf, size_t errlen)
{
    int r;

    memset(s, 0, sizeof(*s));
    s->eng = e;
    s->index = i;
    s->state = RG_DOWN;
    s->backoff_ms = 10;
    s->rand_state = (unsigned int)(rg_now_ns() ^ (uint64_t)(uintptr_t)s);
    list_init(&s->waiting);
    list_init(&s->sent);
    s->bsentinel.next = s->bsentinel.prev = &s->bsentinel;
    atomic_init(&s->down, 0);
    atomic_init(&s->connected, 0);
    atomic_init(&s->spinning, 0);
    if (pthread_mutex_init(&s->mu, NULL) != 0) {
        snprintf(errbuf, errlen, "pthread_mutex_init failed");
        return -1;
    }
    if ((r = uv_loop_init(&s->loop)) != 0) {
        snprintf(errbuf, errlen, "uv_loop_init: %s", uv_strerror(r));
        pthread_mutex_destroy(&s->mu);
        return -1;
    }
    /* These cannot fail on an initialised loop but for EMFILE on the async's
     * eventfd; on failure the loop is closed with what was opened. */
    if ((r = uv_async_init(&s->loop, &s->wake, wake_cb)) != 0) {
        snprintf(errbuf, errlen, "uv_async_init: %s", uv_strerror(r));
        uv_loop_close(&s->loop);
        pthread_mutex_destroy(&s->mu);
        return -1;
    }
    uv_timer_init(&s->loop, &s->deadline_timer);
    uv_timer_init(&s->loop, &s->conn_timer);
    s->wake.data = s;
    s->deadline_timer.data = s;
    s->conn_timer.data = s;
    /* The first connect runs on the loop thread as soon as it starts;
     * until it completes (or fails) checks wait for it, within deadline. */
    s->state = RG_CONNECTING;
    uv_timer_start(&s->conn_timer, rg_conn_timer_cb, 0, 0);
    return 0;
}

/* Close a shard whose thread never ran (start failed half-way). */
static void
shard_discard(rg_shard *s)
{
    uv_close((uv_handle_t *)&s->wake, close_noop);
    uv_close((uv_handle_t *)&s->deadline_timer, close_noop);
    uv_close((uv_handle_t *)&s->conn_timer, close_noop);
    uv_run(&s->loop, UV_RUN_DEFAULT);
    uv_loop_close(&s->loop);
    pthread_mutex_destroy(&s->mu);
}

int
rg_engine_start(rg_engine *e, char *errbuf, size_t errlen)
{
    int i, n = e->cfg.nshards;
    sigset_t all, old;

    e->shards = calloc((size_t)n, sizeof(rg_shard));
    if (e->shards == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        return -1;
    }
    for (i = 0; i < n; i++) {
        if (shard_init(e, &e->shards[i], i, errbuf, errlen) != 0) {
            while (--i >= 0)
                shard_discard(&e->shards[i]);
            free(e->shards);
            e->shards = NULL;
            return -1;
        }
    }
    /* Signals belong to Python's main thread: the loop threads block all. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    for (i = 0; i < n; i++) {
        rg_shard *s = &e->shards[i];
        int r = pthread_create(&s->thread, NULL, shard_main, s);
        if (r != 0) {
            snprintf(errbuf, errlen, "pthread_create: %s", strerror(r));
            break;
        }
        s->thread_started = 1;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (i < n) {
        rg_engine_stop(e); /* joins the started ones, discards the rest */
        return -1;
    }
    e->started = 1;
    return 0;
}

int
rg_engine_submit(rg_engine *e, rg_shard *s, rg_check *c)
{
    int was_empty;
    (void)e;

    c->next = NULL;
    pthread_mutex_lock(&s->mu);
    was_empty = s->qhead == NULL;
    if (s->qtail != NULL)
        s->qtail->next = c;
    else
        s->qhead = c;
    s->qtail = c;
    pthread_mutex_unlock(&s->mu);
    return was_empty;
}

void
rg_engine_wake(rg_shard *s)
{
    uv_async_send(&s->wake);
}

void
rg_engine_stop(rg_engine *e)
{
    int i;

    if (e->shards == NULL)
        return;
    for (i = 0; i < e->cfg.nshards; i++) {
        rg_shard *s = &e->shards[i];
        if (!s->thread_started)
            continue;
        pthread_mutex_lock(&s->mu);
        s->stopping = 1;
        pthread_mutex_unlock(&s->mu);
        uv_async_send(&s->wake);
    }
    for (i = 0; i < e->cfg.nshards; i++) {
        rg_shard *s = &e->shards[i];
        if (s->thread_started) {
            pthread_join(s->thread, NULL);
            /* uv_run returned: every handle is closed, the loop is idle. */
            uv_loop_close(&s->loop);
            pthread_mutex_destroy(&s->mu);
            free(s->argv);
            free(s->argvlen);
            free(s->kbuf);
        } else {
            shard_discard(s);
        }
    }
    free(e->shards);
    e->shards = NULL;
    e->started = 0;
}

void
rg_engine_abandon(rg_engine *e)
{
    e->shards = NULL; /* the parent's threads do not exist here */
    e->started = 0;
    atomic_store(&e->outstanding, 0);
}

void
rg_engine_free_cfg(rg_engine_cfg *cfg)
{
    free(cfg->host);
    free(cfg->path);
    free(cfg->password);
    free(cfg->username);
    cfg->host = cfg->path = cfg->password = cfg->username = NULL;
}
