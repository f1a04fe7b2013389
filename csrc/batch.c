/*
 * batch.c: the script call for a batch of checks (see batch.h).  Loop
 * thread only.
 */
#include "batch.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <hiredis/hiredis.h>

#include "script.h"

rg_batch *
rg_batch_new(rg_check **checks, int n)
{
    rg_batch *b = malloc(sizeof(*b) + (size_t)n * sizeof(rg_check *));
    int i;

    if (b == NULL)
        return NULL;
    b->prev = b->next = NULL;
    b->sent_ns = 0;
    b->n = n;
    b->total = n;
    b->evaled = 0;
    b->asked = 0;
    b->xslot = 0;
    b->command = 0;
    for (i = 0; i < n; i++) {
        b->checks[i] = checks[i];
        checks[i]->batch = b;
        checks[i]->bidx = (uint32_t)i;
    }
    return b;
}

/* A stable 64-bit FNV-1a: the same in every process and every run (unlike
 * the seeded hash of the deny cache), so every app server names a key's
 * buckets the same. */
static uint64_t
fnv1a(const char *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    size_t i;
    for (i = 0; i < n; i++) {
        h ^= (unsigned char)p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

/*
 * A key of check c: rate j's, or (id "c") its concurrency key.  Every key
 * of one check carries the same non-empty hash tag, so a check never spans
 * two Redis Cluster slots:
 *   rg:{<key>}:<id>             a non-empty key without '}'
 *   rg:{~<fnv1a hex>}~<key>:<id> otherwise (a '}' in the key would end the
 *                               tag early, an empty key would give "{}")
 * The two forms never collide: after the first '}' comes ':' in one and
 * '~' in the other; and no id contains ':', so <key>:<id> is unambiguous
 * (a rate's id is "limit/period_ms", never "c").  Binary-safe: keys travel
 * as bulk strings.
 */
static void
write_key(rg_buf *b, const rg_check *c, const char *id, size_t idlen, const char *tag,
          size_t taglen)
{
    size_t n = taglen ? 5 + taglen + 2 + c->keylen + 1 + idlen : 4 + c->keylen + 2 + idlen;
    char *p;

    rg_resp_header(b, '$', n);
    p = b->p + b->len;
    if (taglen) {
        memcpy(p, "rg:{~", 5);
        p += 5;
        memcpy(p, tag, taglen);
        p += taglen;
        *p++ = '}';
        *p++ = '~';
        memcpy(p, c->key, c->keylen);
        p += c->keylen;
        *p++ = ':';
    } else {
        memcpy(p, "rg:{", 4);
        p += 4;
        memcpy(p, c->key, c->keylen);
        p += c->keylen;
        *p++ = '}';
        *p++ = ':';
    }
    memcpy(p, id, idlen);
    p += idlen;
    *p++ = '\r';
    *p++ = '\n';
    b->len = (size_t)(p - b->p);
}

/* The hash tag of a check's keys (see write_key): the key itself, or "~"
 * and 16 hex digits. */
static size_t
key_tag(const rg_check *c, char tag[24])
{
    if (c->keylen == 0 || memchr(c->key, '}', c->keylen) != NULL)
        return (size_t)snprintf(tag, 24, "%016llx", (unsigned long long)fnv1a(c->key, c->keylen));
    return 0;
}

/* CRC-16/XMODEM (poly 0x1021, init 0), Redis Cluster's key hash. */
static uint16_t
crc16(uint16_t crc, const char *p, size_t n)
{
    size_t i;
    int k;

    for (i = 0; i < n; i++) {
        crc ^= (uint16_t)((unsigned char)p[i] << 8);
        for (k = 0; k < 8; k++)
            crc = (uint16_t)(crc & 0x8000 ? (crc << 1) ^ 0x1021 : crc << 1);
    }
    return crc;
}

int
rg_check_slot(const rg_check *c)
{
    char tag[24];
    size_t taglen = key_tag(c, tag);

    if (taglen == 0)
        return crc16(0, c->key, c->keylen) & 16383;
    return crc16(crc16(0, "~", 1), tag, taglen) & 16383;
}

int
rg_key_slot(const char *key, size_t len)
{
    const char *open = memchr(key, '{', len), *close;

    if (open != NULL) {
        close = memchr(open + 1, '}', len - (size_t)(open - key) - 1);
        if (close != NULL && close > open + 1)
            return crc16(0, open + 1, (size_t)(close - open - 1)) & 16383;
    }
    return crc16(0, key, len) & 16383;
}

/* The rates the script gets for c (a release touches none), and whether
 * the concurrency part goes along (a hit takes a slot, a release gives it
 * back; a reset or a charge concerns the rates only). */
static int
rates_sent(const rg_check *c)
{
    return c->op == RG_OP_RELEASE ? 0 : c->spec->n;
}

static int
conc_sent(const rg_check *c)
{
    return c->spec->conc_limit > 0 && (c->op == RG_OP_HIT || c->op == RG_OP_RELEASE);
}

/* The common check (script.c): a hit of one rate with no concurrency part
 * and no lease, sent as its spec's name and its cost. */
static int
is_common(const rg_check *c)
{
    return c->op == RG_OP_HIT && c->spec->n == 1 && c->spec->conc_limit == 0 && !c->lease;
}

/* A spec's name in the call: "=" and its number, 1 to RG_BATCH_MAX (no
 * printf on the loop thread's path). */
static size_t
spec_name(char name[8], int j)
{
    size_t n = 1;
    name[0] = '=';
    if (j >= 100)
        name[n++] = (char)('0' + j / 100);
    if (j >= 10)
        name[n++] = (char)('0' + j / 10 % 10);
    name[n++] = (char)('0' + j % 10);
    return n;
}

int
rg_batch_write(rg_batch *b, const char *sha, rg_buf *out)
{
    const char *script = b->xslot ? rg_script_xslot : rg_script;
    size_t script_len = b->xslot ? rg_script_xslot_len : rg_script_len;
    size_t argc = b->xslot ? 7 : 6, bytes = 160 + RG_RESP_BULK_MAX(script_len);
    /* the specs of the common checks, and each common check's spec (1-based;
     * 0: sent in the general form) */
    const rg_spec *specs[RG_BATCH_MAX];
    unsigned char sidx[RG_BATCH_MAX];
    int i, j, n = 0, nkeys = 0, nspecs = 0, ncommon = 0;

    for (i = 0; i < b->n; i++) {
        rg_check *c = b->checks[i];
        int nr, cc;
        if (c == NULL)
            continue;
        b->checks[n] = c;
        c->bidx = (uint32_t)n++;
        nr = rates_sent(c);
        cc = conc_sent(c);
        nkeys += nr + cc;
        /* per rate: the key (with a tag of up to 16 hex digits and the
         * rate part) and two numbers of at most 31 characters; the
         * concurrency part: its key, two numbers and the slot id */
        bytes += 96 + (size_t)(nr + cc) * (RG_RESP_BULK_MAX(c->keylen + 24 + 48) +
                                           2 * RG_RESP_BULK_MAX(32)) +
                 (size_t)cc * RG_RESP_BULK_MAX(c->sidlen);
        if (n > RG_BATCH_MAX || !is_common(c)) {
            if (n <= RG_BATCH_MAX)
                sidx[n - 1] = 0;
            argc += 3 + 3 * (size_t)nr + 4 * (size_t)cc; /* keys and arguments */
            continue;
        }
        for (j = 0; j < nspecs && specs[j] != c->spec; j++)
            ;
        if (j == nspecs) {
            specs[nspecs++] = c->spec;
            argc += 4;
            bytes += 4 * RG_RESP_BULK_MAX(32);
        }
        sidx[n - 1] = (unsigned char)(j + 1);
        argc += 3;
        ncommon++;
    }
    b->n = n;
    if (n == 0)
        return 1;
    if (rg_buf_reserve(out, bytes) != 0)
        return -1;
    rg_resp_array(out, argc);
    if (b->evaled) {
        rg_resp_bulk(out, "EVAL", 4);
        rg_resp_bulk(out, script, script_len);
    } else {
        rg_resp_bulk(out, "EVALSHA", 7);
        rg_resp_bulk(out, sha, 40);
    }
    if (b->xslot) /* no declared key; their number leads ARGV */
        rg_resp_bulk_int(out, 0);
    rg_resp_bulk_int(out, nkeys);
    for (i = 0; i < n; i++) {
        rg_check *c = b->checks[i];
        char tag[24];
        size_t taglen = key_tag(c, tag);
        for (j = 0; j < rates_sent(c); j++)
            write_key(out, c, c->spec->key_id[j], c->spec->key_id_len[j], tag, taglen);
        if (conc_sent(c))
            write_key(out, c, "c", 1, tag, taglen);
    }
    rg_resp_bulk_int(out, n);
    /* one MGET reads every key first, unless the keys are undeclared
     * (several cluster slots: one command may not span them) */
    rg_resp_bulk(out, !b->xslot && ncommon > 0 ? "1" : "0", 1);
    rg_resp_bulk_int(out, nspecs);
    for (j = 0; j < nspecs; j++) {
        const rg_spec *sp = specs[j];
        char name[8];
        long long ms = (long long)ceil(sp->rates[0].T / 1000.0);
        rg_resp_bulk(out, name, spec_name(name, j + 1));
        rg_resp_bulk(out, sp->arg_T[0], sp->arg_T_len[0]);
        rg_resp_bulk(out, sp->arg_tau[0], sp->arg_tau_len[0]);
        rg_resp_bulk_int(out, ms < 1 ? 1 : ms);
    }
    for (i = 0; i < n; i++) {
        rg_check *c = b->checks[i];
        int nr = rates_sent(c), cc = conc_sent(c);
        if (i < RG_BATCH_MAX && sidx[i] != 0) {
            char name[8];
            rg_resp_bulk(out, name, spec_name(name, sidx[i]));
            rg_resp_bulk_int(out, (long long)c->cost);
            continue;
        }
        rg_resp_bulk_int(out, c->op + (cc ? RG_OP_CONC_FLAG : 0) + (c->lease ? RG_OP_LEASE_FLAG : 0));
        rg_resp_bulk_int(out, (long long)c->cost);
        rg_resp_bulk_int(out, nr);
        for (j = 0; j < nr; j++) {
            rg_resp_bulk(out, c->spec->arg_T[j], c->spec->arg_T_len[j]);
            rg_resp_bulk(out, c->spec->arg_tau[j], c->spec->arg_tau_len[j]);
        }
        if (cc) {
            rg_resp_bulk(out, c->spec->arg_conc[0], c->spec->arg_conc_len[0]);
            rg_resp_bulk(out, c->spec->arg_conc[1], c->spec->arg_conc_len[1]);
            rg_resp_bulk(out, rg_check_sid(c), c->sidlen);
        }
    }
    return 0;
}

static int64_t
int_at(const redisReply *r, size_t i, int *ok)
{
    const redisReply *e = r->element[i];
    if (e->type != REDIS_REPLY_INTEGER) {
        *ok = 0;
        return 0;
    }
    return e->integer;
}

/* Bounds of the script's numbers: tokens (2^53: what a double holds
 * exactly) and microseconds (a century: far inside nanoseconds in 64 bits
 * when added to the monotonic clock). */
#define RG_REPLY_COUNT_MAX (INT64_C(1) << 53)
#define RG_REPLY_US_MAX (INT64_C(100) * 366 * 86400 * 1000000)

static int64_t
clamp(int64_t v, int64_t max)
{
    return v < -max ? -max : v > max ? max : v;
}

static void
copy_text(char *why, size_t whylen, const char *s, size_t n)
{
    if (n >= whylen)
        n = whylen - 1;
    memcpy(why, s, n);
    why[n] = '\0';
}

int
rg_batch_decode(rg_batch *b, const redisReply *reply, char *why, size_t whylen)
{
    size_t at = 0, end;
    int i;

    why[0] = '\0';
    if (reply->type == REDIS_REPLY_ERROR) {
        copy_text(why, whylen, reply->str, reply->len);
        if (!b->evaled && strncmp(reply->str, "NOSCRIPT", 8) == 0)
            return RG_BATCH_NOSCRIPT;
        return RG_BATCH_FAILED;
    }
    if (reply->type != REDIS_REPLY_ARRAY)
        goto unexpected;
    /* Per check H = (allowed + 2) * 32 + rate, remaining, reset_us, and when
     * not allowed retry_us and block_us; then Redis's error text if a
     * command of the script failed (see script.c).  The lengths follow
     * from each H: the walk must end exactly at the end. */
    end = reply->elements;
    if (end > 0 && reply->element[end - 1]->type == REDIS_REPLY_STRING) {
        end--;
        copy_text(why, whylen, reply->element[end]->str, reply->element[end]->len);
    }
    for (i = 0; i < b->n; i++) {
        rg_check *c = b->checks[i];
        int ok = 1;
        int64_t h, allowed;
        size_t len;

        if (at >= end)
            goto unexpected;
        h = int_at(reply, at, &ok);
        if (!ok || h < 0)
            goto unexpected;
        allowed = h / 32 - 2;
        len = allowed >= 1 ? 3 : 5;
        if (end - at < len)
            goto unexpected;
        if (c == NULL) {
            at += len;
            continue;
        }
        c->res.rate = (int)(h % 32);
        c->res.remaining = int_at(reply, at + 1, &ok);
        c->res.reset_us = int_at(reply, at + 2, &ok);
        c->res.retry_us = len == 5 ? int_at(reply, at + 3, &ok) : 0;
        c->res.block_us = len == 5 ? int_at(reply, at + 4, &ok) : 0;
        at += len;
        /* a lease: the tokens taken */
        if (allowed > (c->lease ? c->cost : 1)) {
            ok = 0;
            allowed = 0;
        }
        /* Counts and times as the 64-bit values they arrived as, clamped
         * (a cost larger than a bucket legitimately waits "forever"): the
         * engine adds times to the clock in nanoseconds, which must not
         * wrap (a block of 2^62 us would make a denial end at once). */
        c->res.remaining = clamp(c->res.remaining, RG_REPLY_COUNT_MAX);
        c->res.reset_us = clamp(c->res.reset_us, RG_REPLY_US_MAX);
        c->res.retry_us = clamp(c->res.retry_us, RG_REPLY_US_MAX);
        c->res.block_us = clamp(c->res.block_us, RG_REPLY_US_MAX);
        c->res.allowed = (int)allowed;
        if (ok && b->xslot && allowed == -2) {
            /* Not this node's key: nothing was written; the engine sends
             * the check again in a call of its own slot. */
            c->declared = 1;
            c->err = RG_ERR_NONE;
            continue;
        }
        /* rate n is the concurrency limit, when there is one */
        if (c->res.rate > c->spec->n || (c->res.rate == c->spec->n && c->spec->conc_limit == 0) ||
            allowed < 0)
            ok = 0;
        if (ok && c->op == RG_OP_RESET) {
            /* Deleted: rate 0's bucket is full. */
            c->res.rate = 0;
            c->res.remaining = c->spec->rates[0].burst;
            c->res.reset_us = c->res.retry_us = c->res.block_us = 0;
        }
        c->err = ok ? RG_ERR_NONE : RG_ERR_REDIS;
    }
    if (at != end)
        goto unexpected;
    if (why[0] == '\0')
        for (i = 0; i < b->n; i++)
            if (b->checks[i] != NULL && b->checks[i]->err == RG_ERR_REDIS) {
                copy_text(why, whylen, "malformed reply to the script", 29);
                break;
            }
    return RG_BATCH_DECIDED;
unexpected:
    copy_text(why, whylen, "unexpected reply to the script", 30);
    return RG_BATCH_FAILED;
}
