/*
 * cache.h: keys known to be over their limit, answered without Redis.
 *
 * When Redis denies a check, it also says how long a cost of 1 will keep
 * being denied (block_us).  Until then, but for at most `ttl` (the Limiter's
 * deny_cache_ttl, default 1 s), a repeat of that key under the same spec is
 * denied from here, in C, with no round trip and no suspension.  The ttl
 * bounds how long a reset done elsewhere (limiter.reset() in another
 * process, an operator deleting keys, FLUSHDB, a Redis restart) goes unseen:
 * a flood costs one Redis check per key per ttl per process, however many
 * requests are in flight when the ttl ends (the first asks Redis; the entry
 * answers the rest meanwhile, for at most refresh_ns).
 *
 * The block is counted from the moment the check was *submitted*, which is
 * before Redis's clock read it, so the cached block always ends no later than
 * Redis's would: the cache can deny only what Redis would deny.  It never
 * allows anything; every miss goes to Redis.
 *
 * The cache answers only what Redis said about a cost of 1: a denial puts
 * an entry; an answer saying a cost of 1 is allowed now (an allowed hit, or a
 * peek with a token left) removes it; a peek that leaves no token says
 * nothing new and changes nothing.
 *
 * Bounded, not fixed: it starts small and doubles (4-way set associative,
 * the entry nearest to expiry evicted) while a put would evict a live entry,
 * up to the configured number of entries, so an idle Limiter costs a few KiB
 * and a flood of distinct keys costs at most the bound.  Used only with the
 * GIL held, so it has no lock.
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
    uint64_t until_ns;     /* denied until, CLOCK_MONOTONIC (what Redis said) */
    int32_t rate;          /* reported rate index */
    uint16_t keylen;
    char key[RG_CACHE_KEYMAX];
} rg_cache_entry;

/* One 4-way set in one 64-byte line: every check probes this (a miss reads
 * nothing else), so the hot part of the table stays small. */
typedef struct rg_cache_set {
    uint64_t hash[4];
    uint64_t until_ns[4]; /* answered from here until: min(the entry's, put + ttl); 0: free */
} rg_cache_set;

typedef struct rg_cache {
    size_t nsets;        /* power of two; 0: disabled or freed */
    size_t max_sets;     /* the bound (power of two) */
    uint64_t ttl_ns;     /* an entry lives at most this long, then Redis is asked */
    uint64_t refresh_ns; /* while asked: the others answered from here this long
                          * at most (the check's deadline; default ttl_ns) */
    rg_cache_set *sets;  /* nsets, 64-byte aligned */
    rg_cache_entry *e;   /* nsets * 4 */
} rg_cache;

/* At most `entries` (rounded up to a multiple of 4 and a power of two; 0
 * disables), each living at most ttl_ns.  Allocates only the first few sets. */
int rg_cache_init(rg_cache *c, size_t entries, uint64_t ttl_ns);
/* Free the table; the cache is then disabled (get/put/forget do nothing). */
void rg_cache_free(rg_cache *c);
/* Bytes allocated now (for stats and the memory test). */
size_t rg_cache_bytes(const rg_cache *c);
/* The entry denying (spec, key) at `now`, or NULL. */
const rg_cache_entry *rg_cache_get(rg_cache *c, uint64_t hash, uint64_t spec,
                                   const char *key, size_t keylen, uint64_t now);
/* Deny (spec, key) until min(until_ns, now + ttl). */
void rg_cache_put(rg_cache *c, uint64_t hash, uint64_t spec, const char *key,
                  size_t keylen, uint64_t until_ns, uint64_t reset_ns, int rate,
                  uint64_t now);
void rg_cache_forget(rg_cache *c, uint64_t hash, uint64_t spec,
                     const char *key, size_t keylen);
/* Forget the key under every spec (limiter.reset()). */
void rg_cache_forget_key(rg_cache *c, uint64_t hash, const char *key, size_t keylen);
/* Forget every key (limiter.clear()); keeps the table. */
void rg_cache_forget_all(rg_cache *c);
/* 64-bit hash of a key, seeded per process (FNV-1a with a final mix). */
uint64_t rg_hash(const char *key, size_t len);
/* The same from the seed h (the FNV offset basis 0xcbf29ce484222325: the
 * unseeded hash, reproducible outside the process). */
uint64_t rg_hash_from(uint64_t h, const char *key, size_t len);
void rg_hash_seed(uint64_t seed);

/* splitmix64's finaliser: every bit of h moves every bit of the result
 * (rg_hash's final mix; shmstore.c's set choices). */
static inline uint64_t
rg_mix64(uint64_t h)
{
    h ^= h >> 30;
    h *= 0xbf58476d1ce4e5b9ULL;
    h ^= h >> 27;
    h *= 0x94d049bb133111ebULL;
    h ^= h >> 31;
    return h;
}

#endif
