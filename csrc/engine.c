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

#include <hiredis/hiredis.h>
#include <openssl/sha.h>

#include "port.h"
#include "script.h"
#include "topology.h"

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
static void cmd_failed(rg_shard *s, rg_check *c, int err);

static void
complete(rg_shard *s, rg_check *c, int err)
{
    c->err = err;
    if (c->cmd != NULL && err != RG_ERR_NONE)
        cmd_failed(s, c, err);
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
 * write per run of checks bound for the same port.  Each is stamped with
 * the time it was finished (Decision.latency: submit to decision, as the
 * loop thread saw it).  A check with no port (a concurrency release:
 * nobody waits for it) is freed here. */
static void topo_publish(rg_shard *s);

static void
flush(rg_shard *s)
{
    rg_check *c = s->done_head;
    uint64_t now = c != NULL ? rg_now_ns() : 0;

    if (s->topo_dirty)
        topo_publish(s);

    s->done_head = s->done_tail = NULL;
    while (c != NULL) {
        rg_check *first = c, *last = c;
        first->done_ns = now;
        while (last->next != NULL && last->next->port == first->port) {
            last = last->next;
            last->done_ns = now;
        }
        c = last->next;
        if (first->port == NULL) {
            last->next = NULL;
            while (first != NULL) {
                rg_check *next = first->next;
                rg_check_free(first);
                first = next;
            }
        } else {
            rg_port_push(first->port, first, last, &s->eng->wakeups_port);
        }
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
    rg_msgf(s->why, sizeof(s->why), "%s%s%s", what, detail ? ": " : "", detail ? detail : "");
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

/* An operator's command, for a (re)send: 0, 1 if it was answered
 * meanwhile (nothing written), -1 out of memory. */
static int
cmd_write(rg_batch *b, rg_buf *out)
{
    const rg_cmd *cmd = b->checks[0] != NULL ? b->checks[0]->cmd : NULL;

    if (cmd == NULL)
        return 1;
    if (rg_buf_reserve(out, cmd->resp_len) != 0)
        return -1;
    memcpy(out->p, cmd->resp, cmd->resp_len);
    out->len = cmd->resp_len;
    return 0;
}

/* Write b's script call on d's connection (ready).  On failure (no live
 * check, no connection, out of memory) the batch's checks fail and it is
 * retired. */
static void
batch_send(rg_shard *s, rg_dest *d, rg_batch *b)
{
    rg_buf out = {0};
    int r = d->conn == NULL ? 1
            : b->command    ? cmd_write(b, &out)
                            : rg_batch_write(b, b->xslot ? s->eng->xslot_sha : d->sha, &out);

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
static void dest_move(rg_dest *d);
static void send_waiting(rg_shard *s);
static void rearm(rg_shard *s);
static int cluster_error(rg_shard *s, rg_dest *d, rg_batch *b, const char *why);

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
    d->failing = 1;   /* until a connect succeeds, its checks fail at once */
    d->have_addr = 0; /* behind Sentinel: ask again where the master is */
    s->topo_dirty = 1;
    rg_msgf(d->why, sizeof(d->why), "%s", s->why); /* set_error named the cause */
    if (s->eng->cfg.cluster) {
        /* One node: only its slots' checks fail (at once, from here: the
         * waiting ones are routed again), and the map is asked again (a
         * replica may be promoted). */
        if (s->closing)
            return;
        if (d->node != NULL)
            rg_map_ready(s->map, d->node, 0); /* reads the map again */
        send_waiting(s);
        if (d->node == NULL || !d->node->in_map)
            return; /* no slot of ours there any more: no reconnecting */
    } else {
        atomic_store(&s->connected, 0);
        if (s->closing)
            return;
        atomic_store(&s->down, 1);
        fail_list(s, &s->waiting, RG_ERR_UNAVAILABLE);
    }
    /* Jitter (75% to 125%) keeps many app servers from reconnecting in step. */
    ms = d->backoff_ms * (75 + (uint64_t)(rand_r(&s->rand_state) % 51)) / 100;
    uv_timer_start(&d->retry_timer, retry_cb, ms, 0);
    d->backoff_ms = d->backoff_ms * 2 > 500 ? 500 : d->backoff_ms * 2;
}

/* The priv of a ROLE or an ASKING command (never a batch). */
static char asking_priv;

/* The connection is ready and (behind Sentinel) its server a master. */
static void
dest_ready(rg_dest *d)
{
    rg_shard *s = d->shard;

    d->state = RG_READY;
    d->again = 0;
    d->failing = 0;
    d->answered = 0;
    d->ready_ns = rg_now_ns();
    if (d->ever_ready)
        atomic_fetch_add(&s->eng->reconnects, 1);
    d->ever_ready = 1;
    d->backoff_ms = 10;
    d->why[0] = '\0';
    if (d->node != NULL)
        rg_map_ready(s->map, d->node, 1);
    s->topo_dirty = 1; /* `connected` is worked out there */
    if (!s->eng->cfg.cluster)
        atomic_store(&s->down, 0);
    send_waiting(s);
}

/* The connection is ready: its handshake loaded the script and (behind
 * Sentinel) found the server a master by ROLE, within connect_timeout. */
static void
on_ready(void *owner, rg_conn *c, const char *sha)
{
    rg_dest *d = owner;
    (void)c;

    memcpy(d->sha, sha, sizeof(d->sha));
    dest_ready(d);
}

static void
on_lost(void *owner, rg_conn *c, int was_ready, const char *why)
{
    rg_dest *d = owner;
    rg_shard *s = d->shard;
    (void)c;

    d->conn = NULL;
    d->have_addr = 0; /* behind Sentinel: the master may have moved */
    s->topo_dirty = 1;
    set_error(s, why, NULL);
    if (s->closing) {
        d->state = RG_DOWN;
        return;
    }
    /* (Behind Sentinel, a connection lost before its ROLE answered was
     * never ready for us: a failed attempt.) */
    if (was_ready && d->state == RG_READY) {
        /* It was ready, so the server is up and answered the handshake: an
         * idle timeout, CLIENT KILL, a proxy's reset.  Connect again at once,
         * not `down`: checks keep waiting for it within their deadlines.  A
         * replacement killed before its first reply (CLIENT KILL TYPE
         * normal kills it too) is no failed attempt either.  Only a server
         * or proxy that drops every connection before it answers, three in
         * a row, is reconnected after the backoff instead of at once (no
         * tight loop); checks still wait, within their deadlines. */
        d->drops = d->answered || rg_now_ns() - d->ready_ns >= RG_HEALTHY_NS ? 0 : d->drops + 1;
        d->state = RG_CONNECTING;
        d->again = 1;
        if (d->node != NULL)
            rg_map_ready(s->map, d->node, 0); /* a failover, perhaps: who owns its slots now? */
        else
            atomic_store(&s->connected, 0);
        if (d->drops < 3) {
            dest_connect(d);
        } else {
            int k = d->drops - 3 > 6 ? 6 : d->drops - 3;
            uv_timer_start(&d->retry_timer, retry_cb, 10u << k, 0); /* 10 ms to 640 ms */
        }
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
static void
requeue_now(rg_shard *s, rg_check *c)
{
    batch_detach(c);
    list_remove(c); /* from sent */
    list_insert(&s->waiting, c);
}

static int
requeue(rg_shard *s, rg_dest *d, rg_check *c)
{
    if (d->state != RG_CONNECTING || c->resent || c->deadline_ns <= rg_now_ns())
        return 0;
    c->resent = 1;
    requeue_now(s, c);
    return 1;
}

/* Cluster: every live check of b back to the waiting list, to be routed
 * again (a redirection or TRYAGAIN: Redis ran none of them). */
static void
requeue_batch(rg_shard *s, rg_batch *b)
{
    int i;
    for (i = 0; i < b->n; i++)
        if (b->checks[i] != NULL)
            requeue_now(s, b->checks[i]);
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

/* ---- operators' commands (Engine.command, Engine.connect) ---------------- */

/* Cluster: the destination of the map's node i when the map names it
 * (a slot's master), else NULL. */
static rg_dest *
map_dest(rg_shard *s, int i)
{
    rg_node *n = rg_map_at(s->map, i);
    return n->in_map ? n->data : NULL;
}

/* "host:port" of a destination ("[v6]:port"), or its unix socket path. */
static void
dest_addr(const rg_dest *d, char *buf, size_t len)
{
    const rg_conn_cfg *cc = &d->ccfg;

    if (cc->path != NULL)
        rg_msgf(buf, len, "%s", cc->path);
    else if (d->disc != NULL && !d->have_addr && d->state != RG_READY)
        rg_msgf(buf, len, "the master the Sentinels name");
    else if (strchr(cc->host, ':') != NULL)
        rg_msgf(buf, len, "[%s]:%d", cc->host, cc->port);
    else
        rg_msgf(buf, len, "%s:%d", cc->host, cc->port);
}

/* Whether d is the master an operator named ("host:port" as topology()
 * lists it). */
static int
dest_named(const rg_dest *d, const char *name)
{
    char addr[300];

    dest_addr(d, addr, sizeof(addr));
    return strcmp(addr, name) == 0;
}

/* What a shard still waits for before its store has answered, for a
 * person: the server, the Sentinels, the slot map, or a node of it. */
static void
shard_waits_for(rg_shard *s, char *buf, size_t len)
{
    int i;

    if (!s->eng->cfg.cluster) {
        if (s->dest.disc != NULL && !s->dest.have_addr && s->dest.state != RG_READY)
            rg_msgf(buf, len, "the Sentinels (%s:%d%s)", s->eng->cfg.seed_hosts[0],
                     s->eng->cfg.seed_ports[0], s->eng->cfg.nseeds > 1 ? ", ..." : "");
        else
            dest_addr(&s->dest, buf, len);
        return;
    }
    if (rg_map_state(s->map) > 0)
        for (i = 0; i < rg_map_count(s->map); i++) {
            rg_dest *d = map_dest(s, i);
            if (d != NULL && d->state != RG_READY) {
                dest_addr(d, buf, len);
                return;
            }
        }
    rg_msgf(buf, len, "the cluster nodes for CLUSTER SLOTS (%s:%d%s)", s->eng->cfg.seed_hosts[0],
             s->eng->cfg.seed_ports[0], s->eng->cfg.nseeds > 1 ? ", ..." : "");
}

/* A COMMAND or CONNECT check failed with err: say why, for its exception
 * (ConnectionError, or TimeoutError for a deadline), unless already said. */
static void
cmd_failed(rg_shard *s, rg_check *c, int err)
{
    rg_cmd *cmd = c->cmd;
    char where[300];

    if (cmd->why[0] != '\0')
        return;
    if (err == RG_ERR_TIMEOUT) {
        if (cmd->where[0] != '\0')
            rg_msgf(where, sizeof(where), "%s", cmd->where);
        else
            shard_waits_for(s, where, sizeof(where));
        rg_msgf(cmd->why, sizeof(cmd->why), "no answer from %s within %s (%g s)", where,
                 c->op == RG_OP_CONNECT && cmd->timeout * 1e9 == (double)s->eng->cfg.connect_timeout_ns
                     ? "connect_timeout" : "the timeout", cmd->timeout);
    } else if (err == RG_ERR_CLOSED) {
        rg_msgf(cmd->why, sizeof(cmd->why), "the engine was closed (aclose() was called)");
    } else if (err == RG_ERR_OVERLOADED) {
        rg_msgf(cmd->why, sizeof(cmd->why), "out of memory");
    } else {
        rg_msgf(cmd->why, sizeof(cmd->why), "%s", s->why[0] ? s->why : "not connected");
    }
}

/* Copy hiredis's reply r into o (plain C, for the Python thread): 0, or -1
 * out of memory (o holds what was copied: rg_reply_free frees it).  A
 * RESP3 type (a hiredis >= 1.0 reader accepts them even unasked) becomes
 * the nearest RESP2 one. */
static int
reply_fill(rg_reply *o, const redisReply *r)
{
    size_t i;

    switch (r->type) {
    case REDIS_REPLY_INTEGER:
        o->type = RG_REPLY_INT;
        o->integer = r->integer;
        return 0;
    case REDIS_REPLY_NIL:
        o->type = RG_REPLY_NIL;
        return 0;
    case REDIS_REPLY_STATUS:
    case REDIS_REPLY_ERROR:
    case REDIS_REPLY_STRING:
        o->type = r->type == REDIS_REPLY_STATUS ? RG_REPLY_STATUS
                  : r->type == REDIS_REPLY_ERROR ? RG_REPLY_ERROR
                                                 : RG_REPLY_BULK;
        break;
    case REDIS_REPLY_ARRAY:
        o->type = RG_REPLY_ARRAY;
        break;
    default:
        o->type = r->element != NULL ? RG_REPLY_ARRAY : r->str != NULL ? RG_REPLY_BULK : RG_REPLY_INT;
        o->integer = r->integer;
        break;
    }
    if (o->type == RG_REPLY_ARRAY) {
        if (r->elements == 0)
            return 0;
        o->elem = calloc(r->elements, sizeof(*o->elem));
        if (o->elem == NULL)
            return -1;
        o->n = r->elements;
        for (i = 0; i < r->elements; i++)
            if (reply_fill(&o->elem[i], r->element[i]) != 0)
                return -1;
        return 0;
    }
    if (o->type == RG_REPLY_BULK || o->type == RG_REPLY_STATUS || o->type == RG_REPLY_ERROR) {
        o->str = malloc(r->len + 1);
        if (o->str == NULL)
            return -1;
        if (r->len > 0)
            memcpy(o->str, r->str, r->len);
        o->str[r->len] = '\0';
        o->len = r->len;
    }
    return 0;
}

/*
 * The reply to an operator's command (b->command, one check): copied as
 * plain C for the Python thread.  A lost connection fails it (it is not
 * sent again: it may have run).  On a cluster, a command routed by key
 * follows MOVED and ASK (at most 5 redirections) and waits out TRYAGAIN
 * and CLUSTERDOWN within its deadline, as a check does; behind Sentinel,
 * READONLY (the master became a replica: nothing ran) sends it to the
 * next master.  Any other error is the answer (ReplyError).
 */
static void
cmd_reply(rg_shard *s, rg_dest *d, rg_conn *c, rg_batch *b, struct redisReply *r)
{
    rg_check *ck = b->checks[0];
    char why[400];
    int err = RG_ERR_NONE;

    if (r == NULL) {
        if (ck != NULL && !s->closing)
            rg_msgf(ck->cmd->why, sizeof(ck->cmd->why),
                     "the connection to %s was lost before the reply (%s)", ck->cmd->where,
                     s->why[0] ? s->why : "closed");
        batch_fail(s, b, s->closing ? RG_ERR_CLOSED : RG_ERR_UNAVAILABLE);
        batch_retire(s, b);
        return;
    }
    d->answered = 1;
    if (ck == NULL) { /* answered by its deadline: the late reply is ignored */
        batch_retire(s, b);
        return;
    }
    if (r->type == REDIS_REPLY_ERROR) {
        rg_msgf(why, sizeof(why), "%.*s", (int)(r->len > 300 ? 300 : r->len), r->str);
        if (s->eng->cfg.cluster && ck->cmd->route == RG_CMD_KEY && ck->cmd->redirects < 5) {
            int h;
            ck->cmd->redirects++;
            h = cluster_error(s, d, b, why);
            if (h == 2)
                return;
            if (h == 1) {
                batch_retire(s, b);
                return;
            }
        }
        if (d->disc != NULL && strncmp(why, "READONLY", 8) == 0 && c == d->conn) {
            set_error(s, "the master became a replica, asking Sentinel again", why);
            d->have_addr = 0;
            dest_move(d);
            requeue(s, d, ck);
            batch_fail(s, b, RG_ERR_UNAVAILABLE);
            batch_retire(s, b);
            return;
        }
    }
    ck->cmd->reply = calloc(1, sizeof(rg_reply));
    if (ck->cmd->reply == NULL || reply_fill(ck->cmd->reply, r) != 0) {
        rg_reply_free(ck->cmd->reply);
        ck->cmd->reply = NULL;
        err = RG_ERR_OVERLOADED;
    }
    b->checks[0] = NULL;
    list_remove(ck);
    complete(s, ck, err); /* still counted by the batch */
    batch_retire(s, b);
}

static void
on_reply(void *owner, rg_conn *c, void *priv, struct redisReply *r)
{
    rg_dest *d = owner;
    rg_shard *s = d->shard;
    rg_batch *b = priv;
    char why[sizeof(s->eng->last_error)];
    int i, moved = 0;

    if (priv == &asking_priv)
        return; /* +OK (an error would show in the call that follows) */
    if (b->command) {
        cmd_reply(s, d, c, b, r);
        return;
    }
    if (r == NULL) {
        for (i = 0; i < b->n; i++)
            if (b->checks[i] != NULL && !s->closing)
                requeue(s, d, b->checks[i]);
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
        if (d->disc != NULL && strncmp(why, "READONLY", 8) == 0 && c == d->conn) {
            /* The master became a replica under us (a failover): nothing
             * was written; resend to the master Sentinel names next. */
            set_error(s, "the master became a replica, asking Sentinel again", why);
            d->have_addr = 0;
            dest_move(d);
            for (i = 0; i < b->n; i++)
                if (b->checks[i] != NULL)
                    requeue(s, d, b->checks[i]);
            batch_fail(s, b, RG_ERR_UNAVAILABLE);
            break;
        }
        if (s->eng->cfg.cluster && strncmp(why, "READONLY", 8) == 0 && d->node != NULL) {
            /* A cluster node that is a replica now (CLUSTER FAILOVER, a
             * promotion): the call has no declared key to draw MOVED, and
             * nothing was written.  The map is stale: read it again, and
             * these checks wait for it (the node gets nothing meanwhile). */
            set_error(s, "a cluster master became a replica, reading the slot map again", why);
            rg_map_readonly(s->map, d->node);
            requeue_batch(s, b);
            batch_retire(s, b);
            send_waiting(s);
            return;
        }
        if (b->xslot && b->evaled && strncmp(why, "ERR Error compiling script", 26) == 0) {
            /* Redis < 7.0 cannot compile the script's flags: one call per
             * slot from now on, these checks included.  Only this error
             * says so: READONLY, OOM, BUSY... say nothing of the server's
             * version. */
            set_error(s, "no cross-slot script on this server, one call per slot", why);
            s->no_xslot = 1;
            for (i = 0; i < b->n; i++)
                if (b->checks[i] != NULL)
                    b->checks[i]->declared = 1;
            requeue_batch(s, b);
            batch_retire(s, b);
            send_waiting(s);
            return;
        }
        if (s->eng->cfg.cluster) {
            int h = cluster_error(s, d, b, why);
            if (h == 2)
                return;
            if (h == 1) {
                batch_retire(s, b);
                return;
            }
        }
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
            if (b->xslot && ck->declared) {
                /* Not this node's key (see script.c): route it again. */
                requeue_now(s, ck);
                moved = 1;
                continue;
            }
            b->checks[i] = NULL;
            list_remove(ck);
            complete(s, ck, ck->err);
        }
        break;
    }
    batch_retire(s, b);
    if (moved) {
        rg_map_refresh(s->map, 0);
        send_waiting(s);
    }
}

static void rearm(rg_shard *s);

static void
on_settle(void *owner)
{
    rg_dest *d = owner;
    flush(d->shard);
    rearm(d->shard);
}

static const rg_conn_ops dest_ops = {on_ready, on_reply, on_lost, on_settle, NULL};

static void
dest_connect(rg_dest *d)
{
    rg_shard *s = d->shard;
    char err[200];

    if (s->closing || d->conn != NULL)
        return;
    if (d->state != RG_CONNECTING)
        d->state = RG_CONNECTING;
    if (d->disc != NULL && !d->have_addr) {
        rg_disc_find(d->disc); /* then disc_found connects, or disc_failed */
        return;
    }
    d->conn = rg_conn_open(&s->loop, &d->ccfg, &dest_ops, d, err, sizeof(err));
    if (d->conn == NULL) {
        set_error(s, "connect failed", err);
        dest_down(d);
    }
}

/* Behind Sentinel, the master moved (or stopped being one): let the
 * connection go and connect anew, at once.  Its owed calls come back
 * through reply(NULL) while the state is CONNECTING, so their checks wait
 * for the new master within their deadlines (requeue). */
static void
dest_move(rg_dest *d)
{
    rg_conn *c = d->conn;

    d->state = RG_CONNECTING;
    d->again = 1;
    d->conn = NULL;
    d->shard->topo_dirty = 1;
    uv_timer_stop(&d->retry_timer);
    if (c != NULL)
        rg_conn_close(c);
    dest_connect(d);
}

static void
disc_found(void *owner, const char *host, int port)
{
    rg_dest *d = owner;

    if (d->shard->closing || d->conn != NULL)
        return; /* a +switch-master got there first */
    rg_msgf(d->host, sizeof(d->host), "%s", host);
    d->ccfg.port = port;
    d->have_addr = 1;
    d->shard->topo_dirty = 1;
    dest_connect(d);
}

static void
disc_failed(void *owner, const char *why)
{
    rg_dest *d = owner;

    set_error(d->shard, "no Sentinel named the master", why);
    if (!d->shard->closing && d->conn == NULL)
        dest_down(d);
}

/* Sentinel announced a new master: go there now, whatever the state (in
 * the backoff of a dead master, most likely). */
static void
disc_switched(void *owner, const char *host, int port)
{
    rg_dest *d = owner;

    if (d->shard->closing ||
        (d->have_addr && d->ccfg.port == port && strcmp(d->host, host) == 0 && d->conn != NULL))
        return;
    rg_msgf(d->host, sizeof(d->host), "%s", host);
    d->ccfg.port = port;
    d->have_addr = 1;
    d->backoff_ms = 10;
    dest_move(d);
}

static void
disc_settle(void *owner)
{
    rg_dest *d = owner;
    flush(d->shard);
    rearm(d->shard);
}

static const rg_disc_ops disc_ops = {disc_found, disc_failed, disc_switched, disc_settle};

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

/* ---- what topology() shows ------------------------------------------------- */

/* Cluster: the destination of slot's master in the map as read. */
static rg_dest *
owner_at(rg_shard *s, int slot)
{
    rg_node *n = rg_map_owner(s->map, slot);
    return n != NULL ? n->data : NULL;
}

void
rg_topo_snap_decref(rg_topo_snap *t)
{
    if (t != NULL && atomic_fetch_sub_explicit(&t->refcnt, 1, memory_order_acq_rel) == 1)
        free(t);
}

/*
 * Work out `connected` (stats(): every destination of the store ready:
 * the server, the Sentinel's master, every master of the slot map), and on
 * shard 0 publish a snapshot for topology(): one block, masters in slot
 * order.  Out of memory: tried again at the next flush.
 */
static void
topo_publish(rg_shard *s)
{
    rg_engine *e = s->eng;
    rg_topo_snap *t, *old;
    int (*rng)[2];
    int *pos = NULL, nm = 0, nr = 0, connected, i, slot;
    size_t size;

    if (e->cfg.cluster) {
        connected = rg_map_state(s->map) > 0;
        for (i = 0; i < rg_map_count(s->map); i++)
            if (map_dest(s, i) != NULL) {
                nm++;
                connected &= map_dest(s, i)->state == RG_READY;
            }
        for (slot = 0; slot < 16384; slot++)
            nr += owner_at(s, slot) != NULL && (slot == 0 || owner_at(s, slot - 1) != owner_at(s, slot));
    } else {
        rg_dest *d = &s->dest;
        connected = d->state == RG_READY;
        nm = d->disc == NULL || d->have_addr || d->state == RG_READY;
    }
    atomic_store(&s->connected, connected);
    if (s->index != 0) {
        s->topo_dirty = 0;
        return;
    }
    size = sizeof(*t) + (size_t)nm * sizeof(rg_topo_master) + (size_t)nr * sizeof(*rng);
    t = calloc(1, size);
    if (e->cfg.cluster && t != NULL &&
        (pos = malloc(sizeof(int) * (size_t)(rg_map_count(s->map) + 1))) == NULL) {
        free(t);
        t = NULL;
    }
    if (t == NULL)
        return; /* still dirty: the next flush tries again */
    s->topo_dirty = 0;
    atomic_init(&t->refcnt, 1);
    t->masters = (rg_topo_master *)(t + 1);
    rng = (int (*)[2])(t->masters + nm);
    if (e->cfg.cluster) {
        int j = 0, n = rg_map_count(s->map);
        rg_dest *d;
        /* masters in the order of their first slot; their ranges after */
        for (i = 0; i < n; i++) {
            pos[i] = -1;
            if ((d = map_dest(s, i)) != NULL)
                d->node_pos = i; /* the node's index, for the slot walk */
        }
        for (slot = 0; slot < 16384; slot++) {
            d = owner_at(s, slot);
            if (d != NULL && (slot == 0 || owner_at(s, slot - 1) != d)) {
                if (pos[d->node_pos] < 0)
                    pos[d->node_pos] = j++;
                t->masters[pos[d->node_pos]].nranges++;
            }
        }
        for (i = 0; i < n; i++)
            if (map_dest(s, i) != NULL && pos[i] < 0)
                pos[i] = j++; /* in the map by a MOVED only: no range yet */
        for (i = 0; i < n; i++) {
            rg_topo_master *m;
            if (pos[i] < 0 || (d = map_dest(s, i)) == NULL)
                continue;
            m = &t->masters[pos[i]];
            dest_addr(d, m->addr, sizeof(m->addr));
            m->connected = d->state == RG_READY;
        }
        for (i = 0, j = 0; i < nm; i++) {
            t->masters[i].ranges = rng + j;
            j += t->masters[i].nranges;
            t->masters[i].nranges = 0;
        }
        for (slot = 0; slot < 16384; slot++) {
            rg_topo_master *m;
            d = owner_at(s, slot);
            if (d == NULL || (slot > 0 && owner_at(s, slot - 1) == d))
                continue;
            m = &t->masters[pos[d->node_pos]];
            m->ranges[m->nranges][0] = slot;
            while (slot + 1 < 16384 && owner_at(s, slot + 1) == d)
                slot++;
            m->ranges[m->nranges++][1] = slot;
        }
        free(pos);
    } else if (nm == 1) {
        dest_addr(&s->dest, t->masters[0].addr, sizeof(t->masters[0].addr));
        t->masters[0].connected = connected;
    }
    t->nmasters = nm;
    if (s->dest.disc != NULL)
        rg_disc_named(s->dest.disc, t->sentinel, sizeof(t->sentinel));
    pthread_mutex_lock(&e->topo_mu);
    old = e->topo;
    e->topo = t;
    pthread_mutex_unlock(&e->topo_mu);
    rg_topo_snap_decref(old);
}

rg_topo_snap *
rg_engine_topology(rg_engine *e)
{
    rg_topo_snap *t;

    pthread_mutex_lock(&e->topo_mu);
    t = e->topo;
    if (t != NULL)
        atomic_fetch_add_explicit(&t->refcnt, 1, memory_order_relaxed);
    pthread_mutex_unlock(&e->topo_mu);
    return t;
}

int
rg_engine_kind(const rg_engine *e)
{
    return e->cfg.cluster ? RG_KIND_CLUSTER : e->cfg.nseeds > 0 ? RG_KIND_SENTINEL : RG_KIND_SERVER;
}

/* ---- deadlines ----------------------------------------------------------- */

static const char stall_msg[] = "no reply from Redis within the stall timeout";

/* Answer every check past its deadline, drop stalled connections. */
static void
deadline_pass(rg_shard *s)
{
    uint64_t now = rg_now_ns();
    rg_check *c;
    rg_batch *b;
    int i;

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
    for (i = 0; i < s->ndests; i++) {
        rg_dest *d = s->dests[i];
        b = d->bsentinel.next;
        if (b != &d->bsentinel && now - b->sent_ns >= s->eng->cfg.stall_ns)
            dest_drop(d, stall_msg);
    }
    flush(s);
    rearm(s);
}

static void
poll_now_cb(uv_idle_t *h)
{
    (void)h; /* active: the loop's next poll does not block */
}

/*
 * A deadline or a stall check is due.  The pass runs after the poll phase
 * of this loop turn (after_poll_cb), with a poll that does not block
 * (poll_now): libuv runs due timers before it polls for I/O, so a loop
 * thread descheduled past a deadline would otherwise time out checks whose
 * replies sit unread in the socket.  What has arrived is read first.
 */
static void
deadline_cb(uv_timer_t *t)
{
    rg_shard *s = t->data;

    s->due = 1;
    uv_idle_start(&s->poll_now, poll_now_cb);
}

static void
after_poll_cb(uv_check_t *h)
{
    rg_shard *s = h->data;

    if (!s->due)
        return;
    s->due = 0;
    uv_idle_stop(&s->poll_now);
    deadline_pass(s);
}

/* Set the deadline timer for the earliest deadline or stall check. */
static void
rearm(rg_shard *s)
{
    uint64_t next = UINT64_MAX, now;
    rg_check *c;
    int i;

    if (s->closing)
        return;
    if ((c = list_first(&s->waiting)) != NULL)
        next = c->deadline_ns;
    if ((c = list_first(&s->sent)) != NULL && c->deadline_ns < next)
        next = c->deadline_ns;
    for (i = 0; i < s->ndests; i++) {
        rg_dest *d = s->dests[i];
        if (d->bsentinel.next != &d->bsentinel) {
            uint64_t st = d->bsentinel.next->sent_ns + s->eng->cfg.stall_ns;
            if (st < next)
                next = st;
        }
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

/* A batch (one script call) of checks[0..n) on d, or their failure. */
static void
send_batch(rg_shard *s, rg_dest *d, rg_check **checks, int n)
{
    rg_batch *b = rg_batch_new(checks, n);
    int i;

    if (b != NULL) {
        batch_send(s, d, b);
        return;
    }
    for (i = 0; i < n; i++) {
        list_remove(checks[i]);
        complete(s, checks[i], RG_ERR_OVERLOADED); /* never sent: batch is NULL */
    }
}

/* Cluster order: checks for the cross-slot call first, then by slot. */
static int
by_slot(const void *a, const void *b)
{
    const rg_check *x = *(rg_check *const *)a, *y = *(rg_check *const *)b;
    if (x->declared != y->declared)
        return x->declared - y->declared;
    return (x->cslot > y->cslot) - (x->cslot < y->cslot);
}

/*
 * Send d's pending checks: one script call; on a cluster node, one call of
 * rg_script_xslot for all of them (several slots, keys undeclared), and one
 * call per slot with declared keys for those marked `declared` (a key the
 * node did not serve, or Redis < 7.0 without script flags), so that Redis
 * checks their slot first (MOVED, ASK).  The calls leave in one write at
 * the end of the loop's turn.
 */
static void
dest_flush(rg_shard *s, rg_dest *d)
{
    int i, from = 0, n = d->npend;
    rg_batch *b;

    if (n == 0)
        return;
    d->npend = 0;
    if (!s->eng->cfg.cluster) {
        send_batch(s, d, d->pend, n);
        return;
    }
    if (s->no_xslot)
        for (i = 0; i < n; i++)
            d->pend[i]->declared = 1;
    qsort(d->pend, (size_t)n, sizeof(d->pend[0]), by_slot);
    while (from < n && !d->pend[from]->declared)
        from++;
    if (from > 0) {
        b = rg_batch_new(d->pend, from);
        if (b == NULL) {
            send_batch(s, d, d->pend, from); /* fails them */
        } else {
            b->xslot = 1;
            batch_send(s, d, b);
        }
    }
    for (i = from + 1; i <= n; i++)
        if (i == n || d->pend[i]->cslot != d->pend[from]->cslot) {
            send_batch(s, d, d->pend + from, i - from);
            from = i;
        }
}

static void
dispatch_flush(rg_shard *s)
{
    int i;
    for (i = 0; i < s->ndests; i++)
        dest_flush(s, s->dests[i]);
}

/* Where a check goes: the one destination, or the node that owns its
 * slot; NULL: Cluster, and the slot's owner is not known: *wait says
 * whether that is for now (no map yet) or for good (the map has no owner,
 * or no node answered). */
static rg_dest *
route(rg_shard *s, rg_check *c, int *wait)
{
    rg_node *n;

    if (!s->eng->cfg.cluster)
        return &s->dest;
    if (c->cslot < 0)
        c->cslot = rg_check_slot(c);
    n = rg_map_route(s->map, c->cslot, wait);
    return n != NULL ? n->data : NULL;
}

/* Where an operator's command goes (rg_cmd.route): as route(); when it
 * can go nowhere, cmd->why says why. */
static rg_dest *
cmd_route(rg_shard *s, rg_check *c, int *wait)
{
    rg_cmd *cmd = c->cmd;
    rg_dest *d, *ready;
    int i;

    if (!s->eng->cfg.cluster) {
        if (cmd->route != RG_CMD_NODE || dest_named(&s->dest, cmd->node))
            return &s->dest;
        dest_addr(&s->dest, cmd->where, sizeof(cmd->where));
        rg_msgf(cmd->why, sizeof(cmd->why), "%s is not the master (%s is; topology() lists it)",
                 cmd->node, cmd->where);
        return NULL;
    }
    if (cmd->route == RG_CMD_KEY) {
        rg_node *n = rg_map_route(s->map, cmd->slot, wait);
        if (n != NULL || *wait)
            return n != NULL ? n->data : NULL;
        rg_msgf(cmd->why, sizeof(cmd->why), "no master serves slot %d (%s)", cmd->slot,
                rg_map_state(s->map) < 0 ? rg_map_why(s->map) : "not in the slot map");
        return NULL;
    }
    if (rg_map_state(s->map) <= 0) {
        *wait = rg_map_state(s->map) == 0;
        rg_msgf(cmd->why, sizeof(cmd->why), "%s", rg_map_why(s->map));
        return NULL;
    }
    if (cmd->route == RG_CMD_NODE) {
        for (i = 0; i < rg_map_count(s->map); i++)
            if ((d = map_dest(s, i)) != NULL && dest_named(d, cmd->node))
                return d;
        rg_msgf(cmd->why, sizeof(cmd->why),
                "%s is not a master of the cluster now (topology() lists the masters)", cmd->node);
        return NULL;
    }
    /* Any master: a ready one, else one being connected. */
    for (ready = NULL, i = 0; i < rg_map_count(s->map); i++) {
        rg_dest *n = map_dest(s, i);
        if (n != NULL && n->state == RG_READY)
            return n;
        if (n != NULL && n->state == RG_CONNECTING && !n->failing && ready == NULL)
            ready = n;
    }
    if (ready == NULL)
        rg_msgf(cmd->why, sizeof(cmd->why), "no master of the cluster is connected (%s)",
                s->why[0] ? s->why : "none in the slot map");
    return ready;
}

/*
 * The first-connection rule: a check whose destination has never been
 * ready in this process (the first connection after start or fork: a
 * Sentinel's answer, a slot map, a TLS handshake) waits for it until
 * max(its own deadline, when that first connect began + connect_timeout).
 * A fresh worker's first checks must not fail for a timeout shorter than
 * a connect; once a destination has been ready, `timeout` holds alone.
 */
static void
first_rule(rg_shard *s, rg_dest *d, int wait, rg_check *c)
{
    uint64_t from;

    if (d == NULL && wait)
        from = s->start_ns; /* the cluster's first slot map */
    else if (d != NULL && !d->ever_ready && !d->failing && d->state == RG_CONNECTING)
        from = d->first_ns;
    else
        return;
    if (from + s->eng->cfg.connect_timeout_ns > c->deadline_ns)
        c->deadline_ns = from + s->eng->cfg.connect_timeout_ns;
}

/* Whether the shard's store has answered (Engine.connect): 1 yes, 0 not
 * yet, -1 connecting failed (cmd->why says why; the engine goes on trying). */
static int
shard_answered(rg_shard *s, rg_cmd *cmd)
{
    int i, ready = 1;

    if (!s->eng->cfg.cluster) {
        if (s->dest.state == RG_READY)
            return 1;
        if (!s->dest.failing)
            return 0;
        rg_msgf(cmd->why, sizeof(cmd->why), "%s", s->dest.why[0] ? s->dest.why : s->why);
        return -1;
    }
    if (rg_map_state(s->map) <= 0) {
        if (rg_map_state(s->map) == 0)
            return 0;
        rg_msgf(cmd->why, sizeof(cmd->why), "%s", rg_map_why(s->map));
        return -1;
    }
    for (i = 0; i < rg_map_count(s->map); i++) {
        rg_dest *d = map_dest(s, i);
        if (d == NULL)
            continue;
        if (d->failing) {
            rg_msgf(cmd->why, sizeof(cmd->why), "%s", d->why[0] ? d->why : s->why);
            return -1;
        }
        ready &= d->state == RG_READY;
    }
    return ready;
}

/* An operator's command to a ready destination: a call of its own. */
static void
cmd_send(rg_shard *s, rg_dest *d, rg_check *c)
{
    rg_batch *b = rg_batch_new(&c, 1);

    if (b == NULL) {
        list_remove(c);
        complete(s, c, RG_ERR_OVERLOADED); /* never sent: batch is NULL */
        return;
    }
    b->command = 1;
    batch_send(s, d, b);
}

/* Route one check by connection state: into a batch, to the waiting list,
 * or answered at once.  A connect() waits for the whole store. */
static void
dispatch_one(rg_shard *s, rg_check *c, uint64_t now)
{
    rg_dest *d;
    int wait = 0, r;

    if (c->op == RG_OP_CONNECT) {
        r = shard_answered(s, c->cmd);
        if (r != 0)
            complete(s, c, r > 0 ? RG_ERR_NONE : RG_ERR_UNAVAILABLE);
        else if (c->deadline_ns <= now)
            complete(s, c, RG_ERR_TIMEOUT);
        else
            list_insert(&s->waiting, c);
        return;
    }
    d = c->op == RG_OP_COMMAND ? cmd_route(s, c, &wait) : route(s, c, &wait);
    if (c->cmd == NULL) /* a command's timeout is the operator's, explicitly */
        first_rule(s, d, wait, c);
    if (c->cmd != NULL && d != NULL)
        dest_addr(d, c->cmd->where, sizeof(c->cmd->where));
    if (c->deadline_ns <= now) {
        /* Late already (the thread was starved): do not spend a token the
         * caller will never learn about. */
        complete(s, c, RG_ERR_TIMEOUT);
        return;
    }
    if (d == NULL) {
        /* Cluster: no map yet (wait for it), or no node answers for one
         * (answer now). */
        if (wait)
            list_insert(&s->waiting, c);
        else
            complete(s, c, RG_ERR_UNAVAILABLE);
    } else if (d->state == RG_READY) {
        list_insert(&s->sent, c);
        if (c->op == RG_OP_COMMAND) {
            cmd_send(s, d, c);
            return;
        }
        d->pend[d->npend++] = c;
        if (d->npend == RG_BATCH_MAX)
            dest_flush(s, d);
    } else if (d->state == RG_CONNECTING && !d->failing && !atomic_load(&s->down)) {
        list_insert(&s->waiting, c);
    } else {
        if (c->cmd != NULL && c->cmd->why[0] == '\0' && d->why[0] != '\0')
            rg_msgf(c->cmd->why, sizeof(c->cmd->why), "%s", d->why);
        complete(s, c, RG_ERR_UNAVAILABLE);
    }
}

/* Route every waiting check again (a destination became ready or went
 * down, the map changed).  The list is taken whole first: a check may
 * rejoin it. */
static void
send_waiting(rg_shard *s)
{
    rg_list todo;
    rg_check *c;
    uint64_t now = rg_now_ns();

    list_init(&todo);
    if (list_first(&s->waiting) != NULL) {
        todo.head.next = s->waiting.head.next;
        todo.head.prev = s->waiting.head.prev;
        todo.head.next->prev = &todo.head;
        todo.head.prev->next = &todo.head;
        list_init(&s->waiting);
    }
    while ((c = list_first(&todo)) != NULL) {
        list_remove(c);
        dispatch_one(s, c, now);
    }
    dispatch_flush(s);
}

static void
close_noop(uv_handle_t *h)
{
    (void)h; /* the handles live inside the shard, freed after the join */
}

/* A cluster node's last handle closed: its memory goes. */
static void
node_closed(uv_handle_t *h)
{
    rg_dest *d = h->data;
    rg_conn_memo_clear(&d->memo);
    free(d);
}

/* The shard's own handles. */
static void
shard_close_handles(rg_shard *s)
{
    uv_close((uv_handle_t *)&s->wake, close_noop);
    uv_close((uv_handle_t *)&s->deadline_timer, close_noop);
    uv_close((uv_handle_t *)&s->dest.retry_timer, close_noop);
    uv_close((uv_handle_t *)&s->after_poll, close_noop);
    uv_close((uv_handle_t *)&s->poll_now, close_noop);
}

/* ---- destinations ------------------------------------------------------------- */

/* A destination's retry timer and the fields every destination needs. */
static void
dest_init(rg_shard *s, rg_dest *d)
{
    d->shard = s;
    d->state = RG_DOWN;
    d->backoff_ms = 10;
    d->bsentinel.next = d->bsentinel.prev = &d->bsentinel;
    uv_timer_init(&s->loop, &d->retry_timer);
    d->retry_timer.data = d;
}

/* d joins the shard's destinations: 0, or -1 out of memory. */
static int
dests_add(rg_shard *s, rg_dest *d)
{
    if (s->ndests == s->dcap) {
        int cap = s->dcap ? s->dcap * 2 : 8;
        rg_dest **p = realloc(s->dests, (size_t)cap * sizeof(*p));
        if (p == NULL)
            return -1;
        s->dests = p;
        s->dcap = cap;
    }
    d->index = s->ndests;
    s->dests[s->ndests++] = d;
    return 0;
}

static void
dests_remove(rg_shard *s, rg_dest *d)
{
    rg_dest *last = s->dests[--s->ndests];
    s->dests[d->index] = last;
    last->index = d->index;
}

/* ---- Cluster: what the slot map (topology.c) tells ------------------------- */

/* A node the map names, new: its destination, connecting. */
static void
node_added(void *owner, rg_node *n)
{
    rg_shard *s = owner;
    rg_dest *d = calloc(1, sizeof(*d));

    if (d == NULL || dests_add(s, d) != 0) {
        free(d); /* its slots' checks fail until the next map (n->data NULL) */
        set_error(s, "out of memory adding a cluster node", n->host);
        return;
    }
    dest_init(s, d);
    rg_msgf(d->host, sizeof(d->host), "%s", n->host);
    d->ccfg = s->eng->conn;
    d->ccfg.host = d->host;
    d->ccfg.port = n->port;
    d->ccfg.path = NULL;
    d->ccfg.memo = &d->memo;
    d->have_addr = 1;
    d->first_ns = rg_now_ns();
    d->node = n;
    n->data = d;
    s->topo_dirty = 1;
    dest_connect(d);
}

/* A node the map no longer names: its destination goes (closed, freed
 * once its timer is).  The calls it owed come back through reply(NULL)
 * while it counts as reconnecting, so their checks are routed anew (sent
 * again once, within their deadlines: Redis may have run them). */
static void
node_removed(void *owner, rg_node *n)
{
    rg_shard *s = owner;
    rg_dest *d = n->data;
    rg_conn *c = d->conn;

    n->data = NULL;
    d->node = NULL;
    dests_remove(s, d);
    s->topo_dirty = 1;
    d->state = RG_CONNECTING;
    d->conn = NULL;
    if (c != NULL)
        rg_conn_close(c);
    uv_timer_stop(&d->retry_timer);
    uv_close((uv_handle_t *)&d->retry_timer, node_closed);
}

/* The map was read (or reading it failed): route what waits anew. */
static void
map_changed(void *owner)
{
    rg_shard *s = owner;

    s->topo_dirty = 1;
    if (rg_map_why(s->map)[0] != '\0')
        set_error(s, rg_map_why(s->map), NULL); /* no node answered this round */
    if (!s->closing)
        send_waiting(s);
}

static void
map_settle(void *owner)
{
    rg_shard *s = owner;
    flush(s);
    rearm(s);
}

static const rg_map_ops map_ops = {node_added, node_removed, map_changed, map_settle};

/*
 * A cluster error in reply to batch b (one slot's checks; Redis checked
 * the keys' slot before running anything, so none was touched).  Returns 0
 * for any other error, 1 if the checks were put back (b is to be retired),
 * 2 if b was sent on (it is the target's now).
 *   MOVED: the slot has a new owner: note it, ask for the whole map, route
 *          the checks again.
 *   ASK:   the slot is being migrated: ASKING and the call on the target,
 *          once; if the target is not connected yet, route them again
 *          (they come back here and are ASKed then).
 *   TRYAGAIN: each check alone, at once (see below); one check alone, and
 *   CLUSTERDOWN: again in 20 ms, within the checks' deadlines.
 */
static int
cluster_error(rg_shard *s, rg_dest *d, rg_batch *b, const char *why)
{
    char host[256];
    int slot, port, kind = rg_cluster_redirect(why, &slot, host, sizeof(host), &port);
    rg_dest *t;
    rg_node *n;
    rg_buf cmd = {0};

    if (kind == RG_REDIRECT_NONE) {
        int i, live = 0;
        if (strncmp(why, "TRYAGAIN", 8) != 0 && strncmp(why, "CLUSTERDOWN", 11) != 0)
            return 0;
        for (i = 0; i < b->n; i++)
            live += b->checks[i] != NULL;
        if (live > 1 && strncmp(why, "TRYAGAIN", 8) == 0) {
            /* A slot half-migrated answers TRYAGAIN to a call on several
             * keys some of which moved; one check alone (one key per rate)
             * gets ASK instead, followed at once. */
            for (i = 0; i < b->n; i++) {
                rg_check *c = b->checks[i];
                rg_batch *one;
                if (c == NULL)
                    continue;
                batch_detach(c);
                one = rg_batch_new(&c, 1);
                if (one == NULL) {
                    list_remove(c);
                    complete(s, c, RG_ERR_OVERLOADED);
                } else {
                    batch_send(s, d, one);
                }
            }
            return 1;
        }
        requeue_batch(s, b);
        rg_map_refresh(s->map, 20); /* its answer routes them again */
        return 1;
    }
    /* MOVED: noted in the map at once (and the whole map read again). */
    n = kind == RG_REDIRECT_MOVED ? rg_map_moved(s->map, slot, host, port)
                                  : rg_map_node(s->map, host, port);
    if (n == NULL || (t = n->data) == NULL)
        return 0; /* out of memory: the error is the answer */
    if (kind == RG_REDIRECT_MOVED) {
        requeue_batch(s, b);
        send_waiting(s);
        return 1;
    }
    if (t->state != RG_READY || b->asked || rg_buf_reserve(&cmd, 32) != 0) {
        requeue_batch(s, b);
        rg_map_refresh(s->map, 20);
        return 1;
    }
    rg_resp_array(&cmd, 1);
    rg_resp_bulk(&cmd, "ASKING", 6);
    if (rg_conn_send(t->conn, &cmd, &asking_priv) != 0) {
        requeue_batch(s, b);
        rg_map_refresh(s->map, 20);
        return 1;
    }
    /* The same call, now owed by the target. */
    batch_unlink(b);
    b->asked = 1;
    batch_send(s, t, b);
    return 2;
}

/* Stop: answer everything held with RG_ERR_CLOSED and close every handle;
 * uv_run then returns once their close callbacks have run (and any
 * resolution still running on the thread pool has returned). */
static void
shutdown_shard(rg_shard *s, rg_check *queued)
{
    int i;

    s->closing = 1;
    while (queued != NULL) {
        rg_check *next = queued->next;
        complete(s, queued, RG_ERR_CLOSED);
        queued = next;
    }
    fail_list(s, &s->waiting, RG_ERR_CLOSED);
    if (s->dest.disc != NULL)
        rg_disc_free(s->dest.disc); /* closes the Sentinel connections */
    s->dest.disc = NULL;
    for (i = 0; i < s->ndests; i++) {
        rg_dest *d = s->dests[i];
        rg_conn *c = d->conn;
        d->conn = NULL;
        d->node = NULL;
        if (c != NULL)
            rg_conn_close(c); /* answers every sent check */
        if (d != &s->dest)
            uv_close((uv_handle_t *)&d->retry_timer, node_closed);
    }
    s->ndests = 0;
    if (s->map != NULL)
        rg_map_free(s->map); /* closes its connection; the nodes go (their dests went) */
    s->map = NULL;
    rg_conn_memo_clear(&s->dest.memo);
    for (i = 0; i < s->eng->cfg.nseeds; i++)
        rg_conn_memo_clear(&s->seed_memo[i]);
    flush(s);
    shard_close_handles(s);
}

static void
wake_cb(uv_async_t *a)
{
    rg_shard *s = a->data;
    rg_check *c;
    int stopping;
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
    now = rg_now_ns();
    while (c != NULL) {
        rg_check *next = c->next;
        c->cslot = -1;
        dispatch_one(s, c, now);
        c = next;
    }
    dispatch_flush(s);
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

/* Whether any destination owes replies to script calls. */
static int
shard_owes(rg_shard *s)
{
    int i;
    for (i = 0; i < s->ndests; i++)
        if (s->dests[i]->bsentinel.next != &s->dests[i]->bsentinel)
            return 1;
    return 0;
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

    for (;;) {
        if (spin != 0 && !s->closing && shard_owes(s) && spin_pays(s, spin)) {
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
                if (!queued && !shard_owes(s))
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

static void shard_discard(rg_shard *s);

static int
shard_init(rg_engine *e, rg_shard *s, int i, char *errbuf, size_t errlen)
{
    int r;

    memset(s, 0, sizeof(*s));
    s->eng = e;
    s->index = i;
    s->rand_state = (unsigned int)(rg_now_ns() ^ (uint64_t)(uintptr_t)s);
    list_init(&s->waiting);
    list_init(&s->sent);
    s->start_ns = rg_now_ns();
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
    uv_check_init(&s->loop, &s->after_poll);
    uv_idle_init(&s->loop, &s->poll_now);
    uv_check_start(&s->after_poll, after_poll_cb);
    dest_init(s, &s->dest);
    /* The shard's own copies: each remembers its server (TLS session). */
    for (r = 0; r < e->cfg.nseeds; r++) {
        s->seeds[r] = e->seed_conn[r];
        s->seeds[r].memo = &s->seed_memo[r];
    }
    s->dest.ccfg = e->conn;
    s->dest.ccfg.memo = &s->dest.memo;
    s->wake.data = s;
    s->deadline_timer.data = s;
    s->after_poll.data = s;
    s->poll_now.data = s;
    if (e->cfg.cluster) {
        /* The nodes come from the slot map, asked for at once. */
        s->map = rg_map_new(&s->loop, s->seeds, e->cfg.nseeds, &map_ops, s);
        if (s->map == NULL) {
            snprintf(errbuf, errlen, "out of memory");
            shard_discard(s);
            return -1;
        }
        return 0;
    }
    if (dests_add(s, &s->dest) != 0) {
        snprintf(errbuf, errlen, "out of memory");
        shard_discard(s);
        return -1;
    }
    if (e->cfg.nseeds > 0) {
        s->dest.ccfg.host = s->dest.host;
        s->dest.ccfg.path = NULL;
        s->dest.ccfg.check_role = 1; /* Sentinel's answer may be stale */
        s->dest.disc = rg_disc_new(&s->loop, s->seeds, e->cfg.nseeds, e->cfg.service,
                                   &disc_ops, &s->dest);
        if (s->dest.disc == NULL) {
            snprintf(errbuf, errlen, "out of memory");
            shard_discard(s);
            return -1;
        }
    }
    /* The first connect runs on the loop thread as soon as it starts;
     * until it completes (or fails) checks wait for it, within deadline. */
    s->dest.state = RG_CONNECTING;
    s->dest.first_ns = s->start_ns;
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
    free(s->dests);
    s->dests = NULL;
}

/* Close a shard whose thread never ran (start failed half-way). */
static void
shard_discard(rg_shard *s)
{
    if (s->dest.disc != NULL)
        rg_disc_free(s->dest.disc); /* never asked anything: no connection */
    s->dest.disc = NULL;
    if (s->map != NULL)
        rg_map_free(s->map); /* never ran: no connection */
    s->map = NULL;
    shard_close_handles(s);
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
    unsigned char md[SHA_DIGEST_LENGTH];
    int i;

    /* EVALSHA names the cross-slot script by this; a node that lacks it
     * answers NOSCRIPT, and EVAL loads it. */
    SHA1((const unsigned char *)rg_script_xslot, rg_script_xslot_len, md);
    for (i = 0; i < SHA_DIGEST_LENGTH; i++)
        snprintf(e->xslot_sha + 2 * i, 3, "%02x", md[i]);

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
    /* The seeds: their own address, no database, no script (the handshake
     * is a PING), the same TLS; a Sentinel's own credentials. */
    for (i = 0; i < cfg->nseeds; i++) {
        rg_conn_cfg *sc = &e->seed_conn[i];
        *sc = *cc;
        sc->host = cfg->seed_hosts[i];
        sc->port = cfg->seed_ports[i];
        sc->path = NULL;
        if (!cfg->cluster) {
            sc->username = cfg->sentinel_username;
            sc->username_len = cfg->sentinel_username_len;
            sc->password = cfg->sentinel_password;
            sc->password_len = cfg->sentinel_password_len;
        }
        sc->db = 0;
        sc->script = NULL;
        sc->script_len = 0;
    }
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
    rg_msgf(e->loadavg, sizeof(e->loadavg), "%s", path);
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
        char name[16];
        int r = pthread_create(&s->thread, NULL, shard_main, s);
        if (r != 0) {
            snprintf(errbuf, errlen, "pthread_create: %s", strerror(r));
            break;
        }
        s->thread_started = 1;
        /* Named for ps/top/py-spy (15 characters at most), here rather than
         * in the thread: named before start returns, whenever it runs. */
        snprintf(name, sizeof(name), "rategate-loop-%d", s->index);
        pthread_setname_np(s->thread, name);
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
    rg_topo_snap *t;
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
    pthread_mutex_lock(&e->topo_mu);
    t = e->topo;
    e->topo = NULL;
    pthread_mutex_unlock(&e->topo_mu);
    rg_topo_snap_decref(t);
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
    pthread_mutex_init(&e->topo_mu, NULL);
    e->topo = NULL; /* the parent's: immutable, but its count may be mid-update */
}

void
rg_engine_free_cfg(rg_engine_cfg *cfg)
{
    free(cfg->host);
    free(cfg->path);
    free(cfg->password);
    free(cfg->username);
    for (int i = 0; i < cfg->nseeds; i++) {
        free(cfg->seed_hosts[i]);
        cfg->seed_hosts[i] = NULL;
    }
    cfg->nseeds = 0;
    free(cfg->service);
    free(cfg->sentinel_username);
    free(cfg->sentinel_password);
    cfg->service = cfg->sentinel_username = cfg->sentinel_password = NULL;
    if (cfg->tls != NULL)
        rg_tls_ctx_free(cfg->tls);
    cfg->tls = NULL;
    cfg->host = cfg->path = cfg->password = cfg->username = NULL;
}
