/*
 * memstore.h: the in-process store (memory://): the same GCRA as Redis, for
 * one process, tests and demos.  Used only with the GIL held: no lock.
 *
 * An open-addressing table of (key, rate) -> TAT.  An entry whose TAT has
 * passed describes a full bucket, the same as no entry, so it is dropped
 * whenever the table is rebuilt: memory is bounded by the buckets that are
 * not full, as in Redis with its TTLs.
 */
#ifndef RG_MEMSTORE_H
#define RG_MEMSTORE_H

#include <stddef.h>
#include <stdint.h>

#include "check.h"

/* A concurrency slot held: its id (owned) and when it expires. */
typedef struct rg_mem_slot {
    char *id;
    size_t len;
    double exp;
} rg_mem_slot;

typedef struct rg_mem_entry {
    uint64_t hash; /* 0: free */
    double tat;    /* a concurrency entry: the latest expiry of its slots */
    char *key;     /* "key\0key_id" ("key\0c" for concurrency), owned */
    size_t keylen;
    rg_mem_slot *sl; /* concurrency slots (owned), nsl of capsl used */
    uint32_t nsl, capsl;
} rg_mem_entry;

typedef struct rg_memstore {
    rg_mem_entry *e;
    size_t cap;  /* power of two */
    size_t used;
    uint64_t t0_ns; /* monotonic origin: keeps "now" small and exact */
} rg_memstore;

int rg_memstore_init(rg_memstore *m);
void rg_memstore_free(rg_memstore *m);
/* Seam 2's entries(): the next live entry from *i (start at 0; NULL at the
 * end), *value: the microseconds until a rate's bucket is full, or a key's
 * live slots (an entry is live while its bucket is not full, or its key
 * holds a slot that has not expired).  Its key is "key\0key_id" (the key_id
 * never holds a NUL: it is after the last one). */
const rg_mem_entry *rg_memstore_next(const rg_memstore *m, size_t *i, uint64_t now_ns,
                                     double *value);
/* Do one check of op RG_OP_HIT (with the spec's concurrency limit, take
 * slot `sid`), RG_OP_CHARGE or RG_OP_RELEASE (give `sid` back), exactly as
 * the Redis script does; -1 on out of memory (nothing changed). */
int rg_memstore_op(rg_memstore *m, int op, const rg_spec *spec, const char *key,
                   size_t keylen, const char *sid, size_t sidlen, int64_t cost,
                   uint64_t now_ns, rg_result *out);
/* Forget the key's buckets for the spec's rates (limiter.reset()): they are
 * full again.  Allocates nothing, cannot fail. */
void rg_memstore_delete(rg_memstore *m, const rg_spec *spec, const char *key,
                        size_t keylen);
size_t rg_memstore_size(const rg_memstore *m);
/* Forget every bucket and concurrency slot set (limiter.clear()); returns
 * how many were live at now_ns (a full bucket left in the table is the same
 * as none, as a Redis key past its TTL).  Keeps the table: cannot fail. */
size_t rg_memstore_clear(rg_memstore *m, uint64_t now_ns);

#endif
