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
    return rg_hash_from(hash_seed, key, len);
}

uint64_t
rg_hash_from(uint64_t h, const char *key, size_t len)
{
    size_t i;
    for (i = 0; i < len; i++) {
        h ^= (unsigned char)key[i];
        h *= 0x100000001b3ULL;
    }
    /* FNV's low bits are weak, and we index with them */
    return rg_mix64(h);
}

#define FIRST_SETS 16 /* 64 entries, about 11 KiB, until a flood needs more */

/* Allocate a zeroed table of `sets` sets; 0 or -1 (nothing changed). */
static int
alloc_table(size_t sets, rg_cache_set **lines, rg_cache_entry **entries)
{
    if (posix_memalign((void **)lines, 64, sets * sizeof(rg_cache_set)) != 0)
        return -1;
    memset(*lines, 0, sets * sizeof(rg_cache_set));
    *entries = calloc(sets * WAYS, sizeof(rg_cache_entry));
    if (*entries == NULL) {
        free(*lines);
        return -1;
    }
    return 0;
}

int
rg_cache_init(rg_cache *c, size_t entries, uint64_t ttl_ns)
{
    size_t sets = 1;
    c->nsets = 0;
    c->max_sets = 0;
    c->ttl_ns = ttl_ns;
    c->refresh_ns = ttl_ns;
    c->sets = NULL;
    c->e = NULL;
    if (entries == 0)
        return 0;
    while (sets * WAYS < entries)
        sets <<= 1;
    c->max_sets = sets;
    if (sets > FIRST_SETS)
        sets = FIRST_SETS;
    if (alloc_table(sets, &c->sets, &c->e) < 0)
        return -1;
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
    c->max_sets = 0;
}

void
rg_cache_forget_all(rg_cache *c)
{
    size_t set;
    int i;
    for (set = 0; set < c->nsets; set++)
        for (i = 0; i < WAYS; i++)
            c->sets[set].until_ns[i] = 0;
}

size_t
rg_cache_bytes(const rg_cache *c)
{
    return c->nsets * (sizeof(rg_cache_set) + WAYS * sizeof(rg_cache_entry));
}

/* Double the table, keeping the entries still live at `now`.  0, or -1 on
 * out of memory (the old table is kept: the caller evicts instead). */
static int
grow(rg_cache *c, uint64_t now)
{
    size_t sets = c->nsets * 2, s, n;
    rg_cache_set *lines;
    rg_cache_entry *entries;
    int i;

    if (alloc_table(sets, &lines, &entries) < 0)
        return -1;
    for (s = 0; s < c->nsets; s++) {
        for (i = 0; i < WAYS; i++) {
            uint64_t h = c->sets[s].hash[i], until = c->sets[s].until_ns[i];
            int w;
            if (until <= now)
                continue;
            /* Twice the sets: each old set splits in two, so at most the
             * WAYS entries of one old set meet in a new one: always a way. */
            n = h & (sets - 1);
            for (w = 0; w < WAYS && lines[n].until_ns[w] != 0; w++)
                ;
            lines[n].hash[w] = h;
            lines[n].until_ns[w] = until;
            entries[n * WAYS + (size_t)w] = c->e[s * WAYS + (size_t)i];
        }
    }
    free(c->sets);
    free(c->e);
    c->sets = lines;
    c->e = entries;
    c->nsets = sets;
    return 0;
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
        rg_cache_entry *e = &c->e[set * WAYS + (size_t)i];
        if (now >= e->until_ns) {
            c->sets[set].until_ns[i] = 0; /* Redis's block is over: free the way */
            return NULL;
        }
        /* Its ttl is over but Redis's block is not: this check asks Redis
         * (a reset done elsewhere is seen now), and the entry keeps
         * answering the others for up to refresh_ns, while that answer is
         * on its way; the answer then puts or forgets the entry.  One Redis
         * check per key per ttl, however many requests flood it. */
        c->sets[set].until_ns[i] = now + c->refresh_ns < e->until_ns ? now + c->refresh_ns : e->until_ns;
        return NULL;
    }
    return &c->e[set * WAYS + (size_t)i];
}

void
rg_cache_put(rg_cache *c, uint64_t hash, uint64_t spec, const char *key, size_t keylen,
             uint64_t until_ns, uint64_t reset_ns, int rate, uint64_t now)
{
    size_t set;
    int i;
    rg_cache_entry *e;
    rg_cache_set *l;

    uint64_t expires;

    if (c->nsets == 0 || keylen > RG_CACHE_KEYMAX || until_ns <= now)
        return;
    /* Re-ask Redis after ttl, however long the block: a reset is seen. */
    expires = until_ns - now > c->ttl_ns ? now + c->ttl_ns : until_ns;
    for (;;) {
        set = hash & (c->nsets - 1);
        l = &c->sets[set];
        i = find(c, set, hash, spec, key, keylen);
        if (i >= 0)
            break;
        /* Take the way that expires first (free ways have until_ns 0); if
         * it is still live, grow rather than evict, up to the bound. */
        int w;
        i = 0;
        for (w = 1; w < WAYS; w++)
            if (l->until_ns[w] < l->until_ns[i])
                i = w;
        if (l->until_ns[i] <= now || c->nsets >= c->max_sets || grow(c, now) < 0)
            break;
    }
    e = &c->e[set * WAYS + (size_t)i];
    l->hash[i] = hash;
    l->until_ns[i] = expires;
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

void
rg_cache_forget_key(rg_cache *c, uint64_t hash, const char *key, size_t keylen)
{
    rg_cache_set *l;
    size_t set;
    int i;
    if (c->nsets == 0 || keylen > RG_CACHE_KEYMAX)
        return;
    set = hash & (c->nsets - 1);
    l = &c->sets[set];
    for (i = 0; i < WAYS; i++) {
        const rg_cache_entry *e = &c->e[set * WAYS + (size_t)i];
        if (l->hash[i] == hash && l->until_ns[i] != 0 && e->keylen == keylen &&
            memcmp(e->key, key, keylen) == 0)
            l->until_ns[i] = 0;
    }
}
