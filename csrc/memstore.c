/*
 * memstore.c: see memstore.h.
 */
#include "memstore.h"

#include <stdlib.h>
#include <string.h>

#include "cache.h"

int
rg_memstore_init(rg_memstore *m)
{
    m->cap = 64;
    m->used = 0;
    m->e = calloc(m->cap, sizeof(rg_mem_entry));
    m->t0_ns = rg_now_ns();
    return m->e == NULL ? -1 : 0;
}

static void
entry_free(rg_mem_entry *e)
{
    uint32_t i;
    for (i = 0; i < e->nsl; i++)
        free(e->sl[i].id);
    free(e->sl);
    free(e->key);
}

void
rg_memstore_free(rg_memstore *m)
{
    size_t i;
    if (m->e == NULL)
        return;
    for (i = 0; i < m->cap; i++)
        entry_free(&m->e[i]);
    free(m->e);
    m->e = NULL;
    m->cap = m->used = 0;
}

size_t
rg_memstore_size(const rg_memstore *m)
{
    return m->used;
}

size_t
rg_memstore_clear(rg_memstore *m, uint64_t now_ns)
{
    double now = (double)(now_ns - m->t0_ns) / 1000.0;
    size_t i, live = 0;

    if (m->e == NULL)
        return 0;
    for (i = 0; i < m->cap; i++) {
        rg_mem_entry *e = &m->e[i];
        if (e->hash == 0)
            continue;
        if (e->tat > now)
            live++;
        entry_free(e);
    }
    memset(m->e, 0, m->cap * sizeof(rg_mem_entry));
    m->used = 0;
    return live;
}

static rg_mem_entry *
slot_for(rg_mem_entry *tab, size_t cap, uint64_t h, const char *k, size_t kl)
{
    size_t i = h & (cap - 1);
    for (;;) {
        rg_mem_entry *e = &tab[i];
        if (e->hash == 0 || (e->hash == h && e->keylen == kl && memcmp(e->key, k, kl) == 0))
            return e;
        i = (i + 1) & (cap - 1);
    }
}

/* Rebuild into a table sized for the live entries, dropping full buckets. */
static int
rebuild(rg_memstore *m, double now)
{
    size_t live = 0, cap = 64, i;
    rg_mem_entry *tab;

    for (i = 0; i < m->cap; i++)
        if (m->e[i].hash != 0 && m->e[i].tat > now)
            live++;
    while (cap < live * 4)
        cap <<= 1;
    tab = calloc(cap, sizeof(rg_mem_entry));
    if (tab == NULL)
        return -1;
    for (i = 0; i < m->cap; i++) {
        rg_mem_entry *e = &m->e[i];
        if (e->hash == 0)
            continue;
        if (e->tat > now)
            *slot_for(tab, cap, e->hash, e->key, e->keylen) = *e;
        else
            entry_free(e);
    }
    free(m->e);
    m->e = tab;
    m->cap = cap;
    m->used = live;
    return 0;
}

/* The key of (key, rate j) as the table spells it, "key\0key_id", in buf
 * (or a malloc'd copy when the key is long: free if != buf); NULL on out of
 * memory.  *kl is its length. */
static char *
entry_key(char *buf, size_t bufsize, const rg_spec *spec, int j, const char *key,
          size_t keylen, size_t *kl)
{
    char *k = buf;
    if (keylen + 1 + sizeof(spec->key_id[j]) > bufsize &&
        (k = malloc(keylen + 1 + sizeof(spec->key_id[j]))) == NULL)
        return NULL;
    memcpy(k, key, keylen);
    k[keylen] = '\0';
    memcpy(k + keylen + 1, spec->key_id[j], spec->key_id_len[j]);
    *kl = keylen + 1 + spec->key_id_len[j];
    return k;
}

/* The entry of "key\0id" (claimed, as a full bucket, if new); NULL on out
 * of memory.  The caller made room for it. */
static rg_mem_entry *
entry_get(rg_memstore *m, const char *id, size_t idlen, const char *key, size_t keylen,
          int claim)
{
    char buf[512];
    char *k = buf;
    size_t kl = keylen + 1 + idlen;
    rg_mem_entry *e = NULL;
    uint64_t h;

    if (kl > sizeof(buf) && (k = malloc(kl)) == NULL)
        return NULL;
    memcpy(k, key, keylen);
    k[keylen] = '\0';
    memcpy(k + keylen + 1, id, idlen);
    h = rg_hash(k, kl) | 1; /* never 0: 0 marks a free slot */
    e = slot_for(m->e, m->cap, h, k, kl);
    if (e->hash == 0) {
        if (!claim || (e->key = malloc(kl)) == NULL) {
            e = NULL;
            goto done;
        }
        /* Claim it now; an entry left with tat 0 is a full bucket. */
        memcpy(e->key, k, kl);
        e->keylen = kl;
        e->hash = h;
        e->tat = 0;
        e->sl = NULL;
        e->nsl = e->capsl = 0;
        m->used++;
    }
done:
    if (k != buf)
        free(k);
    return e;
}

/* Drop the expired slots of a concurrency entry (as ZREMRANGEBYSCORE). */
static void
slots_prune(rg_mem_entry *e, double now)
{
    uint32_t i = 0;
    while (i < e->nsl) {
        if (e->sl[i].exp <= now) {
            free(e->sl[i].id);
            e->sl[i] = e->sl[--e->nsl];
        } else {
            i++;
        }
    }
}

static rg_mem_slot *
slots_find(rg_mem_entry *e, const char *sid, size_t sidlen)
{
    uint32_t i;
    for (i = 0; i < e->nsl; i++)
        if (e->sl[i].len == sidlen && memcmp(e->sl[i].id, sid, sidlen) == 0)
            return &e->sl[i];
    return NULL;
}

int
rg_memstore_op(rg_memstore *m, int op, const rg_spec *spec, const char *key, size_t keylen,
               const char *sid, size_t sidlen, int64_t cost, uint64_t now_ns, rg_result *out)
{
    rg_mem_entry *slots[RG_MAX_RATES], *ce = NULL;
    double tats[RG_MAX_RATES];
    double now = (double)(now_ns - m->t0_ns) / 1000.0;
    int j, n = spec->n, conc = spec->conc_limit > 0 && op != RG_OP_CHARGE;

    memset(out, 0, sizeof(*out));
    out->allowed = 1;
    if (op == RG_OP_RELEASE) {
        rg_mem_slot *s;
        ce = conc ? entry_get(m, "c", 1, key, keylen, 0) : NULL;
        if (ce != NULL && (s = slots_find(ce, sid, sidlen)) != NULL) {
            free(s->id);
            *s = ce->sl[--ce->nsl];
            if (ce->nsl == 0)
                ce->tat = 0; /* the key goes with its last slot */
        }
        return 0;
    }
    /* Make room first, so that inserting the entries below cannot fail. */
    if ((m->used + (size_t)n + 1) * 2 > m->cap && rebuild(m, now) < 0)
        return -1;
    for (j = 0; j < n; j++) {
        slots[j] = entry_get(m, spec->key_id[j], spec->key_id_len[j], key, keylen, 1);
        if (slots[j] == NULL)
            return -1;
        tats[j] = slots[j]->tat;
    }
    if (op == RG_OP_CHARGE) {
        rg_gcra_charge(spec->rates, n, now, cost, tats, out);
        for (j = 0; j < n; j++)
            slots[j]->tat = tats[j];
        return 0;
    }
    if (!rg_gcra_check(spec->rates, n, now, cost, tats, out))
        return 0;
    if (conc) {
        rg_mem_slot *s;
        if ((ce = entry_get(m, "c", 1, key, keylen, 1)) == NULL)
            return -1;
        slots_prune(ce, now);
        if (ce->nsl >= spec->conc_limit) {
            /* Denied by the concurrency limit: reported as rate n, retry
             * in a second (as the script). */
            memset(out, 0, sizeof(*out));
            out->rate = n;
            out->retry_us = 1000000;
            return 0;
        }
        if ((s = slots_find(ce, sid, sidlen)) == NULL) {
            char *id;
            if (ce->nsl == ce->capsl) {
                uint32_t cap = ce->capsl ? ce->capsl * 2 : 4;
                rg_mem_slot *sl = realloc(ce->sl, cap * sizeof(*sl));
                if (sl == NULL)
                    return -1;
                ce->sl = sl;
                ce->capsl = cap;
            }
            if ((id = malloc(sidlen ? sidlen : 1)) == NULL)
                return -1;
            memcpy(id, sid, sidlen);
            s = &ce->sl[ce->nsl++];
            s->id = id;
            s->len = sidlen;
        }
        s->exp = now + spec->conc_ttl_us;
        if (s->exp > ce->tat)
            ce->tat = s->exp;
        if (n == 0) {
            out->rate = 0;
            out->remaining = spec->conc_limit - (int64_t)ce->nsl;
        }
    }
    if (cost > 0)
        for (j = 0; j < n; j++)
            slots[j]->tat = tats[j];
    return 0;
}

void
rg_memstore_delete(rg_memstore *m, const rg_spec *spec, const char *key, size_t keylen)
{
    char buf[512];
    int j;

    if (m->e == NULL)
        return;
    for (j = 0; j < spec->n; j++) {
        size_t kl;
        char *k = entry_key(buf, sizeof(buf), spec, j, key, keylen, &kl);
        rg_mem_entry *e;
        if (k == NULL) {
            /* No memory for a long key's copy: compare in two parts. */
            size_t i;
            for (i = 0; i < m->cap; i++) {
                e = &m->e[i];
                if (e->hash != 0 && e->keylen == keylen + 1 + spec->key_id_len[j] &&
                    memcmp(e->key, key, keylen) == 0 && e->key[keylen] == '\0' &&
                    memcmp(e->key + keylen + 1, spec->key_id[j], spec->key_id_len[j]) == 0)
                    e->tat = 0;
            }
            continue;
        }
        e = slot_for(m->e, m->cap, rg_hash(k, kl) | 1, k, kl);
        if (e->hash != 0)
            e->tat = 0; /* a full bucket; the next rebuild drops it */
        if (k != buf)
            free(k);
    }
}

/* Whether e is live at now, and its value (see memstore.h). */
static int
entry_live(const rg_mem_entry *e, double now, double *value)
{
    uint32_t i, n = 0;
    if (e->hash == 0 || e->tat <= now)
        return 0;
    /* "key\0c" is a concurrency key: no key_id is "c". */
    if (!(e->keylen >= 2 && e->key[e->keylen - 2] == '\0' && e->key[e->keylen - 1] == 'c')) {
        *value = e->tat - now;
        return 1;
    }
    for (i = 0; i < e->nsl; i++)
        if (e->sl[i].exp > now)
            n++;
    *value = (double)n;
    return n > 0;
}

const rg_mem_entry *
rg_memstore_next(const rg_memstore *m, size_t *i, uint64_t now_ns, double *value)
{
    double now = (double)(now_ns - m->t0_ns) / 1000.0;
    for (; *i < m->cap; (*i)++)
        if (entry_live(&m->e[*i], now, value))
            return &m->e[(*i)++];
    return NULL;
}
