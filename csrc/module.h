/*
 * module.h: what the Python-facing files share (module.c, pyengine.c,
 * pylocal.c, pygate.c).
 * Everything here runs on a thread holding the GIL.
 */
#ifndef RG_MODULE_H
#define RG_MODULE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "check.h"

typedef struct rg_state {
    PyTypeObject *DecisionType;
    PyTypeObject *SpecType;
    PyTypeObject *EngineType;
    PyTypeObject *MemoryEngineType;
    PyTypeObject *PortType;
    PyObject *ReplyError;             /* rategate._core.ReplyError (pyengine.c) */
    PyObject *err_str[RG_ERR__COUNT]; /* interned kinds, [0] is None */
    PyObject *get_running_loop;       /* asyncio.get_running_loop */
    PyObject *InvalidStateError;      /* asyncio.InvalidStateError */
    PyObject *s_create_future, *s_set_result, *s_add_reader, *s_remove_reader,
        *s_is_closed, *s_is_running, *s_call_soon_threadsafe, *s_drain, *s_close_in_loop;
    uint64_t next_spec_id;
} rg_state;

extern PyModuleDef rg_module_def;

static inline rg_state *
rg_get_state(PyObject *module)
{
    return (rg_state *)PyModule_GetState(module);
}

/* The state of the module that defined `tp` (a heap type of ours). */
rg_state *rg_state_of_type(PyTypeObject *tp);

typedef struct {
    PyObject_HEAD
    double reset_after;
    double retry_after;
    double latency; /* seconds from submit to decision on a loop thread; < 0: None */
    long long limit;
    long long remaining;
    PyObject *error; /* str, or None */
    int rate;
    char allowed;
} DecisionObject;

typedef struct {
    PyObject_HEAD
    rg_spec *spec;   /* our reference */
    PyObject *rates; /* tuple of Rate */
} SpecObject;

/* Counters kept under the GIL by every engine. */
typedef struct rg_counters {
    unsigned long long checks, allowed, denied, cached;
    unsigned long long leased; /* allowed from a lease, without Redis (lease.h) */
    unsigned long long errors[RG_ERR__COUNT];
} rg_counters;

PyObject *rg_decision_new(rg_state *st, int allowed, int rate, long long limit,
                          long long remaining, double reset_after,
                          double retry_after, int err);
/* The failure-mode decision for `err`, counted. */
PyObject *rg_failure(rg_state *st, rg_counters *k, const rg_spec *spec,
                     int failure_open, int err);
/* A store's decision for a check of `cost`, counted.  A denied cost larger
 * than the bucket of one of the rates can never be allowed: its
 * retry_after is math.inf (the middleware then sends no Retry-After). */
PyObject *rg_answer(rg_state *st, rg_counters *k, const rg_spec *spec,
                    const rg_result *r, long long cost);
PyObject *rg_counters_dict(rg_state *st, const rg_counters *k);

/* Arguments of submit(key, spec, cost), checked: 0 or -1 with an error. */
int rg_parse_submit(rg_state *st, PyObject *const *args, Py_ssize_t nargs,
                    const char **key, Py_ssize_t *keylen, SpecObject **spec,
                    long long *cost);

/* submit()'s optional 4th argument, the concurrency slot id, checked against
 * the spec (which needs one exactly when it has a concurrency limit): 0 or
 * -1 with an error.  *sid is NULL when not given. */
int rg_parse_sid(SpecObject *spec, PyObject *const *args, Py_ssize_t nargs,
                 const char **sid, Py_ssize_t *sidlen);

/* Arguments of charge(key, spec, cost): cost may be negative (a refund). */
int rg_parse_charge(rg_state *st, PyObject *const *args, Py_ssize_t nargs,
                    const char **key, Py_ssize_t *keylen, SpecObject **spec,
                    long long *cost);

/* Arguments of release(key, spec, sid): the spec has a concurrency limit. */
int rg_parse_release(rg_state *st, PyObject *const *args, Py_ssize_t nargs,
                     const char **key, Py_ssize_t *keylen, SpecObject **spec,
                     const char **sid, Py_ssize_t *sidlen);

/* Arguments of reset(key, spec), checked the same way. */
int rg_parse_reset(rg_state *st, PyObject *const *args, Py_ssize_t nargs,
                   const char **key, Py_ssize_t *keylen, SpecObject **spec);

/* Add the denial summary (topk.h) to a stats() dict: "top_denied" (at most
 * `max` keys, most denied first: {"key", "denials", "overcount",
 * "truncated"}), "denials_summarized" and "denied_clients_1m". */
struct rg_denials;
int rg_denials_into(PyObject *d, const struct rg_denials *den, size_t max, uint64_t now_ns);
#define RG_DENIALS_SHOWN 16

int rg_engine_types_init(PyObject *module, rg_state *st);
/* rategate._core.Gate and its helpers (pygate.c). */
int rg_gate_types_init(PyObject *module);

/* entries()'s optional prefix (bytes or str; default empty): 0 or -1. */
int rg_parse_prefix(PyObject *const *args, Py_ssize_t nargs, const char **prefix,
                    Py_ssize_t *plen);

/* MemoryEngine, ShmEngine and shm_unlink() (pylocal.c). */
int rg_local_types_init(PyObject *module, rg_state *st);

/* Bumped in the child after fork(): engines started before it are gone. */
extern unsigned long rg_fork_generation;

#define RG_MAX_KEY 65536

#endif
