/*
 * topk.h: the denial summary of one engine: which keys are denied most in
 * this process, and about how many distinct clients were denied in the last
 * minute.  Fed on every denial a store decides (a denial from Redis, from
 * the local over-limit cache, from memory:// or shm://; never a failure
 * decision), in O(1) and in fixed memory; read by stats().
 *
 * The top keys: Space-Saving (Metwally, Agrawal, El Abbadi, "Efficient
 * computation of frequent and top-k elements in data streams", 2005) in its
 * stream-summary form.  RG_TOPK_K counters; a denial of a key counted
 * already adds one to it; a new key takes the place of a key with the least
 * count c (the one that has held that count longest) and starts at c + 1
 * with an error of c.  So every count is an over-estimate by at most its
 * error, and any key denied more than N / RG_TOPK_K times out of N denials
 * is in the summary.  The counters sit in buckets of equal count, kept in
 * ascending order, so an increment moves a counter to the next bucket: no
 * search, no allocation.  A key is known by its 64-bit hash and its length
 * (the caller's hash, seeded per process: two keys taken for one is a
 * 2^-64 chance, and cannot be aimed at); its first RG_TOPK_KEYMAX bytes are
 * kept to show it.
 *
 * Distinct clients: a HyperLogLog (Flajolet et al. 2007) of 2^RG_HLL_P
 * one-byte registers per 2^RG_HLL_SLOT_SHIFT ns (4.3 s), RG_HLL_SLOTS of
 * them in a ring; the estimate is the union of the slots of the last
 * minute (the current one and those before it: between 55.8 and 60.1 s).
 * A key counted in the top keys remembers its client's hash and the slot it
 * last reached, so a flood from one client costs the estimate nothing after
 * its first denial in each slot.  Standard error
 * about 1.04 / sqrt(2^RG_HLL_P) (3.3 %), and exact-ish below a few hundred
 * (linear counting).  A client is the part of the key after the first '|'
 * or '#' (rategate/admin.py: a middleware key is "<rule>|<client>" or
 * "<rule>#<digest of the client>", the rule's name escaped so that neither
 * character appears in it); a key with neither counts as a whole.  So a
 * client denied under two rules counts once.
 *
 * Memory: nothing until the first denial, then about 21 KiB for the top keys
 * and 14 KiB for the estimate, per engine, whatever the flood.  Plain C,
 * no Python.h: used only with the GIL held (where decisions are made), so it
 * has no lock.  A failed allocation leaves the summary off (it is
 * statistics, never a reason to fail a check).
 */
#ifndef RG_TOPK_H
#define RG_TOPK_H

#include <stddef.h>
#include <stdint.h>

#define RG_TOPK_K 64        /* counters */
#define RG_TOPK_KEYMAX 256  /* bytes of a key kept */
#define RG_TOPK_INDEX 128   /* hash chains (power of two, >= 2 * K) */

#define RG_HLL_P 10
#define RG_HLL_SLOTS 14
#define RG_HLL_SLOT_SHIFT 32 /* a slot is 2^32 ns, 4.3 s: 14 of them, 60.1 s */

typedef struct rg_topk_item {
    uint64_t hash;
    uint64_t count; /* an over-estimate: the true count is in [count - error, count] */
    uint64_t error;
    uint64_t client_hash; /* rg_client_hash of its client */
    uint64_t epoch;       /* the last slot its client was added to the estimate */
    int16_t bucket;       /* the bucket holding it; -1: unused */
    int16_t prev, next;   /* within its bucket, oldest first */
    int16_t chain;        /* next in its hash chain */
    uint32_t keylen;      /* the key's full length (only RG_TOPK_KEYMAX kept) */
    char key[RG_TOPK_KEYMAX];
} rg_topk_item;

typedef struct rg_topk_bucket {
    uint64_t count;
    int16_t head, tail;   /* items, oldest first */
    int16_t prev, next;   /* buckets by ascending count */
} rg_topk_bucket;

typedef struct rg_topk {
    int16_t used;         /* items in use (they fill up first) */
    int16_t min;          /* the bucket of the least count; -1: none */
    int16_t free_bucket;  /* free list of buckets, through next */
    int16_t index[RG_TOPK_INDEX];
    rg_topk_bucket buckets[RG_TOPK_K];
    rg_topk_item items[RG_TOPK_K];
    uint64_t total;       /* denials fed */
} rg_topk;

typedef struct rg_hll_ring {
    uint64_t epoch[RG_HLL_SLOTS]; /* now >> RG_HLL_SLOT_SHIFT of the slot's registers */
    uint8_t reg[RG_HLL_SLOTS][1u << RG_HLL_P];
} rg_hll_ring;

/* The summary of one engine.  Zero it to start (nothing is allocated until
 * the first denial). */
typedef struct rg_denials {
    rg_topk *top;
    rg_hll_ring *recent;
    int off; /* an allocation failed: fed no more */
} rg_denials;

/* One entry of the summary, as rg_denials_top() reads it. */
typedef struct rg_denied_key {
    const char *key;
    size_t keylen;        /* bytes in key (at most RG_TOPK_KEYMAX) */
    int truncated;        /* the key was longer: key holds its start */
    uint64_t count, error;
} rg_denied_key;

/* A denial of `key` (whose hash is `hash`, any good 64-bit hash of it) at
 * now_ns (CLOCK_MONOTONIC).  O(1); allocates only on the first call. */
void rg_denials_note(rg_denials *d, uint64_t hash, const char *key, size_t keylen,
                     uint64_t now_ns);
/* Up to `max` keys with the most denials, most first (ties: the oldest
 * count first) into out; returns how many.  Pointers into the summary:
 * valid until the next note or clear. */
size_t rg_denials_top(const rg_denials *d, rg_denied_key *out, size_t max);
/* Denials fed since the start (or the last clear). */
uint64_t rg_denials_total(const rg_denials *d);
/* The estimate of distinct clients denied in the last minute at now_ns. */
uint64_t rg_denials_recent(const rg_denials *d, uint64_t now_ns);
/* Forget everything (after fork(): the parent's denials are not ours). */
void rg_denials_clear(rg_denials *d);
/* Free the memory; the summary may be fed again afterwards. */
void rg_denials_free(rg_denials *d);

/* The hash the estimate uses for a client (FNV-1a with a splitmix64
 * finaliser, unseeded: the tests reproduce it). */
uint64_t rg_client_hash(const char *key, size_t keylen);

#endif
