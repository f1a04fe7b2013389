/*
 * topk.c: the denial summary (see topk.h).
 */
#include "topk.h"

#include "cache.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- Space-Saving, stream-summary form ------------------------------------ */

static void
topk_init(rg_topk *t)
{
    int i;
    memset(t, 0, sizeof(*t));
    t->min = -1;
    for (i = 0; i < RG_TOPK_INDEX; i++)
        t->index[i] = -1;
    /* every bucket on the free list */
    for (i = 0; i < RG_TOPK_K; i++)
        t->buckets[i].next = (int16_t)(i + 1 < RG_TOPK_K ? i + 1 : -1);
    t->free_bucket = 0;
}

static int16_t
bucket_new(rg_topk *t, uint64_t count, int16_t after)
{
    int16_t bi = t->free_bucket; /* never empty: buckets <= items <= K */
    rg_topk_bucket *b = &t->buckets[bi];

    t->free_bucket = b->next;
    b->count = count;
    b->head = b->tail = -1;
    if (after < 0) { /* the new least count */
        b->prev = -1;
        b->next = t->min;
        if (t->min >= 0)
            t->buckets[t->min].prev = bi;
        t->min = bi;
    } else {
        b->prev = after;
        b->next = t->buckets[after].next;
        if (b->next >= 0)
            t->buckets[b->next].prev = bi;
        t->buckets[after].next = bi;
    }
    return bi;
}

static void
bucket_free(rg_topk *t, int16_t bi)
{
    rg_topk_bucket *b = &t->buckets[bi];

    if (b->prev >= 0)
        t->buckets[b->prev].next = b->next;
    else
        t->min = b->next;
    if (b->next >= 0)
        t->buckets[b->next].prev = b->prev;
    b->next = t->free_bucket;
    t->free_bucket = bi;
}

static void
item_unlink(rg_topk *t, int16_t i)
{
    rg_topk_item *it = &t->items[i];
    rg_topk_bucket *b = &t->buckets[it->bucket];

    if (it->prev >= 0)
        t->items[it->prev].next = it->next;
    else
        b->head = it->next;
    if (it->next >= 0)
        t->items[it->next].prev = it->prev;
    else
        b->tail = it->prev;
}

static void
item_append(rg_topk *t, int16_t bi, int16_t i)
{
    rg_topk_item *it = &t->items[i];
    rg_topk_bucket *b = &t->buckets[bi];

    it->bucket = bi;
    it->prev = b->tail;
    it->next = -1;
    if (b->tail >= 0)
        t->items[b->tail].next = i;
    else
        b->head = i;
    b->tail = i;
}

/* Counter i goes from its bucket's count c to c + 1, at the end (the
 * newest) of bucket c + 1. */
static void
item_increment(rg_topk *t, int16_t i)
{
    rg_topk_item *it = &t->items[i];
    int16_t bi = it->bucket, nb = t->buckets[bi].next;
    uint64_t c = t->buckets[bi].count;

    if (nb >= 0 && t->buckets[nb].count == c + 1) {
        item_unlink(t, i);
        item_append(t, nb, i);
        if (t->buckets[bi].head < 0)
            bucket_free(t, bi);
    } else if (t->buckets[bi].head == i && t->buckets[bi].tail == i) {
        t->buckets[bi].count = c + 1; /* alone: its bucket moves up, still in order */
    } else {
        item_unlink(t, i);
        item_append(t, bucket_new(t, c + 1, bi), i);
    }
    it->count = c + 1;
}

/* By hash and length (see topk.h): no byte comparison on the hot path. */
static int16_t
topk_find(const rg_topk *t, uint64_t hash, size_t keylen)
{
    int16_t i = t->index[hash & (RG_TOPK_INDEX - 1)];

    while (i >= 0) {
        const rg_topk_item *it = &t->items[i];
        if (it->hash == hash && it->keylen == keylen)
            return i;
        i = it->chain;
    }
    return -1;
}

static void
index_remove(rg_topk *t, int16_t i)
{
    int16_t *p = &t->index[t->items[i].hash & (RG_TOPK_INDEX - 1)];

    while (*p >= 0 && *p != i)
        p = &t->items[*p].chain;
    if (*p == i)
        *p = t->items[i].chain;
}

static void
item_set_key(rg_topk *t, int16_t i, uint64_t hash, const char *key, size_t keylen)
{
    rg_topk_item *it = &t->items[i];
    int16_t *head = &t->index[hash & (RG_TOPK_INDEX - 1)];

    it->hash = hash;
    it->keylen = keylen > UINT32_MAX ? UINT32_MAX : (uint32_t)keylen;
    memcpy(it->key, key, keylen < RG_TOPK_KEYMAX ? keylen : RG_TOPK_KEYMAX);
    it->chain = *head;
    *head = i;
}

/* Count a denial of key; returns its counter. */
static rg_topk_item *
topk_add(rg_topk *t, uint64_t hash, const char *key, size_t keylen, int *is_new)
{
    int16_t i = topk_find(t, hash, keylen);

    t->total++;
    *is_new = i < 0;
    if (i >= 0) {
        item_increment(t, i);
        return &t->items[i];
    }
    if (t->used < RG_TOPK_K) {
        i = t->used++;
        item_set_key(t, i, hash, key, keylen);
        t->items[i].error = 0;
        t->items[i].count = 1;
        if (t->min < 0 || t->buckets[t->min].count != 1)
            bucket_new(t, 1, -1);
        item_append(t, t->min, i);
        return &t->items[i];
    }
    /* Full: the oldest counter of the least count c takes the new key, at
     * c + 1 with an error of c. */
    i = t->buckets[t->min].head;
    index_remove(t, i);
    item_set_key(t, i, hash, key, keylen);
    t->items[i].error = t->buckets[t->min].count;
    item_increment(t, i);
    return &t->items[i];
}

/* ---- distinct clients: a ring of HyperLogLogs ------------------------------ */

uint64_t
rg_client_hash(const char *key, size_t keylen)
{
    return rg_hash_from(0xcbf29ce484222325ULL, key, keylen);
}

#define NREG (1u << RG_HLL_P)

static void
hll_add(rg_hll_ring *r, uint64_t h, uint64_t epoch)
{
    size_t s = (size_t)(epoch % RG_HLL_SLOTS);
    uint32_t idx = (uint32_t)(h >> (64 - RG_HLL_P));
    /* the rank of the first 1 bit after the index bits (a guard bit bounds it) */
    uint8_t rho = (uint8_t)(__builtin_clzll((h << RG_HLL_P) | (1ULL << (RG_HLL_P - 1))) + 1);

    if (r->epoch[s] != epoch) {
        memset(r->reg[s], 0, NREG);
        r->epoch[s] = epoch;
    }
    if (r->reg[s][idx] < rho)
        r->reg[s][idx] = rho;
}

static uint64_t
hll_estimate(const rg_hll_ring *r, uint64_t now_ns)
{
    uint64_t cur = now_ns >> RG_HLL_SLOT_SHIFT;
    int live[RG_HLL_SLOTS], n = 0, s;
    double m = (double)NREG, sum = 0.0, e;
    uint32_t j, zeros = 0;

    for (s = 0; s < RG_HLL_SLOTS; s++)
        if (r->epoch[s] <= cur && cur - r->epoch[s] < RG_HLL_SLOTS)
            live[n++] = s;
    for (j = 0; j < NREG; j++) {
        uint8_t mx = 0;
        int k;
        for (k = 0; k < n; k++)
            if (r->reg[live[k]][j] > mx)
                mx = r->reg[live[k]][j];
        sum += ldexp(1.0, -(int)mx);
        zeros += mx == 0;
    }
    e = 0.7213 / (1.0 + 1.079 / m) * m * m / sum;
    if (e <= 2.5 * m && zeros > 0)
        e = m * log(m / (double)zeros); /* linear counting: exact-ish when small */
    return (uint64_t)(e + 0.5);
}

/* The client of a key: after the first '|' or '#' (see topk.h). */
static void
client_part(const char *key, size_t keylen, const char **out, size_t *outlen)
{
    size_t i;
    for (i = 0; i < keylen; i++) {
        if (key[i] == '|' || key[i] == '#') {
            *out = key + i + 1;
            *outlen = keylen - i - 1;
            return;
        }
    }
    *out = key;
    *outlen = keylen;
}

/* ---- the summary ----------------------------------------------------------- */

void
rg_denials_note(rg_denials *d, uint64_t hash, const char *key, size_t keylen, uint64_t now_ns)
{
    uint64_t epoch = now_ns >> RG_HLL_SLOT_SHIFT;
    rg_topk_item *it;
    int is_new;

    if (d->top == NULL) {
        if (d->off)
            return;
        d->top = malloc(sizeof(*d->top));
        d->recent = calloc(1, sizeof(*d->recent));
        if (d->top == NULL || d->recent == NULL) {
            rg_denials_free(d);
            d->off = 1;
            return;
        }
        topk_init(d->top);
    }
    it = topk_add(d->top, hash, key, keylen, &is_new);
    if (is_new) {
        const char *client;
        size_t clientlen;
        client_part(key, keylen, &client, &clientlen);
        it->client_hash = rg_client_hash(client, clientlen);
    } else if (it->epoch == epoch) {
        return; /* its client is in this slot's registers already */
    }
    it->epoch = epoch;
    hll_add(d->recent, it->client_hash, epoch);
}

size_t
rg_denials_top(const rg_denials *d, rg_denied_key *out, size_t max)
{
    const rg_topk *t = d->top;
    size_t n = 0;
    int16_t bi, last;

    if (t == NULL || t->min < 0)
        return 0;
    /* the largest count is the last bucket; within one, the oldest first */
    for (last = t->min; t->buckets[last].next >= 0; last = t->buckets[last].next)
        ;
    for (bi = last; bi >= 0 && n < max; bi = t->buckets[bi].prev) {
        int16_t i;
        for (i = t->buckets[bi].head; i >= 0 && n < max; i = t->items[i].next) {
            const rg_topk_item *it = &t->items[i];
            out[n].key = it->key;
            out[n].keylen = it->keylen < RG_TOPK_KEYMAX ? it->keylen : RG_TOPK_KEYMAX;
            out[n].truncated = it->keylen > RG_TOPK_KEYMAX;
            out[n].count = it->count;
            out[n].error = it->error;
            n++;
        }
    }
    return n;
}

uint64_t
rg_denials_total(const rg_denials *d)
{
    return d->top != NULL ? d->top->total : 0;
}

uint64_t
rg_denials_recent(const rg_denials *d, uint64_t now_ns)
{
    return d->recent != NULL ? hll_estimate(d->recent, now_ns) : 0;
}

void
rg_denials_clear(rg_denials *d)
{
    if (d->top != NULL)
        topk_init(d->top);
    if (d->recent != NULL)
        memset(d->recent, 0, sizeof(*d->recent));
}

void
rg_denials_free(rg_denials *d)
{
    free(d->top);
    free(d->recent);
    d->top = NULL;
    d->recent = NULL;
}
