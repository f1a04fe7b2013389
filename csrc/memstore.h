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

typedef struct rg_mem_entry {
    uint64_t hash; /* 0: free */
    double tat;
    char *key;     /* "key\0key_id", owned */
    size_t keylen;
} rg_mem_entry;

typedef struct rg_memstore {
    rg_mem_entry *e;
    size_t cap;  /* power of two */
    size_t used;
    uint64_t t0_ns; /* monotonic origin: keeps "now" small and exact */
} rg_memstore;

int rg_memstore_init(rg_memstore *m);
void rg_memstore_free(rg_memstore *m);
/* Decide one check; -1 on out of memory (nothing consumed). */
int rg_memstore_check(rg_memstore *m, const rg_spec *spec, const char *key,
                      size_t keylen, int64_t cost, uint64_t now_ns, rg_result *out);
/* Forget the key's buckets for the spec's rates (limiter.reset()): they are
 * full again.  Allocates nothing, cannot fail. */
void rg_memstore_delete(rg_memstore *m, const rg_spec *spec, const char *key,
                        size_t keylen);
size_t rg_memstore_size(const rg_memstore *m);

#endif
