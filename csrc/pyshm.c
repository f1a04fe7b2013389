/*
 * pyshm.c: ShmEngine (shm://NAME) as a Python type, over shmstore.c, and
 * the module function shm_unlink(NAME).
 *
 * Like MemoryEngine, every check is decided in the caller's thread, in C,
 * with the GIL held: submit() returns a Decision, never a future, so the
 * middleware answers without an await.  A denial is the store's own
 * answer (not a cached one).  When the store cannot decide (no room for a
 * new bucket, a lock not had within `timeout`, a lock that cannot be
 * used), the failure mode decides, counted by kind; an overloaded segment
 * is also logged (logger "rategate"), at most once a minute per process.
 *
 * Holding the GIL does not make this single-threaded: logging calls
 * Python code, so it comes after the store is done with, and nothing of
 * the segment is touched after it (close() may run meanwhile).
 */
#include "module.h"

#include "cache.h"
#include "shmstore.h"
#include "topk.h"

/* The Limiter's timeout range (limiter.py checks it too). */
#define SHM_MIN_SECONDS 1e-6
#define SHM_MAX_SECONDS 86400.0
#define SHM_LOG_QUIET_S 60.0

typedef struct {
    PyObject_HEAD
    rg_state *st;
    PyObject *module;     /* keeps st alive */
    PyObject *name;       /* str: NAME of shm://NAME */
    rg_shm shm;
    rg_counters k;
    int failure_open;
    int closed;
    uint64_t timeout_ns;  /* the most a check waits for a stripe's lock */
    double last_log;      /* monotonic seconds of the last "full" log line (< 0: never) */
    unsigned long long unlogged; /* overloaded checks since that line */
    rg_denials denials;   /* this process's denial summary (topk.h), not the segment's */
    unsigned long denials_gen; /* the fork generation it belongs to */
} ShmEngineObject;

/* This process's denial summary: a forked child starts its own (the
 * buckets are shared, the summary of who this process denied is not). */
static rg_denials *
shm_denials(ShmEngineObject *self)
{
    if (self->denials_gen != rg_fork_generation) {
        rg_denials_clear(&self->denials);
        self->denials_gen = rg_fork_generation;
    }
    return &self->denials;
}

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
    ShmEngineObject *self;

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
    self = (ShmEngineObject *)tp->tp_alloc(tp, 0);
    if (self == NULL)
        return NULL;
    self->st = st;
    self->failure_open = failure_open;
    self->timeout_ns = (uint64_t)(timeout * 1e9);
    self->last_log = -1.0;
    self->closed = 1; /* until the segment is mapped (dealloc relies on shm.base) */
    self->module = Py_XNewRef(PyType_GetModuleByDef(tp, &rg_module_def));
    self->name = PyUnicode_FromString(name);
    if (self->module == NULL || self->name == NULL) {
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
    self->closed = 0;
    return (PyObject *)self;
}

static int
shm_ready(ShmEngineObject *self)
{
    if (self->closed) {
        PyErr_SetString(PyExc_RuntimeError, "this Limiter is closed (aclose() was called)");
        return -1;
    }
    return 0;
}

/* What a full segment means, for the log line and stats()["overloaded_cause"]. */
static PyObject *
shm_full_cause(ShmEngineObject *self)
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
shm_log_full(ShmEngineObject *self)
{
    PyObject *logging = NULL, *logger = NULL, *cause = NULL, *r = NULL;
    struct timespec ts;
    double now;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    now = (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
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

/* The failure-mode decision for a store result other than RG_SHM_OK. */
static PyObject *
shm_failure(ShmEngineObject *self, rg_counters *k, const rg_spec *spec, int rc)
{
    int err = rc == RG_SHM_FULL ? RG_ERR_OVERLOADED
              : rc == RG_SHM_TIMEOUT ? RG_ERR_TIMEOUT : RG_ERR_UNAVAILABLE;
    PyObject *d = rg_failure(self->st, k, spec, self->failure_open, err);
    if (d != NULL && rc == RG_SHM_FULL)
        shm_log_full(self);
    return d;
}

/* submit(key, spec, cost[, slot_id]) -> Decision */
static PyObject *
shm_submit(ShmEngineObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    const char *key, *sid;
    Py_ssize_t keylen, sidlen;
    SpecObject *spec;
    long long cost;
    rg_result r;
    int rc;

    if (rg_parse_submit(self->st, args, nargs, &key, &keylen, &spec, &cost) < 0 ||
        rg_parse_sid(spec, args, nargs, &sid, &sidlen) < 0 || shm_ready(self) < 0)
        return NULL;
    self->k.checks++;
    rc = rg_shm_op(&self->shm, RG_OP_HIT, spec->spec, key, (size_t)keylen, sid, (size_t)sidlen,
                   cost, self->timeout_ns, &r);
    if (rc != RG_SHM_OK)
        return shm_failure(self, &self->k, spec->spec, rc);
    if (!r.allowed)
        rg_denials_note(shm_denials(self), rg_hash(key, (size_t)keylen), key, (size_t)keylen,
                        rg_now_ns());
    return rg_answer(self->st, &self->k, spec->spec, &r, cost);
}

/* charge(key, spec, cost) -> Decision (not counted as a check). */
static PyObject *
shm_charge(ShmEngineObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    const char *key;
    Py_ssize_t keylen;
    SpecObject *spec;
    long long cost;
    rg_counters scratch;
    rg_result r;
    int rc;

    if (rg_parse_charge(self->st, args, nargs, &key, &keylen, &spec, &cost) < 0 ||
        shm_ready(self) < 0)
        return NULL;
    memset(&scratch, 0, sizeof(scratch));
    rc = rg_shm_op(&self->shm, RG_OP_CHARGE, spec->spec, key, (size_t)keylen, NULL, 0, cost,
                   self->timeout_ns, &r);
    if (rc != RG_SHM_OK)
        return shm_failure(self, &scratch, spec->spec, rc);
    return rg_answer(self->st, &scratch, spec->spec, &r, cost);
}

/* release(key, spec, slot_id) -> True, or False if the segment could not be
 * had within timeout (the slot then expires after its ttl). */
static PyObject *
shm_release(ShmEngineObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    const char *key, *sid;
    Py_ssize_t keylen, sidlen;
    SpecObject *spec;
    rg_result r;

    if (rg_parse_release(self->st, args, nargs, &key, &keylen, &spec, &sid, &sidlen) < 0 ||
        shm_ready(self) < 0)
        return NULL;
    return PyBool_FromLong(rg_shm_op(&self->shm, RG_OP_RELEASE, spec->spec, key, (size_t)keylen,
                                     sid, (size_t)sidlen, 0, self->timeout_ns, &r) == RG_SHM_OK);
}

/* reset(key, spec) -> True: the key's buckets for the spec's rates are full
 * again (False: the segment could not be had within timeout). */
static PyObject *
shm_reset(ShmEngineObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    const char *key;
    Py_ssize_t keylen;
    SpecObject *spec;

    if (rg_parse_reset(self->st, args, nargs, &key, &keylen, &spec) < 0 || shm_ready(self) < 0)
        return NULL;
    return PyBool_FromLong(rg_shm_delete(&self->shm, spec->spec, key, (size_t)keylen,
                                         self->timeout_ns) == RG_SHM_OK);
}

static PyObject *
shm_not_had(ShmEngineObject *self, int rc)
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

/* clear() -> int: every bucket and concurrency slot set removed; how many
 * live ones went (Seam 2). */
static PyObject *
shm_clear_all(ShmEngineObject *self, PyObject *unused)
{
    uint64_t n;
    int rc;
    (void)unused;
    if (shm_ready(self) < 0)
        return NULL;
    if ((rc = rg_shm_clear(&self->shm, self->timeout_ns, &n)) != RG_SHM_OK)
        return shm_not_had(self, rc);
    return PyLong_FromUnsignedLongLong(n);
}

/* entries(prefix=b"") -> [(key, key_id, value)] (Seam 2). */
static PyObject *
shm_entries(ShmEngineObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    const char *prefix = "";
    Py_ssize_t plen = 0;
    rg_shm_item *items = NULL;
    size_t n = 0, i;
    PyObject *out = NULL;
    int rc;

    if (rg_parse_prefix(args, nargs, &prefix, &plen) < 0 || shm_ready(self) < 0)
        return NULL;
    if ((rc = rg_shm_entries(&self->shm, prefix, (size_t)plen, self->timeout_ns, &items, &n)) !=
        RG_SHM_OK)
        return shm_not_had(self, rc);
    if ((out = PyList_New((Py_ssize_t)n)) == NULL)
        goto done;
    for (i = 0; i < n; i++) {
        PyObject *t = Py_BuildValue("(y#y#d)", items[i].k, (Py_ssize_t)items[i].klen, items[i].id,
                                    (Py_ssize_t)items[i].idlen, items[i].value);
        if (t == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)i, t);
    }
done:
    free(items);
    return out;
}

static PyObject *
shm_close(ShmEngineObject *self, PyObject *unused)
{
    (void)unused;
    self->closed = 1;
    rg_shm_close(&self->shm);
    Py_RETURN_NONE;
}

static PyObject *
shm_stats(ShmEngineObject *self, PyObject *unused)
{
    PyObject *d = rg_counters_dict(self->st, &self->k), *v = NULL, *cause = NULL;
    rg_shm_info in;
    (void)unused;

    if (d == NULL)
        return NULL;
    if (self->closed) {
        memset(&in, 0, sizeof(in));
    } else {
        rg_shm_info_get(&self->shm, &in);
        if (self->k.errors[RG_ERR_OVERLOADED] && (cause = shm_full_cause(self)) == NULL)
            goto error;
    }
    v = Py_BuildValue(
        "{sisisOsOsKsisOs{sOsssKsKsKsIsKsKsKsKsK}}", "in_flight", 0, "reconnects", 0, "connected",
        self->closed ? Py_False : Py_True, "last_error", Py_None, "keys",
        (unsigned long long)in.live, "threads", 0, "overloaded_cause", cause ? cause : Py_None,
        "shm", "name", self->name, "path", self->shm.path, "capacity",
        (unsigned long long)in.capacity, "slots", (unsigned long long)in.slots, "bytes",
        (unsigned long long)in.bytes, "stripes", (unsigned)in.nstripes, "live",
        (unsigned long long)in.live, "overloaded", (unsigned long long)in.full, "recovered",
        (unsigned long long)in.recovered, "evicted", (unsigned long long)in.evicted, "lock_waits",
        (unsigned long long)in.waits);
    if (v == NULL || PyDict_Update(d, v) < 0 ||
        rg_denials_into(d, shm_denials(self), RG_DENIALS_SHOWN, rg_now_ns()) < 0)
        goto error;
    Py_DECREF(v);
    Py_XDECREF(cause);
    return d;
error:
    Py_XDECREF(v);
    Py_XDECREF(cause);
    Py_DECREF(d);
    return NULL;
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
shm_unlink_self(ShmEngineObject *self, PyObject *unused)
{
    (void)unused;
    return shm_do_unlink(self->name);
}

/* _test_fault(hold_ns, hang): the crash tests' fault injection (shmstore.h). */
static PyObject *
shm_test_fault(ShmEngineObject *self, PyObject *args)
{
    unsigned long long hold;
    int hang;
    if (!PyArg_ParseTuple(args, "Ki:_test_fault", &hold, &hang) || shm_ready(self) < 0)
        return NULL;
    self->shm.test_hold_ns = hold;
    self->shm.test_hang = hang;
    Py_RETURN_NONE;
}

static void
shm_dealloc(ShmEngineObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    rg_shm_close(&self->shm);
    rg_denials_free(&self->denials);
    Py_CLEAR(self->name);
    Py_CLEAR(self->module);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyMethodDef shm_methods[] = {
    {"submit", (PyCFunction)(void (*)(void))shm_submit, METH_FASTCALL,
     "submit(key, spec, cost[, slot_id]) -> Decision"},
    {"reset", (PyCFunction)(void (*)(void))shm_reset, METH_FASTCALL, "reset(key, spec) -> bool"},
    {"charge", (PyCFunction)(void (*)(void))shm_charge, METH_FASTCALL,
     "charge(key, spec, cost) -> Decision"},
    {"release", (PyCFunction)(void (*)(void))shm_release, METH_FASTCALL,
     "release(key, spec, slot_id) -> bool"},
    {"clear", (PyCFunction)shm_clear_all, METH_NOARGS,
     "clear() -> int: remove every bucket and concurrency slot set; how many live ones went"},
    {"entries", (PyCFunction)(void (*)(void))shm_entries, METH_FASTCALL,
     "entries(prefix=b'') -> [(key, key_id, value)]: every live entry whose key starts with "
     "prefix; value: microseconds until a rate's bucket is full, or a set's live slots (key_id "
     "b'c').  A key longer than 172 bytes is listed by its first 140."},
    {"unlink", (PyCFunction)shm_unlink_self, METH_NOARGS,
     "unlink() -> bool: remove the segment's name (processes using it keep it)"},
    {"close", (PyCFunction)shm_close, METH_NOARGS, "Unmap the segment (it stays for the others)."},
    {"stats", (PyCFunction)shm_stats, METH_NOARGS, "Counters, and the segment's under 'shm'."},
    {"_test_fault", (PyCFunction)shm_test_fault, METH_VARARGS, "Fault injection, for tests."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot shm_slots[] = {
    {Py_tp_new, shm_tp_new},
    {Py_tp_dealloc, shm_dealloc},
    {Py_tp_methods, shm_methods},
    {Py_tp_doc, "shm://NAME: buckets shared by every process of the host, decided at once."},
    {0, NULL},
};

static PyType_Spec shm_spec = {
    .name = "rategate._core.ShmEngine",
    .basicsize = sizeof(ShmEngineObject),
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

int
rg_shm_types_init(PyObject *m)
{
    PyTypeObject *tp = (PyTypeObject *)PyType_FromModuleAndSpec(m, &shm_spec, NULL);
    int rc = tp == NULL ? -1 : PyModule_AddType(m, tp);
    Py_XDECREF(tp);
    if (rc < 0 || PyModule_AddFunctions(m, shm_functions) < 0 ||
        PyModule_AddIntConstant(m, "SHM_DEFAULT_CAPACITY", RG_SHM_DEFAULT_CAPACITY) < 0 ||
        PyModule_AddIntConstant(m, "SHM_NAME_MAX", RG_SHM_NAME_MAX) < 0)
        return -1;
    return 0;
}
