/*
 * memstore.c: see memstore.h.
 */
#include "memstore.h"

#include <stdlib.h>
#include <string.h>

#include "cache.h"

int
rg_memstore_init(rg_memstore *m)
{
    m->cap = 64;
    m->used = 0;
    m->e = calloc(m->cap, sizeof(rg_mem_entry));
    m->t0_ns = rg_now_ns();
    return m->e == NULL ? -1 : 0;
}

void
rg_memstore_free(rg_memstore *m)
{
    size_t i;
    if (m->e == NULL)
        return;
    for (i = 0; i < m->cap; i++)
        free(m->e[i].key);
    free(m->e);
    m->e = NULL;
    m->cap = m->used = 0;
}

size_t
rg_memstore_size(const rg_memstore *m)
{
    return m->used;
}

static rg_mem_entry *
slot_for(rg_mem_entry *tab, size_t cap, uint64_t h, const char *k, size_t kl)
{
    size_t i = h & (cap - 1);
    for (;;) {
        rg_mem_entry *e = &tab[i];
        if (e->hash == 0 || (e->hash == h && e->keylen == kl && memcmp(e->key, k, kl) == 0))
            return e;
        i = (i + 1) & (cap - 1);
    }
}

/* Rebuild into a table sized for the live entries, dropping full buckets. */
static int
rebuild(rg_memstore *m, double now)
{
    size_t live = 0, cap = 64, i;
    rg_mem_entry *tab;

    for (i = 0; i < m->cap; i++)
        if (m->e[i].hash != 0 && m->e[i].tat > now)
            live++;
    while (cap < live * 4)
        cap <<= 1;
    tab = calloc(cap, sizeof(rg_mem_entry));
    if (tab == NULL)
        return -1;
    for (i = 0; i < m->cap; i++) {
        rg_mem_entry *e = &m->e[i];
        if (e->hash == 0)
            continue;
        if (e->tat > now)
            *slot_for(tab, cap, e->hash, e->key, e->keylen) = *e;
        else
            free(e->key);
    }
    free(m->e);
    m->e = tab;
    m->cap = cap;
    m->used = live;
    return 0;
}

/* The key of (key, rate j) as the table spells it, "key\0key_id", in buf
 * (or a malloc'd copy when the key is long: free if != buf); NULL on out of
 * memory.  *kl is its length. */
static char *
entry_key(char *buf, size_t bufsize, const rg_spec *spec, int j, const char *key,
          size_t keylen, size_t *kl)
{
    char *k = buf;
    if (keylen + 1 + sizeof(spec->key_id[j]) > bufsize &&
        (k = malloc(keylen + 1 + sizeof(spec->key_id[j]))) == NULL)
        return NULL;
    memcpy(k, key, keylen);
    k[keylen] = '\0';
    memcpy(k + keylen + 1, spec->key_id[j], spec->key_id_len[j]);
    *kl = keylen + 1 + spec->key_id_len[j];
    return k;
}

int
rg_memstore_check(rg_memstore *m, const rg_spec *spec, const char *key,
                  size_t keylen, int64_t cost, uint64_t now_ns, rg_result *out)
{
    rg_mem_entry *slots[RG_MAX_RATES];
    double tats[RG_MAX_RATES];
    char buf[512];
    char *k = NULL;
    double now = (double)(now_ns - m->t0_ns) / 1000.0;
    int j, n = spec->n, rc = -1;

    /* Make room first, so that inserting the n entries below cannot fail. */
    if ((m->used + (size_t)n) * 2 > m->cap && rebuild(m, now) < 0)
        return -1;

    for (j = 0; j < n; j++) {
        size_t kl;
        k = entry_key(buf, sizeof(buf), spec, j, key, keylen, &kl);
        if (k == NULL)
            goto done;
        uint64_t h = rg_hash(k, kl) | 1; /* never 0: 0 marks a free slot */
        rg_mem_entry *e = slot_for(m->e, m->cap, h, k, kl);
        if (e->hash == 0) {
            /* Claim it now; an entry left with tat 0 is a full bucket. */
            e->key = malloc(kl);
            if (e->key == NULL)
                goto done;
            memcpy(e->key, k, kl);
            e->keylen = kl;
            e->hash = h;
            e->tat = 0;
            m->used++;
        }
        slots[j] = e;
        tats[j] = e->tat;
        if (k != buf)
            free(k);
        k = NULL;
    }
    if (rg_gcra_check(spec->rates, n, now, cost, tats, out) && cost > 0)
        for (j = 0; j < n; j++)
            slots[j]->tat = tats[j];
    rc = 0;
done:
    if (k != buf)
        free(k);
    return rc;
}

void
rg_memstore_delete(rg_memstore *m, const rg_spec *spec, const char *key, size_t keylen)
{
    char buf[512];
    int j;

    if (m->e == NULL)
        return;
    for (j = 0; j < spec->n; j++) {
        size_t kl;
        char *k = entry_key(buf, sizeof(buf), spec, j, key, keylen, &kl);
        rg_mem_entry *e;
        if (k == NULL) {
            /* No memory for a long key's copy: compare in two parts. */
            size_t i;
            for (i = 0; i < m->cap; i++) {
                e = &m->e[i];
                if (e->hash != 0 && e->keylen == keylen + 1 + spec->key_id_len[j] &&
                    memcmp(e->key, key, keylen) == 0 && e->key[keylen] == '\0' &&
                    memcmp(e->key + keylen + 1, spec->key_id[j], spec->key_id_len[j]) == 0)
                    e->tat = 0;
            }
            continue;
        }
        e = slot_for(m->e, m->cap, rg_hash(k, kl) | 1, k, kl);
        if (e->hash != 0)
            e->tat = 0; /* a full bucket; the next rebuild drops it */
        if (k != buf)
            free(k);
    }
}
