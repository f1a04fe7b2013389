/*
 * cache.c: see cache.h.
 */
#include "cache.h"

#include <stdlib.h>
#include <string.h>

#define WAYS 4

static uint64_t hash_seed = 0xcbf29ce484222325ULL;

void
rg_hash_seed(uint64_t seed)
{
    hash_seed ^= seed;
}

uint64_t
rg_hash(const char *key, size_t len)
{
    uint64_t h = hash_seed;
    size_t i;
    for (i = 0; i < len; i++) {
        h ^= (unsigned char)key[i];
        h *= 0x100000001b3ULL;
    }
    /* splitmix64 finaliser: FNV's low bits are weak, and we index with them */
    h ^= h >> 30;
    h *= 0xbf58476d1ce4e5b9ULL;
    h ^= h >> 27;
    h *= 0x94d049bb133111ebULL;
    h ^= h >> 31;
    return h;
}

int
rg_cache_init(rg_cache *c, size_t entries)
{
    size_t sets = 1;
    c->nsets = 0;
    c->sets = NULL;
    c->e = NULL;
    if (entries == 0)
        return 0;
    while (sets * WAYS < entries)
        sets <<= 1;
    if (posix_memalign((void **)&c->sets, 64, sets * sizeof(rg_cache_set)) != 0) {
        c->sets = NULL;
        return -1;
    }
    memset(c->sets, 0, sets * sizeof(rg_cache_set));
    c->e = calloc(sets * WAYS, sizeof(rg_cache_entry));
    if (c->e == NULL) {
        free(c->sets);
        c->sets = NULL;
        return -1;
    }
    c->nsets = sets;
    return 0;
}

void
rg_cache_free(rg_cache *c)
{
    free(c->sets);
    free(c->e);
    c->sets = NULL;
    c->e = NULL;
    c->nsets = 0;
}

/* The way of (spec, key) in its set, or -1. */
static int
find(rg_cache *c, size_t set, uint64_t hash, uint64_t spec, const char *key, size_t keylen)
{
    rg_cache_set *l = &c->sets[set];
    int i;
    for (i = 0; i < WAYS; i++) {
        if (l->hash[i] == hash && l->until_ns[i] != 0) {
            rg_cache_entry *e = &c->e[set * WAYS + (size_t)i];
            if (e->spec == spec && e->keylen == keylen && memcmp(e->key, key, keylen) == 0)
                return i;
        }
    }
    return -1;
}

const rg_cache_entry *
rg_cache_get(rg_cache *c, uint64_t hash, uint64_t spec, const char *key, size_t keylen,
             uint64_t now)
{
    size_t set;
    int i;
    if (c->nsets == 0 || keylen > RG_CACHE_KEYMAX)
        return NULL;
    set = hash & (c->nsets - 1);
    i = find(c, set, hash, spec, key, keylen);
    if (i < 0)
        return NULL;
    if (now >= c->sets[set].until_ns[i]) {
        c->sets[set].until_ns[i] = 0; /* expired: free the way */
        return NULL;
    }
    return &c->e[set * WAYS + (size_t)i];
}

void
rg_cache_put(rg_cache *c, uint64_t hash, uint64_t spec, const char *key, size_t keylen,
             uint64_t until_ns, uint64_t reset_ns, int rate)
{
    size_t set;
    int i;
    rg_cache_entry *e;
    rg_cache_set *l;

    if (c->nsets == 0 || keylen > RG_CACHE_KEYMAX || until_ns == 0)
        return;
    set = hash & (c->nsets - 1);
    l = &c->sets[set];
    i = find(c, set, hash, spec, key, keylen);
    if (i < 0) {
        /* Evict the way that expires first (free ways have until_ns 0). */
        int w;
        i = 0;
        for (w = 1; w < WAYS; w++)
            if (l->until_ns[w] < l->until_ns[i])
                i = w;
    } else if (l->until_ns[i] > until_ns) {
        return; /* keep the longer block: both came from Redis */
    }
    e = &c->e[set * WAYS + (size_t)i];
    l->hash[i] = hash;
    l->until_ns[i] = until_ns;
    e->spec = spec;
    e->until_ns = until_ns;
    e->reset_ns = reset_ns;
    e->rate = rate;
    e->keylen = (uint16_t)keylen;
    memcpy(e->key, key, keylen);
}

void
rg_cache_forget(rg_cache *c, uint64_t hash, uint64_t spec, const char *key, size_t keylen)
{
    size_t set;
    int i;
    if (c->nsets == 0 || keylen > RG_CACHE_KEYMAX)
        return;
    set = hash & (c->nsets - 1);
    i = find(c, set, hash, spec, key, keylen);
    if (i >= 0)
        c->sets[set].until_ns[i] = 0;
}
