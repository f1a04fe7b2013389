/*
 * batch.h: one script call for a batch of checks: the command writer and
 * the reply decoder (loop thread only).
 *
 * A batch knows its checks and the script's calling convention, nothing of
 * connections, shards or threads: the engine sends the bytes written here on
 * a connection of the check's destination, and gives the reply back here.
 */
#ifndef RG_BATCH_H
#define RG_BATCH_H

#include <stdint.h>

#include "check.h"
#include "conn.h"

struct redisReply;

#define RG_BATCH_MAX 100 /* checks in one script call */

/* One script call in flight, in its destination's list of unreplied calls
 * (oldest first).  A slot is NULL once its check was answered otherwise
 * (its deadline passed, or it moved to another connection): the reply is
 * then ignored for it. */
typedef struct rg_batch {
    struct rg_batch *prev, *next;
    uint64_t sent_ns;
    int n;       /* slots in checks[] */
    int total;   /* checks this batch counts in the engine's `outstanding` */
    int evaled;  /* sent with EVAL (after NOSCRIPT) */
    int asked;   /* Cluster: sent after ASKING (an ASK is followed once) */
    int xslot;   /* Cluster: rg_script_xslot over several slots (see script.c) */
    int command; /* an operator's command (checks[0]->cmd), not a script call */
    rg_check *checks[];
} rg_batch;

/* A batch of checks[0..n); each check's batch/bidx are set.  NULL: out of memory. */
rg_batch *rg_batch_new(rg_check **checks, int n);
/*
 * Write the script call for the live checks of b (compacting out the NULL
 * slots) into out: EVALSHA sha, or EVAL with the body once b->evaled.
 * 0, 1 if no check is live (nothing written), -1 out of memory.
 */
int rg_batch_write(rg_batch *b, const char *sha, rg_buf *out);
/* The Redis Cluster hash slot of every key of c (they share one hash tag). */
int rg_check_slot(const rg_check *c);
/* The hash slot of a Redis key as it is (its first non-empty {tag}, else
 * the whole key): where an operator's command on that key goes. */
int rg_key_slot(const char *key, size_t len);

enum rg_batch_outcome {
    RG_BATCH_DECIDED,  /* each live check has res and err (NONE or REDIS) set;
                        * xslot: `declared` set on those the node does not serve */
    RG_BATCH_NOSCRIPT, /* Redis lost the script: write again with EVAL */
    RG_BATCH_FAILED,   /* the whole call failed: why says how */
};
/* Decode the reply to b.  `why` gets Redis's own error text when the call
 * (or one check's command) failed, else is set to "". */
int rg_batch_decode(rg_batch *b, const struct redisReply *r, char *why, size_t whylen);

#endif
