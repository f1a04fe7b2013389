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
    c->e = NULL;
    if (entries == 0)
        return 0;
    while (sets * WAYS < entries)
        sets <<= 1;
    c->e = calloc(sets * WAYS, sizeof(rg_cache_entry));
    if (c->e == NULL)
        return -1;
    c->nsets = sets;
    return 0;
}

void
rg_cache_free(rg_cache *c)
{
    free(c->e);
    c->e = NULL;
    c->nsets = 0;
}

static rg_cache_entry *
find(rg_cache *c, uint64_t hash, uint64_t spec, const char *key, size_t keylen)
{
    rg_cache_entry *set = &c->e[(hash & (c->nsets - 1)) * WAYS];
    int i;
    for (i = 0; i < WAYS; i++) {
        rg_cache_entry *e = &set[i];
        if (e->hash == hash && e->spec == spec && e->keylen == keylen &&
            e->until_ns != 0 && memcmp(e->key, key, keylen) == 0)
            return e;
    }
    return NULL;
}

const rg_cache_entry *
rg_cache_get(rg_cache *c, uint64_t hash, uint64_t spec, const char *key,
             size_t keylen, uint64_t now)
{
    rg_cache_entry *e;
    if (c->nsets == 0 || keylen > RG_CACHE_KEYMAX)
        return NULL;
    e = find(c, hash, spec, key, keylen);
    if (e == NULL)
        return NULL;
    if (now >= e->until_ns) {
        e->until_ns = 0; /* expired: free the way */
        return NULL;
    }
    return e;
}

void
rg_cache_put(rg_cache *c, uint64_t hash, uint64_t spec, const char *key,
             size_t keylen, uint64_t until_ns, uint64_t reset_ns, int rate)
{
    rg_cache_entry *e;
    if (c->nsets == 0 || keylen > RG_CACHE_KEYMAX || until_ns == 0)
        return;
    e = find(c, hash, spec, key, keylen);
    if (e == NULL) {
        /* Evict the way that expires first (free ways have until_ns 0). */
        rg_cache_entry *set = &c->e[(hash & (c->nsets - 1)) * WAYS];
        int i;
        e = &set[0];
        for (i = 1; i < WAYS; i++)
            if (set[i].until_ns < e->until_ns)
                e = &set[i];
    } else if (e->until_ns > until_ns) {
        return; /* keep the longer block: both came from Redis */
    }
    e->hash = hash;
    e->spec = spec;
    e->until_ns = until_ns;
    e->reset_ns = reset_ns;
    e->rate = rate;
    e->keylen = (uint16_t)keylen;
    memcpy(e->key, key, keylen);
}

void
rg_cache_forget(rg_cache *c, uint64_t hash, uint64_t spec, const char *key,
                size_t keylen)
{
    rg_cache_entry *e;
    if (c->nsets == 0 || keylen > RG_CACHE_KEYMAX)
        return;
    e = find(c, hash, spec, key, keylen);
    if (e != NULL)
        e->until_ns = 0;
}
