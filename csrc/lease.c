/*
 * lease.c: the table of token leases (see lease.h).  GIL held.
 */
#include "lease.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define WINDOW_NS 100000000ull    /* a block lasts about this long at the observed rate */
#define MIN_WINDOW_NS 10000000ull /* a rate is observed over at least this long */

static int
matches(const rg_lease *l, uint64_t hash, uint64_t spec, const char *key, size_t keylen)
{
    return l->spec == spec && l->hash == hash && l->keylen == keylen &&
           memcmp(l->key, key, keylen) == 0;
}

static rg_lease *
set_of(rg_lease_table *t, uint64_t hash)
{
    return &t->e[(hash & (RG_LEASE_SETS - 1)) * 4];
}

rg_lease *
rg_lease_find(rg_lease_table *t, uint64_t hash, uint64_t spec, const char *key, size_t keylen)
{
    rg_lease *s;
    int i;

    if (t->e == NULL || keylen > RG_CACHE_KEYMAX)
        return NULL;
    s = set_of(t, hash);
    for (i = 0; i < 4; i++)
        if (matches(&s[i], hash, spec, key, keylen))
            return &s[i];
    return NULL;
}

rg_lease *
rg_lease_get(rg_lease_table *t, uint64_t hash, uint64_t spec, const char *key, size_t keylen,
             uint64_t now)
{
    rg_lease *s, *l = NULL;
    int i;

    if (keylen > RG_CACHE_KEYMAX)
        return NULL;
    if (t->e == NULL) {
        t->e = calloc(RG_LEASE_SETS * 4, sizeof(rg_lease));
        if (t->e == NULL)
            return NULL;
    }
    s = set_of(t, hash);
    for (i = 0; i < 4; i++) {
        if (matches(&s[i], hash, spec, key, keylen))
            return &s[i];
        if (s[i].spec == 0) {
            if (l == NULL || l->spec != 0)
                l = &s[i];
        } else if (s[i].taking_ns <= now &&
                   (l == NULL || (l->spec != 0 && s[i].expires_ns < l->expires_ns))) {
            l = &s[i];
        }
    }
    if (l == NULL)
        return NULL;
    memset(l, 0, sizeof(*l));
    l->hash = hash;
    l->spec = spec;
    l->win_ns = now;
    l->keylen = (uint16_t)keylen;
    memcpy(l->key, key, keylen);
    return l;
}

void
rg_lease_forget_key(rg_lease_table *t, uint64_t hash, const char *key, size_t keylen)
{
    rg_lease *s;
    int i;

    if (t->e == NULL || keylen > RG_CACHE_KEYMAX)
        return;
    s = set_of(t, hash);
    for (i = 0; i < 4; i++)
        if (s[i].spec != 0 && s[i].hash == hash && s[i].keylen == keylen &&
            memcmp(s[i].key, key, keylen) == 0) {
            s[i].tokens = 0;
            s[i].expires_ns = 0;
        }
}

void
rg_lease_clear(rg_lease_table *t)
{
    if (t->e != NULL)
        memset(t->e, 0, RG_LEASE_SETS * 4 * sizeof(rg_lease));
}

void
rg_lease_free(rg_lease_table *t)
{
    free(t->e);
    t->e = NULL;
}

int64_t
rg_lease_block(rg_lease *l, const rg_spec *spec, uint64_t now)
{
    uint64_t w = now > l->win_ns ? now - l->win_ns : 0;
    double b;

    if (w < MIN_WINDOW_NS)
        w = MIN_WINDOW_NS;
    b = ceil((double)l->served * (double)WINDOW_NS / (double)w);
    l->win_ns = now;
    l->served = 0;
    if (!(b >= 1.0))
        return 1;
    return b >= (double)spec->lease_max ? spec->lease_max : (int64_t)b;
}
