/*
 * engine.c: shard threads, the request queue, deadlines, completions.
 *
 * Threading contract (see engine.h): fields under "Loop thread only" are
 * touched by the shard's thread once it runs; before that (start) and after
 * it is joined (stop) by the Python thread, which the thread's creation and
 * pthread_join order with it.  Nothing here touches a PyObject.
 */
#define _GNU_SOURCE /* pthread_setname_np */
#include "engine.h"

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "port.h"
#include "script.h"

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

/* Insert in deadline order.  Checks mostly arrive in that order (one
 * timeout for all), so the walk from the tail is one step; but a check's
 * deadline is taken on the Python thread before calls that may switch
 * threads, and a resent check rejoins with an older one, so it is not
 * assumed: deadline_cb stops at the first check not yet due. */
static void
list_insert(rg_list *l, rg_check *c)
{
    rg_check *at = l->head.prev;
    while (at != &l->head && at->deadline_ns > c->deadline_ns)
        at = at->prev;
    c->prev = at;
    c->next = at->next;
    at->next->prev = c;
    at->next = c;
}

static void
list_remove(rg_check *c)
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
 * because until then its bytes are still held for the connection.
 */
static void
complete(rg_shard *s, rg_check *c, int err)
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
static void
flush(rg_shard *s)
{
    rg_check *c = s->done_head;

    s->done_head = s->done_tail = NULL;
    while (c != NULL) {
        rg_check *first = c, *last = c;
        while (last->next != NULL && last->next->port == first->port)
            last = last->next;
        c = last->next;
        if (rg_port_push(first->port, first, last))
            atomic_fetch_add_explicit(&s->eng->wakeups_port, 1, memory_order_relaxed);
    }
}

static void
fail_list(rg_shard *s, rg_list *l, int err)
{
    rg_check *c;
    while ((c = list_first(l)) != NULL) {
        list_remove(c);
        complete(s, c, err);
    }
}

static void
set_error(rg_shard *s, const char *what, const char *detail)
{
    char buf[sizeof(s->eng->last_error)];
    int n = snprintf(buf, sizeof(buf), "%s%s%s", what, detail ? ": " : "", detail ? detail : "");
    if (n < 0)
        return;
    rg_engine_set_error(s->eng, buf, (size_t)n < sizeof(buf) ? (size_t)n : sizeof(buf) - 1);
}

/* ---- batches on a destination ------------------------------------------------ */

static void
batch_link(rg_dest *d, rg_batch *b)
{
    b->prev = d->bsentinel.prev;
    b->next = &d->bsentinel;
    d->bsentinel.prev->next = b;
    d->bsentinel.prev = b;
}

static void
batch_unlink(rg_batch *b)
{
    b->prev->next = b->next;
    b->next->prev = b->prev;
    b->prev = b->next = NULL;
}

/* The batch is done with: it stops counting its checks. */
static void
batch_retire(rg_shard *s, rg_batch *b)
{
    if (b->prev != NULL)
        batch_unlink(b);
    atomic_fetch_sub_explicit(&s->eng->outstanding, b->total, memory_order_relaxed);
    free(b);
}

/* Take a live check out of its batch (it answers, or moves elsewhere): from
 * now on it counts in `outstanding` by itself. */
static void
batch_detach(rg_check *c)
{
    rg_batch *b = c->batch;
    b->checks[c->bidx] = NULL;
    b->total--;
    c->batch = NULL;
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
        list_remove(c);
        complete(s, c, err); /* still counted by the batch: c->batch is set */
    }
}

/* Write b's script call on d's connection (ready).  On failure (no live
 * check, no connection, out of memory) the batch's checks fail and it is
 * retired. */
static void
batch_send(rg_shard *s, rg_dest *d, rg_batch *b)
{
    rg_buf out = {0};
    int r = d->conn != NULL ? rg_batch_write(b, d->sha, &out) : 1;

    if (r == 0) {
        b->sent_ns = rg_now_ns();
        batch_link(d, b);
        if (rg_conn_send(d->conn, &out, b) == 0)
            return;
        batch_unlink(b);
    }
    rg_buf_free(&out);
    if (r < 0)
        set_error(s, "out of memory writing a script call", NULL);
    batch_fail(s, b, r < 0 ? RG_ERR_OVERLOADED : RG_ERR_UNAVAILABLE);
    batch_retire(s, b);
}

/* ---- the destination's connection ----------------------------------------------- */

static void dest_connect(rg_dest *d);

/* A ready connection that lived this long counts as healthy when it drops. */
#define RG_HEALTHY_NS 1000000000ull

static void
retry_cb(uv_timer_t *t)
{
    rg_dest *d = t->data;
    dest_connect(d);
    flush(d->shard);
}

/* A connect attempt failed (or the connection is given up as stuck): Redis
 * is really unreachable.  Answer at once until a connect succeeds; what
 * waits fails now; try again after a backoff. */
static void
dest_down(rg_dest *d)
{
    rg_shard *s = d->shard;
    uint64_t ms;

    d->state = RG_DOWN;
    d->again = 0;
    atomic_store(&s->connected, 0);
    if (s->closing)
        return;
    atomic_store(&s->down, 1);
    fail_list(s, &s->waiting, RG_ERR_UNAVAILABLE);
    /* Jitter (75% to 125%) keeps many app servers from reconnecting in step. */
    ms = d->backoff_ms * (75 + (uint64_t)(rand_r(&s->rand_state) % 51)) / 100;
    uv_timer_start(&d->retry_timer, retry_cb, ms, 0);
    d->backoff_ms = d->backoff_ms * 2 > 500 ? 500 : d->backoff_ms * 2;
}

static void send_waiting(rg_shard *s);

static void
on_ready(void *owner, rg_conn *c, const char *sha)
{
    rg_dest *d = owner;
    rg_shard *s = d->shard;
    (void)c;

    memcpy(d->sha, sha, sizeof(d->sha));
    d->state = RG_READY;
    d->again = 0;
    d->answered = 0;
    d->ready_ns = rg_now_ns();
    if (d->ever_ready)
        atomic_fetch_add(&s->eng->reconnects, 1);
    d->ever_ready = 1;
    d->backoff_ms = 10;
    atomic_store(&s->connected, 1);
    atomic_store(&s->down, 0);
    send_waiting(s);
}

static void
on_lost(void *owner, rg_conn *c, int was_ready, const char *why)
{
    rg_dest *d = owner;
    rg_shard *s = d->shard;
    (void)c;

    d->conn = NULL;
    set_error(s, why, NULL);
    if (s->closing) {
        d->state = RG_DOWN;
        return;
    }
    if (was_ready && (d->answered || rg_now_ns() - d->ready_ns >= RG_HEALTHY_NS)) {
        /* Healthy until now (an idle timeout, CLIENT KILL, a proxy's reset):
         * connect again at once, no backoff, not `down`.  Checks keep
         * waiting for it within their deadlines.  A connection dropped
         * before it answered anything or lived a second (a proxy that
         * closes each one) counts as a failed attempt: no tight loop. */
        d->state = RG_CONNECTING;
        d->again = 1;
        atomic_store(&s->connected, 0);
        dest_connect(d);
        return;
    }
    dest_down(d);
}

/* A check of a call lost with its connection: send it again on the next
 * connection if it can still make its deadline.  Redis may have run the
 * lost call (only its reply was lost), so a resent hit may consume its
 * tokens twice; it never admits more than the limit (the second run sees
 * the first's consumption).  At most once, so a connection that keeps
 * dropping cannot hold a check. */
static int
requeue(rg_shard *s, rg_check *c)
{
    if (s->dest.state != RG_CONNECTING || c->resent || c->deadline_ns <= rg_now_ns())
        return 0;
    c->resent = 1;
    batch_detach(c);
    list_remove(c); /* from sent */
    list_insert(&s->waiting, c);
    return 1;
}

/* ---- whether polling pays -------------------------------------------------- */

/* Fixed point for the EWMAs of rg_spin_state: RG_SPIN_ONE is 1. */
#define RG_SPIN_ONE 1024u
/* Poll only while at least this share of recent polls caught a submit. */
#define RG_SPIN_MIN_HITS (RG_SPIN_ONE / 4)
/* With a low hit rate, still poll once in this many chances: the rate is
 * only learnt by polling, and traffic changes. */
#define RG_SPIN_PROBE 16u
/* How often the running-thread count is sampled: the read is three syscalls
 * (open, read, close; a few us), so at most 100 a second per shard. */
#define RG_SPIN_SAMPLE_NS 10000000ull

/* A script call was answered `lat_ns` after it was written (EWMA, 1/8). */
static void
spin_reply(rg_shard *s, uint64_t lat_ns)
{
    int64_t d = (int64_t)lat_ns - (int64_t)s->spin.reply_ns;
    s->spin.reply_ns = (uint64_t)((int64_t)s->spin.reply_ns + d / 8);
}

/* A poll ended; `hit`: it took a check submitted while it ran (the submit
 * skipped its wake-up syscall, and the check went out without a sleep). */
static void
spin_done(rg_shard *s, int hit)
{
    s->spin.hits = s->spin.hits - s->spin.hits / 8 + (hit ? RG_SPIN_ONE / 8 : 0);
    atomic_fetch_add_explicit(&s->eng->spins, 1, memory_order_relaxed);
    if (hit)
        atomic_fetch_add_explicit(&s->eng->spin_hits, 1, memory_order_relaxed);
}

/* Runnable threads on the whole machine, ourselves included: the 4th field
 * of /proc/loadavg ("0.52 0.58 0.59 3/1234 5678" -> 3), the kernel's
 * instantaneous count (nr_running).  -1 if it cannot be read. */
static int
running_threads(const char *path)
{
    char buf[128], *p = buf;
    ssize_t n;
    int fd = open(path, O_RDONLY | O_CLOEXEC), i;

    if (fd < 0)
        return -1;
    n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = '\0';
    for (i = 0; i < 3; i++) {
        p = strchr(p, ' ');
        if (p == NULL)
            return -1;
        p++;
    }
    return (int)strtol(p, NULL, 10);
}

/*
 * Whether a core is idle, so that polling takes CPU from nobody.  From
 * /proc/loadavg's running count, sampled at most every RG_SPIN_SAMPLE_NS
 * and smoothed (EWMA, 1/4: an instantaneous count flickers).  Chosen over
 * the alternatives because it is cheap and says exactly this: getrusage's
 * involuntary switches only tell after the poll has taken a core from
 * someone, and our own process's threads miss the other processes (the
 * other workers, Redis) that share the cores.  The count is the machine's:
 * in a container limited by a CPU quota it may call a core idle that the
 * quota does not give us (then polling costs what it did before this).
 * Unreadable (no /proc): counted as idle, the behaviour before.
 */
static int
core_idle(rg_shard *s, uint64_t now)
{
    if (now - s->spin.sampled_ns >= RG_SPIN_SAMPLE_NS) {
        int running = running_threads(s->eng->loadavg);
        unsigned busy = running > s->eng->ncpu ? RG_SPIN_ONE : 0;
        /* The first sample stands alone; an unreadable one changes nothing. */
        if (running >= 0)
            s->spin.busy = s->spin.sampled_ns == 0 ? busy : s->spin.busy - s->spin.busy / 4 + busy / 4;
        s->spin.sampled_ns = now;
    }
    return s->spin.busy < RG_SPIN_ONE / 2;
}

/*
 * Whether to poll now (replies are owed; `spin` is the window, the user's
 * upper bound).  Polling saves the submitter's wake-up syscall and our
 * wake from epoll, but burns a core meanwhile, so only while it pays:
 * - a core is idle (never take CPU from a thread that has work);
 * - replies come within the window (else the poll ends before the reply
 *   it waits for, and the thread sleeps anyway);
 * - recent polls caught submits (else it only waits for replies, which
 *   epoll would deliver at the cost of one wake-up), probing now and then.
 * RATEGATE_SPIN_ADAPTIVE=0 polls whenever replies are owed, as before
 * (for A/B measurements).
 */
static int
spin_pays(rg_shard *s, uint64_t spin)
{
    if (s->eng->spin_fixed)
        return 1;
    if (!core_idle(s, rg_now_ns()) || s->spin.reply_ns > spin)
        return 0;
    if (s->spin.hits >= RG_SPIN_MIN_HITS) {
        s->spin.skipped = 0;
        return 1;
    }
    return ++s->spin.skipped % RG_SPIN_PROBE == 0;
}

static void
on_reply(void *owner, rg_conn *c, void *priv, struct redisReply *r)
{
    rg_dest *d = owner;
    rg_shard *s = d->shard;
    rg_batch *b = priv;
    char why[sizeof(s->eng->last_error)];
    int i;
    (void)c;

    if (r == NULL) {
        for (i = 0; i < b->n; i++)
            if (b->checks[i] != NULL && !s->closing)
                requeue(s, b->checks[i]);
        batch_fail(s, b, s->closing ? RG_ERR_CLOSED : RG_ERR_UNAVAILABLE);
        batch_retire(s, b);
        return;
    }
    d->answered = 1;
    spin_reply(s, rg_now_ns() - b->sent_ns);
    switch (rg_batch_decode(b, r, why, sizeof(why))) {
    case RG_BATCH_NOSCRIPT:
        /* SCRIPT FLUSH, or a failover to a replica without the script:
         * send the body once; EVAL caches it for the next EVALSHA. */
        b->evaled = 1;
        batch_unlink(b);
        batch_send(s, d, b);
        return;
    case RG_BATCH_FAILED:
        set_error(s, "script error", why);
        batch_fail(s, b, RG_ERR_REDIS);
        break;
    default:
        if (why[0] != '\0')
            set_error(s, "Redis refused a command of the script", why);
        for (i = 0; i < b->n; i++) {
            rg_check *ck = b->checks[i];
            if (ck == NULL)
                continue; /* answered by its deadline: the late reply is ignored */
            b->checks[i] = NULL;
            list_remove(ck);
            complete(s, ck, ck->err);
        }
        break;
    }
    batch_retire(s, b);
}

static void rearm(rg_shard *s);

static void
on_settle(void *owner)
{
    rg_dest *d = owner;
    flush(d->shard);
    rearm(d->shard);
}

static const rg_conn_ops dest_ops = {on_ready, on_reply, on_lost, on_settle};

static void
dest_connect(rg_dest *d)
{
    rg_shard *s = d->shard;
    char err[200];

    if (s->closing || d->conn != NULL)
        return;
    if (d->state != RG_CONNECTING)
        d->state = RG_CONNECTING;
    d->conn = rg_conn_open(&s->loop, &s->eng->conn, &dest_ops, d, err, sizeof(err));
    if (d->conn == NULL) {
        set_error(s, "connect failed", err);
        dest_down(d);
    }
}

/* Give up the connection as stuck: its calls fail, and it counts as a
 * failed attempt (Redis answers nothing: no point in waiting for it). */
static void
dest_drop(rg_dest *d, const char *why)
{
    rg_conn *c = d->conn;
    rg_shard *s = d->shard;

    set_error(s, why, NULL);
    d->conn = NULL;
    d->state = RG_DOWN; /* no requeue of what the close answers */
    if (c != NULL)
        rg_conn_close(c);
    dest_down(d);
}

/* ---- deadlines ----------------------------------------------------------- */

static const char stall_msg[] = "no reply from Redis within the stall timeout";

static void
deadline_cb(uv_timer_t *t)
{
    rg_shard *s = t->data;
    uint64_t now = rg_now_ns();
    rg_check *c;
    rg_batch *b;

    while ((c = list_first(&s->waiting)) != NULL && c->deadline_ns <= now) {
        list_remove(c);
        complete(s, c, RG_ERR_TIMEOUT);
    }
    while ((c = list_first(&s->sent)) != NULL && c->deadline_ns <= now) {
        list_remove(c);
        /* The reply may still come: the batch must not see this check. */
        c->batch->checks[c->bidx] = NULL;
        complete(s, c, RG_ERR_TIMEOUT);
    }

    /* Replies are owed and none came for stall_ns: the connection is dead
     * or Redis is stuck; drop it rather than let checks pile up behind it. */
    b = s->dest.bsentinel.next;
    if (b != &s->dest.bsentinel && now - b->sent_ns >= s->eng->cfg.stall_ns)
        dest_drop(&s->dest, stall_msg);
    flush(s);
    rearm(s);
}

/* Set the deadline timer for the earliest deadline or stall check. */
static void
rearm(rg_shard *s)
{
    uint64_t next = UINT64_MAX, now;
    rg_check *c;

    if (s->closing)
        return;
    if ((c = list_first(&s->waiting)) != NULL)
        next = c->deadline_ns;
    if ((c = list_first(&s->sent)) != NULL && c->deadline_ns < next)
        next = c->deadline_ns;
    if (s->dest.bsentinel.next != &s->dest.bsentinel) {
        uint64_t st = s->dest.bsentinel.next->sent_ns + s->eng->cfg.stall_ns;
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
    rg_batch *b;
    int i;

    if (d->n == 0)
        return;
    b = rg_batch_new(d->b, d->n);
    if (b == NULL) {
        for (i = 0; i < d->n; i++) {
            list_remove(d->b[i]);
            complete(s, d->b[i], RG_ERR_OVERLOADED); /* never sent: batch is NULL */
        }
    } else {
        batch_send(s, &s->dest, b);
    }
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
        complete(s, c, RG_ERR_TIMEOUT);
    } else if (s->dest.state == RG_READY) {
        list_insert(&s->sent, c);
        d->b[d->n++] = c;
        if (d->n == RG_BATCH_MAX)
            dispatch_flush(s, d);
    } else if (s->dest.state == RG_CONNECTING && !atomic_load(&s->down)) {
        list_insert(&s->waiting, c);
    } else {
        complete(s, c, RG_ERR_UNAVAILABLE);
    }
}

static void
send_waiting(rg_shard *s)
{
    dispatch d;
    rg_check *c;
    uint64_t now = rg_now_ns();

    d.n = 0;
    while ((c = list_first(&s->waiting)) != NULL) {
        list_remove(c);
        dispatch_one(s, &d, c, now);
    }
    dispatch_flush(s, &d);
}

static void
close_noop(uv_handle_t *h)
{
    (void)h; /* the handles live inside the shard, freed after the join */
}

/* Stop: answer everything held with RG_ERR_CLOSED and close every handle;
 * uv_run then returns once their close callbacks have run (and any
 * resolution still running on the thread pool has returned). */
static void
shutdown_shard(rg_shard *s, rg_check *queued)
{
    rg_conn *c = s->dest.conn;

    s->closing = 1;
    while (queued != NULL) {
        rg_check *next = queued->next;
        complete(s, queued, RG_ERR_CLOSED);
        queued = next;
    }
    fail_list(s, &s->waiting, RG_ERR_CLOSED);
    s->dest.conn = NULL;
    if (c != NULL)
        rg_conn_close(c); /* answers every sent check */
    flush(s);
    uv_close((uv_handle_t *)&s->wake, close_noop);
    uv_close((uv_handle_t *)&s->deadline_timer, close_noop);
    uv_close((uv_handle_t *)&s->dest.retry_timer, close_noop);
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
    flush(s);
    rearm(s);
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
 * while Redis owes replies (they are microseconds away) and polling pays
 * (spin_pays) it polls instead: uv_run without blocking, the queue,
 * sched_yield, for at most spin_ns.  Meanwhile `spinning` tells the Python thread that a wake-up syscall is not
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
    char name[16];

    /* Named for ps/top/py-spy (15 characters at most). */
    snprintf(name, sizeof(name), "rategate-loop-%d", s->index);
    pthread_setname_np(pthread_self(), name);

    for (;;) {
        if (spin != 0 && !s->closing && s->dest.bsentinel.next != &s->dest.bsentinel &&
            spin_pays(s, spin)) {
            uint64_t until = rg_now_ns() + spin;
            int hit = 0;
            atomic_store(&s->spinning, 1);
            while (!s->closing && rg_now_ns() < until) {
                int queued = queue_pending(s);
                if (queued) {
                    hit = 1;
                    wake_cb(&s->wake);
                }
                if (uv_run(&s->loop, UV_RUN_NOWAIT) == 0)
                    break;
                /* Nothing owed: sleep.  Checks queued since `queued` was read
                 * are caught by the re-check after `spinning` is cleared. */
                if (!queued && s->dest.bsentinel.next == &s->dest.bsentinel)
                    break;
                sched_yield();
            }
            atomic_store(&s->spinning, 0);
            atomic_thread_fence(memory_order_seq_cst);
            if (queue_pending(s)) {
                spin_done(s, 1);
                wake_cb(&s->wake);
                continue;
            }
            spin_done(s, hit);
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

/* The fds libuv opened for the loop (epoll, the async eventfd), for the
 * fork handler.  async_io_watcher is a documented private field of
 * uv_loop_t on Unix (uv/unix.h); -1 where there is none. */
static void
loop_fds(uv_loop_t *loop, int own)
{
    int fds[2] = {uv_backend_fd(loop), loop->async_io_watcher.fd}, i;
    for (i = 0; i < 2; i++)
        if (fds[i] >= 0)
            (own ? rg_fd_own : rg_fd_disown)(fds[i]);
}

static int
shard_init(rg_engine *e, rg_shard *s, int i, char *errbuf, size_t errlen)
{
    int r;

    memset(s, 0, sizeof(*s));
    s->eng = e;
    s->index = i;
    s->rand_state = (unsigned int)(rg_now_ns() ^ (uint64_t)(uintptr_t)s);
    s->dest.shard = s;
    s->dest.state = RG_DOWN;
    s->dest.backoff_ms = 10;
    s->dest.bsentinel.next = s->dest.bsentinel.prev = &s->dest.bsentinel;
    list_init(&s->waiting);
    list_init(&s->sent);
    atomic_init(&s->down, 0);
    atomic_init(&s->connected, 0);
    atomic_init(&s->spinning, 0);
    s->spin.hits = RG_SPIN_ONE; /* poll at first, as before; learn from there */
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
    loop_fds(&s->loop, 1);
    uv_timer_init(&s->loop, &s->deadline_timer);
    uv_timer_init(&s->loop, &s->dest.retry_timer);
    s->wake.data = s;
    s->deadline_timer.data = s;
    s->dest.retry_timer.data = &s->dest;
    /* The first connect runs on the loop thread as soon as it starts;
     * until it completes (or fails) checks wait for it, within deadline. */
    s->dest.state = RG_CONNECTING;
    uv_timer_start(&s->dest.retry_timer, retry_cb, 0, 0);
    return 0;
}

/* After the thread is gone (or never ran): close the loop. */
static void
loop_close(rg_shard *s)
{
    loop_fds(&s->loop, 0);
    uv_loop_close(&s->loop);
    pthread_mutex_destroy(&s->mu);
}

/* Close a shard whose thread never ran (start failed half-way). */
static void
shard_discard(rg_shard *s)
{
    uv_close((uv_handle_t *)&s->wake, close_noop);
    uv_close((uv_handle_t *)&s->deadline_timer, close_noop);
    uv_close((uv_handle_t *)&s->dest.retry_timer, close_noop);
    uv_run(&s->loop, UV_RUN_DEFAULT);
    loop_close(s);
}

/* What every connection of the engine is made from. */
static void
conn_cfg(rg_engine *e)
{
    const rg_engine_cfg *cfg = &e->cfg;
    rg_conn_cfg *cc = &e->conn;
    const char *delay = getenv("RATEGATE_TEST_RESOLVE_DELAY_MS");

    memset(cc, 0, sizeof(*cc));
    cc->host = cfg->host;
    cc->port = cfg->port;
    cc->path = cfg->path;
    cc->username = cfg->username;
    cc->username_len = cfg->username_len;
    cc->password = cfg->password;
    cc->password_len = cfg->password_len;
    cc->db = cfg->db;
    cc->script = rg_script;
    cc->script_len = rg_script_len;
    cc->connect_timeout_ns = cfg->connect_timeout_ns;
    cc->tls = cfg->tls;
    cc->tls_check_hostname = cfg->tls_check_hostname;
    /* For the tests of slow name resolution only: a resolver that takes
     * this long, deterministically (see tests/test_tls.py). */
    if (delay != NULL)
        cc->resolve_delay_ms = (unsigned)strtoul(delay, NULL, 10);
}

/* The adaptive polling's inputs.  RATEGATE_SPIN_ADAPTIVE=0 restores the
 * fixed poll (for A/B runs); RATEGATE_TEST_LOADAVG names a file to read
 * instead of /proc/loadavg (tests pin "every core busy" or "idle" with it). */
static void
spin_cfg(rg_engine *e)
{
    const char *adaptive = getenv("RATEGATE_SPIN_ADAPTIVE");
    const char *path = getenv("RATEGATE_TEST_LOADAVG");
    long n = sysconf(_SC_NPROCESSORS_ONLN);

    e->spin_fixed = adaptive != NULL && strcmp(adaptive, "0") == 0;
    e->ncpu = n > 0 ? (int)n : 1;
    if (path == NULL || strlen(path) >= sizeof(e->loadavg))
        path = "/proc/loadavg";
    snprintf(e->loadavg, sizeof(e->loadavg), "%s", path);
}

int
rg_engine_start(rg_engine *e, char *errbuf, size_t errlen)
{
    int i, n = e->cfg.nshards;
    sigset_t all, old;

    rg_fd_install_atfork();
    conn_cfg(e);
    spin_cfg(e);
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

/* Never on a shard that is stopping: its loop may be closing or closed.  A
 * check pushed meanwhile is answered by rg_engine_stop after the join. */
void
rg_engine_wake(rg_shard *s)
{
    pthread_mutex_lock(&s->mu);
    if (!s->stopping) {
        uv_async_send(&s->wake);
        atomic_fetch_add_explicit(&s->eng->wakeups_loop, 1, memory_order_relaxed);
    }
    pthread_mutex_unlock(&s->mu);
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
            rg_check *c;
            pthread_join(s->thread, NULL);
            /* Checks pushed after the thread took its queue for the last
             * time (a submit racing the stop): answered here. */
            c = s->qhead;
            s->qhead = s->qtail = NULL;
            while (c != NULL) {
                rg_check *next = c->next;
                complete(s, c, RG_ERR_CLOSED);
                c = next;
            }
            flush(s);
            /* uv_run returned: every handle is closed, the loop is idle. */
            loop_close(s);
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
    /* A parent thread may have held it at the fork: a fresh one (the old
     * one's memory is reused as is, never unlocked or destroyed). */
    pthread_mutex_init(&e->err_mu, NULL);
}

void
rg_engine_free_cfg(rg_engine_cfg *cfg)
{
    free(cfg->host);
    free(cfg->path);
    free(cfg->password);
    free(cfg->username);
    if (cfg->tls != NULL)
        rg_tls_ctx_free(cfg->tls);
    cfg->tls = NULL;
    cfg->host = cfg->path = cfg->password = cfg->username = NULL;
}
