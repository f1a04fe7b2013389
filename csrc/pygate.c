/*
 * pygate.c: rategate._core.Gate, the common case of RateLimitMiddleware's
 * request in one call into C (issue 20).
 *
 * The middleware (rategate/middleware.py) builds one Gate from its
 * configuration, once, and per HTTP request calls gate(scope, send), which
 * answers:
 *   None            "not mine": the Python path takes the request whole (a
 *                   path not routed yet, a rule or a key function of the
 *                   user's, concurrency, charge, a Forwarded header to walk,
 *                   an unusual scope); nothing has been done for it yet;
 *   a callable      call the app with this as its send: the original send
 *                   (not limited, or no headers to add), or a Send that adds
 *                   the rate-limit headers to http.response.start;
 *   a list          the denial: send its two messages (429 start and body);
 *   a Pending       the check went to Redis: await pending.future, then
 *                   gate.resume(pending, decision, send) answers as above.
 * What the Python path does for the same request is the reference, byte for
 * byte (tests/test_gate.py runs both on random configurations and scopes):
 * routing through the middleware's own route cache, the key of client_ip()
 * or header() (gate.c parses addresses), the prefixed store key, the
 * submit, the counts, the failure log, the headers.
 *
 * GIL held throughout.  A Gate is immutable after it is built; calls into
 * Python (submit, a count's sinks, the failure log, key_digest) may run
 * other code, which can change nothing the Gate reads.
 */
#include "module.h"

#include <math.h>
#include <structmember.h>
#include <time.h>

#include "gate.h"

#define MAX_KEY_LENGTH 200
#define MAX_HOPS 32

enum { HDR_XFF, HDR_REAL, HDR_FORWARDED };
enum { STYLE_NONE, STYLE_D6, STYLE_D11, STYLE_X };
enum { KEY_NONE, KEY_IP, KEY_HEADER };

/* client_ip()'s configuration (keys.py). */
typedef struct {
    rg_net *nets;
    Py_ssize_t nnets;
    int trust_unix, v6prefix, plain, hdr;
    PyObject *hdrname; /* bytes */
} ipkey;

typedef struct {
    int kind;
    ipkey ip;          /* KEY_IP, or header()'s fallback */
    int fallback_ip;   /* header(): fallback client_ip (else None: not limited) */
    PyObject *hname, *heq, *hhashed; /* header(): bytes */
} keysrc;

typedef struct {
    PyObject *rule;    /* the Rule */
    PyObject *methods; /* frozenset, or NULL: every method */
    int limited;       /* rule.spec is not None */
    int gateable;      /* its requests can take this path */
    PyObject *spec;
    PyObject *bprefix, *bhprefix; /* bytes */
    PyObject *sprefix, *shprefix; /* str: the store key of a str client key */
    PyObject *headers; /* the rule's RateLimitHeaders, or None */
    keysrc key;
    PyObject *cost;    /* int */
    int style;
    PyObject *pre;     /* tuple of (bytes, bytes) */
    PyObject *items;   /* tuple of bytes */
    double *full;
    Py_ssize_t n;      /* policies: len(pre) or len(full) */
    PyObject *counts;  /* RuleCounts */
    PyObject *label;   /* counts.name: the rule's label in the denial log */
    PyObject *redact;  /* the key function's redact (rategate.denials), or None */
} grule;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    rg_state *st;
    PyObject *module;
    PyObject *one;
    PyObject *exempt;      /* frozenset */
    PyObject *route_cache; /* the middleware's dict: path -> Rule | PASS | tuple */
    PyObject *pass;        /* the middleware's _PASS */
    PyObject *index;       /* dict: Rule -> int */
    grule *rules;
    Py_ssize_t nrules;
    PyObject *submit;
    PyObject *failures;    /* the limiter's IncidentLog (active, note()) */
    PyObject *denials;     /* the middleware's DenialLog (note()), or None: not logged */
    PyObject *limiter;     /* the record's limiter of a limit */
    PyObject *record_key;  /* RECORD_KEY */
    PyObject *fail_status; /* failure_status (int) */
    PyObject *fail_headers; /* its headers: tuple of (bytes, bytes) */
    PyObject *fail_body;   /* bytes */
    PyObject *key_digest;  /* keys.key_digest */
    int sync_cached;
    PyObject *s_type, *s_path, *s_method, *s_client, *s_headers, *s_http, *s_start, *s_status,
        *s_body, *s_resp_body, *s_active, *s_note, *s_allowed, *s_denied, *s_denied_cached,
        *s_failures, *s_sinks, *s_root, *s_state, *s_render, *s_o_allowed, *s_o_denied, *s_o_cached, *s_o_failure, *unknown,
        *h_ctype, *v_json, *h_clen, *v_clen, *denied_body, *h_retry;
} GateObject;

typedef struct {
    PyObject_HEAD
    PyObject *future;
    PyObject *key;   /* the store key (str or bytes, as the Python path makes it) */
    PyObject *scope; /* for the request's record */
    Py_ssize_t rule;
} PendingObject;

typedef struct {
    PyObject_HEAD
    PyObject *send;
    PyObject *rec;   /* the request's record (a list, see middleware.py RECORD_KEY) */
    PyObject *gate;  /* GateObject: its strings and the rule */
    Py_ssize_t rule;
    vectorcallfunc vectorcall;
} SendObject;

/* The record's layout and modes (rategate/middleware.py: R_*, OPEN ... DONE). */
#define R_BEST 0
#define R_HEADERS 1
#define R_MODE 2
#define MODE_OPEN 0
#define MODE_WRAPPED 1
#define MODE_DONE 3

static PyTypeObject *PendingType, *SendType; /* set by rg_gate_types_init (one interpreter) */

static PyObject *gate_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames);

/* ---- building ---------------------------------------------------------------- */

static int
parse_nets(PyObject *seq, ipkey *k)
{
    Py_ssize_t i, n;
    PyObject *fast = PySequence_Fast(seq, "nets must be a sequence");
    if (fast == NULL)
        return -1;
    n = PySequence_Fast_GET_SIZE(fast);
    k->nets = PyMem_Calloc((size_t)(n ? n : 1), sizeof(rg_net));
    if (k->nets == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    for (i = 0; i < n; i++) {
        int version, prefix;
        const char *b;
        Py_ssize_t blen;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "iy#i", &version, &b, &blen, &prefix) ||
            !((version == 4 && blen == 4) || (version == 6 && blen == 16)) || prefix < 0 ||
            prefix > 8 * blen) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "bad network");
            Py_DECREF(fast);
            return -1;
        }
        k->nets[i].ip.version = version;
        memcpy(k->nets[i].ip.b, b, (size_t)blen);
        k->nets[i].prefix = prefix;
    }
    k->nnets = n;
    Py_DECREF(fast);
    return 0;
}

/* ("ip", nets, trust_unix, v6prefix, plain, header kind, header name) */
static int
parse_ipkey(PyObject *t, ipkey *k)
{
    PyObject *nets, *name;
    const char *tag;
    if (!PyArg_ParseTuple(t, "sOpipiS", &tag, &nets, &k->trust_unix, &k->v6prefix, &k->plain, &k->hdr,
                          &name))
        return -1;
    if (strcmp(tag, "ip") != 0 || k->hdr < HDR_XFF || k->hdr > HDR_FORWARDED) {
        PyErr_SetString(PyExc_ValueError, "bad client_ip configuration");
        return -1;
    }
    k->hdrname = Py_NewRef(name);
    return parse_nets(nets, k);
}

/* None (hand over), ("ip", ...) or ("header", name, eq, hashed, fallback ip tuple or None) */
static int
parse_key(PyObject *t, keysrc *k)
{
    if (t == Py_None) {
        k->kind = KEY_NONE;
        return 0;
    }
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) < 1 || !PyUnicode_Check(PyTuple_GET_ITEM(t, 0))) {
        PyErr_SetString(PyExc_ValueError, "bad key configuration");
        return -1;
    }
    if (PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(t, 0), "ip") == 0) {
        k->kind = KEY_IP;
        return parse_ipkey(t, &k->ip);
    }
    {
        const char *tag;
        PyObject *fb;
        if (!PyArg_ParseTuple(t, "sSSSO", &tag, &k->hname, &k->heq, &k->hhashed, &fb))
            return -1;
        Py_INCREF(k->hname);
        Py_INCREF(k->heq);
        Py_INCREF(k->hhashed);
        k->kind = KEY_HEADER;
        if (fb != Py_None) {
            k->fallback_ip = 1;
            return parse_ipkey(fb, &k->ip);
        }
    }
    return 0;
}

/* (rule, methods, limited, gateable, spec, bprefix, bhprefix, sprefix, shprefix, key, cost,
 *  headers, style, pre, items, full, counts) */
static int
parse_rule(PyObject *t, grule *r)
{
    PyObject *rule, *methods, *spec, *bp, *bhp, *sp, *shp, *key, *cost, *hd, *pre, *items, *full, *counts,
        *redact;
    Py_ssize_t i;

    if (!PyArg_ParseTuple(t, "OOppOOOOOOOOiOOOOO", &rule, &methods, &r->limited, &r->gateable, &spec, &bp, &bhp,
                          &sp, &shp, &key, &cost, &hd, &r->style, &pre, &items, &full, &counts, &redact))
        return -1;
    r->rule = Py_NewRef(rule);
    r->methods = methods == Py_None ? NULL : Py_NewRef(methods);
    if (!r->gateable)
        return 0;
    if (!PyBytes_Check(bp) || !PyBytes_Check(bhp) || !PyUnicode_Check(sp) || !PyUnicode_Check(shp) ||
        !PyLong_Check(cost) || !PyTuple_Check(pre) ||
        !PyTuple_Check(items) || !PyTuple_Check(full) || r->style < STYLE_NONE || r->style > STYLE_X) {
        PyErr_SetString(PyExc_ValueError, "bad rule configuration");
        return -1;
    }
    r->spec = Py_NewRef(spec);
    r->bprefix = Py_NewRef(bp);
    r->bhprefix = Py_NewRef(bhp);
    r->sprefix = Py_NewRef(sp);
    r->shprefix = Py_NewRef(shp);
    r->headers = Py_NewRef(hd);
    r->cost = Py_NewRef(cost);
    r->pre = Py_NewRef(pre);
    r->items = Py_NewRef(items);
    r->counts = Py_NewRef(counts);
    r->redact = Py_NewRef(redact);
    r->label = PyObject_GetAttrString(counts, "name");
    if (r->label == NULL)
        return -1;
    r->n = PyTuple_GET_SIZE(full);
    r->full = PyMem_Calloc((size_t)(r->n ? r->n : 1), sizeof(double));
    if (r->full == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (i = 0; i < r->n; i++) {
        r->full[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(full, i));
        if (r->full[i] == -1.0 && PyErr_Occurred())
            return -1;
    }
    return parse_key(key, &r->key);
}

static void
ipkey_clear(ipkey *k)
{
    PyMem_Free(k->nets);
    k->nets = NULL;
    Py_CLEAR(k->hdrname);
}

static void
rules_free(GateObject *g)
{
    Py_ssize_t i;
    for (i = 0; i < g->nrules; i++) {
        grule *r = &g->rules[i];
        Py_CLEAR(r->rule);
        Py_CLEAR(r->methods);
        Py_CLEAR(r->spec);
        Py_CLEAR(r->bprefix);
        Py_CLEAR(r->bhprefix);
        Py_CLEAR(r->sprefix);
        Py_CLEAR(r->shprefix);
        Py_CLEAR(r->headers);
        Py_CLEAR(r->cost);
        Py_CLEAR(r->pre);
        Py_CLEAR(r->items);
        Py_CLEAR(r->counts);
        Py_CLEAR(r->label);
        Py_CLEAR(r->redact);
        PyMem_Free(r->full);
        r->full = NULL;
        ipkey_clear(&r->key.ip);
        Py_CLEAR(r->key.hname);
        Py_CLEAR(r->key.heq);
        Py_CLEAR(r->key.hhashed);
    }
    PyMem_Free(g->rules);
    g->rules = NULL;
    g->nrules = 0;
}

/* Gate(exempt, route_cache, pass, rules, submit, incidents, key_digest, sync_cached, limiter,
 *      record_key, failure_status, failure_headers, failure_body, denials) */
static PyObject *
gate_tp_new(PyTypeObject *tp, PyObject *args, PyObject *kw)
{
    rg_state *st = rg_state_of_type(tp);
    PyObject *exempt, *cache, *pass, *rules, *submit, *failures, *digest, *fast = NULL, *limiter, *rkey, *fst,
        *fhd, *fbody, *denials;
    int sync_cached;
    GateObject *g;
    Py_ssize_t i;

    if (st == NULL)
        return NULL;
    if (kw != NULL && PyDict_GET_SIZE(kw) != 0) {
        PyErr_SetString(PyExc_TypeError, "Gate() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "O!O!OOOOOpOUO!O!SO:Gate", &PyFrozenSet_Type, &exempt, &PyDict_Type, &cache, &pass,
                          &rules, &submit, &failures, &digest, &sync_cached, &limiter, &rkey, &PyLong_Type, &fst,
                          &PyTuple_Type, &fhd, &fbody, &denials))
        return NULL;
    g = (GateObject *)tp->tp_alloc(tp, 0);
    if (g == NULL)
        return NULL;
    g->vectorcall = (vectorcallfunc)gate_call;
    g->st = st;
    g->one = PyLong_FromLong(1);
    if (g->one == NULL)
        goto error;
    g->module = Py_NewRef(PyType_GetModuleByDef(tp, &rg_module_def));
    g->exempt = Py_NewRef(exempt);
    g->route_cache = Py_NewRef(cache);
    g->pass = Py_NewRef(pass);
    g->submit = Py_NewRef(submit);
    g->failures = Py_NewRef(failures);
    g->denials = Py_NewRef(denials);
    g->limiter = Py_NewRef(limiter);
    g->record_key = Py_NewRef(rkey);
    g->fail_status = Py_NewRef(fst);
    g->fail_headers = Py_NewRef(fhd);
    g->fail_body = Py_NewRef(fbody);
    g->key_digest = Py_NewRef(digest);
    g->sync_cached = sync_cached;
    g->index = PyDict_New();
    fast = PySequence_Fast(rules, "rules must be a sequence");
    if (g->index == NULL || fast == NULL)
        goto error;
    g->rules = PyMem_Calloc((size_t)PySequence_Fast_GET_SIZE(fast) + 1, sizeof(grule));
    if (g->rules == NULL) {
        PyErr_NoMemory();
        goto error;
    }
    for (i = 0; i < PySequence_Fast_GET_SIZE(fast); i++) {
        PyObject *ix;
        g->nrules = i + 1;
        if (parse_rule(PySequence_Fast_GET_ITEM(fast, i), &g->rules[i]) < 0)
            goto error;
        ix = PyLong_FromSsize_t(i);
        if (ix == NULL || PyDict_SetItem(g->index, g->rules[i].rule, ix) < 0) {
            Py_XDECREF(ix);
            goto error;
        }
        Py_DECREF(ix);
    }
#define S(f, text)                                                                       \
    if ((g->f = PyUnicode_InternFromString(text)) == NULL)                              \
        goto error;
    S(s_type, "type");
    S(s_path, "path");
    S(s_method, "method");
    S(s_client, "client");
    S(s_headers, "headers");
    S(s_http, "http");
    S(s_start, "http.response.start");
    S(s_status, "status");
    S(s_body, "body");
    S(s_resp_body, "http.response.body");
    S(s_active, "active");
    S(s_root, "root_path");
    S(s_state, "state");
    S(s_render, "render");
    S(s_note, "note");
    S(s_allowed, "allowed");
    S(s_denied, "denied");
    S(s_denied_cached, "denied_cached");
    S(s_failures, "failures");
    S(s_sinks, "sinks");
    S(s_o_allowed, "allowed");
    S(s_o_denied, "denied");
    S(s_o_cached, "denied_cached");
    S(s_o_failure, "failure");
    S(unknown, "unknown");
#undef S
#define B(f, text)                                                                       \
    if ((g->f = PyBytes_FromString(text)) == NULL)                                       \
        goto error;
    B(h_ctype, "content-type");
    B(v_json, "application/json");
    B(h_clen, "content-length");
    B(denied_body, "{\"detail\":\"Too Many Requests\"}");
    B(h_retry, "retry-after");
#undef B
    g->v_clen = PyBytes_FromFormat("%zd", PyBytes_GET_SIZE(g->denied_body));
    if (g->v_clen == NULL)
        goto error;
    Py_DECREF(fast);
    return (PyObject *)g;
error:
    Py_XDECREF(fast);
    Py_DECREF(g);
    return NULL;
}

static int
gate_traverse(GateObject *g, visitproc visit, void *arg)
{
    Py_ssize_t i;
    Py_VISIT(Py_TYPE(g));
    Py_VISIT(g->module);
    Py_VISIT(g->exempt);
    Py_VISIT(g->route_cache);
    Py_VISIT(g->pass);
    Py_VISIT(g->index);
    Py_VISIT(g->submit);
    Py_VISIT(g->failures);
    Py_VISIT(g->denials);
    Py_VISIT(g->limiter);
    Py_VISIT(g->key_digest);
    for (i = 0; i < g->nrules; i++) {
        Py_VISIT(g->rules[i].rule);
        Py_VISIT(g->rules[i].spec);
        Py_VISIT(g->rules[i].counts);
        Py_VISIT(g->rules[i].redact);
    }
    return 0;
}

static int
gate_clear(GateObject *g)
{
    Py_CLEAR(g->exempt);
    Py_CLEAR(g->route_cache);
    Py_CLEAR(g->pass);
    Py_CLEAR(g->index);
    Py_CLEAR(g->submit);
    Py_CLEAR(g->failures);
    Py_CLEAR(g->denials);
    Py_CLEAR(g->limiter);
    Py_CLEAR(g->record_key);
    Py_CLEAR(g->fail_status);
    Py_CLEAR(g->fail_headers);
    Py_CLEAR(g->fail_body);
    Py_CLEAR(g->key_digest);
    rules_free(g);
    return 0;
}

static void
gate_dealloc(GateObject *g)
{
    PyTypeObject *tp = Py_TYPE(g);
    PyObject_GC_UnTrack(g);
    gate_clear(g);
    Py_CLEAR(g->module);
    Py_CLEAR(g->one);
    Py_CLEAR(g->s_type);
    Py_CLEAR(g->s_path);
    Py_CLEAR(g->s_method);
    Py_CLEAR(g->s_client);
    Py_CLEAR(g->s_headers);
    Py_CLEAR(g->s_http);
    Py_CLEAR(g->s_start);
    Py_CLEAR(g->s_status);
    Py_CLEAR(g->s_body);
    Py_CLEAR(g->s_resp_body);
    Py_CLEAR(g->s_active);
    Py_CLEAR(g->s_root);
    Py_CLEAR(g->s_state);
    Py_CLEAR(g->s_render);
    Py_CLEAR(g->s_note);
    Py_CLEAR(g->s_allowed);
    Py_CLEAR(g->s_denied);
    Py_CLEAR(g->s_denied_cached);
    Py_CLEAR(g->s_failures);
    Py_CLEAR(g->s_sinks);
    Py_CLEAR(g->s_o_allowed);
    Py_CLEAR(g->s_o_denied);
    Py_CLEAR(g->s_o_cached);
    Py_CLEAR(g->s_o_failure);
    Py_CLEAR(g->unknown);
    Py_CLEAR(g->h_ctype);
    Py_CLEAR(g->v_json);
    Py_CLEAR(g->h_clen);
    Py_CLEAR(g->v_clen);
    Py_CLEAR(g->denied_body);
    Py_CLEAR(g->h_retry);
    tp->tp_free((PyObject *)g);
    Py_DECREF(tp);
}

/* ---- the key ------------------------------------------------------------------ */

#define HANDOVER ((PyObject *)1) /* a key function result: "Python path" */

/* The (name, value) of a header item, checked: 0 when not two bytes. */
static int
header_item(PyObject *item, PyObject **k, PyObject **v)
{
    if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2)
        return 0;
    *k = PyTuple_GET_ITEM(item, 0);
    *v = PyTuple_GET_ITEM(item, 1);
    return PyBytes_CheckExact(*k) && PyBytes_CheckExact(*v);
}

/* k == name or (same length and k.lower() == name); name is lower case. */
static int
name_is(PyObject *k, PyObject *name)
{
    Py_ssize_t n = PyBytes_GET_SIZE(name), i;
    const char *a = PyBytes_AS_STRING(k), *b = PyBytes_AS_STRING(name);
    if (PyBytes_GET_SIZE(k) != n)
        return 0;
    for (i = 0; i < n; i++) {
        char c = a[i];
        if (c >= 'A' && c <= 'Z')
            c = (char)(c - 'A' + 'a');
        if (c != b[i])
            return 0;
    }
    return 1;
}

/* The headers list of the scope (a list or tuple of 2-tuples of bytes), or
 * NULL: hand over (with no error) when it is anything else. */
static PyObject *
scope_headers(GateObject *g, PyObject *scope)
{
    PyObject *h = PyDict_GetItemWithError(scope, g->s_headers);
    if (h == NULL)
        return PyErr_Occurred() ? NULL : PyTuple_New(0);
    if (!PyList_CheckExact(h) && !PyTuple_CheckExact(h))
        return NULL;
    return Py_NewRef(h);
}

/* The key of one address text (keys.client_ip._lookup): *trusted set. */
static int
ip_lookup(const ipkey *k, const char *s, size_t n, char *buf, size_t *len, int *trusted)
{
    rg_ip ip;
    if (!rg_ip_parse(s, n, &ip))
        return 0;
    *trusted = rg_ip_trusted(&ip, k->nets, (size_t)k->nnets);
    *len = rg_ip_key(&ip, k->v6prefix, buf);
    return 1;
}

/* keys.client_ip._walk: the client behind trusted proxies; `fb` the peer's key. */
static PyObject *
ip_walk(GateObject *g, const ipkey *k, PyObject *scope, PyObject *fb)
{
    PyObject *hs = scope_headers(g, scope), *joined = NULL, *out = NULL;
    Py_ssize_t i, n, total = 0;
    char *text, buf[RG_IP_KEY_MAX], best[RG_IP_KEY_MAX];
    size_t blen = 0, bestlen = 0;
    int trusted, found = 0, have = 0, splits = 0;

    if (hs == NULL)
        return PyErr_Occurred() ? NULL : HANDOVER;
    if (k->hdr == HDR_FORWARDED) {
        Py_DECREF(hs);
        return HANDOVER;
    }
    n = PySequence_Fast_GET_SIZE(hs);
    for (i = 0; i < n; i++) {
        PyObject *hk, *hv;
        if (!header_item(PySequence_Fast_GET_ITEM(hs, i), &hk, &hv)) {
            Py_DECREF(hs);
            return HANDOVER;
        }
        if (name_is(hk, k->hdrname)) {
            total += (found ? 1 : 0) + PyBytes_GET_SIZE(hv);
            found = 1;
        }
    }
    if (!found) {
        Py_DECREF(hs);
        return Py_NewRef(fb);
    }
    joined = PyBytes_FromStringAndSize(NULL, total);
    if (joined == NULL)
        goto done;
    text = PyBytes_AS_STRING(joined);
    total = 0;
    for (i = 0; i < n; i++) {
        PyObject *hk = PyTuple_GET_ITEM(PySequence_Fast_GET_ITEM(hs, i), 0);
        PyObject *hv = PyTuple_GET_ITEM(PySequence_Fast_GET_ITEM(hs, i), 1);
        if (name_is(hk, k->hdrname)) {
            if (have)
                text[total++] = ',';
            memcpy(text + total, PyBytes_AS_STRING(hv), (size_t)PyBytes_GET_SIZE(hv));
            total += PyBytes_GET_SIZE(hv);
            have = 1;
        }
    }
    if (k->hdr == HDR_REAL) {
        out = ip_lookup(k, text, (size_t)total, buf, &blen, &trusted)
                  ? PyUnicode_FromStringAndSize(buf, (Py_ssize_t)blen)
                  : Py_NewRef(fb);
        goto done;
    }
    /* X-Forwarded-For, right to left, at most MAX_HOPS splits (the rest,
     * if reached, is one malformed item); an empty hop is skipped. */
    {
        Py_ssize_t end = total, j;
        int have_best = 0;
        for (;;) {
            Py_ssize_t start = 0, a, b;
            if (splits < MAX_HOPS)
                for (j = end - 1; j >= 0; j--)
                    if (text[j] == ',') {
                        start = j + 1;
                        break;
                    }
            if (splits >= MAX_HOPS || j < 0)
                start = 0;
            a = start;
            b = end;
            while (a < b && rg_is_strip_space((unsigned char)text[a]))
                a++;
            while (b > a && rg_is_strip_space((unsigned char)text[b - 1]))
                b--;
            if (b > a) {
                if (!ip_lookup(k, text + a, (size_t)(b - a), buf, &blen, &trusted)) {
                    out = Py_NewRef(fb); /* malformed: never crash, never bypass */
                    goto done;
                }
                memcpy(best, buf, blen);
                bestlen = blen;
                have_best = 1;
                if (!trusted)
                    break;
            }
            if (start == 0)
                break;
            end = start - 1;
            splits++;
        }
        out = have_best ? PyUnicode_FromStringAndSize(best, (Py_ssize_t)bestlen) : Py_NewRef(fb);
    }
done:
    Py_XDECREF(joined);
    Py_DECREF(hs);
    return out;
}

/* keys.client_ip.__call__: a str, or HANDOVER, or NULL with an error. */
static PyObject *
ip_key(GateObject *g, const ipkey *k, PyObject *scope)
{
    PyObject *client = PyDict_GetItemWithError(scope, g->s_client), *peer;
    char buf[RG_IP_KEY_MAX];
    size_t len;
    int trusted;
    PyObject *key, *out;

    if (client == NULL && PyErr_Occurred())
        return NULL;
    if (client != NULL && client != Py_None) {
        const char *s;
        Py_ssize_t n;
        if (!PyTuple_CheckExact(client) && !PyList_CheckExact(client))
            return HANDOVER;
        if (PySequence_Fast_GET_SIZE(client) == 0)
            goto no_client;
        peer = PySequence_Fast_GET_ITEM(client, 0);
        if (!PyUnicode_CheckExact(peer) || !PyUnicode_IS_ASCII(peer))
            return HANDOVER;
        s = PyUnicode_AsUTF8AndSize(peer, &n);
        if (s == NULL)
            return NULL;
        if (!ip_lookup(k, s, (size_t)n, buf, &len, &trusted))
            return Py_NewRef(g->unknown);
        key = PyUnicode_FromStringAndSize(buf, (Py_ssize_t)len);
        if (key == NULL || k->plain || !trusted)
            return key;
        out = ip_walk(g, k, scope, key);
        Py_DECREF(key);
        return out;
    }
no_client:
    if (!k->trust_unix)
        return Py_NewRef(g->unknown);
    return ip_walk(g, k, scope, g->unknown);
}

/* keys.key_digest(k) as ASCII bytes (the digest of a key past
 * MAX_KEY_LENGTH), or NULL with an error. */
static PyObject *
digest_bytes(GateObject *g, PyObject *k)
{
    PyObject *dg = PyObject_CallOneArg(g->key_digest, k), *enc;
    if (dg == NULL)
        return NULL;
    enc = PyUnicode_AsASCIIString(dg);
    Py_DECREF(dg);
    return enc;
}

/* prefix (bytes) + the n bytes at s: new bytes, or NULL with an error. */
static PyObject *
prefixed(PyObject *prefix, const char *s, Py_ssize_t n)
{
    Py_ssize_t pn = PyBytes_GET_SIZE(prefix);
    PyObject *out = PyBytes_FromStringAndSize(NULL, pn + n);
    if (out != NULL) {
        memcpy(PyBytes_AS_STRING(out), PyBytes_AS_STRING(prefix), (size_t)pn);
        memcpy(PyBytes_AS_STRING(out) + pn, s, (size_t)n);
    }
    return out;
}

/* prefixed() of the bytes b, whose reference it takes. */
static PyObject *
prefixed_del(PyObject *prefix, PyObject *b)
{
    PyObject *out = prefixed(prefix, PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b));
    Py_DECREF(b);
    return out;
}

/* The client key of rule r for this request: str or bytes, Py_None (not
 * limited), HANDOVER, or NULL with an error. */
static PyObject *
client_key(GateObject *g, const grule *r, PyObject *scope)
{
    PyObject *hs;
    Py_ssize_t i, n;

    if (r->key.kind == KEY_IP)
        return ip_key(g, &r->key.ip, scope);
    if (r->key.kind != KEY_HEADER)
        return HANDOVER;
    hs = scope_headers(g, scope);
    if (hs == NULL)
        return PyErr_Occurred() ? NULL : HANDOVER;
    n = PySequence_Fast_GET_SIZE(hs);
    for (i = 0; i < n; i++) {
        PyObject *hk, *hv;
        if (!header_item(PySequence_Fast_GET_ITEM(hs, i), &hk, &hv)) {
            Py_DECREF(hs);
            return HANDOVER;
        }
        if (name_is(hk, r->key.hname)) {
            const char *v = PyBytes_AS_STRING(hv);
            Py_ssize_t a = 0, b = PyBytes_GET_SIZE(hv);
            /* bytes.strip(): ASCII whitespace */
            while (a < b && (v[a] == ' ' || (v[a] >= 9 && v[a] <= 13)))
                a++;
            while (b > a && (v[b - 1] == ' ' || (v[b - 1] >= 9 && v[b - 1] <= 13)))
                b--;
            if (b > a) {
                PyObject *part, *enc;
                Py_DECREF(hs);
                if (b - a <= MAX_KEY_LENGTH)
                    return prefixed(r->key.heq, v + a, b - a);
                if ((part = PyBytes_FromStringAndSize(v + a, b - a)) == NULL)
                    return NULL;
                enc = digest_bytes(g, part);
                Py_DECREF(part);
                return enc == NULL ? NULL : prefixed_del(r->key.hhashed, enc);
            }
            break;
        }
    }
    Py_DECREF(hs);
    if (!r->key.fallback_ip)
        return Py_NewRef(Py_None);
    return ip_key(g, &r->key.ip, scope);
}

/* admin.prefixed_key: prefix + key, or past MAX_KEY_LENGTH the hashed
 * prefix + the key's digest; str for a str client key, bytes for bytes (the
 * request's record compares store keys as the Python path makes them). */
static PyObject *
store_key(GateObject *g, const grule *r, PyObject *k)
{
    PyObject *out, *dg, *enc;

    if (PyUnicode_Check(k)) {
        if (PyUnicode_GET_LENGTH(k) <= MAX_KEY_LENGTH)
            return PyUnicode_Concat(r->sprefix, k);
        dg = PyObject_CallOneArg(g->key_digest, k);
        if (dg == NULL)
            return NULL;
        out = PyUnicode_Concat(r->shprefix, dg);
        Py_DECREF(dg);
        return out;
    }
    if (PyBytes_GET_SIZE(k) <= MAX_KEY_LENGTH)
        return prefixed(r->bprefix, PyBytes_AS_STRING(k), PyBytes_GET_SIZE(k));
    enc = digest_bytes(g, k);
    return enc == NULL ? NULL : prefixed_del(r->bhprefix, enc);
}

/* ---- counts, headers, answers --------------------------------------------------- */

static int
bump(GateObject *g, PyObject *obj, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(obj, name), *w;
    int rc;
    if (v == NULL)
        return -1;
    w = PyNumber_Add(v, g->one);
    Py_DECREF(v);
    if (w == NULL)
        return -1;
    rc = PyObject_SetAttr(obj, name, w);
    Py_DECREF(w);
    return rc;
}

/* RuleCounts.note(d, cached, shadow=False), then the failure log as
 * _settle() does. */
static int
note(GateObject *g, const grule *r, DecisionObject *d, int cached)
{
    PyObject *outcome, *sinks;
    Py_ssize_t i;

    if (d->error != Py_None) {
        PyObject *f = PyObject_GetAttr(r->counts, g->s_failures), *v, *w;
        if (f == NULL)
            return -1;
        v = PyDict_GetItemWithError(f, d->error);
        if (v == NULL && PyErr_Occurred()) {
            Py_DECREF(f);
            return -1;
        }
        w = v == NULL ? Py_NewRef(g->one) : PyNumber_Add(v, g->one);
        if (w == NULL || PyDict_SetItem(f, d->error, w) < 0) {
            Py_XDECREF(w);
            Py_DECREF(f);
            return -1;
        }
        Py_DECREF(w);
        Py_DECREF(f);
        outcome = g->s_o_failure;
    } else if (d->allowed) {
        if (bump(g, r->counts, g->s_allowed) < 0)
            return -1;
        outcome = g->s_o_allowed;
    } else if (cached) {
        if (bump(g, r->counts, g->s_denied_cached) < 0)
            return -1;
        outcome = g->s_o_cached;
    } else {
        if (bump(g, r->counts, g->s_denied) < 0)
            return -1;
        outcome = g->s_o_denied;
    }
    sinks = PyObject_GetAttr(r->counts, g->s_sinks);
    if (sinks == NULL)
        return -1;
    if (PyTuple_Check(sinks)) {
        for (i = 0; i < PyTuple_GET_SIZE(sinks); i++) {
            PyObject *a[3] = {outcome, d->error, (PyObject *)d};
            PyObject *res = PyObject_Vectorcall(PyTuple_GET_ITEM(sinks, i), a, 3, NULL);
            if (res == NULL) {
                Py_DECREF(sinks);
                return -1;
            }
            Py_DECREF(res);
        }
    }
    Py_DECREF(sinks);
    {
        int active = 0;
        if (d->error == Py_None) {
            PyObject *act = PyObject_GetAttr(g->failures, g->s_active);
            if (act == NULL)
                return -1;
            active = PyObject_IsTrue(act);
            Py_DECREF(act);
            if (active < 0)
                return -1;
        }
        if (d->error != Py_None || active) {
            PyObject *res = PyObject_CallMethodOneArg(g->failures, g->s_note, (PyObject *)d);
            if (res == NULL)
                return -1;
            Py_DECREF(res);
        }
    }
    return 0;
}

/* Small non-negative integers as bytes, made once (headers.py's _INTS). */
#define SMALL_INTS 4096
static PyObject *small_ints[SMALL_INTS];

static PyObject *
int_bytes(long long v)
{
    char buf[24], *p = buf + sizeof(buf);
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;

    if (v >= 0 && v < SMALL_INTS && small_ints[v] != NULL)
        return Py_NewRef(small_ints[v]);
    do {
        *--p = (char)('0' + u % 10);
        u /= 10;
    } while (u != 0);
    if (v < 0)
        *--p = '-';
    return PyBytes_FromStringAndSize(p, buf + sizeof(buf) - p);
}

/* The bytes of math.ceil(x) for a finite x (any size). */
static PyObject *
ceil_bytes(double x)
{
    PyObject *i, *s, *b;
    if (fabs(x) < 9e15)
        return int_bytes((long long)ceil(x));
    i = PyLong_FromDouble(ceil(x));
    if (i == NULL)
        return NULL;
    s = PyObject_Str(i);
    Py_DECREF(i);
    if (s == NULL)
        return NULL;
    b = PyUnicode_AsASCIIString(s);
    Py_DECREF(s);
    return b;
}

static int
append_pair(PyObject *list, PyObject *name, PyObject *value)
{
    PyObject *t;
    int rc;
    if (value == NULL)
        return -1;
    t = PyTuple_Pack(2, name, value);
    Py_DECREF(value);
    if (t == NULL)
        return -1;
    rc = PyList_Append(list, t);
    Py_DECREF(t);
    return rc;
}

/* (reset > 0: ceil(reset) if < 1e12 else 0) as headers.py writes it */
static long long
reset_of(double r)
{
    return r > 0.0 ? (r < 1e12 ? (long long)ceil(r) : 0) : 0;
}

/* draft-11's RateLimit value: b'"name";r=' + remaining + b";t=" + reset */
static PyObject *
d11_value(PyObject *item, long long rem, long long reset)
{
    char buf[64];
    int n = snprintf(buf, sizeof(buf), "%lld;t=%lld", rem, reset);
    PyObject *out = PyBytes_FromStringAndSize(NULL, PyBytes_GET_SIZE(item) + n);
    if (out != NULL) {
        memcpy(PyBytes_AS_STRING(out), PyBytes_AS_STRING(item), (size_t)PyBytes_GET_SIZE(item));
        memcpy(PyBytes_AS_STRING(out) + PyBytes_GET_SIZE(item), buf, (size_t)n);
    }
    return out;
}

/* RateLimitHeaders.render(d), or render_denied(d) when `denied`, appended
 * to list.  ra: the Retry-After seconds (< 0: none). */
static int
render(GateObject *g, const grule *r, DecisionObject *d, PyObject *list, double ra)
{
    static PyObject *n_lim, *n_rem, *n_reset, *n_rl, *x_lim, *x_rem, *x_reset;
    Py_ssize_t i = d->rate;
    long long rem = d->remaining;

    (void)g;

    if (n_lim == NULL) {
        if ((n_lim = PyBytes_FromString("ratelimit-limit")) == NULL ||
            (n_rem = PyBytes_FromString("ratelimit-remaining")) == NULL ||
            (n_reset = PyBytes_FromString("ratelimit-reset")) == NULL ||
            (n_rl = PyBytes_FromString("ratelimit")) == NULL ||
            (x_lim = PyBytes_FromString("x-ratelimit-limit")) == NULL ||
            (x_rem = PyBytes_FromString("x-ratelimit-remaining")) == NULL ||
            (x_reset = PyBytes_FromString("x-ratelimit-reset")) == NULL)
            return -1;
    }
    if (i >= r->n || i < 0)
        i = 0;
    if (r->style == STYLE_D6) {
        if (append_pair(list, n_lim, int_bytes(d->limit)) < 0 ||
            append_pair(list, n_rem, int_bytes(rem > 0 ? rem : 0)) < 0 ||
            append_pair(list, n_reset, int_bytes(reset_of(d->reset_after))) < 0 ||
            PyList_Append(list, PyTuple_GET_ITEM(r->pre, i)) < 0)
            return -1;
    } else if (r->style == STYLE_D11) {
        double x = d->reset_after;
        long long reset;
        PyObject *item = PyTuple_GET_ITEM(r->items, i);
        if (rem <= 0)
            x -= r->full[i];
        reset = reset_of(x);
        if (ra >= 0 && (double)reset > ra)
            reset = (long long)ra;
        if (PyList_Append(list, PyTuple_GET_ITEM(r->pre, i)) < 0 ||
            append_pair(list, n_rl, d11_value(item, rem > 0 ? rem : 0, reset)) < 0)
            return -1;
    } else if (r->style == STYLE_X) {
        struct timespec ts;
        double x = d->reset_after, now;
        clock_gettime(CLOCK_REALTIME, &ts);
        now = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
        if (append_pair(list, x_lim, int_bytes(d->limit)) < 0 ||
            append_pair(list, x_rem, int_bytes(rem > 0 ? rem : 0)) < 0 ||
            append_pair(list, x_reset, ceil_bytes(now + (x > 0.0 && x < 1e12 ? x : 0.0))) < 0)
            return -1;
    }
    return 0;
}

/* The denial: [429 start, body] (middleware._denied_headers and DENIED_BODY). */
static PyObject *
denial(GateObject *g, const grule *r, DecisionObject *d)
{
    PyObject *hdrs = PyList_New(0), *start = NULL, *body = NULL, *out = NULL, *v;
    double x = d->retry_after, ra = -1.0; /* headers.retry_after_seconds; < 0: None */

    if (hdrs == NULL)
        return NULL;
    if (d->error != Py_None) {
        /* the store failed (closed mode): failure_status, Retry-After: 1 only */
        if (PyList_SetSlice(hdrs, 0, 0, g->fail_headers) < 0)
            goto done;
    } else {
        if (!(x != x || x == Py_HUGE_VAL))
            ra = x <= 0.0 ? 1.0 : ceil(x) > 1.0 ? ceil(x) : 1.0;
        if (append_pair(hdrs, g->h_ctype, Py_NewRef(g->v_json)) < 0 ||
            append_pair(hdrs, g->h_clen, Py_NewRef(g->v_clen)) < 0)
            goto done;
        if (r->style != STYLE_NONE && render(g, r, d, hdrs, ra) < 0)
            goto done;
        if (ra >= 0 && append_pair(hdrs, g->h_retry, ceil_bytes(ra)) < 0)
            goto done;
    }
    start = PyDict_New();
    body = PyDict_New();
    if (start == NULL || body == NULL)
        goto done;
    v = d->error != Py_None ? Py_NewRef(g->fail_status) : PyLong_FromLong(429);
    if (v == NULL || PyDict_SetItem(start, g->s_type, g->s_start) < 0 ||
        PyDict_SetItem(start, g->s_status, v) < 0 || PyDict_SetItem(start, g->s_headers, hdrs) < 0) {
        Py_XDECREF(v);
        goto done;
    }
    Py_DECREF(v);
    if (PyDict_SetItem(body, g->s_type, g->s_resp_body) < 0 ||
        PyDict_SetItem(body, g->s_body, d->error != Py_None ? g->fail_body : g->denied_body) < 0)
        goto done;
    out = PyList_New(2);
    if (out != NULL) {
        PyList_SET_ITEM(out, 0, Py_NewRef(start));
        PyList_SET_ITEM(out, 1, Py_NewRef(body));
    }
done:
    Py_DECREF(hdrs);
    Py_XDECREF(start);
    Py_XDECREF(body);
    return out;
}

static PyObject *send_new(GateObject *g, const grule *r, PyObject *send, PyObject *rec);

/* record_new() as the first checker's allowance makes it (the middleware's
 * __call__): [best, renderer, mode, None, limiter, key, spec, d], best and
 * renderer d and the rule's headers when it has some to show (then WRAPPED:
 * our send renders them), else None and OPEN; stored in scope["state"]. */
static PyObject *
record_new(GateObject *g, const grule *r, DecisionObject *d, PyObject *scope, PyObject *key)
{
    int show = r->headers != Py_None && d->error == Py_None;
    PyObject *rec = PyList_New(8), *state;
    int rc;

    if (rec == NULL)
        return NULL;
    PyList_SET_ITEM(rec, 0, Py_NewRef(show ? (PyObject *)d : Py_None));
    PyList_SET_ITEM(rec, 1, Py_NewRef(show ? r->headers : Py_None));
    PyList_SET_ITEM(rec, 2, PyLong_FromLong(show ? MODE_WRAPPED : MODE_OPEN));
    PyList_SET_ITEM(rec, 3, Py_NewRef(Py_None));
    PyList_SET_ITEM(rec, 4, Py_NewRef(g->limiter));
    PyList_SET_ITEM(rec, 5, Py_NewRef(key));
    PyList_SET_ITEM(rec, 6, Py_NewRef(r->spec));
    PyList_SET_ITEM(rec, 7, Py_NewRef((PyObject *)d));
    if (PyList_GET_ITEM(rec, 2) == NULL)
        goto error;
    state = PyDict_GetItemWithError(scope, g->s_state);
    if (state == NULL) {
        if (PyErr_Occurred())
            goto error;
        state = PyDict_New();
        if (state == NULL)
            goto error;
        rc = PyDict_SetItem(scope, g->s_state, state);
        Py_DECREF(state); /* the scope holds it */
        if (rc < 0)
            goto error;
    }
    if (PyObject_SetItem(state, g->record_key, rec) < 0)
        goto error;
    return rec;
error:
    Py_DECREF(rec);
    return NULL;
}

/* _settle() and what __call__ does with it: send or a Send (let through,
 * the record made), the denial's messages, or NULL. */
static PyObject *
answer(GateObject *g, const grule *r, DecisionObject *d, int cached, PyObject *send, PyObject *scope,
       PyObject *key)
{
    PyObject *rec, *out;

    if (note(g, r, d, cached) < 0)
        return NULL;
    if (!d->allowed) {
        /* An enforced denial (the gate never runs in shadow mode) goes to
         * the denial log, as the Python path's __call__ does:
         * note(rule label, store key, scope["path"], retry_after, redact). */
        if (d->error == Py_None && g->denials != Py_None) {
            PyObject *path = PyDict_GetItemWithError(scope, g->s_path), *ra, *res;
            if (path == NULL) {
                if (!PyErr_Occurred())
                    PyErr_SetObject(PyExc_KeyError, g->s_path);
                return NULL;
            }
            ra = PyFloat_FromDouble(d->retry_after);
            if (ra == NULL)
                return NULL;
            {
                PyObject *argv[7] = {NULL, g->denials, r->label, key, path, ra, r->redact};
                Py_INCREF(path); /* the scope may drop it while note() runs */
                res = PyObject_VectorcallMethod(g->s_note, argv + 1, 6 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
                Py_DECREF(path);
            }
            Py_DECREF(ra);
            if (res == NULL)
                return NULL;
            Py_DECREF(res);
        }
        return denial(g, r, d);
    }
    rec = record_new(g, r, d, scope, key);
    if (rec == NULL)
        return NULL;
    out = PyList_GET_ITEM(rec, R_BEST) != Py_None ? send_new(g, r, send, rec) : Py_NewRef(send);
    Py_DECREF(rec);
    return out;
}

/* The rule of a route-cache entry for this method: a grule, NULL with
 * *pass set (not limited), or NULL: hand over. */
static const grule *
pick(GateObject *g, PyObject *entry, PyObject *scope, int *pass)
{
    PyObject *ix;
    *pass = 0;
    if (entry == g->pass) {
        *pass = 1;
        return NULL;
    }
    if (PyTuple_CheckExact(entry)) {
        PyObject *method = PyDict_GetItemWithError(scope, g->s_method);
        Py_ssize_t i;
        if (method == NULL || !PyUnicode_CheckExact(method))
            return NULL;
        for (i = 0; i < PyTuple_GET_SIZE(entry); i++) {
            const grule *r;
            int in;
            ix = PyDict_GetItemWithError(g->index, PyTuple_GET_ITEM(entry, i));
            if (ix == NULL)
                return NULL;
            r = &g->rules[PyLong_AsSsize_t(ix)];
            in = r->methods == NULL ? 1 : PySet_Contains(r->methods, method);
            if (in < 0)
                return NULL;
            if (in) {
                if (!r->limited)
                    *pass = 1;
                return r->limited ? r : NULL;
            }
        }
        *pass = 1;
        return NULL;
    }
    ix = PyDict_GetItemWithError(g->index, entry);
    if (ix == NULL)
        return NULL;
    return &g->rules[PyLong_AsSsize_t(ix)];
}

/* gate(scope, send): see the top of the file. */
static PyObject *
gate_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    GateObject *g = (GateObject *)self;
    PyObject *scope, *send, *v, *entry, *k, *key, *res, *a[3];
    const grule *r;
    int pass, cached;

    if (PyVectorcall_NARGS(nargsf) != 2 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "gate(scope, send)");
        return NULL;
    }
    scope = args[0];
    send = args[1];
    if (!PyDict_CheckExact(scope))
        Py_RETURN_NONE;
    v = PyDict_GetItemWithError(scope, g->s_type);
    if (v == NULL || !PyUnicode_CheckExact(v) || PyUnicode_Compare(v, g->s_http) != 0) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    v = PyDict_GetItemWithError(scope, g->s_path);
    if (v == NULL || !PyUnicode_CheckExact(v)) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    {
        /* route_path(): the root path removed (then "" is "/") */
        PyObject *root = PyDict_GetItemWithError(scope, g->s_root), *path;
        int found;
        if (root == NULL && PyErr_Occurred())
            return NULL;
        if (root != NULL && root != Py_None && !(PyUnicode_CheckExact(root)))
            Py_RETURN_NONE;
        if (root != NULL && root != Py_None && PyUnicode_GET_LENGTH(root) > 0) {
            Py_ssize_t n = PyUnicode_GET_LENGTH(root), plen = PyUnicode_GET_LENGTH(v);
            Py_ssize_t m = PyUnicode_Tailmatch(v, root, 0, n, -1);
            if (m < 0)
                return NULL;
            if (m && plen == n)
                path = PyUnicode_FromString("/");
            else if (m && PyUnicode_READ_CHAR(v, n) == '/')
                path = PyUnicode_Substring(v, n, plen);
            else
                path = plen ? Py_NewRef(v) : PyUnicode_FromString("/");
        } else {
            path = Py_NewRef(v);
        }
        if (path == NULL)
            return NULL;
        found = PySet_Contains(g->exempt, path);
        if (found != 0) {
            Py_DECREF(path);
            return found < 0 ? NULL : Py_NewRef(send);
        }
        entry = Py_XNewRef(PyDict_GetItemWithError(g->route_cache, path));
        Py_DECREF(path);
    }
    if (entry == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE; /* not routed yet: the Python path routes it (and caches it) */
    }
    r = pick(g, entry, scope, &pass);
    Py_DECREF(entry);
    if (r == NULL) {
        if (PyErr_Occurred())
            return NULL;
        if (pass)
            return Py_NewRef(send);
        Py_RETURN_NONE;
    }
    if (!r->gateable)
        Py_RETURN_NONE;
    {
        /* a record: another checker saw this request (nested middlewares,
         * a dependency): the Python path reads and joins it */
        PyObject *state = PyDict_GetItemWithError(scope, g->s_state);
        if (state == NULL && PyErr_Occurred())
            return NULL;
        if (state != NULL && state != Py_None) {
            PyObject *rec;
            if (!PyDict_CheckExact(state))
                Py_RETURN_NONE;
            rec = PyDict_GetItemWithError(state, g->record_key);
            if (rec != NULL)
                Py_RETURN_NONE;
            if (PyErr_Occurred())
                return NULL;
        }
    }
    k = client_key(g, r, scope);
    if (k == NULL)
        return NULL;
    if (k == HANDOVER)
        Py_RETURN_NONE;
    if (k == Py_None) {
        Py_DECREF(k);
        return Py_NewRef(send);
    }
    key = store_key(g, r, k);
    Py_DECREF(k);
    if (key == NULL)
        return NULL;
    a[0] = key;
    a[1] = r->spec;
    a[2] = r->cost;
    res = PyObject_Vectorcall(g->submit, a, 3, NULL);
    if (res == NULL) {
        Py_DECREF(key);
        return NULL;
    }
    if (Py_IS_TYPE(res, g->st->DecisionType)) {
        PyObject *out;
        cached = g->sync_cached;
        out = answer(g, r, (DecisionObject *)res, cached, send, scope, key);
        Py_DECREF(res);
        Py_DECREF(key);
        return out;
    }
    {
        PendingObject *p = PyObject_GC_New(PendingObject, PendingType);
        if (p == NULL) {
            Py_DECREF(res);
            Py_DECREF(key);
            return NULL;
        }
        p->future = res;
        p->key = key;
        p->scope = Py_NewRef(scope);
        p->rule = r - g->rules;
        PyObject_GC_Track(p);
        return (PyObject *)p;
    }
}

/* gate.resume(pending, decision, send) */
static PyObject *
gate_resume(GateObject *g, PyObject *const *args, Py_ssize_t nargs)
{
    PendingObject *p;
    PyObject *out;
    if (nargs != 3 || !Py_IS_TYPE(args[0], PendingType) || !Py_IS_TYPE(args[1], g->st->DecisionType)) {
        PyErr_SetString(PyExc_TypeError, "resume(pending, decision, send)");
        return NULL;
    }
    p = (PendingObject *)args[0];
    if (p->rule < 0 || p->rule >= g->nrules) {
        PyErr_SetString(PyExc_ValueError, "not this gate's pending check");
        return NULL;
    }
    out = answer(g, &g->rules[p->rule], (DecisionObject *)args[1], 0, args[2], p->scope, p->key);
    return out;
}

/* ---- Pending ------------------------------------------------------------------ */

static int
pending_traverse(PendingObject *p, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(p));
    Py_VISIT(p->future);
    Py_VISIT(p->scope);
    return 0;
}

static int
pending_clear(PendingObject *p)
{
    Py_CLEAR(p->future);
    Py_CLEAR(p->key);
    Py_CLEAR(p->scope);
    return 0;
}

static void
pending_dealloc(PendingObject *p)
{
    PyTypeObject *tp = Py_TYPE(p);
    PyObject_GC_UnTrack(p);
    pending_clear(p);
    PyObject_GC_Del(p);
    Py_DECREF(tp);
}

static PyMemberDef pending_members[] = {
    {"future", T_OBJECT, offsetof(PendingObject, future), READONLY, "the check's future"},
    {"key", T_OBJECT, offsetof(PendingObject, key), READONLY, "the store key"},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot pending_slots[] = {
    {Py_tp_dealloc, pending_dealloc},
    {Py_tp_traverse, pending_traverse},
    {Py_tp_clear, pending_clear},
    {Py_tp_members, pending_members},
    {0, NULL},
};

static PyType_Spec pending_spec = {
    .name = "rategate._core.GatePending",
    .basicsize = sizeof(PendingObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE |
             Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = pending_slots,
};

/* ---- Send --------------------------------------------------------------------- */

/* send(message): at http.response.start, while the record says WRAPPED,
 * DONE and the record's headers (its most restrictive decision's: another
 * checker may have offered one) added to the message (a new list: the app's
 * own is never edited, it may send it twice); then the wrapped send's
 * awaitable, returned as is: no Python frame per message. */
static PyObject *
send_vectorcall(SendObject *s, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    GateObject *g = (GateObject *)s->gate;
    PyObject *msg, *t, *mode;
    int start;

    if (PyVectorcall_NARGS(nargsf) != 1 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "send(message)");
        return NULL;
    }
    msg = args[0];
    t = PyObject_GetItem(msg, g->s_type);
    if (t == NULL)
        return NULL;
    start = PyUnicode_Check(t) && PyUnicode_Compare(t, g->s_start) == 0;
    Py_DECREF(t);
    if (start && PyErr_Occurred())
        return NULL;
    mode = PyList_GET_SIZE(s->rec) > R_MODE ? PyList_GET_ITEM(s->rec, R_MODE) : NULL;
    if (start && mode != NULL && PyLong_CheckExact(mode) && PyLong_AsLong(mode) == MODE_WRAPPED) {
        PyObject *old, *list, *best, *h, *mine = NULL, *done = PyLong_FromLong(MODE_DONE);
        int rc;
        if (done == NULL || PyList_SetItem(s->rec, R_MODE, done) < 0)
            return NULL;
        best = Py_NewRef(PyList_GET_ITEM(s->rec, R_BEST));
        h = Py_NewRef(PyList_GET_ITEM(s->rec, R_HEADERS));
        if (h == g->rules[s->rule].headers && Py_IS_TYPE(best, g->st->DecisionType)) {
            mine = PyList_New(0);
            if (mine != NULL && render(g, &g->rules[s->rule], (DecisionObject *)best, mine, -1.0) < 0)
                Py_CLEAR(mine);
        } else { /* another checker's renderer: its own render() */
            mine = PyObject_CallMethodOneArg(h, g->s_render, best);
        }
        Py_DECREF(best);
        Py_DECREF(h);
        if (mine == NULL)
            return NULL;
        /* [*message.get("headers", ()), *rendered] */
        if (PyDict_Check(msg)) {
            old = PyDict_GetItemWithError(msg, g->s_headers);
            Py_XINCREF(old);
        } else {
            old = PyObject_GetItem(msg, g->s_headers);
            if (old == NULL && PyErr_ExceptionMatches(PyExc_KeyError))
                PyErr_Clear();
        }
        if (old == NULL && PyErr_Occurred()) {
            Py_DECREF(mine);
            return NULL;
        }
        list = old == NULL ? PyList_New(0) : PySequence_List(old);
        Py_XDECREF(old);
        if (list == NULL || PyList_SetSlice(list, PyList_GET_SIZE(list), PyList_GET_SIZE(list), mine) < 0) {
            Py_XDECREF(list);
            Py_DECREF(mine);
            return NULL;
        }
        Py_DECREF(mine);
        rc = PyObject_SetItem(msg, g->s_headers, list);
        Py_DECREF(list);
        if (rc < 0)
            return NULL;
    }
    return PyObject_Vectorcall(s->send, args, 1, NULL);
}

static PyObject *
send_new(GateObject *g, const grule *r, PyObject *send, PyObject *rec)
{
    SendObject *s = PyObject_GC_New(SendObject, SendType);
    if (s == NULL)
        return NULL;
    s->send = Py_NewRef(send);
    s->rec = Py_NewRef(rec);
    s->gate = Py_NewRef((PyObject *)g);
    s->rule = r - g->rules;
    s->vectorcall = (vectorcallfunc)send_vectorcall;
    PyObject_GC_Track(s);
    return (PyObject *)s;
}

static int
send_traverse(SendObject *s, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(s));
    Py_VISIT(s->send);
    Py_VISIT(s->rec);
    Py_VISIT(s->gate);
    return 0;
}

static int
send_clear(SendObject *s)
{
    Py_CLEAR(s->send);
    Py_CLEAR(s->rec);
    Py_CLEAR(s->gate);
    return 0;
}

static void
send_dealloc(SendObject *s)
{
    PyTypeObject *tp = Py_TYPE(s);
    PyObject_GC_UnTrack(s);
    send_clear(s);
    PyObject_GC_Del(s);
    Py_DECREF(tp);
}

static PyMemberDef send_members[] = {
    {"record", T_OBJECT, offsetof(SendObject, rec), READONLY, "the request's record"},
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(SendObject, vectorcall), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot send_slots[] = {
    {Py_tp_dealloc, send_dealloc},
    {Py_tp_traverse, send_traverse},
    {Py_tp_clear, send_clear},
    {Py_tp_call, PyVectorcall_Call},
    {Py_tp_members, send_members},
    {0, NULL},
};

static PyType_Spec send_spec = {
    .name = "rategate._core.GateSend",
    .basicsize = sizeof(SendObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE |
             Py_TPFLAGS_DISALLOW_INSTANTIATION | Py_TPFLAGS_HAVE_VECTORCALL,
    .slots = send_slots,
};

/* ---- Gate type ---------------------------------------------------------------- */

static PyMethodDef gate_methods[] = {
    {"resume", (PyCFunction)(void (*)(void))gate_resume, METH_FASTCALL,
     "resume(pending, decision, send): the answer once the check's future is done"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef gate_members[] = {
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(GateObject, vectorcall), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot gate_slots[] = {
    {Py_tp_new, gate_tp_new},
    {Py_tp_dealloc, gate_dealloc},
    {Py_tp_traverse, gate_traverse},
    {Py_tp_clear, gate_clear},
    {Py_tp_methods, gate_methods},
    {Py_tp_call, PyVectorcall_Call},
    {Py_tp_members, gate_members},
    {Py_tp_doc, "The middleware's request path in C (built by RateLimitMiddleware; see pygate.c)."},
    {0, NULL},
};

static PyType_Spec gate_spec = {
    .name = "rategate._core.Gate",
    .basicsize = sizeof(GateObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE |
             Py_TPFLAGS_HAVE_VECTORCALL,
    .slots = gate_slots,
};

int
rg_gate_types_init(PyObject *m)
{
    long long i;
    for (i = 0; i < SMALL_INTS; i++)
        if (small_ints[i] == NULL && (small_ints[i] = int_bytes(i)) == NULL)
            return -1;
    PyTypeObject *tp = (PyTypeObject *)PyType_FromModuleAndSpec(m, &gate_spec, NULL);
    if (tp == NULL)
        return -1;
    if (PyModule_AddType(m, tp) < 0) {
        Py_DECREF(tp);
        return -1;
    }
    Py_DECREF(tp);
    PendingType = (PyTypeObject *)PyType_FromModuleAndSpec(m, &pending_spec, NULL);
    SendType = (PyTypeObject *)PyType_FromModuleAndSpec(m, &send_spec, NULL);
    if (PendingType == NULL || SendType == NULL)
        return -1;
    if (PyModule_AddObjectRef(m, "GatePending", (PyObject *)PendingType) < 0 ||
        PyModule_AddObjectRef(m, "GateSend", (PyObject *)SendType) < 0)
        return -1;
    return 0;
}
