/*
 * lease.h: token leases for hot keys (issue 13), answered in C without Redis.
 *
 * A key whose spec leases (Spec(..., lease=True)) takes a block of tokens
 * from Redis in one check (the script's "take up to B": as many as every
 * rate allows, at most B, at least the request's own 1 or a denial) and
 * hands them out here, one per request, with no round trip, no future and
 * no suspension.  What this promises:
 *
 * - Never over the limit: a token is handed out only after Redis granted it
 *   to this process, so the requests admitted across all processes never
 *   exceed what Redis granted.  A lease is usable only for ttl_ns after its
 *   take was submitted (a quarter of the shortest refill time, tau: a
 *   rate's period when its burst is its limit; at most 1 s), so an admission happens at most ttl_ns after Redis counted it: in
 *   any window W, at most what the limit allows in W + ttl_ns, and from a
 *   full bucket, at most burst + rate * t by time t, exactly as without
 *   leases.
 * - Bounded under-admission: a process parks at most `lease_max` tokens (a
 *   sixteenth of the smallest burst, at least 1).  Leftovers of an expired
 *   lease are refunded to Redis (a charge of minus the leftover, fire and
 *   forget) when the key is next checked here; a lease dropped without a
 *   refund (evicted from the table, the process ending) is as if its tokens
 *   were used at its take: Redis refills them at the rate.
 * - The block adapts: 100 ms of this process's observed rate of the key
 *   (requests since the last take over the time since, at least 10 ms),
 *   from 1 up to lease_max, so a quiet key takes one token at a time.
 *
 * One take per key in flight; requests arriving meanwhile with the pool
 * empty are plain checks.  Only a cost of 1 is leased (other costs, peeks
 * and charges go to Redis).  Bounded: a 4-way set-associative table of at
 * most RG_LEASE_SETS * 4 keys, allocated on the first leased check; a key
 * that finds its set full of leases being taken is a plain check.  Used
 * only with the GIL held (submit, and the answers, resolved on the loop),
 * so it has no lock; a pointer into it is valid until the next call into
 * Python (any such call may let another thread change the table).
 */
#ifndef RG_LEASE_H
#define RG_LEASE_H

#include <stddef.h>
#include <stdint.h>

#include "cache.h" /* RG_CACHE_KEYMAX */
#include "check.h"

#define RG_LEASE_SETS 256

typedef struct rg_lease {
    uint64_t hash;
    uint64_t spec;        /* spec id; 0: a free entry */
    int64_t tokens;       /* granted by Redis, not yet handed out */
    uint64_t expires_ns;  /* tokens usable while now < expires_ns */
    uint64_t reset_ns;    /* the reported bucket is full again at (from the take) */
    int64_t remaining;    /* Redis's remaining after the take (for headers) */
    uint64_t taking_ns;   /* a take is in flight until this deadline (0: none) */
    uint64_t win_ns;      /* the observed-rate window started */
    int64_t served;       /* checks of this key since win_ns */
    int32_t rate;         /* the reported rate index */
    uint16_t keylen;
    char key[RG_CACHE_KEYMAX];
} rg_lease;

typedef struct rg_lease_table {
    rg_lease *e; /* RG_LEASE_SETS * 4, or NULL until the first leased check */
} rg_lease_table;

/* The lease of (spec, key), or NULL. */
rg_lease *rg_lease_find(rg_lease_table *t, uint64_t hash, uint64_t spec, const char *key,
                        size_t keylen);
/* The lease of (spec, key), made if need be (evicting a lease that is not
 * being taken, the one expiring first: its tokens are dropped); NULL when
 * the key is too long, the set is all being taken, or out of memory. */
rg_lease *rg_lease_get(rg_lease_table *t, uint64_t hash, uint64_t spec, const char *key,
                       size_t keylen, uint64_t now);
/* Forget the key under every spec (limiter.reset()): its tokens are gone
 * with the buckets. */
void rg_lease_forget_key(rg_lease_table *t, uint64_t hash, const char *key, size_t keylen);
/* Drop every lease (after fork: the parent's tokens are the parent's). */
void rg_lease_clear(rg_lease_table *t);
void rg_lease_free(rg_lease_table *t);
/* The size of the next take (see above); starts a new rate window. */
int64_t rg_lease_block(rg_lease *l, const rg_spec *spec, uint64_t now);

#endif
