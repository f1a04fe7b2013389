/*
 * pyengine.c: the engines as Python objects, and the ports that hand their
 * decisions to asyncio.
 *
 * Engine       a Redis engine: submit() returns a Decision when it can
 *              answer at once (the over-limit cache, fail-fast while Redis
 *              is down, overload) and otherwise an asyncio future that the
 *              loop thread's answer resolves.
 * Port         one per (engine, asyncio loop): a C port (port.h) whose
 *              eventfd the loop watches with add_reader, and the futures
 *              waiting on it, by slot.  _drain() resolves every finished
 *              check in one call.
 * (MemoryEngine and ShmEngine, which answer in the caller's thread, are in
 * pylocal.c.)
 *
 * All of this runs with the GIL held; the only calls into the loop threads
 * are rg_engine_start/submit/stop (engine.h).
 */
#include "module.h"

#include <structmember.h>

#include "cache.h"
#include "engine.h"
#include "lease.h"
#include "port.h"
#include "topk.h"

typedef struct PortObject PortObject;

typedef struct {
    PyObject_HEAD
    rg_state *st;
    PyObject *module;    /* keeps st alive */
    rg_engine eng;
    rg_cache cache;
    rg_lease_table lease;
    rg_counters k;
    rg_denials denials;  /* the keys denied most, distinct clients (topk.h) */
    int failure_open;
    int closed;
    unsigned long fork_gen;
    PyObject *ports;     /* dict: loop -> Port */
    PyObject *last_loop; /* the loop of the last submit, and its port */
    PortObject *last_port;
    PyObject *weakreflist;
    int err_mu_ready;    /* eng.err_mu was initialised (dealloc destroys it) */
} EngineObject;

struct PortObject {
    PyObject_HEAD
    EngineObject *engine; /* strong */
    PyObject *loop;       /* strong */
    rg_port *port;        /* our reference; NULL once shut down */
    unsigned long fork_gen;
    int registered;       /* the eventfd is watched by loop */
    PyObject **futs;      /* slot -> future (strong), NULL if free */
    uint32_t *next_free;
    uint32_t cap, free_head, used;
};

#define NO_SLOT UINT32_MAX

/* The range of timeout, connect_timeout and stall_timeout, in seconds (the
 * same in limiter.py): a day is far inside uint64 nanoseconds added to the
 * monotonic clock, and inside libuv's millisecond timers. */
#define RG_MIN_SECONDS 1e-6
#define RG_MAX_SECONDS 86400.0

/* ---- Port -------------------------------------------------------------------- */

static int
port_grow(PortObject *p)
{
    uint32_t cap = p->cap ? p->cap * 2 : 64, i;
    PyObject **f;
    uint32_t *nf;

    if (cap <= p->cap) {
        PyErr_NoMemory();
        return -1;
    }
    f = PyMem_Realloc(p->futs, cap * sizeof(*f));
    if (f == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    p->futs = f;
    nf = PyMem_Realloc(p->next_free, cap * sizeof(*nf));
    if (nf == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    p->next_free = nf;
    for (i = p->cap; i < cap; i++) {
        p->futs[i] = NULL;
        p->next_free[i] = i + 1 < cap ? i + 1 : p->free_head;
    }
    p->free_head = p->cap;
    p->cap = cap;
    return 0;
}

/* Park a future (new reference taken) and return its slot. */
static int
port_park(PortObject *p, PyObject *fut, uint32_t *slot)
{
    uint32_t s;
    if (p->free_head == NO_SLOT && port_grow(p) < 0)
        return -1;
    s = p->free_head;
    p->free_head = p->next_free[s];
    p->futs[s] = Py_NewRef(fut);
    p->used++;
    *slot = s;
    return 0;
}

/* Take the future out of its slot (reference passed to the caller). */
static PyObject *
port_unpark(PortObject *p, uint32_t s)
{
    PyObject *f;
    if (s >= p->cap || p->futs[s] == NULL)
        return NULL;
    f = p->futs[s];
    p->futs[s] = NULL;
    p->next_free[s] = p->free_head;
    p->free_head = s;
    p->used--;
    return f;
}

static int engine_fire(EngineObject *self, const char *key, size_t keylen, rg_spec *spec,
                       int op, long long cost, uint64_t hash, const char *sid, size_t sidlen);

/* A lease's take answered (lease.h): the tokens past the request's own go
 * to the key's lease (or back to Redis if the lease is gone); *r becomes the
 * request's answer (allowed: the remaining counts what the lease holds).
 * No Python code runs here. */
static void
lease_taken(EngineObject *e, const rg_check *c, rg_result *r)
{
    int64_t got = c->err == RG_ERR_NONE && r->allowed >= 1 ? r->allowed : 0;
    rg_lease *l = rg_lease_find(&e->lease, c->hash, c->spec->id, c->key, c->keylen);

    if (got > 0)
        r->allowed = 1;
    if (l != NULL) {
        l->taking_ns = 0;
        if (got > 1) {
            uint64_t until = c->submit_ns + c->spec->lease_ttl_ns, now = rg_now_ns();
            if (l->tokens > 0 && now < l->expires_ns) {
                l->tokens += got - 1; /* an earlier take's: the earlier expiry holds */
                if (until < l->expires_ns)
                    l->expires_ns = until;
            } else {
                l->tokens = got - 1;
                l->expires_ns = until;
            }
            l->remaining = r->remaining;
            l->rate = r->rate;
            l->reset_ns = c->submit_ns + (uint64_t)(r->reset_us > 0 ? r->reset_us : 0) * 1000u;
            r->remaining += l->tokens;
        }
    } else if (got > 1) {
        engine_fire(e, c->key, c->keylen, c->spec, RG_OP_CHARGE, -(got - 1), c->hash, NULL, 0);
    }
}

/* Turn a finished check into its Decision, counted, and teach the cache
 * what Redis said about a cost of 1 (see cache.h): denied, or allowed.  A
 * charge is not a check: it is not counted, and only makes the cache
 * forget the key (a refund may have ended a denial). */
static PyObject *
engine_decide(EngineObject *e, const rg_check *c)
{
    rg_state *st = e->st;
    rg_counters scratch, *k = c->op == RG_OP_CHARGE ? &scratch : &e->k;
    rg_result res = c->res;
    PyObject *d;

    if (c->lease)
        lease_taken(e, c, &res);
    if (c->err != RG_ERR_NONE) {
        d = rg_failure(st, k, c->spec, e->failure_open, c->err);
    } else {
        if (c->op == RG_OP_HIT && !res.allowed && res.block_us > 0) {
            /* Counted from submission, which is before Redis read its clock:
             * the cached block ends no later than Redis's (see cache.h). */
            rg_cache_put(&e->cache, c->hash, c->spec->id, c->key, c->keylen,
                         c->submit_ns + (uint64_t)res.block_us * 1000u,
                         c->submit_ns +
                             (uint64_t)(res.reset_us > 0 ? res.reset_us : 0) * 1000u,
                         res.rate, rg_now_ns());
        } else if (c->op == RG_OP_CHARGE || !res.allowed || c->cost >= 1 ||
                   res.remaining >= 1) {
            /* A cost of 1 is allowed now (a peek that leaves no token says
             * nothing about that, and changes nothing). */
            rg_cache_forget(&e->cache, c->hash, c->spec->id, c->key, c->keylen);
        }
        if (c->op == RG_OP_HIT && !res.allowed)
            rg_denials_note(&e->denials, c->hash, c->key, c->keylen, rg_now_ns());
        /* a lease's take answers its request, of cost 1 */
        d = rg_answer(st, k, c->spec, &res, c->lease ? 1 : c->cost);
    }
    if (d != NULL && c->done_ns >= c->submit_ns && c->done_ns != 0)
        ((DecisionObject *)d)->latency = (double)(c->done_ns - c->submit_ns) / 1e9;
    return d;
}

/* The future waiting for finished check c (a new reference), out of its
 * slot, or NULL: nobody waits (any more).  A connect()'s checks share one
 * future (rg_group): the first failure takes it, or the last shard's
 * answer; `forget`: c is dropped unanswered (its port is shutting down). */
static PyObject *
port_take(PortObject *p, const rg_check *c, int forget)
{
    rg_group *g = c->cmd != NULL ? c->cmd->group : NULL;

    if (g != NULL) {
        if (g->done)
            return NULL;
        if (!forget && c->err == RG_ERR_NONE && --g->left > 0)
            return NULL;
        g->done = 1;
    }
    return port_unpark(p, c->slot);
}

/* fut.set_result(v), or fut.set_exception(v).  A future cancelled
 * meanwhile (its task was cancelled) or a closed loop refusing the
 * callback: nobody can have the answer. */
static void
port_settle(PortObject *p, PyObject *fut, int exc, PyObject *v)
{
    PyObject *r = exc ? PyObject_CallMethod(fut, "set_exception", "O", v)
                      : PyObject_CallMethodOneArg(fut, p->engine->st->s_set_result, v);
    if (r == NULL) {
        if (PyErr_ExceptionMatches(p->engine->st->InvalidStateError) ||
            PyErr_ExceptionMatches(PyExc_RuntimeError))
            PyErr_Clear();
        else
            PyErr_WriteUnraisable(fut);
    }
    Py_XDECREF(r);
}

/* A reply (plain C, see check.h) as Python: int, bytes (bulk), str
 * (status), None (nil), list; an error inside an array (EXEC's) is a
 * ReplyError instance, as redis-py gives it.  A new reference, or NULL
 * with an exception. */
static PyObject *
reply_to_py(rg_state *st, const rg_reply *r)
{
    PyObject *o, *t;
    size_t i;

    switch (r->type) {
    case RG_REPLY_INT:
        return PyLong_FromLongLong(r->integer);
    case RG_REPLY_BULK:
        return PyBytes_FromStringAndSize(r->str, (Py_ssize_t)r->len);
    case RG_REPLY_STATUS:
        return PyUnicode_DecodeUTF8(r->str, (Py_ssize_t)r->len, "surrogateescape");
    case RG_REPLY_ERROR:
        t = PyUnicode_DecodeUTF8(r->str, (Py_ssize_t)r->len, "replace");
        o = t != NULL ? PyObject_CallOneArg(st->ReplyError, t) : NULL;
        Py_XDECREF(t);
        return o;
    case RG_REPLY_ARRAY:
        o = PyList_New((Py_ssize_t)r->n);
        for (i = 0; o != NULL && i < r->n; i++) {
            t = reply_to_py(st, &r->elem[i]);
            if (t == NULL)
                Py_CLEAR(o);
            else
                PyList_SET_ITEM(o, (Py_ssize_t)i, t);
        }
        return o;
    default:
        Py_RETURN_NONE;
    }
}

/* What an operator's op that did not succeed raises: ReplyError (the
 * server's error text); a command past its deadline TimeoutError; else
 * (a connect() too) ConnectionError naming the cause.  A new reference,
 * or NULL with an exception. */
static PyObject *
cmd_exception(rg_state *st, const rg_check *c)
{
    const rg_cmd *cmd = c->cmd;

    if (c->err == RG_ERR_NONE)
        return reply_to_py(st, cmd->reply); /* an error reply: a ReplyError */
    return PyObject_CallFunction(c->err == RG_ERR_TIMEOUT && c->op == RG_OP_COMMAND
                                     ? PyExc_TimeoutError
                                     : PyExc_ConnectionError,
                                 "s", cmd->why[0] ? cmd->why : "not connected");
}

/* Resolve the future of a finished COMMAND or CONNECT check, then free the
 * check.  A reply that cannot be turned into Python (out of memory) puts
 * that error on the future. */
static void
port_resolve_cmd(PortObject *p, rg_check *c)
{
    rg_state *st = p->engine->st;
    PyObject *fut = port_take(p, c, 0), *v;
    int exc = c->err != RG_ERR_NONE || (c->op == RG_OP_COMMAND && c->cmd->reply->type == RG_REPLY_ERROR);

    if (fut == NULL) {
        rg_check_free(c);
        return;
    }
    if (exc)
        v = cmd_exception(st, c);
    else if (c->op == RG_OP_CONNECT)
        v = Py_NewRef(Py_None);
    else
        v = reply_to_py(st, c->cmd->reply);
    rg_check_free(c);
    if (v == NULL) {
        PyObject *et, *tb;
        PyErr_Fetch(&et, &v, &tb);
        PyErr_NormalizeException(&et, &v, &tb);
        Py_XDECREF(et);
        Py_XDECREF(tb);
        exc = 1;
        if (v == NULL) {
            Py_DECREF(fut);
            return;
        }
    }
    port_settle(p, fut, exc, v);
    Py_DECREF(v);
    Py_DECREF(fut);
}

/* Resolve the future of one finished check, then free the check.  A hit
 * or a charge gets its Decision; a reset gets True, or False if the store
 * could not be reached (nothing is counted). */
static void
port_resolve(PortObject *p, rg_check *c)
{
    PyObject *fut, *dec;

    if (c->cmd != NULL) {
        port_resolve_cmd(p, c);
        return;
    }
    fut = port_take(p, c, 0);
    if (c->op == RG_OP_RESET) {
        /* A denial answered while the reset was in flight may have put the
         * key back: forget it again. */
        rg_cache_forget_key(&p->engine->cache, c->hash, c->key, c->keylen);
        dec = Py_NewRef(c->err == RG_ERR_NONE ? Py_True : Py_False);
    } else {
        dec = engine_decide(p->engine, c);
    }
    rg_check_free(c);
    if (fut == NULL) {
        Py_XDECREF(dec);
        return;
    }
    if (dec == NULL) {
        PyErr_WriteUnraisable((PyObject *)p);
        Py_DECREF(fut);
        return;
    }
    port_settle(p, fut, 0, dec);
    Py_DECREF(dec);
    Py_DECREF(fut);
}

static PyObject *
port_drain(PortObject *self, PyObject *unused)
{
    rg_check *c;
    (void)unused;

    if (self->port == NULL || self->fork_gen != rg_fork_generation)
        Py_RETURN_NONE;
    c = rg_port_take(self->port);
    while (c != NULL) {
        rg_check *next = c->next;
        port_resolve(self, c);
        c = next;
    }
    Py_RETURN_NONE;
}

/*
 * Let go of the C port.  `resolve`: answer what already arrived (the loop is
 * usable); otherwise just drop it.  Checks still inside the engine are freed
 * by the loop thread when it pushes them (the port is closed).  After a fork
 * the C port belongs to the parent: leave it alone, leak it.
 *
 * The C port is moved out of the object before any call into Python
 * (is_closed, remove_reader, set_result): another thread may come here for
 * the same port meanwhile (close(), a new loop's first submit), and must find
 * nothing left to close.  A cleanup: an exception in flight when it is
 * called (the caller's error path, a dealloc) is kept, and none is raised.
 */
static void
port_shutdown(PortObject *self, int resolve)
{
    rg_port *cp = self->port;
    int registered = self->registered;
    PyObject *et, *ev, *tb;
    rg_check *c;
    uint32_t i;

    if (cp == NULL)
        return;
    PyErr_Fetch(&et, &ev, &tb);
    self->port = NULL;
    self->registered = 0;
    if (self->fork_gen == rg_fork_generation) {
        c = rg_port_close(cp); /* from here, the loop threads free what they push */
        if (registered) {
            PyObject *r;
            int closed = 1;
            r = PyObject_CallMethodNoArgs(self->loop, self->engine->st->s_is_closed);
            if (r != NULL) {
                closed = PyObject_IsTrue(r);
                Py_DECREF(r);
            }
            if (closed == 0) {
                PyObject *fd = PyLong_FromLong(cp->efd); /* open: we hold cp */
                r = fd ? PyObject_CallMethodOneArg(self->loop, self->engine->st->s_remove_reader, fd)
                       : NULL;
                Py_XDECREF(fd);
                Py_XDECREF(r);
            }
            PyErr_Clear();
        }
        while (c != NULL) {
            rg_check *next = c->next;
            if (resolve) {
                port_resolve(self, c);
            } else {
                PyObject *f = port_take(self, c, 1);
                Py_XDECREF(f);
                rg_check_free(c);
            }
            c = next;
        }
        rg_port_decref(cp);
    }
    /* One at a time through the free list: dropping a future may run code. */
    for (i = 0; i < self->cap; i++) {
        PyObject *f = port_unpark(self, i);
        Py_XDECREF(f);
    }
    PyErr_Restore(et, ev, tb);
}
/* Shut down from the port's own loop (scheduled by close() from elsewhere). */
static PyObject *
port_close_in_loop(PortObject *self, PyObject *unused)
{
    (void)unused;
    port_drain(self, NULL);
    port_shutdown(self, 1);
    Py_RETURN_NONE;
}

static PortObject *
port_new(EngineObject *e, PyObject *loop)
{
    rg_state *st = e->st;
    PortObject *p;
    PyObject *fd = NULL, *cb = NULL, *r = NULL;

    p = (PortObject *)st->PortType->tp_alloc(st->PortType, 0);
    if (p == NULL)
        return NULL;
    p->engine = (EngineObject *)Py_NewRef(e);
    p->loop = Py_NewRef(loop);
    p->fork_gen = rg_fork_generation;
    p->free_head = NO_SLOT;
    p->port = rg_port_new();
    if (p->port == NULL) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto error;
    }
    fd = PyLong_FromLong(p->port->efd);
    cb = PyObject_GetAttr((PyObject *)p, st->s_drain);
    if (fd == NULL || cb == NULL)
        goto error;
    r = PyObject_CallMethodObjArgs(loop, st->s_add_reader, fd, cb, NULL);
    if (r == NULL)
        goto error;
    p->registered = 1;
    Py_DECREF(r);
    Py_DECREF(fd);
    Py_DECREF(cb);
    return p;
error:
    Py_XDECREF(fd);
    Py_XDECREF(cb);
    Py_DECREF(p);
    return NULL;
}

static int
port_traverse(PortObject *self, visitproc visit, void *arg)
{
    uint32_t i;
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->engine);
    Py_VISIT(self->loop);
    for (i = 0; i < self->cap; i++)
        Py_VISIT(self->futs[i]);
    return 0;
}

static int
port_clear(PortObject *self)
{
    uint32_t i;
    for (i = 0; i < self->cap; i++)
        Py_CLEAR(self->futs[i]);
    Py_CLEAR(self->loop);
    Py_CLEAR(self->engine);
    return 0;
}

/* The last reference is gone (or the GC found a cycle): unregister from the
 * loop while both are still whole.  tp_finalize, not tp_dealloc, because it
 * calls the loop (remove_reader): Python code, that may resurrect us. */
static void
port_finalize(PortObject *self)
{
    /* port_shutdown keeps any exception in flight where the last reference
     * was dropped. */
    if (self->port != NULL && self->engine != NULL && self->loop != NULL)
        port_shutdown(self, 0);
}

static void
port_dealloc(PortObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);

    if (PyObject_CallFinalizerFromDealloc((PyObject *)self) < 0)
        return; /* resurrected */
    PyObject_GC_UnTrack(self);
    if (self->port != NULL) {
        /* Cleared by the GC before finalizing could reach the loop: let go
         * of the C port without it (the loop's reader holds a bound method
         * of ours, so a loop still watching the fd cannot get here). */
        if (self->fork_gen == rg_fork_generation) {
            rg_check *c = rg_port_close(self->port);
            while (c != NULL) {
                rg_check *next = c->next;
                rg_check_free(c);
                c = next;
            }
            rg_port_decref(self->port);
        }
        self->port = NULL;
    }
    port_clear(self);
    PyMem_Free(self->futs);
    PyMem_Free(self->next_free);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}
static PyMethodDef port_methods[] = {
    {"_drain", (PyCFunction)port_drain, METH_NOARGS, "Resolve every finished check."},
    {"_close_in_loop", (PyCFunction)port_close_in_loop, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot port_slots[] = {
    {Py_tp_dealloc, port_dealloc},
    {Py_tp_finalize, port_finalize},
    {Py_tp_traverse, port_traverse},
    {Py_tp_clear, port_clear},
    {Py_tp_methods, port_methods},
    {0, NULL},
};

static PyType_Spec port_spec = {
    .name = "rategate._core.Port",
    .basicsize = sizeof(PortObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE |
             Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = port_slots,
};

/* ---- Engine ------------------------------------------------------------------- */

static char *
dup_arg(PyObject *o, size_t *len, const char *what)
{
    const char *s;
    Py_ssize_t n;
    char *out;

    if (o == Py_None)
        return NULL;
    if (PyBytes_Check(o)) {
        s = PyBytes_AS_STRING(o);
        n = PyBytes_GET_SIZE(o);
    } else if (PyUnicode_Check(o)) {
        s = PyUnicode_AsUTF8AndSize(o, &n);
        if (s == NULL)
            return NULL;
    } else {
        PyErr_Format(PyExc_TypeError, "%s must be str, bytes or None", what);
        return NULL;
    }
    out = malloc((size_t)n + 1);
    if (out == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    memcpy(out, s, (size_t)n);
    out[n] = '\0';
    if (len != NULL)
        *len = (size_t)n;
    return out;
}

/* The seeds (Sentinels, or cluster nodes) into the engine's cfg (a list
 * of 1..RG_MAX_SEEDS (host, port) pairs, checked by the caller), and the
 * Sentinel's service and credentials (None for a cluster).  0, or -1 with
 * an error; what was copied is freed with the cfg. */
static int
engine_seeds(EngineObject *self, PyObject *list, PyObject *service, PyObject *user,
                 PyObject *pass)
{
    rg_engine_cfg *cfg = &self->eng.cfg;
    Py_ssize_t i;

    for (i = 0; i < PyList_GET_SIZE(list); i++) {
        PyObject *item = PyList_GET_ITEM(list, i);
        PyObject *h;
        int p;
        if (!PyTuple_Check(item) || !PyArg_ParseTuple(item, "Ui", &h, &p)) {
            if (!PyErr_Occurred() || PyErr_ExceptionMatches(PyExc_TypeError)) {
                PyErr_Clear();
                PyErr_SetString(PyExc_TypeError, "each seed must be a (host, port) tuple");
            }
            return -1;
        }
        if (p < 1 || p > 65535) {
            PyErr_Format(PyExc_ValueError, "a seed's port must be 1..65535, got %d", p);
            return -1;
        }
        cfg->seed_hosts[i] = dup_arg(h, NULL, "a seed's host");
        if (cfg->seed_hosts[i] == NULL)
            return -1;
        cfg->seed_ports[i] = p;
        cfg->nseeds = (int)i + 1;
    }
    if (cfg->cluster)
        return 0;
    cfg->service = dup_arg(service, NULL, "service");
    if (cfg->service == NULL)
        return -1;
    cfg->sentinel_username = dup_arg(user, &cfg->sentinel_username_len, "sentinel_username");
    if (PyErr_Occurred())
        return -1;
    cfg->sentinel_password = dup_arg(pass, &cfg->sentinel_password_len, "sentinel_password");
    if (PyErr_Occurred())
        return -1;
    return 0;
}

/* A duration option: a finite number of seconds within [lo, hi], so that
 * it fits uint64 nanoseconds and a libuv timer with room to add it to the
 * clock.  0, or -1 with a ValueError naming the option and its range. */
static int
check_seconds(const char *name, double v, double lo, double hi)
{
    PyObject *got;
    char range[64];

    if (v >= lo && v <= hi) /* false for NaN */
        return 0;
    /* PyErr_Format has no float conversion (3.12+ raise SystemError on
     * %g, 3.11 copies it verbatim): the bounds are formatted here. */
    snprintf(range, sizeof(range), "from %g to %g", lo, hi);
    got = PyFloat_FromDouble(v);
    if (got != NULL) {
        PyErr_Format(PyExc_ValueError, "%s must be a number of seconds %s, got %R", name, range, got);
        Py_DECREF(got);
    }
    return -1;
}

static PyObject *
engine_tp_new(PyTypeObject *tp, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"host", "port", "path", "username", "password", "db",
                             "timeout", "failure_open", "threads", "max_pending",
                             "cache_size", "connect_timeout", "stall_timeout", "spin",
                             "deny_cache_ttl", "tls", "ssl_ca_certs", "ssl_certfile",
                             "ssl_keyfile", "ssl_verify", "ssl_check_hostname", "seeds",
                             "service", "sentinel_username", "sentinel_password", "cluster",
                             NULL};
    PyObject *host, *path, *user, *pass;
    PyObject *seeds = Py_None, *service = Py_None, *s_user = Py_None, *s_pass = Py_None;
    int cluster = 0;
    const char *ca = NULL, *certfile = NULL, *keyfile = NULL;
    int port, db, failure_open, threads, tls = 0, verify = 1, check_hostname = 1;
    long max_pending;
    Py_ssize_t cache_size;
    double timeout, connect_timeout, stall_timeout, spin = 0.0, ttl = 1.0;
    rg_state *st = rg_state_of_type(tp);
    EngineObject *self;

    if (st == NULL)
        return NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OiOOOidpilndd|ddpzzzppOOOOp:Engine", kwlist,
                                     &host, &port, &path, &user, &pass, &db, &timeout,
                                     &failure_open, &threads, &max_pending, &cache_size,
                                     &connect_timeout, &stall_timeout, &spin, &ttl, &tls, &ca,
                                     &certfile, &keyfile, &verify, &check_hostname, &seeds,
                                     &service, &s_user, &s_pass, &cluster)) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError,
                            "Engine: an integer argument is out of range (port, db, threads, "
                            "max_pending or cache_size); Limiter() checks each and names it");
        }
        return NULL;
    }
    if (check_seconds("timeout", timeout, RG_MIN_SECONDS, RG_MAX_SECONDS) < 0 ||
        check_seconds("connect_timeout", connect_timeout, RG_MIN_SECONDS, RG_MAX_SECONDS) < 0 ||
        check_seconds("stall_timeout", stall_timeout, RG_MIN_SECONDS, RG_MAX_SECONDS) < 0 ||
        check_seconds("spin", spin, 0.0, 0.01) < 0 ||
        check_seconds("deny_cache_ttl", ttl, 0.001, 3600.0) < 0)
        return NULL;
    if (threads < 1 || threads > 64 || max_pending < 1 || cache_size < 0 || db < 0 || port < 0 ||
        port > 65535) {
        PyErr_SetString(PyExc_ValueError, "threads must be 1..64, max_pending >= 1, "
                                          "cache_size >= 0, db >= 0, port 0..65535");
        return NULL;
    }
    if (seeds != Py_None) {
        if (!PyList_Check(seeds) || PyList_GET_SIZE(seeds) < 1 ||
            PyList_GET_SIZE(seeds) > RG_MAX_SEEDS || (service != Py_None) == !!cluster ||
            host != Py_None || path != Py_None || (cluster && db != 0)) {
            PyErr_Format(PyExc_ValueError,
                         "seeds must be a list of 1 to %d (host, port) pairs, with either "
                         "service (Sentinel) or cluster=True (db 0), and without host or path",
                         RG_MAX_SEEDS);
            return NULL;
        }
    } else if ((host == Py_None) == (path == Py_None)) {
        PyErr_SetString(PyExc_ValueError, "give exactly one of host and path");
        return NULL;
    }
    self = (EngineObject *)tp->tp_alloc(tp, 0);
    if (self == NULL)
        return NULL;
    self->st = st;
    self->fork_gen = rg_fork_generation;
    self->failure_open = failure_open;
    atomic_init(&self->eng.outstanding, 0);
    atomic_init(&self->eng.reconnects, 0);
    atomic_init(&self->eng.wakeups_loop, 0);
    atomic_init(&self->eng.wakeups_port, 0);
    atomic_init(&self->eng.spins, 0);
    atomic_init(&self->eng.spin_hits, 0);
    if (pthread_mutex_init(&self->eng.err_mu, NULL) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "pthread_mutex_init failed");
        goto error;
    }
    if (pthread_mutex_init(&self->eng.topo_mu, NULL) != 0) {
        pthread_mutex_destroy(&self->eng.err_mu);
        PyErr_SetString(PyExc_RuntimeError, "pthread_mutex_init failed");
        goto error;
    }
    self->err_mu_ready = 1; /* and topo_mu */
    self->module = Py_XNewRef(PyType_GetModuleByDef(tp, &rg_module_def));
    if (self->module == NULL)
        goto error;
    self->eng.cfg.port = port;
    self->eng.cfg.db = db;
    self->eng.cfg.nshards = threads;
    self->eng.cfg.max_pending = max_pending;
    self->eng.cfg.timeout_ns = (uint64_t)(timeout * 1e9);
    self->eng.cfg.connect_timeout_ns = (uint64_t)(connect_timeout * 1e9);
    self->eng.cfg.stall_ns = (uint64_t)(stall_timeout * 1e9);
    self->eng.cfg.spin_ns = (uint64_t)(spin * 1e9);
    if ((self->ports = PyDict_New()) == NULL)
        goto error;
    self->eng.cfg.host = dup_arg(host, NULL, "host");
    if (PyErr_Occurred())
        goto error;
    self->eng.cfg.path = dup_arg(path, NULL, "path");
    if (PyErr_Occurred())
        goto error;
    self->eng.cfg.username = dup_arg(user, &self->eng.cfg.username_len, "username");
    if (PyErr_Occurred())
        goto error;
    self->eng.cfg.password = dup_arg(pass, &self->eng.cfg.password_len, "password");
    if (PyErr_Occurred())
        goto error;
    self->eng.cfg.cluster = cluster;
    if (seeds != Py_None && engine_seeds(self, seeds, service, s_user, s_pass) < 0)
        goto error;
    if (tls) {
        /* Made here, on the Python thread, so a bad file is a ValueError
         * now; the loop threads only make SSL objects from it (conn.c). */
        char err[600];
        self->eng.cfg.tls = rg_tls_ctx_new(ca, certfile, keyfile, verify, err, sizeof(err));
        if (self->eng.cfg.tls == NULL) {
            PyErr_SetString(PyExc_ValueError, err);
            goto error;
        }
        self->eng.cfg.tls_check_hostname = verify && check_hostname;
    }
    if (rg_cache_init(&self->cache, (size_t)cache_size, (uint64_t)(ttl * 1e9)) < 0) {
        PyErr_NoMemory();
        goto error;
    }
    /* While a key's entry is re-asked of Redis, the others are answered
     * from it for the re-asking check's deadline at most (and never longer
     * than the ttl), so a reset is still seen within about a ttl. */
    if (self->eng.cfg.timeout_ns < self->cache.refresh_ns)
        self->cache.refresh_ns = self->eng.cfg.timeout_ns;
    return (PyObject *)self;
error:
    Py_DECREF(self);
    return NULL;
}

/* After fork(), in the child: the parent's threads and ports are not ours. */
static void
engine_after_fork(EngineObject *self)
{
    PyObject *ports = PyDict_Values(self->ports); /* a snapshot: dropping futures runs code */
    Py_ssize_t i;

    rg_engine_abandon(&self->eng);
    if (ports != NULL) {
        for (i = 0; i < PyList_GET_SIZE(ports); i++) /* fork_gen differs: no touching */
            port_shutdown((PortObject *)PyList_GET_ITEM(ports, i), 0);
        Py_DECREF(ports);
    }
    PyErr_Clear(); /* out of memory for the snapshot: the ports are dropped below */
    PyDict_Clear(self->ports);
    Py_CLEAR(self->last_loop);
    Py_CLEAR(self->last_port);
    rg_lease_clear(&self->lease); /* the parent holds those tokens */
    rg_denials_clear(&self->denials); /* the parent's denials */
    self->fork_gen = rg_fork_generation;
}

/* Shut down the ports of loops that have closed.  The dict is snapshot
 * first: is_closed is a call into Python, during which other threads may
 * change it.  0, or -1 with an error. */
static int
engine_forget_closed_loops(EngineObject *self)
{
    PyObject *items = PyDict_Items(self->ports);
    Py_ssize_t i;
    int rc = -1;

    if (items == NULL)
        return -1;
    for (i = 0; i < PyList_GET_SIZE(items); i++) {
        PyObject *loop = PyTuple_GET_ITEM(PyList_GET_ITEM(items, i), 0);
        PyObject *port = PyTuple_GET_ITEM(PyList_GET_ITEM(items, i), 1);
        PyObject *r = PyObject_CallMethodNoArgs(loop, self->st->s_is_closed), *now;
        int closed = r == NULL ? -1 : PyObject_IsTrue(r);
        Py_XDECREF(r);
        if (closed < 0)
            goto done;
        if (!closed)
            continue;
        port_shutdown((PortObject *)port, 0);
        /* Delete only if the dict still maps the loop to this port. */
        now = PyDict_GetItemWithError(self->ports, loop);
        if (now == NULL && PyErr_Occurred())
            goto done;
        if (now == port && PyDict_DelItem(self->ports, loop) < 0)
            goto done;
    }
    rc = 0;
done:
    Py_DECREF(items);
    return rc;
}

/* The port of the running loop (a new reference), made on first use. */
static PortObject *
engine_port(EngineObject *self)
{
    rg_state *st = self->st;
    PyObject *loop = PyObject_CallNoArgs(st->get_running_loop);
    PortObject *port;

    if (loop == NULL)
        return NULL;
    if (loop == self->last_loop && self->last_port != NULL) {
        Py_DECREF(loop);
        return (PortObject *)Py_NewRef(self->last_port);
    }
    port = (PortObject *)Py_XNewRef(PyDict_GetItemWithError(self->ports, loop));
    if (port == NULL) {
        if (PyErr_Occurred())
            goto error;
        /* A new loop: forget ports of loops that have closed since. */
        if (engine_forget_closed_loops(self) < 0)
            goto error;
        port = port_new(self, loop);
        if (port == NULL)
            goto error;
        /* port_new called the loop: close() may have run meanwhile. */
        if (self->closed || PyDict_SetItem(self->ports, loop, (PyObject *)port) < 0) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_RuntimeError, "this Limiter is closed (aclose() was called)");
            port_shutdown(port, 0);
            Py_DECREF(port);
            goto error;
        }
    }
    /* Our references first: each swap may drop the last reference to the
     * previous loop or port, which runs arbitrary code. */
    Py_XSETREF(self->last_port, (PortObject *)Py_NewRef(port));
    Py_XSETREF(self->last_loop, loop); /* steals our reference */
    return port;
error:
    Py_DECREF(loop);
    return NULL;
}

/* The engine usable from this process and thread: not closed, started.
 * Runs no Python code (but after a fork, where only this thread exists).
 * 0, or -1 with RuntimeError. */
static int
engine_ready(EngineObject *self)
{
    if (self->closed) {
        PyErr_SetString(PyExc_RuntimeError, "this Limiter is closed (aclose() was called)");
        return -1;
    }
    if (self->fork_gen != rg_fork_generation)
        engine_after_fork(self);
    if (!self->eng.started) {
        char err[200];
        if (rg_engine_start(&self->eng, err, sizeof(err)) < 0) {
            PyErr_Format(PyExc_RuntimeError, "rategate: cannot start the engine: %s", err);
            return -1;
        }
    }
    return 0;
}

/*
 * The first half of every hand-over to the loop threads: the running
 * loop's port and a new future of it (new references in *portp, *futp).
 * Every call into Python comes first (the running loop, its port,
 * create_future): any of them lets other threads run, and one may close the
 * engine (freeing the shards) or shut the port down.  Then everything is
 * re-checked, and the caller pushes its check with no Python code in
 * between, so nothing close() frees is reachable from there.  0, or -1
 * with an error (nothing held).
 */
static int
engine_future(EngineObject *self, PortObject **portp, PyObject **futp)
{
    PortObject *port = engine_port(self);
    PyObject *fut = NULL;

    if (port == NULL)
        return -1;
    fut = PyObject_CallMethodNoArgs(port->loop, self->st->s_create_future);
    if (fut == NULL)
        goto error;
    /* ---- no Python code from here to the caller's push ---- */
    if (engine_ready(self) < 0)
        goto error;
    if (port->port == NULL || port->fork_gen != rg_fork_generation) {
        PyErr_SetString(PyExc_RuntimeError, "rategate: this event loop is closing");
        goto error;
    }
    *portp = port;
    *futp = fut;
    return 0;
error:
    Py_XDECREF(fut);
    Py_DECREF(port);
    return -1;
}

/* Hand c to shard, to be answered into port at its future's slot: the
 * port's reference, the queue, the wake-up.  No Python code. */
static void
engine_hand(EngineObject *self, PortObject *port, rg_check *c, uint32_t slot, rg_shard *shard)
{
    c->slot = slot;
    c->port = port->port;
    rg_port_incref(port->port);
    /* Wake the shard only onto an empty queue: it takes the whole queue at
     * once, so checks that arrive while it works ride in its next batch.
     * (Deferring the wake to the end of the event-loop iteration saved
     * syscalls but cost HTTP throughput: measured 0.75x /health against
     * 0.96x for this, over four interleaved runs; see the README.) */
    if (rg_engine_submit(&self->eng, shard, c) && rg_shard_needs_wake(shard))
        rg_engine_wake(shard);
}

/*
 * Hand one check (a hit, or a reset) to the loop threads; returns its future.
 * When the store cannot take it (shard down, too many outstanding), returns
 * at once what the future would have said: the failure Decision of a hit,
 * False for a reset.
 */
static PyObject *
engine_enqueue(EngineObject *self, const char *key, size_t keylen, SpecObject *spec,
               long long cost, int op, uint64_t hash, const char *sid, size_t sidlen,
               int lease)
{
    rg_state *st = self->st;
    PortObject *port;
    PyObject *fut = NULL, *res = NULL;
    rg_shard *shard;
    rg_check *c;
    uint32_t slot;
    uint64_t now;
    int err = RG_ERR_NONE;

    if (engine_future(self, &port, &fut) < 0)
        return NULL;
    now = rg_now_ns(); /* after the Python calls: deadlines stay in order */
    shard = &self->eng.shards[(hash >> 40) % (uint64_t)self->eng.cfg.nshards];
    if (atomic_load_explicit(&shard->down, memory_order_relaxed)) {
        err = RG_ERR_UNAVAILABLE;
    } else if (atomic_fetch_add_explicit(&self->eng.outstanding, 1, memory_order_relaxed) >=
               self->eng.cfg.max_pending) {
        atomic_fetch_sub_explicit(&self->eng.outstanding, 1, memory_order_relaxed);
        err = RG_ERR_OVERLOADED;
    }
    if (err != RG_ERR_NONE) {
        if (op == RG_OP_RESET) {
            res = Py_NewRef(Py_False);
        } else if (op == RG_OP_CHARGE) {
            rg_counters scratch;
            res = rg_failure(st, &scratch, spec->spec, self->failure_open, err);
        } else {
            self->k.checks++;
            res = rg_failure(st, &self->k, spec->spec, self->failure_open, err);
        }
        goto done;
    }
    c = rg_check_new(key, keylen, sid, sidlen);
    if (c == NULL) {
        PyErr_NoMemory();
        goto undo;
    }
    if (port_park(port, fut, &slot) < 0) { /* no Python code: PyMem and Py_NewRef */
        rg_check_free(c);
        goto undo;
    }
    c->hash = hash;
    c->spec = spec->spec;
    rg_spec_incref(spec->spec);
    c->cost = cost;
    c->op = op;
    c->lease = lease;
    c->submit_ns = now;
    c->deadline_ns = now + self->eng.cfg.timeout_ns;
    engine_hand(self, port, c, slot, shard);
    if (op == RG_OP_HIT)
        self->k.checks++;
    res = fut;
    fut = NULL;
    goto done;
undo:
    atomic_fetch_sub_explicit(&self->eng.outstanding, 1, memory_order_relaxed);
done:
    Py_XDECREF(fut);
    Py_DECREF(port);
    return res;
}

/* The denial of a key the deny cache holds (entry e, found at now), counted. */
static PyObject *
engine_cached(EngineObject *self, const rg_spec *sp, const rg_cache_entry *e, uint64_t now,
              const char *key, size_t keylen, uint64_t hash)
{
    rg_denials_note(&self->denials, hash, key, keylen, now);
    self->k.checks++;
    self->k.cached++;
    self->k.denied++;
    return rg_decision_new(self->st, 0, e->rate, sp->rates[e->rate].burst, 0,
                           e->reset_ns > now ? (double)(e->reset_ns - now) / 1e9 : 0.0,
                           (double)(e->until_ns - now) / 1e9, RG_ERR_NONE);
}

/*
 * submit() of a cost of 1 under a leasing spec (lease.h): a token of the
 * key's lease if it holds one, answered here; otherwise a take of a block
 * (one in flight per key), or, while one is in flight, a plain check.
 * The lease is read and updated with no Python code in between; the
 * allocations after it (the Decision, the future) may run some, so no
 * pointer into the table is kept across them.
 */
static PyObject *
engine_leased(EngineObject *self, const char *key, size_t keylen, SpecObject *spec,
              uint64_t hash)
{
    rg_state *st = self->st;
    rg_spec *sp = spec->spec;
    uint64_t now = rg_now_ns();
    rg_lease *l = rg_lease_get(&self->lease, hash, sp->id, key, keylen, now);
    int64_t refund = 0, block = 0;
    const rg_cache_entry *e;
    PyObject *r;

    if (l != NULL) {
        l->served++;
        if (l->tokens > 0 && now < l->expires_ns) {
            long long remaining;
            int rate = l->rate;
            double reset = l->reset_ns > now ? (double)(l->reset_ns - now) / 1e9 : 0.0;
            l->tokens--;
            remaining = (long long)(l->remaining + l->tokens);
            self->k.checks++;
            self->k.allowed++;
            self->k.leased++;
            return rg_decision_new(st, 1, rate, sp->rates[rate].burst, remaining, reset, 0.0,
                                   RG_ERR_NONE);
        }
    }
    /* Over the limit: the deny cache answers (see cache.h), with no take. */
    e = rg_cache_get(&self->cache, hash, sp->id, key, keylen, now);
    if (e != NULL)
        return engine_cached(self, sp, e, now, key, keylen, hash);
    /* l is still valid: no Python code since rg_lease_get */
    if (l != NULL && l->taking_ns <= now) { /* none in flight (or it can no longer answer) */
        refund = l->tokens; /* an expired lease's leftovers go back */
        l->tokens = 0;
        block = rg_lease_block(l, sp, now);
        l->taking_ns = now + self->eng.cfg.timeout_ns;
    }
    if (refund > 0)
        engine_fire(self, key, keylen, sp, RG_OP_CHARGE, -refund, hash, NULL, 0);
    if (block == 0) /* a take is in flight (or no room to lease): a plain check */
        return engine_enqueue(self, key, keylen, spec, 1, RG_OP_HIT, hash, NULL, 0, 0);
    r = engine_enqueue(self, key, keylen, spec, block, RG_OP_HIT, hash, NULL, 0, 1);
    if (r == NULL || Py_IS_TYPE(r, st->DecisionType)) {
        /* not sent: nothing is in flight */
        l = rg_lease_find(&self->lease, hash, sp->id, key, keylen);
        if (l != NULL)
            l->taking_ns = 0;
    }
    return r;
}

static PyObject *
engine_submit(EngineObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    rg_state *st = self->st;
    const char *key, *sid;
    Py_ssize_t keylen, sidlen;
    SpecObject *spec;
    long long cost;
    uint64_t hash;

    if (rg_parse_submit(st, args, nargs, &key, &keylen, &spec, &cost) < 0 ||
        rg_parse_sid(spec, args, nargs, &sid, &sidlen) < 0)
        return NULL;
    if (engine_ready(self) < 0)
        return NULL;
    hash = rg_hash(key, (size_t)keylen);
    if (spec->spec->lease && cost == 1)
        return engine_leased(self, key, (size_t)keylen, spec, hash);
    /* The cache knows the wait of a cost of 1; a larger cost waits longer
     * by an amount only Redis knows (several rates), so it asks Redis. */
    if (cost == 1) {
        uint64_t now = rg_now_ns();
        const rg_cache_entry *e =
            rg_cache_get(&self->cache, hash, spec->spec->id, key, (size_t)keylen, now);
        if (e != NULL)
            return engine_cached(self, spec->spec, e, now, key, (size_t)keylen, hash);
    }
    if (atomic_load_explicit(&self->eng.shards[(hash >> 40) % (uint64_t)self->eng.cfg.nshards].down,
                             memory_order_relaxed)) {
        /* Down: answer at once, without the cost of a future (re-checked
         * after it in engine_enqueue anyway). */
        self->k.checks++;
        return rg_failure(st, &self->k, spec->spec, self->failure_open, RG_ERR_UNAVAILABLE);
    }
    return engine_enqueue(self, key, (size_t)keylen, spec, cost, RG_OP_HIT, hash, sid,
                          (size_t)sidlen, 0);
}

/* charge(key, spec, cost) -> Future[Decision] | Decision: consume cost
 * (negative: refund) without denying.  Never answered from the deny cache;
 * not counted as a check.  A Decision at once when Redis is down. */
static PyObject *
engine_charge(EngineObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    const char *key;
    Py_ssize_t keylen;
    SpecObject *spec;
    long long cost;

    if (rg_parse_charge(self->st, args, nargs, &key, &keylen, &spec, &cost) < 0)
        return NULL;
    if (engine_ready(self) < 0)
        return NULL;
    return engine_enqueue(self, key, (size_t)keylen, spec, cost, RG_OP_CHARGE,
                          rg_hash(key, (size_t)keylen), NULL, 0, 0);
}

/*
 * Send one check that nobody waits for (a release, a lease's refund): it
 * carries no port, the loop thread frees it when answered (engine.c flush).
 * Needs no event loop and runs no Python code.  When it cannot be sent
 * (closed, not started, after fork, shard down, too many outstanding, out
 * of memory) it is dropped: a slot then expires after the spec's ttl, and
 * leased tokens are as if used (lease.h).  Returns whether it was sent.
 */
static int
engine_fire(EngineObject *self, const char *key, size_t keylen, rg_spec *spec, int op,
            long long cost, uint64_t hash, const char *sid, size_t sidlen)
{
    rg_shard *shard;
    rg_check *c;
    uint64_t now;

    if (self->closed || !self->eng.started || self->fork_gen != rg_fork_generation)
        return 0;
    shard = &self->eng.shards[(hash >> 40) % (uint64_t)self->eng.cfg.nshards];
    if (atomic_load_explicit(&shard->down, memory_order_relaxed))
        return 0;
    if (atomic_fetch_add_explicit(&self->eng.outstanding, 1, memory_order_relaxed) >=
        self->eng.cfg.max_pending) {
        atomic_fetch_sub_explicit(&self->eng.outstanding, 1, memory_order_relaxed);
        return 0;
    }
    c = rg_check_new(key, keylen, sid, sidlen);
    if (c == NULL) {
        atomic_fetch_sub_explicit(&self->eng.outstanding, 1, memory_order_relaxed);
        return 0;
    }
    now = rg_now_ns();
    c->slot = NO_SLOT;
    c->hash = hash;
    c->spec = spec;
    rg_spec_incref(spec);
    c->op = op;
    c->cost = cost;
    c->submit_ns = now;
    c->deadline_ns = now + self->eng.cfg.timeout_ns;
    if (rg_engine_submit(&self->eng, shard, c) && rg_shard_needs_wake(shard))
        rg_engine_wake(shard);
    return 1;
}

/*
 * release(key, spec, slot_id) -> bool: give a concurrency slot back, fire
 * and forget (engine_fire).  Returns whether it was sent.
 */
static PyObject *
engine_release(EngineObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    const char *key, *sid;
    Py_ssize_t keylen, sidlen;
    SpecObject *spec;

    if (rg_parse_release(self->st, args, nargs, &key, &keylen, &spec, &sid, &sidlen) < 0)
        return NULL;
    if (engine_ready(self) < 0)
        return NULL;
    return PyBool_FromLong(engine_fire(self, key, (size_t)keylen, spec->spec, RG_OP_RELEASE, 0,
                                       rg_hash(key, (size_t)keylen), sid, (size_t)sidlen));
}

/* reset(key, spec) -> Future[bool] | False: delete the key's buckets for the
 * spec's rates in Redis, and forget it in the deny cache now (and again
 * when the answer arrives). */
static PyObject *
engine_reset(EngineObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    const char *key;
    Py_ssize_t keylen;
    SpecObject *spec;
    uint64_t hash;

    if (rg_parse_reset(self->st, args, nargs, &key, &keylen, &spec) < 0)
        return NULL;
    if (engine_ready(self) < 0)
        return NULL;
    hash = rg_hash(key, (size_t)keylen);
    rg_cache_forget_key(&self->cache, hash, key, (size_t)keylen);
    rg_lease_forget_key(&self->lease, hash, key, (size_t)keylen);
    return engine_enqueue(self, key, (size_t)keylen, spec, 0, RG_OP_RESET, hash, NULL, 0, 0);
}

/* forget_local() -> None: forget every key in this process's deny cache and
 * drop its leases (limiter.clear() deleted the buckets they speak of). */
static PyObject *
engine_forget_local(EngineObject *self, PyObject *unused)
{
    (void)unused;
    rg_cache_forget_all(&self->cache);
    rg_lease_clear(&self->lease);
    Py_RETURN_NONE;
}

/* ---- the operator's interface: connect(), command(), topology() -------------- */

/* An operator's timeout: None (connect_timeout) or seconds in range. */
static int
op_timeout(EngineObject *self, PyObject *o, double *out)
{
    double v;

    if (o == Py_None) {
        *out = (double)self->eng.cfg.connect_timeout_ns / 1e9;
        return 0;
    }
    v = PyFloat_AsDouble(o);
    if (v == -1.0 && PyErr_Occurred())
        return -1;
    *out = v;
    return check_seconds("timeout", v, RG_MIN_SECONDS, RG_MAX_SECONDS);
}

/* A COMMAND or CONNECT check carrying cmd (taken), counted in
 * `outstanding`, deadline `timeout` from now.  NULL: out of memory (cmd
 * freed). */
static rg_check *
op_check(EngineObject *self, int op, rg_cmd *cmd, double timeout)
{
    rg_check *c = rg_check_new("", 0, NULL, 0);

    if (c == NULL) {
        rg_cmd_free(cmd);
        PyErr_NoMemory();
        return NULL;
    }
    c->op = op;
    c->cmd = cmd;
    cmd->timeout = timeout;
    c->submit_ns = rg_now_ns();
    c->deadline_ns = c->submit_ns + (uint64_t)(timeout * 1e9);
    atomic_fetch_add_explicit(&self->eng.outstanding, 1, memory_order_relaxed);
    return c;
}

/*
 * connect(timeout=None, /) -> Future[None]: start the engine in this
 * process if needed; resolved once every shard's store has answered (the
 * server; the Sentinels' master confirmed by ROLE; the slot map and every
 * master of it), or failed with ConnectionError naming the cause (a
 * connect that failed, or nothing within `timeout`, default
 * connect_timeout).  The engine goes on reconnecting either way.  One
 * CONNECT check per shard, sharing the future (rg_group).
 */
static PyObject *
engine_connect(EngineObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PortObject *port;
    PyObject *fut;
    rg_check **cs;
    rg_group *g;
    double timeout;
    uint32_t slot;
    int i, n;

    if (nargs > 1) {
        PyErr_Format(PyExc_TypeError, "connect() takes at most 1 argument (timeout), got %zd", nargs);
        return NULL;
    }
    if (op_timeout(self, nargs == 1 ? args[0] : Py_None, &timeout) < 0)
        return NULL;
    if (engine_future(self, &port, &fut) < 0)
        return NULL;
    /* ---- no Python code from here to the push (allocations only) ---- */
    n = self->eng.cfg.nshards;
    cs = calloc((size_t)n, sizeof(*cs));
    g = calloc(1, sizeof(*g));
    if (cs == NULL || g == NULL)
        goto nomem;
    for (i = 0; i < n; i++) {
        rg_cmd *cmd = calloc(1, sizeof(*cmd));
        if (cmd == NULL || (cs[i] = op_check(self, RG_OP_CONNECT, cmd, timeout)) == NULL)
            goto nomem;
        cmd->group = g;
    }
    if (port_park(port, fut, &slot) < 0)
        goto undo;
    atomic_init(&g->refcnt, n); /* one per check */
    g->left = n;
    for (i = 0; i < n; i++)
        engine_hand(self, port, cs[i], slot, &self->eng.shards[i]);
    free(cs);
    Py_DECREF(port);
    return fut;
nomem:
    PyErr_NoMemory();
undo:
    for (i = 0; cs != NULL && i < n && cs[i] != NULL; i++) {
        cs[i]->cmd->group = NULL; /* freed once, below */
        rg_check_free(cs[i]);
        atomic_fetch_sub_explicit(&self->eng.outstanding, 1, memory_order_relaxed);
    }
    free(cs);
    free(g);
    Py_DECREF(fut);
    Py_DECREF(port);
    return NULL;
}

/* args (a sequence of bytes, str or int) as one RESP command into cmd.
 * 0, or -1 with an error. */
static int
cmd_encode(PyObject *args, rg_cmd *cmd)
{
    PyObject *items = PySequence_Tuple(args), *keep = NULL;
    const char **ps = NULL;
    Py_ssize_t *ls = NULL, n, i;
    size_t total;
    char *p;
    int rc = -1;

    if (items == NULL) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "command() takes the command as a sequence of bytes, "
                         "str or int, got %.100s", Py_TYPE(args)->tp_name);
        }
        return -1;
    }
    n = PyTuple_GET_SIZE(items);
    if (n == 0 || PyBytes_Check(args) || PyUnicode_Check(args)) {
        PyErr_SetString(PyExc_ValueError, n == 0 ? "command() needs at least the command's name"
                        : "command() takes a sequence of arguments, e.g. [\"GET\", key], "
                          "not one string");
        goto done;
    }
    ps = PyMem_Malloc((size_t)n * sizeof(*ps));
    ls = PyMem_Malloc((size_t)n * sizeof(*ls));
    keep = PyList_New(0); /* the text of int arguments, alive until written */
    if (ps == NULL || ls == NULL || keep == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    total = 32;
    for (i = 0; i < n; i++) {
        PyObject *o = PyTuple_GET_ITEM(items, i);
        if (PyBytes_Check(o)) {
            ps[i] = PyBytes_AS_STRING(o);
            ls[i] = PyBytes_GET_SIZE(o);
        } else if (PyUnicode_Check(o)) {
            if ((ps[i] = PyUnicode_AsUTF8AndSize(o, &ls[i])) == NULL)
                goto done;
        } else if (PyLong_Check(o) && !PyBool_Check(o)) {
            PyObject *v = PyNumber_Index(o), *t = v != NULL ? PyObject_Str(v) : NULL;
            Py_XDECREF(v);
            if (t == NULL || PyList_Append(keep, t) < 0) {
                Py_XDECREF(t);
                goto done;
            }
            Py_DECREF(t);
            if ((ps[i] = PyUnicode_AsUTF8AndSize(t, &ls[i])) == NULL)
                goto done;
        } else {
            PyErr_Format(PyExc_TypeError, "command() argument %zd must be bytes, str or int, not %.100s",
                         i, Py_TYPE(o)->tp_name);
            goto done;
        }
        total += (size_t)ls[i] + 32;
    }
    if ((p = cmd->resp = malloc(total)) == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    p += sprintf(p, "*%zd\r\n", n);
    for (i = 0; i < n; i++) {
        p += sprintf(p, "$%zd\r\n", ls[i]);
        memcpy(p, ps[i], (size_t)ls[i]);
        p += ls[i];
        *p++ = '\r';
        *p++ = '\n';
    }
    cmd->resp_len = (size_t)(p - cmd->resp);
    rc = 0;
done:
    PyMem_Free(ps);
    PyMem_Free(ls);
    Py_XDECREF(keep);
    Py_DECREF(items);
    return rc;
}

/*
 * command(args, /, *, key=None, node=None, timeout=None) -> Future[Any]:
 * one command, each argument a bulk string, to the master owning `key`'s
 * slot (Cluster; the one server or Sentinel master otherwise), the master
 * `node` ("host:port" as topology() lists it), or with neither any master
 * (a connected one first).  Answered as Python (reply_to_py); an error
 * reply raises ReplyError, no connection ConnectionError, the deadline
 * (timeout, default connect_timeout) TimeoutError.  Not a check: not
 * counted, no deny cache.  Shard 0 sends it (topology() is its view).
 */
static PyObject *
engine_command(EngineObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *key = Py_None, *node = Py_None, *tmo = Py_None, *fut;
    Py_ssize_t i, nkw = kwnames != NULL ? PyTuple_GET_SIZE(kwnames) : 0;
    PortObject *port;
    rg_cmd *cmd;
    rg_check *c;
    double timeout;
    uint32_t slot;

    if (nargs != 1) {
        PyErr_Format(PyExc_TypeError, "command() takes 1 positional argument (the command's "
                     "arguments), got %zd", nargs);
        return NULL;
    }
    for (i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        if (PyUnicode_CompareWithASCIIString(name, "key") == 0)
            key = args[nargs + i];
        else if (PyUnicode_CompareWithASCIIString(name, "node") == 0)
            node = args[nargs + i];
        else if (PyUnicode_CompareWithASCIIString(name, "timeout") == 0)
            tmo = args[nargs + i];
        else {
            PyErr_Format(PyExc_TypeError, "command() got an unexpected keyword argument %R", name);
            return NULL;
        }
    }
    if (key != Py_None && node != Py_None) {
        PyErr_SetString(PyExc_ValueError, "command(): give key= or node=, not both");
        return NULL;
    }
    if (node != Py_None && !PyUnicode_Check(node)) {
        PyErr_SetString(PyExc_TypeError, "command(): node must be a str, \"host:port\" as topology() lists it");
        return NULL;
    }
    if (op_timeout(self, tmo, &timeout) < 0)
        return NULL;
    if ((cmd = calloc(1, sizeof(*cmd))) == NULL)
        return PyErr_NoMemory();
    if (cmd_encode(args[0], cmd) < 0)
        goto error;
    if (key != Py_None) {
        const char *k;
        Py_ssize_t kl;
        if (PyBytes_Check(key)) {
            k = PyBytes_AS_STRING(key);
            kl = PyBytes_GET_SIZE(key);
        } else if (!PyUnicode_Check(key)) {
            PyErr_SetString(PyExc_TypeError, "command(): key must be bytes or str");
            goto error;
        } else if ((k = PyUnicode_AsUTF8AndSize(key, &kl)) == NULL) {
            goto error;
        }
        cmd->route = RG_CMD_KEY;
        cmd->slot = rg_key_slot(k, (size_t)kl);
    } else if (node != Py_None) {
        const char *nm = PyUnicode_AsUTF8(node);
        if (nm == NULL)
            goto error;
        if ((cmd->node = strdup(nm)) == NULL) {
            PyErr_NoMemory();
            goto error;
        }
        cmd->route = RG_CMD_NODE;
    }
    if (engine_future(self, &port, &fut) < 0)
        goto error;
    /* ---- no Python code from here to the push ---- */
    if ((c = op_check(self, RG_OP_COMMAND, cmd, timeout)) == NULL)
        goto undo;
    if (port_park(port, fut, &slot) < 0) {
        atomic_fetch_sub_explicit(&self->eng.outstanding, 1, memory_order_relaxed);
        rg_check_free(c);
        goto undo;
    }
    engine_hand(self, port, c, slot, &self->eng.shards[0]);
    Py_DECREF(port);
    return fut;
undo:
    Py_DECREF(fut);
    Py_DECREF(port);
    return NULL;
error:
    rg_cmd_free(cmd);
    return NULL;
}

/*
 * topology() -> dict: what shard 0's loop thread knows (a snapshot it
 * published, see engine.h): {"kind", "masters": [{"address", "connected",
 * "slots"}], "sentinel"}.  Does not start the engine: before it ran,
 * "masters" is empty.
 */
static PyObject *
engine_topology(EngineObject *self, PyObject *unused)
{
    static const char *const kinds[] = {"server", "sentinel", "cluster"};
    PyObject *masters = NULL, *out = NULL, *sentinel;
    rg_topo_snap *t = NULL;
    int i, j;
    (void)unused;

    if (self->closed) {
        PyErr_SetString(PyExc_RuntimeError, "this Limiter is closed (aclose() was called)");
        return NULL;
    }
    if (self->fork_gen != rg_fork_generation)
        engine_after_fork(self);
    if (self->eng.started)
        t = rg_engine_topology(&self->eng);
    if ((masters = PyList_New(0)) == NULL)
        goto done;
    for (i = 0; t != NULL && i < t->nmasters; i++) {
        const rg_topo_master *m = &t->masters[i];
        PyObject *slots = PyList_New(m->nranges), *d;
        for (j = 0; slots != NULL && j < m->nranges; j++) {
            PyObject *r = Py_BuildValue("(ii)", m->ranges[j][0], m->ranges[j][1]);
            if (r == NULL)
                Py_CLEAR(slots);
            else
                PyList_SET_ITEM(slots, j, r);
        }
        if (slots == NULL)
            goto done;
        d = Py_BuildValue("{sssOsN}", "address", m->addr, "connected",
                          m->connected ? Py_True : Py_False, "slots", slots);
        if (d == NULL || PyList_Append(masters, d) < 0) {
            Py_XDECREF(d);
            goto done;
        }
        Py_DECREF(d);
    }
    sentinel = t != NULL && t->sentinel[0] ? PyUnicode_FromString(t->sentinel) : Py_NewRef(Py_None);
    if (sentinel != NULL)
        out = Py_BuildValue("{sssOsN}", "kind", kinds[rg_engine_kind(&self->eng)], "masters",
                            masters, "sentinel", sentinel);
done:
    Py_XDECREF(masters);
    rg_topo_snap_decref(t);
    return out;
}

/*
 * Stop the threads (every check still held is answered "closed"), then
 * resolve what the ports hold: directly for the running loop's port or a
 * loop that is not running; from their own loop for loops running in
 * other threads (a future is not thread-safe).
 */
static PyObject *
engine_close(EngineObject *self, PyObject *unused)
{
    rg_state *st = self->st;
    PyObject *loop, *port, *running, *items;
    Py_ssize_t i;
    (void)unused;

    if (self->closed)
        Py_RETURN_NONE;
    /* Set before the GIL is released below: from here submit() refuses,
     * stats() reads no shard, and a second close() returns. */
    self->closed = 1;
    if (self->fork_gen != rg_fork_generation)
        engine_after_fork(self);
    if (self->eng.started) {
        Py_BEGIN_ALLOW_THREADS
        rg_engine_stop(&self->eng);
        Py_END_ALLOW_THREADS
    }
    running = PyObject_CallNoArgs(st->get_running_loop);
    if (running == NULL)
        PyErr_Clear();
    items = PyDict_Items(self->ports);
    if (items == NULL) {
        Py_XDECREF(running);
        return NULL;
    }
    for (i = 0; i < PyList_GET_SIZE(items); i++) {
        PyObject *r;
        int other_running = 0;
        loop = PyTuple_GET_ITEM(PyList_GET_ITEM(items, i), 0);
        port = PyTuple_GET_ITEM(PyList_GET_ITEM(items, i), 1);
        if (loop != running) {
            r = PyObject_CallMethodNoArgs(loop, st->s_is_running);
            other_running = r != NULL && PyObject_IsTrue(r) == 1;
            Py_XDECREF(r);
            PyErr_Clear();
        }
        if (other_running) {
            PyObject *cb = PyObject_GetAttr(port, st->s_close_in_loop);
            r = cb ? PyObject_CallMethodOneArg(loop, st->s_call_soon_threadsafe, cb) : NULL;
            Py_XDECREF(cb);
            if (r != NULL) {
                Py_DECREF(r);
                continue;
            }
            PyErr_Clear();
        }
        port_drain((PortObject *)port, NULL);
        port_shutdown((PortObject *)port, 1);
    }
    Py_DECREF(items);
    Py_XDECREF(running);
    PyDict_Clear(self->ports);
    Py_CLEAR(self->last_loop);
    Py_CLEAR(self->last_port);
    rg_cache_free(&self->cache); /* disabled from here: answers still arriving put nothing */
    rg_lease_free(&self->lease);
    Py_RETURN_NONE;
}

static PyObject *
engine_stats(EngineObject *self, PyObject *unused)
{
    PyObject *d = rg_counters_dict(self->st, &self->k), *v;
    int i, connected = 0;
    char err[256];
    (void)unused;

    if (d == NULL)
        return NULL;
    /* The shards exist while started and not closed: close() sets closed
     * before it releases the GIL to stop and free them. */
    /* closed first: close() sets it before it releases the GIL and stops
     * the engine (writing eng.started) on another thread. */
    if (!self->closed && self->eng.started && self->fork_gen == rg_fork_generation) {
        connected = 1;
        for (i = 0; i < self->eng.cfg.nshards; i++)
            connected &= atomic_load(&self->eng.shards[i].connected);
    }
    pthread_mutex_lock(&self->eng.err_mu);
    memcpy(err, self->eng.last_error, sizeof(err));
    pthread_mutex_unlock(&self->eng.err_mu);
    /* wakeups_*: the syscalls that hand work across threads (submit -> loop
     * thread, loop thread -> asyncio); spins, spin_hits: the loop threads'
     * polls and those that caught a submit (engine.c, spin_pays). */
    v = Py_BuildValue("{slslsOsNslsnslslslsl}", "in_flight", atomic_load(&self->eng.outstanding),
                      "reconnects", atomic_load(&self->eng.reconnects), "connected",
                      connected ? Py_True : Py_False, "last_error",
                      err[0] ? PyUnicode_DecodeUTF8(err, (Py_ssize_t)strlen(err), "replace")
                             : Py_NewRef(Py_None),
                      "threads", (long)self->eng.cfg.nshards, "deny_cache_bytes",
                      (Py_ssize_t)rg_cache_bytes(&self->cache), "wakeups_loop",
                      atomic_load_explicit(&self->eng.wakeups_loop, memory_order_relaxed),
                      "wakeups_port",
                      atomic_load_explicit(&self->eng.wakeups_port, memory_order_relaxed),
                      "spins", atomic_load_explicit(&self->eng.spins, memory_order_relaxed),
                      "spin_hits",
                      atomic_load_explicit(&self->eng.spin_hits, memory_order_relaxed));
    if (v == NULL || PyDict_Update(d, v) < 0 || rg_denials_into(d, &self->denials, RG_DENIALS_SHOWN, rg_now_ns()) < 0) {
        Py_XDECREF(v);
        Py_DECREF(d);
        return NULL;
    }
    Py_DECREF(v);
    return d;
}

static int
engine_traverse(EngineObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->module);
    Py_VISIT(self->ports);
    Py_VISIT(self->last_loop);
    Py_VISIT(self->last_port);
    return 0;
}

static int
engine_clear(EngineObject *self)
{
    Py_CLEAR(self->last_loop);
    Py_CLEAR(self->last_port);
    if (self->ports != NULL)
        PyDict_Clear(self->ports);
    return 0;
}

static void
engine_dealloc(EngineObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    if (self->weakreflist != NULL)
        PyObject_ClearWeakRefs((PyObject *)self);
    if (self->eng.started) {
        if (self->fork_gen == rg_fork_generation) {
            Py_BEGIN_ALLOW_THREADS
            rg_engine_stop(&self->eng);
            Py_END_ALLOW_THREADS
        } else {
            rg_engine_abandon(&self->eng);
        }
    }
    engine_clear(self);
    Py_CLEAR(self->ports);
    rg_cache_free(&self->cache);
    rg_lease_free(&self->lease);
    rg_denials_free(&self->denials);
    rg_engine_free_cfg(&self->eng.cfg);
    rg_topo_snap_decref(self->eng.topo); /* NULL once stopped */
    self->eng.topo = NULL;
    if (self->err_mu_ready) {
        pthread_mutex_destroy(&self->eng.err_mu);
        pthread_mutex_destroy(&self->eng.topo_mu);
    }
    Py_CLEAR(self->module);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyMethodDef engine_methods[] = {
    {"submit", (PyCFunction)(void (*)(void))engine_submit, METH_FASTCALL,
     "submit(key, spec, cost) -> Decision | Future[Decision]"},
    {"reset", (PyCFunction)(void (*)(void))engine_reset, METH_FASTCALL,
     "reset(key, spec) -> Future[bool] | False"},
    {"charge", (PyCFunction)(void (*)(void))engine_charge, METH_FASTCALL,
     "charge(key, spec, cost) -> Decision | Future[Decision]"},
    {"release", (PyCFunction)(void (*)(void))engine_release, METH_FASTCALL,
     "release(key, spec, slot_id) -> bool (sent)"},
    {"forget_local", (PyCFunction)engine_forget_local, METH_NOARGS,
     "forget_local() -> None: empty this process's deny cache and leases"},
    {"close", (PyCFunction)engine_close, METH_NOARGS, "Stop and join the loop threads."},
    {"stats", (PyCFunction)engine_stats, METH_NOARGS, "Counters."},
    {"connect", (PyCFunction)(void (*)(void))engine_connect, METH_FASTCALL,
     "connect(timeout=None, /) -> Future[None]: the store has answered"},
    {"command", (PyCFunction)(void (*)(void))engine_command, METH_FASTCALL | METH_KEYWORDS,
     "command(args, /, *, key=None, node=None, timeout=None) -> Future[Any]"},
    {"topology", (PyCFunction)engine_topology, METH_NOARGS,
     "topology() -> dict: the masters shard 0 knows"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef engine_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(EngineObject, weakreflist), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot engine_slots[] = {
    {Py_tp_new, engine_tp_new},
    {Py_tp_dealloc, engine_dealloc},
    {Py_tp_traverse, engine_traverse},
    {Py_tp_clear, engine_clear},
    {Py_tp_methods, engine_methods},
    {Py_tp_members, engine_members},
    {Py_tp_doc, "A Redis engine: loop threads owning the Redis connections."},
    {0, NULL},
};

static PyType_Spec engine_spec = {
    .name = "rategate._core.Engine",
    .basicsize = sizeof(EngineObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = engine_slots,
};

int
rg_engine_types_init(PyObject *m, rg_state *st)
{
    st->ReplyError = PyErr_NewExceptionWithDoc(
        "rategate._core.ReplyError",
        "An error reply from the server to Engine.command(); str() is the server's text.",
        PyExc_Exception, NULL);
    if (st->ReplyError == NULL || PyModule_AddObjectRef(m, "ReplyError", st->ReplyError) < 0)
        return -1;
    st->EngineType = (PyTypeObject *)PyType_FromModuleAndSpec(m, &engine_spec, NULL);
    if (st->EngineType == NULL || PyModule_AddType(m, st->EngineType) < 0)
        return -1;
    st->PortType = (PyTypeObject *)PyType_FromModuleAndSpec(m, &port_spec, NULL);
    if (st->PortType == NULL || PyModule_AddType(m, st->PortType) < 0)
        return -1;
    return 0;
}
