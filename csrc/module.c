/*
 * module.c: the rategate._core module: state, Decision, Spec.
 *
 * Multi-phase init (PEP 489), heap types, all state in the module state.
 * One interpreter only: the loop threads and the fork handler are
 * process-wide, and free-threaded builds are not supported (no Py_mod_gil
 * slot, so such a build re-enables the GIL for us).
 */
#include "module.h"

#include <math.h>
#include <pthread.h>
#include <structmember.h>

#include "memstore.h"
#include "cache.h"
#include "engine.h"
#include "script.h"
#include "topk.h"

unsigned long rg_fork_generation;

static void
rg_atfork_child(void)
{
    rg_fork_generation++;
}

rg_state *
rg_state_of_type(PyTypeObject *tp)
{
    PyObject *m = PyType_GetModuleByDef(tp, &rg_module_def);
    return m == NULL ? NULL : rg_get_state(m);
}

/* ---- Decision --------------------------------------------------------------- */

PyObject *
rg_decision_new(rg_state *st, int allowed, int rate, long long limit,
                long long remaining, double reset_after, double retry_after, int err)
{
    DecisionObject *d = (DecisionObject *)st->DecisionType->tp_alloc(st->DecisionType, 0);
    if (d == NULL)
        return NULL;
    d->allowed = (char)(allowed != 0);
    d->rate = rate;
    d->limit = limit;
    d->remaining = remaining;
    d->reset_after = reset_after;
    d->retry_after = retry_after;
    d->latency = -1.0;
    d->error = Py_NewRef(st->err_str[err]);
    return (PyObject *)d;
}

PyObject *
rg_failure(rg_state *st, rg_counters *k, const rg_spec *spec, int failure_open, int err)
{
    k->errors[err]++;
    if (failure_open)
        k->allowed++;
    else
        k->denied++;
    return rg_decision_new(st, failure_open, 0, spec->rates[0].burst, 0, 0.0,
                           failure_open ? 0.0 : 1.0, err);
}

PyObject *
rg_answer(rg_state *st, rg_counters *k, const rg_spec *spec, const rg_result *r,
          long long cost)
{
    double retry = 0.0;
    int j;

    if (r->allowed) {
        k->allowed++;
    } else {
        k->denied++;
        retry = (double)r->retry_us / 1e6;
        /* allowed needs cost * T <= tau + slack for every rate, i.e. (the
         * slack being at most T/2) cost <= burst: past that, never. */
        for (j = 0; j < spec->n; j++)
            if (cost > spec->rates[j].burst)
                retry = Py_HUGE_VAL;
    }
    return rg_decision_new(st, r->allowed, r->rate, spec->rates[r->rate].burst,
                           r->remaining, (double)r->reset_us / 1e6, retry, RG_ERR_NONE);
}

static PyObject *
decision_tp_new(PyTypeObject *tp, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"allowed", "limit", "remaining", "reset_after",
                             "retry_after", "error", "rate", NULL};
    int allowed, rate = 0;
    long long limit, remaining;
    double reset_after, retry_after;
    PyObject *error = Py_None;
    DecisionObject *d;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "pLLdd|Oi:Decision", kwlist, &allowed,
                                     &limit, &remaining, &reset_after, &retry_after,
                                     &error, &rate))
        return NULL;
    if (error != Py_None && !PyUnicode_Check(error)) {
        PyErr_SetString(PyExc_TypeError, "Decision error must be a str or None");
        return NULL;
    }
    d = (DecisionObject *)tp->tp_alloc(tp, 0);
    if (d == NULL)
        return NULL;
    d->allowed = (char)allowed;
    d->rate = rate;
    d->limit = limit;
    d->remaining = remaining;
    d->reset_after = reset_after;
    d->retry_after = retry_after;
    d->latency = -1.0;
    d->error = Py_NewRef(error);
    return (PyObject *)d;
}

static void
decision_dealloc(DecisionObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    Py_CLEAR(self->error);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *
decision_repr(DecisionObject *self)
{
    PyObject *r, *reset = PyFloat_FromDouble(self->reset_after);
    PyObject *retry = PyFloat_FromDouble(self->retry_after);
    if (reset == NULL || retry == NULL) {
        r = NULL;
        goto done;
    }
    r = PyUnicode_FromFormat("Decision(allowed=%s, limit=%lld, remaining=%lld, "
                             "reset_after=%R, retry_after=%R, error=%R)",
                             self->allowed ? "True" : "False", self->limit,
                             self->remaining, reset, retry, self->error);
done:
    Py_XDECREF(reset);
    Py_XDECREF(retry);
    return r;
}

static PyMemberDef decision_members[] = {
    {"allowed", T_BOOL, offsetof(DecisionObject, allowed), READONLY, "True if the request may proceed"},
    {"limit", T_LONGLONG, offsetof(DecisionObject, limit), READONLY, "bucket size of the reported rate"},
    {"remaining", T_LONGLONG, offsetof(DecisionObject, remaining), READONLY, "tokens left after this check"},
    {"reset_after", T_DOUBLE, offsetof(DecisionObject, reset_after), READONLY, "seconds until the bucket is full"},
    {"retry_after", T_DOUBLE, offsetof(DecisionObject, retry_after), READONLY, "seconds until this cost would be allowed; 0 if allowed; inf if never (cost above a bucket)"},
    {"error", T_OBJECT, offsetof(DecisionObject, error), READONLY, "None, or why the failure mode decided"},
    {"rate", T_INT, offsetof(DecisionObject, rate), READONLY, "index of the reported rate"},
    {NULL, 0, 0, 0, NULL},
};

static PyObject *
decision_latency(DecisionObject *self, void *unused)
{
    (void)unused;
    if (self->latency < 0)
        Py_RETURN_NONE;
    return PyFloat_FromDouble(self->latency);
}

static PyGetSetDef decision_getset[] = {
    {"latency", (getter)decision_latency, NULL,
     "seconds from submit to decision, measured on the loop thread; None for a decision "
     "answered at once (memory://, the deny cache, the failure mode while Redis is down)",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot decision_slots[] = {
    {Py_tp_getset, decision_getset},
    {Py_tp_new, decision_tp_new},
    {Py_tp_dealloc, decision_dealloc},
    {Py_tp_repr, decision_repr},
    {Py_tp_members, decision_members},
    {Py_tp_doc, "The answer to one check (immutable)."},
    {0, NULL},
};

static PyType_Spec decision_spec = {
    .name = "rategate._core.Decision",
    .basicsize = sizeof(DecisionObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = decision_slots,
};

/* ---- Spec -------------------------------------------------------------------- */

/* A field of rate number i as a C number; -1 with an error set on failure.
 * Not a Rate at all (no such attribute, not a number): TypeError. */
static int
rate_field(PyObject *r, Py_ssize_t i, const char *name, double *out)
{
    PyObject *v = PyObject_GetAttrString(r, name);
    if (v != NULL) {
        *out = PyFloat_AsDouble(v);
        Py_DECREF(v);
        if (!(*out == -1.0 && PyErr_Occurred()))
            return 0;
    }
    if (PyErr_ExceptionMatches(PyExc_AttributeError) || PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError,
                     "Spec takes a tuple of rategate.Rate (use Limiter.compile(\"10/second\")); "
                     "item %zd is %.100s, with no number %s",
                     i, Py_TYPE(r)->tp_name, name);
    }
    return -1;
}

static PyObject *
spec_tp_new(PyTypeObject *tp, PyObject *args, PyObject *kw)
{
    rg_state *st = rg_state_of_type(tp);
    static char *kwlist[] = {"", "concurrency", "ttl", "lease", NULL};
    PyObject *rates;
    SpecObject *self = NULL;
    rg_spec *s = NULL;
    Py_ssize_t i, n;
    long long conc = 0;
    double ttl = 60.0;
    int lease = 0;

    if (st == NULL)
        return NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!|$Ldp:Spec", kwlist, &PyTuple_Type, &rates,
                                     &conc, &ttl, &lease))
        return NULL;
    if (lease && conc > 0) {
        PyErr_SetString(PyExc_ValueError,
                        "lease=True cannot go with a concurrency limit: a slot is taken in the "
                        "store for every request, so there is nothing to lease; drop one of them");
        return NULL;
    }
    n = PyTuple_GET_SIZE(rates);
    if (conc < 0 || conc > (long long)RG_MAX_LIMIT) {
        PyErr_Format(PyExc_ValueError,
                     "concurrency must be an int from 1 to 10**9 (0: none), got %lld", conc);
        return NULL;
    }
    if (conc > 0 && !(ttl >= 0.001 && ttl <= 86400.0)) { /* false for NaN */
        PyErr_Format(PyExc_ValueError,
                     "ttl (how long a dead process may hold a concurrency slot) must be a "
                     "number of seconds from 0.001 to 86400, got %R",
                     PyTuple_GET_ITEM(args, PyTuple_GET_SIZE(args) > 2 ? 2 : 0));
        return NULL;
    }
    if (n < (conc > 0 ? 0 : 1) || n > RG_MAX_RATES - (conc > 0)) {
        PyErr_Format(PyExc_ValueError, "a check takes 1 to %d rates (0 to %d with a concurrency "
                     "limit), got %zd", RG_MAX_RATES, RG_MAX_RATES - 1, n);
        return NULL;
    }
    s = calloc(1, sizeof(*s));
    if (s == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    atomic_init(&s->refcnt, 1);
    s->n = (int)n;
    s->id = ++st->next_spec_id;
    for (i = 0; i < n; i++) {
        PyObject *r = PyTuple_GET_ITEM(rates, i), *kid;
        double limit, period, burst;
        const char *id;
        Py_ssize_t idlen;

        if (rate_field(r, i, "limit", &limit) < 0 || rate_field(r, i, "period", &period) < 0 ||
            rate_field(r, i, "burst", &burst) < 0)
            goto error;
        /* The same bounds as rates.Rate (NaN fails every comparison). */
        if (!(limit >= 1 && limit <= RG_MAX_LIMIT && limit == floor(limit) && burst >= 1 &&
              burst <= RG_MAX_LIMIT && burst == floor(burst) && period >= RG_MIN_PERIOD_S &&
              period <= RG_MAX_PERIOD_S)) {
            PyErr_Format(PyExc_ValueError,
                         "bad rate %R: limit and burst must be whole numbers from 1 to 10**9, "
                         "period from 0.001 to 31622400 seconds (366 days)", r);
            goto error;
        }
        s->rates[i].T = period * 1e6 / limit;
        s->rates[i].tau = burst * s->rates[i].T;
        s->rates[i].burst = (int64_t)burst;
        if (s->rates[i].T < 1.0) {
            PyErr_Format(PyExc_ValueError,
                         "rate %R is too fast: at most 1,000,000 per second", r);
            goto error;
        }
        if (s->rates[i].tau > RG_MAX_TAU_US) {
            PyErr_Format(PyExc_ValueError,
                         "rate %R takes more than 10 years to refill its bucket "
                         "(burst * period / limit): use a smaller burst or a shorter period", r);
            goto error;
        }
        /* at most 24 characters each ("%.17g" of a finite double): no truncation */
        s->arg_T_len[i] = (uint8_t)snprintf(s->arg_T[i], sizeof(s->arg_T[i]), "%.17g", s->rates[i].T);
        s->arg_tau_len[i] =
            (uint8_t)snprintf(s->arg_tau[i], sizeof(s->arg_tau[i]), "%.17g", s->rates[i].tau);
        kid = PyObject_GetAttrString(r, "key_id");
        if (kid == NULL)
            goto error;
        id = PyUnicode_Check(kid) ? PyUnicode_AsUTF8AndSize(kid, &idlen) : NULL;
        if (id == NULL || idlen < 1 || idlen >= (Py_ssize_t)sizeof(s->key_id[i])) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "bad key_id %R", kid);
            Py_DECREF(kid);
            goto error;
        }
        memcpy(s->key_id[i], id, (size_t)idlen);
        s->key_id_len[i] = (uint8_t)idlen;
        Py_DECREF(kid);
    }
    if (lease) {
        /* lease.h: a sixteenth of the smallest burst per process, usable a
         * quarter of the shortest period (tau), at most 1 s. */
        double ttl_us = 1e6;
        s->lease = 1;
        s->lease_max = (int64_t)RG_MAX_LIMIT;
        for (i = 0; i < n; i++) {
            if (s->rates[i].burst / 16 < s->lease_max)
                s->lease_max = s->rates[i].burst / 16;
            if (s->rates[i].tau / 4 < ttl_us)
                ttl_us = s->rates[i].tau / 4;
        }
        if (s->lease_max < 1)
            s->lease_max = 1;
        s->lease_ttl_ns = ttl_us < 1.0 ? 1000u : (uint64_t)(ttl_us * 1000.0);
    }
    if (conc > 0) {
        /* The concurrency limit reports as rate n (see check.h). */
        s->conc_limit = conc;
        s->conc_ttl_us = floor(ttl * 1e6);
        s->rates[n].burst = conc;
        s->arg_conc_len[0] = (uint8_t)snprintf(s->arg_conc[0], sizeof(s->arg_conc[0]), "%lld", conc);
        s->arg_conc_len[1] = (uint8_t)snprintf(s->arg_conc[1], sizeof(s->arg_conc[1]), "%.17g",
                                               s->conc_ttl_us);
    }
    self = (SpecObject *)tp->tp_alloc(tp, 0);
    if (self == NULL)
        goto error;
    self->spec = s;
    self->rates = Py_NewRef(rates);
    return (PyObject *)self;
error:
    free(s);
    return NULL;
}

static void
spec_dealloc(SpecObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    if (self->spec != NULL)
        rg_spec_decref(self->spec);
    Py_CLEAR(self->rates);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *
spec_concurrency(SpecObject *self, void *unused)
{
    (void)unused;
    return PyLong_FromLongLong(self->spec->conc_limit);
}

static PyObject *
spec_ttl(SpecObject *self, void *unused)
{
    (void)unused;
    return PyFloat_FromDouble(self->spec->conc_ttl_us / 1e6);
}

static PyObject *
spec_lease(SpecObject *self, void *unused)
{
    (void)unused;
    return PyBool_FromLong(self->spec->lease);
}

static PyGetSetDef spec_getset[] = {
    {"lease", (getter)spec_lease, NULL, "whether hits of cost 1 are answered from leased tokens", NULL},
    {"concurrency", (getter)spec_concurrency, NULL, "the concurrency limit, 0 if none", NULL},
    {"ttl", (getter)spec_ttl, NULL, "seconds a concurrency slot is held at most", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef spec_members[] = {
    {"rates", T_OBJECT, offsetof(SpecObject, rates), READONLY, "the rates, a tuple of Rate"},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot spec_slots[] = {
    {Py_tp_new, spec_tp_new},
    {Py_tp_dealloc, spec_dealloc},
    {Py_tp_members, spec_members},
    {Py_tp_getset, spec_getset},
    {Py_tp_doc, "A compiled list of rates (see Limiter.compile)."},
    {0, NULL},
};

static PyType_Spec spec_spec = {
    .name = "rategate._core.Spec",
    .basicsize = sizeof(SpecObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = spec_slots,
};

/* ---- shared helpers ---------------------------------------------------------- */

/* key and spec of a check, checked: 0 or -1 with an error. */
static int
parse_key_spec(rg_state *st, PyObject *k, PyObject *sp, const char **key, Py_ssize_t *keylen,
               SpecObject **spec)
{
    if (PyBytes_Check(k)) {
        *key = PyBytes_AS_STRING(k);
        *keylen = PyBytes_GET_SIZE(k);
    } else if (PyUnicode_Check(k)) {
        *key = PyUnicode_AsUTF8AndSize(k, keylen);
        if (*key == NULL)
            return -1;
    } else {
        PyErr_Format(PyExc_TypeError, "key must be str or bytes, not %.100s", Py_TYPE(k)->tp_name);
        return -1;
    }
    if (*keylen == 0) {
        PyErr_SetString(PyExc_ValueError, "key must not be empty");
        return -1;
    }
    if (*keylen > RG_MAX_KEY) {
        PyErr_Format(PyExc_ValueError,
                     "key is %zd bytes, at most %d allowed: hash long keys (rategate.keys does)",
                     *keylen, RG_MAX_KEY);
        return -1;
    }
    if (Py_TYPE(sp) != st->SpecType) {
        PyErr_Format(PyExc_TypeError, "spec must come from Limiter.compile(), not %.100s",
                     Py_TYPE(sp)->tp_name);
        return -1;
    }
    *spec = (SpecObject *)sp;
    return 0;
}

/* A cost: an int from lo to 2**53. */
static int
parse_cost(PyObject *o, long long lo, long long *cost)
{
    if (PyLong_Check(o) && !PyBool_Check(o)) {
        *cost = PyLong_AsLongLong(o);
        if (!(*cost == -1 && PyErr_Occurred()) && *cost >= lo && *cost <= RG_MAX_COST)
            return 0;
        PyErr_Clear();
    }
    PyErr_Format(PyExc_ValueError, "cost must be an int from %s to 2**53, got %R%s",
                 lo == 0 ? "0" : "-2**53", o,
                 lo == 0 ? " (to give tokens back, charge() a negative cost)" : "");
    return -1;
}

int
rg_parse_submit(rg_state *st, PyObject *const *args, Py_ssize_t nargs, const char **key,
                Py_ssize_t *keylen, SpecObject **spec, long long *cost)
{
    if (nargs != 3 && nargs != 4) {
        PyErr_Format(PyExc_TypeError,
                     "submit() takes (key, spec, cost[, slot_id]), got %zd arguments", nargs);
        return -1;
    }
    if (parse_key_spec(st, args[0], args[1], key, keylen, spec) < 0)
        return -1;
    return parse_cost(args[2], 0, cost);
}

#define RG_MAX_SID 256

static int
parse_sid_obj(PyObject *o, const char **sid, Py_ssize_t *sidlen)
{
    if (PyBytes_Check(o)) {
        *sid = PyBytes_AS_STRING(o);
        *sidlen = PyBytes_GET_SIZE(o);
    } else if (PyUnicode_Check(o)) {
        if ((*sid = PyUnicode_AsUTF8AndSize(o, sidlen)) == NULL)
            return -1;
    } else {
        PyErr_Format(PyExc_TypeError, "slot_id must be str or bytes, not %.100s",
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    if (*sidlen < 1 || *sidlen > RG_MAX_SID) {
        PyErr_Format(PyExc_ValueError, "slot_id must be 1 to %d bytes, got %zd", RG_MAX_SID,
                     *sidlen);
        return -1;
    }
    return 0;
}

int
rg_parse_sid(SpecObject *spec, PyObject *const *args, Py_ssize_t nargs, const char **sid,
             Py_ssize_t *sidlen)
{
    *sid = NULL;
    *sidlen = 0;
    if (spec->spec->conc_limit == 0) {
        if (nargs == 3)
            return 0;
        PyErr_SetString(PyExc_ValueError,
                        "submit(): a slot_id goes only with a spec that has a concurrency limit");
        return -1;
    }
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError,
                        "submit(): this spec has a concurrency limit: pass a unique slot_id as "
                        "the 4th argument (Limiter.concurrency() does)");
        return -1;
    }
    return parse_sid_obj(args[3], sid, sidlen);
}

int
rg_parse_charge(rg_state *st, PyObject *const *args, Py_ssize_t nargs, const char **key,
                Py_ssize_t *keylen, SpecObject **spec, long long *cost)
{
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "charge() takes (key, spec, cost), got %zd arguments", nargs);
        return -1;
    }
    if (parse_key_spec(st, args[0], args[1], key, keylen, spec) < 0)
        return -1;
    if ((*spec)->spec->n == 0) {
        PyErr_SetString(PyExc_ValueError, "charge(): the spec has no rates to charge");
        return -1;
    }
    return parse_cost(args[2], -RG_MAX_COST, cost);
}

int
rg_parse_release(rg_state *st, PyObject *const *args, Py_ssize_t nargs, const char **key,
                 Py_ssize_t *keylen, SpecObject **spec, const char **sid, Py_ssize_t *sidlen)
{
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "release() takes (key, spec, slot_id), got %zd arguments",
                     nargs);
        return -1;
    }
    if (parse_key_spec(st, args[0], args[1], key, keylen, spec) < 0)
        return -1;
    if ((*spec)->spec->conc_limit == 0) {
        PyErr_SetString(PyExc_ValueError, "release(): the spec has no concurrency limit");
        return -1;
    }
    return parse_sid_obj(args[2], sid, sidlen);
}

int
rg_parse_reset(rg_state *st, PyObject *const *args, Py_ssize_t nargs, const char **key,
               Py_ssize_t *keylen, SpecObject **spec)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "reset() takes (key, spec), got %zd arguments", nargs);
        return -1;
    }
    return parse_key_spec(st, args[0], args[1], key, keylen, spec);
}

int
rg_parse_prefix(PyObject *const *args, Py_ssize_t nargs, const char **prefix, Py_ssize_t *plen)
{
    *prefix = "";
    *plen = 0;
    if (nargs > 1) {
        PyErr_Format(PyExc_TypeError, "entries() takes (prefix=b''), got %zd arguments", nargs);
        return -1;
    }
    if (nargs == 0)
        return 0;
    if (PyBytes_Check(args[0])) {
        *prefix = PyBytes_AS_STRING(args[0]);
        *plen = PyBytes_GET_SIZE(args[0]);
        return 0;
    }
    if (PyUnicode_Check(args[0]))
        return (*prefix = PyUnicode_AsUTF8AndSize(args[0], plen)) == NULL ? -1 : 0;
    PyErr_Format(PyExc_TypeError, "entries(): prefix must be bytes or str, not %.100s",
                 Py_TYPE(args[0])->tp_name);
    return -1;
}

PyObject *
rg_counters_dict(rg_state *st, const rg_counters *k)
{
    PyObject *d = NULL, *errs = NULL;
    int i;

    errs = PyDict_New();
    if (errs == NULL)
        goto error;
    for (i = 1; i < RG_ERR__COUNT; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(k->errors[i]);
        if (v == NULL || PyDict_SetItem(errs, st->err_str[i], v) < 0) {
            Py_XDECREF(v);
            goto error;
        }
        Py_DECREF(v);
    }
    d = Py_BuildValue("{sKsKsKsKsKsO}", "checks", k->checks, "allowed", k->allowed,
                      "denied", k->denied, "cached_denials", k->cached, "leased", k->leased,
                      "errors", errs);
error:
    Py_XDECREF(errs);
    return d;
}

/* ---- module functions -------------------------------------------------------- */

/* _gcra_check(spec, now_us, cost, tats, charge=False) -> (allowed, rate,
 * remaining, reset_us, retry_us, block_us, new_tats): the C algorithm (or
 * the charge), for tests. */
static PyObject *
mod_gcra_check(PyObject *module, PyObject *args)
{
    rg_state *st = rg_get_state(module);
    PyObject *spec, *tats, *out = NULL, *nt = NULL;
    double now, tv[RG_MAX_RATES];
    long long cost;
    rg_result r;
    int i, n;

    int charge = 0;

    if (!PyArg_ParseTuple(args, "O!dLO!|p:_gcra_check", st->SpecType, &spec, &now, &cost,
                          &PyList_Type, &tats, &charge))
        return NULL;
    n = ((SpecObject *)spec)->spec->n;
    if (PyList_GET_SIZE(tats) != n) {
        PyErr_SetString(PyExc_ValueError, "one TAT per rate");
        return NULL;
    }
    for (i = 0; i < n; i++) {
        tv[i] = PyFloat_AsDouble(PyList_GET_ITEM(tats, i));
        if (tv[i] == -1.0 && PyErr_Occurred())
            return NULL;
    }
    if (charge)
        rg_gcra_charge(((SpecObject *)spec)->spec->rates, n, now, cost, tv, &r);
    else
        rg_gcra_check(((SpecObject *)spec)->spec->rates, n, now, cost, tv, &r);
    nt = PyList_New(n);
    if (nt == NULL)
        return NULL;
    for (i = 0; i < n; i++) {
        PyObject *f = PyFloat_FromDouble(tv[i]);
        if (f == NULL)
            goto done;
        PyList_SET_ITEM(nt, i, f);
    }
    out = Py_BuildValue("(iiLLLLO)", r.allowed, r.rate, (long long)r.remaining,
                        (long long)r.reset_us, (long long)r.retry_us, (long long)r.block_us, nt);
done:
    Py_DECREF(nt);
    return out;
}

static PyObject *
mod_live(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    return Py_BuildValue("{slslsl}", "checks", atomic_load(&rg_live_checks), "ports",
                         atomic_load(&rg_live_ports), "conns", atomic_load(&rg_live_conns));
}


/* ---- the denial summary (topk.h) in stats() --------------------------------- */

int
rg_denials_into(PyObject *d, const rg_denials *den, size_t max, uint64_t now_ns)
{
    rg_denied_key top[RG_TOPK_K];
    size_t n = rg_denials_top(den, top, max < RG_TOPK_K ? max : RG_TOPK_K), i;
    PyObject *list = PyList_New((Py_ssize_t)n), *v;
    int rc = -1;

    if (list == NULL)
        return -1;
    for (i = 0; i < n; i++) {
        /* Keys are bytes (a str key is its UTF-8): shown as text, any
         * other byte escaped. */
        PyObject *key = PyUnicode_DecodeUTF8(top[i].key, (Py_ssize_t)top[i].keylen,
                                             "backslashreplace");
        if (key == NULL)
            goto done;
        v = Py_BuildValue("{sNsKsKsO}", "key", key, "denials", (unsigned long long)top[i].count,
                          "overcount", (unsigned long long)top[i].error, "truncated",
                          top[i].truncated ? Py_True : Py_False);
        if (v == NULL)
            goto done;
        PyList_SET_ITEM(list, (Py_ssize_t)i, v);
    }
    v = Py_BuildValue("{sOsKsK}", "top_denied", list, "denials_summarized",
                      (unsigned long long)rg_denials_total(den), "denied_clients_1m",
                      (unsigned long long)rg_denials_recent(den, now_ns));
    if (v == NULL)
        goto done;
    rc = PyDict_Update(d, v);
    Py_DECREF(v);
done:
    Py_DECREF(list);
    return rc;
}

/* _denials(keys, times_ns, max) -> the stats() entries of a fresh summary
 * fed key i at times_ns[i] (the tests compare it with a Python model). */
static PyObject *
mod_denials(PyObject *module, PyObject *args)
{
    PyObject *keys, *times, *out = NULL;
    Py_ssize_t i, n, max;
    rg_denials den = {0};
    uint64_t now = 0;
    (void)module;

    if (!PyArg_ParseTuple(args, "O!O!n:_denials", &PyList_Type, &keys, &PyList_Type, &times,
                          &max))
        return NULL;
    n = PyList_GET_SIZE(keys);
    if (PyList_GET_SIZE(times) != n || max < 0) {
        PyErr_SetString(PyExc_ValueError, "one time per key, max >= 0");
        return NULL;
    }
    for (i = 0; i < n; i++) {
        char *k;
        Py_ssize_t kl;
        if (PyBytes_AsStringAndSize(PyList_GET_ITEM(keys, i), &k, &kl) < 0)
            goto done;
        now = (uint64_t)PyLong_AsUnsignedLongLong(PyList_GET_ITEM(times, i));
        if (PyErr_Occurred())
            goto done;
        rg_denials_note(&den, rg_hash(k, (size_t)kl), k, (size_t)kl, now);
    }
    out = PyDict_New();
    if (out != NULL && rg_denials_into(out, &den, (size_t)max, now) < 0)
        Py_CLEAR(out);
done:
    rg_denials_free(&den);
    return out;
}

static PyMethodDef module_methods[] = {
    {"_gcra_check", mod_gcra_check, METH_VARARGS, "The C GCRA, for tests."},
    {"_denials", mod_denials, METH_VARARGS, "The denial summary (topk.h), for tests."},
    {"_live", mod_live, METH_NOARGS, "Live checks, ports and connections (leak tests)."},
    {NULL, NULL, 0, NULL},
};

/* ---- init --------------------------------------------------------------------- */

static int
module_exec(PyObject *m)
{
    static const char *kinds[RG_ERR__COUNT] = {NULL, "timeout", "unavailable",
                                               "overloaded", "closed", "redis_error"};
    static int atfork_done;
    rg_state *st = rg_get_state(m);
    PyObject *asyncio = NULL, *script = NULL;
    int i, rc = -1;

    if (!atfork_done) {
        if (pthread_atfork(NULL, NULL, rg_atfork_child) != 0) {
            PyErr_SetString(PyExc_RuntimeError, "pthread_atfork failed");
            return -1;
        }
        atfork_done = 1;
        rg_hash_seed(rg_now_ns() ^ (uint64_t)(uintptr_t)&atfork_done);
    }
#define TYPE(field, spec, base)                                                          \
    do {                                                                                 \
        st->field = (PyTypeObject *)PyType_FromModuleAndSpec(m, &spec, base);            \
        if (st->field == NULL || PyModule_AddType(m, st->field) < 0)                     \
            goto done;                                                                   \
    } while (0)
    TYPE(DecisionType, decision_spec, NULL);
    TYPE(SpecType, spec_spec, NULL);
#undef TYPE
    if (rg_engine_types_init(m, st) < 0 || rg_local_types_init(m, st) < 0 ||
        rg_gate_types_init(m) < 0)
        goto done;

    st->err_str[0] = Py_NewRef(Py_None);
    for (i = 1; i < RG_ERR__COUNT; i++)
        if ((st->err_str[i] = PyUnicode_InternFromString(kinds[i])) == NULL)
            goto done;
#define STR(field, text)                                                                 \
    if ((st->field = PyUnicode_InternFromString(text)) == NULL)                          \
        goto done;
    STR(s_create_future, "create_future");
    STR(s_set_result, "set_result");
    STR(s_add_reader, "add_reader");
    STR(s_remove_reader, "remove_reader");
    STR(s_is_closed, "is_closed");
    STR(s_is_running, "is_running");
    STR(s_call_soon_threadsafe, "call_soon_threadsafe");
    STR(s_drain, "_drain");
    STR(s_close_in_loop, "_close_in_loop");
#undef STR
    asyncio = PyImport_ImportModule("asyncio");
    if (asyncio == NULL)
        goto done;
    st->get_running_loop = PyObject_GetAttrString(asyncio, "get_running_loop");
    st->InvalidStateError = PyObject_GetAttrString(asyncio, "InvalidStateError");
    if (st->get_running_loop == NULL || st->InvalidStateError == NULL)
        goto done;
    script = PyUnicode_FromString(rg_script);
    if (script == NULL || PyModule_AddObjectRef(m, "SCRIPT", script) < 0)
        goto done;
    if (PyModule_AddIntConstant(m, "MAX_KEY", RG_MAX_KEY) < 0 ||
        PyModule_AddIntConstant(m, "BATCH_MAX", RG_BATCH_MAX) < 0)
        goto done;
    rc = 0;
done:
    Py_XDECREF(asyncio);
    Py_XDECREF(script);
    return rc;
}

static int
module_traverse(PyObject *m, visitproc visit, void *arg)
{
    rg_state *st = rg_get_state(m);
    Py_VISIT(st->DecisionType);
    Py_VISIT(st->SpecType);
    Py_VISIT(st->EngineType);
    Py_VISIT(st->MemoryEngineType);
    Py_VISIT(st->PortType);
    Py_VISIT(st->ReplyError);
    Py_VISIT(st->get_running_loop);
    Py_VISIT(st->InvalidStateError);
    return 0;
}

static int
module_clear(PyObject *m)
{
    rg_state *st = rg_get_state(m);
    int i;
    Py_CLEAR(st->DecisionType);
    Py_CLEAR(st->SpecType);
    Py_CLEAR(st->EngineType);
    Py_CLEAR(st->MemoryEngineType);
    Py_CLEAR(st->PortType);
    Py_CLEAR(st->ReplyError);
    for (i = 0; i < RG_ERR__COUNT; i++)
        Py_CLEAR(st->err_str[i]);
    Py_CLEAR(st->get_running_loop);
    Py_CLEAR(st->InvalidStateError);
    Py_CLEAR(st->s_create_future);
    Py_CLEAR(st->s_set_result);
    Py_CLEAR(st->s_add_reader);
    Py_CLEAR(st->s_remove_reader);
    Py_CLEAR(st->s_is_closed);
    Py_CLEAR(st->s_is_running);
    Py_CLEAR(st->s_call_soon_threadsafe);
    Py_CLEAR(st->s_drain);
    Py_CLEAR(st->s_close_in_loop);
    return 0;
}

static void
module_free(void *m)
{
    module_clear((PyObject *)m);
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
#ifdef Py_mod_multiple_interpreters
    /* Loop threads and the fork hook are per process: one interpreter. */
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED},
#endif
    {0, NULL},
};

PyModuleDef rg_module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "rategate._core",
    .m_doc = "rategate's C core: GCRA checks on a libuv thread that owns the Redis connection.",
    .m_size = sizeof(rg_state),
    .m_methods = module_methods,
    .m_slots = module_slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

PyMODINIT_FUNC
PyInit__core(void)
{
    return PyModuleDef_Init(&rg_module_def);
}
