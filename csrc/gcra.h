/*
 * gcra.h: the Generic Cell Rate Algorithm, one implementation for every store.
 *
 * A rate "limit per period, bucket of burst tokens" becomes an emission
 * interval T = period / limit and a tolerance tau = burst * T, both in
 * microseconds.  The state of one bucket is its theoretical arrival time (TAT):
 * the instant at which the bucket is full again.  A check of `cost` tokens at
 * time `now` is allowed when  max(TAT, now) + cost*T - now <= tau + RG_SLACK(T).
 *
 * The same arithmetic runs in C (the in-memory store, unit tests) and in Lua
 * inside Redis (script.c holds the script); keep the two in step.  Times are
 * doubles of microseconds: exact for integers below 2^53, i.e. for centuries.
 */
#ifndef RG_GCRA_H
#define RG_GCRA_H

#include <stdint.h>

#define RG_MAX_RATES 16

/* Costs and durations stay below 2^53 (exact doubles, and integers in the
 * script's reply); a wait longer than that (285 years) is reported as that. */
#define RG_MAX_COST 9007199254740992LL
#define RG_MAX_US 9e15

/* A bucket refills within 10 years at most (tau = burst * period / limit):
 * a TAT of now + tau then stays an exact double for centuries, and Redis's
 * PX TTL (tau in ms) far inside int64.  rates.py bounds Rate the same way. */
#define RG_MAX_TAU_US (10.0 * 365 * 86400 * 1e6)
#define RG_MAX_LIMIT 1e9          /* limit and burst, tokens */
#define RG_MIN_PERIOD_S 0.001
#define RG_MAX_PERIOD_S (366.0 * 86400)

/* Slack absorbs the rounding of repeated additions of a fractional T, so a
 * bucket of N tokens admits exactly N back-to-back hits: 1 us, or T/2 when T
 * is under 2 us (T >= 1 us is enforced), so it is never a whole token. */
#define RG_SLACK(T) ((T) < 2.0 ? (T) / 2.0 : 1.0)

/* A charge may put a bucket this far into debt at most (31 years): the TAT
 * stays an exact double and a Redis PX TTL far inside int64. */
#define RG_MAX_DEBT_US 1e15

typedef struct rg_rate {
    double T;      /* emission interval, us */
    double tau;    /* burst * T, us */
    int64_t burst; /* bucket size, tokens: the "limit" reported to clients */
} rg_rate;

/* A decision for one check over n rates.  Durations are microseconds. */
typedef struct rg_result {
    int allowed;
    int rate;          /* index of the reported rate (closest to its limit) */
    int64_t remaining; /* tokens left in that rate's bucket after the check */
    int64_t reset_us;  /* until that bucket is full again */
    int64_t retry_us;  /* 0 if allowed, else until this cost would be allowed */
    int64_t block_us;  /* if denied: until a cost of 1 could be allowed (>= 0) */
} rg_result;

/*
 * Decide a check of `cost` over rates[0..n) given each bucket's stored TAT
 * (tats[j] <= 0 for a bucket with no state) at time `now`.  A denial by any
 * rate consumes from none.  If allowed and cost > 0, tats[] is updated to the
 * values to store; each must then be kept for (tats[j] - now) us.  Returns
 * out->allowed.
 */
int rg_gcra_check(const rg_rate *rates, int n, double now, int64_t cost,
                  double *tats, rg_result *out);

/*
 * Charge `cost` (negative: a refund) to rates[0..n) without deciding: each
 * TAT becomes max(TAT, now) + cost*T, at least now (a refund stops at a full
 * bucket) and at most now + RG_MAX_DEBT_US (a bucket in debt denies until it
 * has refilled).  tats[] gets the values to store (now: full, nothing to
 * keep); out reports the rate with the fewest tokens left, allowed.
 */
void rg_gcra_charge(const rg_rate *rates, int n, double now, int64_t cost,
                    double *tats, rg_result *out);

#endif
