/*
 * cache.h: keys known to be over their limit, answered without Redis.
 *
 * When Redis denies a check, it also says how long a cost of 1 will keep
 * being denied (block_us).  Until then, a repeat of that key under the same
 * spec is denied from here, in C, with no round trip and no suspension.
 *
 * The block is counted from the moment the check was *submitted*, which is
 * before Redis's clock read it, so the cached block always ends no later than
 * Redis's would: the cache can deny only what Redis would deny.  It never
 * allows anything; every miss goes to Redis.  Other processes consuming the
 * same key only lengthen the real block, which keeps this true.
 *
 * Fixed size (no growth under a flood of distinct keys), 4-way set
 * associative, the entry nearest to expiry evicted.  Used only with the GIL
 * held, so it has no lock.
 */
#ifndef RG_CACHE_H
#define RG_CACHE_H

#include <stddef.h>
#include <stdint.h>

#define RG_CACHE_KEYMAX 120 /* longer keys are not cached (keys.py hashes long keys) */

/* The details of an entry, read only once its set's line has matched. */
typedef struct rg_cache_entry {
    uint64_t spec;         /* id of the compiled spec (never reused) */
    uint64_t reset_ns;     /* the bucket is full again at */
    uint64_t until_ns;     /* denied until, CLOCK_MONOTONIC (copy of the set's) */
    int32_t rate;          /* reported rate index */
    uint16_t keylen;
    char key[RG_CACHE_KEYMAX];
} rg_cache_entry;

/* One 4-way set in one 64-byte line: every check probes this (a miss reads
 * nothing else), so the hot part of the table stays small. */
typedef struct rg_cache_set {
    uint64_t hash[4];
    uint64_t until_ns[4]; /* 0: free */
} rg_cache_set;

typedef struct rg_cache {
    size_t nsets;        /* power of two */
    rg_cache_set *sets;  /* nsets, 64-byte aligned */
    rg_cache_entry *e;   /* nsets * 4 */
} rg_cache;

/* entries is rounded up to a multiple of 4 and a power of two; 0 disables. */
int rg_cache_init(rg_cache *c, size_t entries);
void rg_cache_free(rg_cache *c);
/* The entry denying (spec, key) at `now`, or NULL. */
const rg_cache_entry *rg_cache_get(rg_cache *c, uint64_t hash, uint64_t spec,
                                   const char *key, size_t keylen, uint64_t now);
void rg_cache_put(rg_cache *c, uint64_t hash, uint64_t spec, const char *key,
                  size_t keylen, uint64_t until_ns, uint64_t reset_ns, int rate);
void rg_cache_forget(rg_cache *c, uint64_t hash, uint64_t spec,
                     const char *key, size_t keylen);
/* 64-bit hash of a key, seeded per process (FNV-1a with a final mix). */
uint64_t rg_hash(const char *key, size_t len);
void rg_hash_seed(uint64_t seed);

#endif
