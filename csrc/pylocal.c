/*
 * pylocal.c: the engines that decide in the caller's thread, as Python
 * types: MemoryEngine (memory://, over memstore.c: this process's buckets)
 * and ShmEngine (shm://NAME, over shmstore.c: every process of the host
 * shares them); and the module functions shm_unlink(NAME), shm_size().
 *
 * Every check is decided in the caller's thread, in C, with the GIL held:
 * submit() returns a Decision, never a future, so the middleware answers
 * without an await.  A denial is the store's own answer (not a cached
 * one).  When the store cannot decide (memory: no memory for a new bucket;
 * shm: no room for a new bucket, a lock not had within `timeout`, a lock
 * that cannot be used), the failure mode decides, counted by kind; an
 * overloaded shm segment is also logged (logger "rategate"), at most once
 * a minute per process.
 *
 * One implementation of the Python-facing methods serves both types: each
 * method parses its arguments, checks the engine is open and builds its
 * answer once, and reaches the store through the store_* functions below,
 * each a switch on the store's kind: direct calls, no table of function
 * pointers.  submit() is on the measured path: its one body is compiled
 * once per kind (mem_submit, shm_submit), so no switch is left in either.
 * Each type keeps its own constructor, method docstrings and fields after
 * the common head (LocalObject).
 *
 * Holding the GIL does not make this single-threaded: logging calls
 * Python code, so it comes after the store is done with, and nothing of
 * the segment is touched after it (close() may run meanwhile).
 */
#include "module.h"

#include "cache.h"
#include "memstore.h"
#include "shmstore.h"
#include "topk.h"

/* The Limiter's timeout range (limiter.py checks it too). */
#define SHM_MIN_SECONDS 1e-6
#define SHM_MAX_SECONDS 86400.0
#define SHM_LOG_QUIET_S 60.0

enum { STORE_MEMORY, STORE_SHM };

/* What both types start with; the store follows (MemoryObject, ShmObject). */
typedef struct {
    PyObject_HEAD
    rg_state *st;
    PyObject *module;     /* keeps st alive */
    int kind;             /* STORE_MEMORY or STORE_SHM: which object this is */
    int failure_open;
    int closed;
    rg_counters k;
    rg_denials denials;   /* this process's denial summary (topk.h) */
    unsigned long denials_gen; /* shm: the fork generation it belongs to */
} LocalObject;

typedef struct {
    LocalObject h;
    rg_memstore mem;
} MemoryObject;

typedef struct {
    LocalObject h;
    PyObject *name;       /* str: NAME of shm://NAME */
    rg_shm shm;
    uint64_t timeout_ns;  /* the most a check waits for a stripe's lock */
    double last_log;      /* monotonic seconds of the last "full" log line (< 0: never) */
    unsigned long long unlogged; /* overloaded checks since that line */
} ShmObject;

#define MEM(self) ((MemoryObject *)(self))
#define SHM(self) ((ShmObject *)(self))

/* ---- shm:// specifics ------------------------------------------------------------ */

static PyObject *
shm_error(int kind, int err, const char *msg)
{
    PyObject *e;
    switch (kind) {
    case RG_SHM_EPERM:
        PyErr_SetString(PyExc_PermissionError, msg);
        return NULL;
    case RG_SHM_EOS:
        /* OSError(errno, msg) picks the subclass (FileNotFoundError, ...). */
        e = PyObject_CallFunction(PyExc_OSError, "is", err, msg);
        if (e != NULL) {
            PyErr_SetObject((PyObject *)Py_TYPE(e), e);
            Py_DECREF(e);
        }
        return NULL;
    default:
        PyErr_SetString(PyExc_ValueError, msg);
        return NULL;
    }
}

/* What a full segment means, for the log line and stats()["overloaded_cause"]. */
static PyObject *
shm_full_cause(ShmObject *self)
{
    return PyUnicode_FromFormat(
        "the shm segment %s is full: a new bucket found every entry it may use holding a live "
        "bucket (capacity=%llu); raise capacity (a new segment: remove this one first, "
        "rategate.shm_unlink(%R)), or use fewer distinct keys or shorter periods",
        self->shm.path, (unsigned long long)self->shm.hdr->capacity, self->name);
}

/* Log an overloaded segment, at most once a minute per process.  Calls
 * Python code: the caller has finished with the segment. */
static void
shm_log_full(ShmObject *self)
{
    PyObject *logging = NULL, *logger = NULL, *cause = NULL, *r = NULL;
    double now = (double)rg_now_ns() / 1e9;

    self->unlogged++;
    if (self->last_log >= 0 && now - self->last_log < SHM_LOG_QUIET_S)
        return;
    self->last_log = now;
    if ((cause = shm_full_cause(self)) == NULL || (logging = PyImport_ImportModule("logging")) == NULL ||
        (logger = PyObject_CallMethod(logging, "getLogger", "s", "rategate")) == NULL)
        goto done;
    r = PyObject_CallMethod(logger, "warning", "sOK",
                            "rategate: %s; the failure mode decides (%d overloaded checks in this "
                            "process since the last line of this kind; logged at most once a "
                            "minute)",
                            cause, self->unlogged);
    self->unlogged = 0;
done:
    /* A failing log handler must not fail the check. */
    if (PyErr_Occurred())
        PyErr_WriteUnraisable((PyObject *)self);
    Py_XDECREF(r);
    Py_XDECREF(logger);
    Py_XDECREF(logging);
    Py_XDECREF(cause);
}

/* clear() and entries() could not have the segment (rc: RG_SHM_FULL, no
 * memory for the walk; RG_SHM_TIMEOUT; RG_SHM_BROKEN). */
static PyObject *
shm_not_had(ShmObject *self, int rc)
{
    if (rc == RG_SHM_FULL)
        return PyErr_NoMemory();
    PyErr_Format(rc == RG_SHM_TIMEOUT ? PyExc_TimeoutError : PyExc_OSError,
                 "the shm segment %s: %s", self->shm.path,
                 rc == RG_SHM_TIMEOUT
                     ? "a stripe's lock was held past the Limiter's timeout (a stopped process?)"
                     : "a stripe's lock cannot be used (remove the segment and start again)");
    return NULL;
}

/* ---- the store interface: a switch on the kind ---------------------------------- */

/* The time memory:// decides at; shm:// keeps its own clock (0). */
static inline uint64_t
store_now(int kind)
{
    return kind == STORE_MEMORY ? rg_now_ns() : 0;
}

/* One op (RG_OP_HIT, RG_OP_CHARGE, RG_OP_RELEASE) on the store of `kind`
 * (self->kind, or the constant of a specialised caller) at store_now():
 * RG_ERR_NONE with *r set, or the kind of failure the failure mode decides
 * with (nothing consumed). */
static inline int
store_op(LocalObject *self, int kind, int op, const rg_spec *spec, const char *key, size_t keylen,
         const char *sid, size_t sidlen, long long cost, uint64_t now, rg_result *r)
{
    int rc;
    if (kind == STORE_MEMORY)
        return rg_memstore_op(&MEM(self)->mem, op, spec, key, keylen, sid, sidlen, cost, now, r) < 0
                   ? RG_ERR_OVERLOADED
                   : RG_ERR_NONE;
    rc = rg_shm_op(&SHM(self)->shm, op, spec, key, keylen, sid, sidlen, cost, SHM(self)->timeout_ns,
                   r);
    return rc == RG_SHM_OK        ? RG_ERR_NONE
           : rc == RG_SHM_FULL    ? RG_ERR_OVERLOADED
           : rc == RG_SHM_TIMEOUT ? RG_ERR_TIMEOUT
                                  : RG_ERR_UNAVAILABLE;
}

/* The failure-mode decision for store_op's `err`, counted in k.  An
 * overloaded segment is logged: Python code, after the store is done with. */
static PyObject *
store_failure(LocalObject *self, rg_counters *k, const rg_spec *spec, int err)
{
    PyObject *d = rg_failure(self->st, k, spec, self->failure_open, err);
    if (d != NULL && err == RG_ERR_OVERLOADED && self->kind == STORE_SHM)
        shm_log_full(SHM(self));
    return d;
}

/* This process's denial summary.  A forked child of a shm:// engine starts
 * its own (the buckets are shared, the summary of who this process denied
 * is not); memory://'s child has its own copy of the buckets, and keeps
 * the summary that goes with them. */
static inline rg_denials *
store_denials(LocalObject *self, int kind)
{
    if (kind == STORE_SHM && self->denials_gen != rg_fork_generation) {
        rg_denials_clear(&self->denials);
        self->denials_gen = rg_fork_generation;
    }
    return &self->denials;
}

/* Forget the key's buckets for the spec's rates: 1, or 0 when the segment
 * could not be had within timeout (memory:// cannot fail). */
static int
store_delete(LocalObject *self, const rg_spec *spec, const char *key, size_t keylen)
{
    if (self->kind == STORE_MEMORY) {
        rg_memstore_delete(&MEM(self)->mem, spec, key, keylen);
        return 1;
    }
    return rg_shm_delete(&SHM(self)->shm, spec, key, keylen, SHM(self)->timeout_ns) == RG_SHM_OK;
}

/* Remove every bucket and slot set: how many live ones went (an int), or NULL. */
static PyObject *
store_clear(LocalObject *self)
{
    uint64_t n;
    int rc;
    if (self->kind == STORE_MEMORY)
        return PyLong_FromSize_t(rg_memstore_clear(&MEM(self)->mem, rg_now_ns()));
    if ((rc = rg_shm_clear(&SHM(self)->shm, SHM(self)->timeout_ns, &n)) != RG_SHM_OK)
        return shm_not_had(SHM(self), rc);
    return PyLong_FromUnsignedLongLong(n);
}

/* entries()'s list item (key, key_id, value) appended to out: 0 or -1. */
static int
entry_append(PyObject *out, const char *k, size_t klen, const char *id, size_t idlen, double value)
{
    PyObject *t = Py_BuildValue("(y#y#d)", k, (Py_ssize_t)klen, id, (Py_ssize_t)idlen, value);
    int rc = t == NULL ? -1 : PyList_Append(out, t);
    Py_XDECREF(t);
    return rc;
}

/* Every live entry whose key starts with prefix, appended to out: 0, or -1
 * with an error.  Builds bytes only: no Python code runs while memory://'s
 * table is walked; shm:// copies the entries out under the locks first. */
static int
store_entries(LocalObject *self, const char *prefix, size_t plen, PyObject *out)
{
    if (self->kind == STORE_MEMORY) {
        const rg_mem_entry *e;
        uint64_t now = rg_now_ns();
        size_t i = 0;
        double v;
        while ((e = rg_memstore_next(&MEM(self)->mem, &i, now, &v)) != NULL) {
            /* its key is "key\0key_id" (memstore.h) */
            const char *nul = memrchr(e->key, '\0', e->keylen);
            size_t kl = (size_t)(nul - e->key);
            if (kl < plen || memcmp(e->key, prefix, plen) != 0)
                continue;
            if (entry_append(out, e->key, kl, nul + 1, e->keylen - kl - 1, v) < 0)
                return -1;
        }
        return 0;
    } else {
        rg_shm_item *items = NULL;
        size_t n = 0, i;
        int rc = rg_shm_entries(&SHM(self)->shm, prefix, plen, SHM(self)->timeout_ns, &items, &n);
        if (rc != RG_SHM_OK) {
            shm_not_had(SHM(self), rc);
            return -1;
        }
        for (i = 0; i < n && rc == 0; i++)
            rc = entry_append(out, items[i].k, items[i].klen, items[i].id, items[i].idlen,
                              items[i].value);
        free(items);
        return rc;
    }
}

/* The store's part of stats(): *keys, its live buckets; *extra, what only
 * shm:// adds ("overloaded_cause", and "shm": the segment's counters), a
 * new dict, or NULL.  0, or -1 with an error. */
static int
store_stats(LocalObject *self, unsigned long long *keys, PyObject **extra)
{
    PyObject *cause = NULL;
    rg_shm_info in;

    *extra = NULL;
    if (self->kind == STORE_MEMORY) {
        *keys = rg_memstore_size(&MEM(self)->mem);
        return 0;
    }
    if (self->closed) {
        memset(&in, 0, sizeof(in));
    } else {
        rg_shm_info_get(&SHM(self)->shm, &in);
        if (self->k.errors[RG_ERR_OVERLOADED] && (cause = shm_full_cause(SHM(self))) == NULL)
            return -1;
    }
    *keys = in.live;
    *extra = Py_BuildValue(
        "{sOs{sOsssKsKsKsIsKsKsKsKsK}}", "overloaded_cause", cause ? cause : Py_None, "shm",
        "name", SHM(self)->name, "path", SHM(self)->shm.path, "capacity",
        (unsigned long long)in.capacity, "slots", (unsigned long long)in.slots, "bytes",
        (unsigned long long)in.bytes, "stripes", (unsigned)in.nstripes, "live",
        (unsigned long long)in.live, "overloaded", (unsigned long long)in.full, "recovered",
        (unsigned long long)in.recovered, "evicted", (unsigned long long)in.evicted, "lock_waits",
        (unsigned long long)in.waits);
    Py_XDECREF(cause);
    return *extra == NULL ? -1 : 0;
}

/* Unmap or free the store (close(), dealloc: twice is fine). */
static void
store_close(LocalObject *self)
{
    if (self->kind == STORE_MEMORY)
        rg_memstore_free(&MEM(self)->mem);
    else
        rg_shm_close(&SHM(self)->shm);
}

/* ---- the methods, for both types ------------------------------------------------- */

static int
local_ready(LocalObject *self)
{
    if (self->closed) {
        PyErr_SetString(PyExc_RuntimeError, "this Limiter is closed (aclose() was called)");
        return -1;
    }
    return 0;
}

/* submit(key, spec, cost[, slot_id]) -> Decision.  The measured path: one
 * body, compiled once per store with `kind` a constant (mem_submit,
 * shm_submit), so that no switch on the kind is left in it. */
static inline __attribute__((always_inline)) PyObject *
local_submit(LocalObject *self, PyObject *const *args, Py_ssize_t nargs, int kind)
{
    const char *key, *sid;
    Py_ssize_t keylen, sidlen;
    SpecObject *spec;
    long long cost;
    uint64_t now;
    rg_result r;
    int err;

    if (rg_parse_submit(self->st, args, nargs, &key, &keylen, &spec, &cost) < 0 ||
        rg_parse_sid(spec, args, nargs, &sid, &sidlen) < 0 || local_ready(self) < 0)
        return NULL;
    self->k.checks++;
    now = store_now(kind);
    err = store_op(self, kind, RG_OP_HIT, spec->spec, key, (size_t)keylen, sid, (size_t)sidlen,
                   cost, now, &r);
    if (err != RG_ERR_NONE)
        return store_failure(self, &self->k, spec->spec, err);
    if (!r.allowed) /* at the time the store decided (shm://: read it now) */
        rg_denials_note(store_denials(self, kind), rg_hash(key, (size_t)keylen), key,
                        (size_t)keylen, kind == STORE_MEMORY ? now : rg_now_ns());
    return rg_answer(self->st, &self->k, spec->spec, &r, cost);
}

static PyObject *
mem_submit(LocalObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return local_submit(self, args, nargs, STORE_MEMORY);
}

static PyObject *
shm_submit(LocalObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return local_submit(self, args, nargs, STORE_SHM);
}

/* charge(key, spec, cost) -> Decision (not counted as a check). */
static PyObject *
local_charge(LocalObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    const char *key;
    Py_ssize_t keylen;
    SpecObject *spec;
    long long cost;
    rg_counters scratch;
    rg_result r;
    int err;

    if (rg_parse_charge(self->st, args, nargs, &key, &keylen, &spec, &cost) < 0 ||
        local_ready(self) < 0)
        return NULL;
    memset(&scratch, 0, sizeof(scratch));
    err = store_op(self, self->kind, RG_OP_CHARGE, spec->spec, key, (size_t)keylen, NULL, 0, cost,
                   store_now(self->kind), &r);
    if (err != RG_ERR_NONE)
        return store_failure(self, &scratch, spec->spec, err);
    return rg_answer(self->st, &scratch, spec->spec, &r, cost);
}

/* release(key, spec, slot_id) -> True: the slot is given back; False: the
 * segment could not be had within timeout (the slot then expires after its
 * ttl).  memory:// allocates nothing for it: always True. */
static PyObject *
local_release(LocalObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    const char *key, *sid;
    Py_ssize_t keylen, sidlen;
    SpecObject *spec;
    rg_result r;

    if (rg_parse_release(self->st, args, nargs, &key, &keylen, &spec, &sid, &sidlen) < 0 ||
        local_ready(self) < 0)
        return NULL;
    return PyBool_FromLong(store_op(self, self->kind, RG_OP_RELEASE, spec->spec, key,
                                    (size_t)keylen, sid, (size_t)sidlen, 0,
                                    store_now(self->kind), &r) == RG_ERR_NONE);
}

/* reset(key, spec) -> True: the key's buckets for the spec's rates are full
 * again (False: the segment could not be had within timeout). */
static PyObject *
local_reset(LocalObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    const char *key;
    Py_ssize_t keylen;
    SpecObject *spec;

    if (rg_parse_reset(self->st, args, nargs, &key, &keylen, &spec) < 0 || local_ready(self) < 0)
        return NULL;
    return PyBool_FromLong(store_delete(self, spec->spec, key, (size_t)keylen));
}

/* clear() -> int: every bucket and concurrency slot set removed; how many
 * live ones went (Seam 2). */
static PyObject *
local_clear(LocalObject *self, PyObject *unused)
{
    (void)unused;
    if (local_ready(self) < 0)
        return NULL;
    return store_clear(self);
}

/* entries(prefix=b"") -> [(key, key_id, value)] (Seam 2): every live entry
 * whose key starts with prefix; value: microseconds until a rate's bucket is
 * full, or a key's live slots (key_id b"c"). */
static PyObject *
local_entries(LocalObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    const char *prefix;
    Py_ssize_t plen;
    PyObject *out;

    if (rg_parse_prefix(args, nargs, &prefix, &plen) < 0 || local_ready(self) < 0)
        return NULL;
    if ((out = PyList_New(0)) != NULL && store_entries(self, prefix, (size_t)plen, out) < 0)
        Py_CLEAR(out);
    return out;
}

static PyObject *
local_close(LocalObject *self, PyObject *unused)
{
    (void)unused;
    self->closed = 1;
    store_close(self);
    Py_RETURN_NONE;
}

/* stats(): the counters, then the same keys as the Redis engine's (nothing
 * in flight, no threads), the store's, and the denial summary. */
static PyObject *
local_stats(LocalObject *self, PyObject *unused)
{
    PyObject *d = rg_counters_dict(self->st, &self->k), *v = NULL, *extra = NULL;
    unsigned long long keys;
    (void)unused;

    if (d == NULL || store_stats(self, &keys, &extra) < 0)
        goto error;
    /* memory:// has no connection to lose: connected even once closed */
    v = Py_BuildValue("{sisisOsOsKsi}", "in_flight", 0, "reconnects", 0, "connected",
                      self->kind == STORE_MEMORY || !self->closed ? Py_True : Py_False,
                      "last_error", Py_None, "keys", keys, "threads", 0);
    if (v == NULL || PyDict_Update(d, v) < 0 || (extra != NULL && PyDict_Update(d, extra) < 0) ||
        rg_denials_into(d, store_denials(self, self->kind), RG_DENIALS_SHOWN, rg_now_ns()) < 0)
        goto error;
    Py_DECREF(v);
    Py_XDECREF(extra);
    return d;
error:
    Py_XDECREF(v);
    Py_XDECREF(extra);
    Py_XDECREF(d);
    return NULL;
}

/* A new object of type tp with the common head set; the caller opens the store. */
static LocalObject *
local_alloc(PyTypeObject *tp, rg_state *st, int kind, int failure_open)
{
    LocalObject *self = (LocalObject *)tp->tp_alloc(tp, 0);
    if (self == NULL)
        return NULL;
    self->st = st;
    self->kind = kind;
    self->failure_open = failure_open;
    self->module = Py_XNewRef(PyType_GetModuleByDef(tp, &rg_module_def));
    if (self->module == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return self;
}

static void
local_dealloc(LocalObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    store_close(self);
    rg_denials_free(&self->denials);
    if (self->kind == STORE_SHM)
        Py_CLEAR(SHM(self)->name);
    Py_CLEAR(self->module);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}


/* ---- MemoryEngine ------------------------------------------------------------------ */

static PyObject *
mem_tp_new(PyTypeObject *tp, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"failure_open", NULL};
    int failure_open = 0;
    rg_state *st = rg_state_of_type(tp);
    LocalObject *self;

    if (st == NULL)
        return NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|p:MemoryEngine", kwlist, &failure_open))
        return NULL;
    if ((self = local_alloc(tp, st, STORE_MEMORY, failure_open)) == NULL)
        return NULL;
    if (rg_memstore_init(&MEM(self)->mem) < 0) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    return (PyObject *)self;
}

static PyMethodDef mem_methods[] = {
    {"submit", (PyCFunction)(void (*)(void))mem_submit, METH_FASTCALL,
     "submit(key, spec, cost) -> Decision"},
    {"reset", (PyCFunction)(void (*)(void))local_reset, METH_FASTCALL,
     "reset(key, spec) -> True"},
    {"charge", (PyCFunction)(void (*)(void))local_charge, METH_FASTCALL,
     "charge(key, spec, cost) -> Decision"},
    {"release", (PyCFunction)(void (*)(void))local_release, METH_FASTCALL,
     "release(key, spec, slot_id) -> True"},
    {"clear", (PyCFunction)local_clear, METH_NOARGS,
     "clear() -> int: forget every bucket and slot set (how many were live)"},
    {"close", (PyCFunction)local_close, METH_NOARGS, "Forget every bucket."},
    {"stats", (PyCFunction)local_stats, METH_NOARGS, "Counters."},
    {"entries", (PyCFunction)(void (*)(void))local_entries, METH_FASTCALL,
     "entries(prefix=b'') -> [(key, key_id, value)]"},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot mem_slots[] = {
    {Py_tp_new, mem_tp_new},
    {Py_tp_dealloc, local_dealloc},
    {Py_tp_methods, mem_methods},
    {Py_tp_doc, "memory://: the same GCRA in process, answered synchronously."},
    {0, NULL},
};

static PyType_Spec mem_spec = {
    .name = "rategate._core.MemoryEngine",
    .basicsize = sizeof(MemoryObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = mem_slots,
};

/* ---- ShmEngine --------------------------------------------------------------------- */

static PyObject *
shm_tp_new(PyTypeObject *tp, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"name", "capacity", "failure_open", "timeout", NULL};
    const char *name;
    unsigned long long capacity = 0;
    int failure_open = 0, rc, saved_errno;
    double timeout = 0.05;
    char err[1024];
    rg_state *st = rg_state_of_type(tp);
    ShmObject *self;

    if (st == NULL)
        return NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "s|Kpd:ShmEngine", kwlist, &name, &capacity,
                                     &failure_open, &timeout))
        return NULL;
    if (!(timeout >= SHM_MIN_SECONDS && timeout <= SHM_MAX_SECONDS)) { /* false for NaN */
        PyObject *t = PyFloat_FromDouble(timeout);
        if (t != NULL)
            PyErr_Format(PyExc_ValueError,
                         "timeout must be a number of seconds from 1e-06 to 86400, got %R", t);
        Py_XDECREF(t);
        return NULL;
    }
    if ((self = SHM(local_alloc(tp, st, STORE_SHM, failure_open))) == NULL)
        return NULL;
    self->h.closed = 1; /* until the segment is mapped */
    self->timeout_ns = (uint64_t)(timeout * 1e9);
    self->last_log = -1.0;
    if ((self->name = PyUnicode_FromString(name)) == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    /* May wait (bounded) for another process to finish creating it. */
    Py_BEGIN_ALLOW_THREADS
    rc = rg_shm_open(&self->shm, name, capacity, err, sizeof(err));
    saved_errno = errno;
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        Py_DECREF(self);
        return shm_error(rc, saved_errno, err);
    }
    self->h.closed = 0;
    return (PyObject *)self;
}

static PyObject *
shm_do_unlink(PyObject *name)
{
    Py_ssize_t n = 0;
    const char *s = PyUnicode_Check(name) ? PyUnicode_AsUTF8AndSize(name, &n) : NULL;
    char buf[16 + RG_SHM_NAME_MAX];
    int rc;

    if (s == NULL || (size_t)n != strlen(s) || rg_shm_name(s, buf, sizeof(buf)) < 0) {
        if (!PyErr_Occurred() || PyErr_ExceptionMatches(PyExc_UnicodeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError,
                         "bad shm name %R: 1 to %d letters, digits, '.', '_' or '-', starting "
                         "with a letter or digit",
                         name, RG_SHM_NAME_MAX);
        }
        return NULL;
    }
    if ((rc = rg_shm_unlink(s)) < 0)
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, buf);
    return PyBool_FromLong(rc);
}

/* unlink() -> bool: remove this segment's name (see shm_unlink). */
static PyObject *
shm_unlink_self(ShmObject *self, PyObject *unused)
{
    (void)unused;
    return shm_do_unlink(self->name);
}

/* _test_fault(hold_ns, hang): the crash tests' fault injection (shmstore.h). */
static PyObject *
shm_test_fault(ShmObject *self, PyObject *args)
{
    unsigned long long hold;
    int hang;
    if (!PyArg_ParseTuple(args, "Ki:_test_fault", &hold, &hang) || local_ready(&self->h) < 0)
        return NULL;
    self->shm.test_hold_ns = hold;
    self->shm.test_hang = hang;
    Py_RETURN_NONE;
}

static PyMethodDef shm_methods[] = {
    {"submit", (PyCFunction)(void (*)(void))shm_submit, METH_FASTCALL,
     "submit(key, spec, cost[, slot_id]) -> Decision"},
    {"reset", (PyCFunction)(void (*)(void))local_reset, METH_FASTCALL, "reset(key, spec) -> bool"},
    {"charge", (PyCFunction)(void (*)(void))local_charge, METH_FASTCALL,
     "charge(key, spec, cost) -> Decision"},
    {"release", (PyCFunction)(void (*)(void))local_release, METH_FASTCALL,
     "release(key, spec, slot_id) -> bool"},
    {"clear", (PyCFunction)local_clear, METH_NOARGS,
     "clear() -> int: remove every bucket and concurrency slot set; how many live ones went"},
    {"entries", (PyCFunction)(void (*)(void))local_entries, METH_FASTCALL,
     "entries(prefix=b'') -> [(key, key_id, value)]: every live entry whose key starts with "
     "prefix; value: microseconds until a rate's bucket is full, or a set's live slots (key_id "
     "b'c').  A key longer than 172 bytes is listed by its first 140."},
    {"unlink", (PyCFunction)shm_unlink_self, METH_NOARGS,
     "unlink() -> bool: remove the segment's name (processes using it keep it)"},
    {"close", (PyCFunction)local_close, METH_NOARGS, "Unmap the segment (it stays for the others)."},
    {"stats", (PyCFunction)local_stats, METH_NOARGS, "Counters, and the segment's under 'shm'."},
    {"_test_fault", (PyCFunction)shm_test_fault, METH_VARARGS, "Fault injection, for tests."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot shm_slots[] = {
    {Py_tp_new, shm_tp_new},
    {Py_tp_dealloc, local_dealloc},
    {Py_tp_methods, shm_methods},
    {Py_tp_doc, "shm://NAME: buckets shared by every process of the host, decided at once."},
    {0, NULL},
};

static PyType_Spec shm_spec = {
    .name = "rategate._core.ShmEngine",
    .basicsize = sizeof(ShmObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = shm_slots,
};

/* shm_unlink(name) -> bool: remove shm://NAME's segment (True), or there
 * was none (False).  Processes that have it open keep using it; the next
 * one to open NAME makes a new one. */
static PyObject *
mod_shm_unlink(PyObject *module, PyObject *name)
{
    (void)module;
    return shm_do_unlink(name);
}

/* shm_size(capacity) -> int: the bytes of a segment of that capacity. */
static PyObject *
mod_shm_size(PyObject *module, PyObject *arg)
{
    unsigned long long c = PyLong_AsUnsignedLongLong(arg);
    (void)module;
    if (c == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (c < 1 || c > RG_SHM_MAX_CAPACITY) {
        PyErr_Format(PyExc_ValueError, "capacity must be from 1 to %llu", RG_SHM_MAX_CAPACITY);
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(rg_shm_size_for(c));
}

/* _shm_test_euid(uid) -> None: the tests' stand-in for another user
 * (shmstore.h); -1 restores geteuid(). */
static PyObject *
mod_shm_test_euid(PyObject *module, PyObject *arg)
{
    long uid = PyLong_AsLong(arg);
    (void)module;
    if (uid == -1 && PyErr_Occurred())
        return NULL;
    rg_shm_test_euid = uid < 0 ? -1 : uid;
    Py_RETURN_NONE;
}

static PyMethodDef shm_functions[] = {
    {"_shm_test_euid", mod_shm_test_euid, METH_O, "For tests: the euid the owner check uses."},
    {"shm_unlink", mod_shm_unlink, METH_O, "shm_unlink(name) -> bool"},
    {"shm_size", mod_shm_size, METH_O, "shm_size(capacity) -> bytes of such a segment"},
    {NULL, NULL, 0, NULL},
};

/* MemoryEngine (kept in the module state too), ShmEngine and the shm functions. */
int
rg_local_types_init(PyObject *m, rg_state *st)
{
    PyTypeObject *tp;
    int rc;

    st->MemoryEngineType = (PyTypeObject *)PyType_FromModuleAndSpec(m, &mem_spec, NULL);
    if (st->MemoryEngineType == NULL || PyModule_AddType(m, st->MemoryEngineType) < 0)
        return -1;
    tp = (PyTypeObject *)PyType_FromModuleAndSpec(m, &shm_spec, NULL);
    rc = tp == NULL ? -1 : PyModule_AddType(m, tp);
    Py_XDECREF(tp);
    if (rc < 0 || PyModule_AddFunctions(m, shm_functions) < 0 ||
        PyModule_AddIntConstant(m, "SHM_DEFAULT_CAPACITY", RG_SHM_DEFAULT_CAPACITY) < 0 ||
        PyModule_AddIntConstant(m, "SHM_NAME_MAX", RG_SHM_NAME_MAX) < 0)
        return -1;
    return 0;
}
