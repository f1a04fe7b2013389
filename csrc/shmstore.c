/*
 * shmstore.c: shm://NAME, exact limits shared by the processes of one host.
 *
 * The segment.  A POSIX shared memory object "/rategate.NAME" (the file
 * /dev/shm/rategate.NAME on Linux), created 0600 with O_EXCL by whichever
 * process comes first, sized with ftruncate and reserved with
 * posix_fallocate (so a full /dev/shm is an error at creation, never a
 * SIGBUS later), and mapped MAP_SHARED by every process that opens NAME.
 * It lives until the host reboots or someone unlinks it.  Layout:
 *
 *   header (one page)   magic, version, every size the layout depends on,
 *                       the hash key, the clock origin, shared counters
 *   stripes[nstripes]   a robust process-shared mutex and a journal each
 *   sets[nstripes*sps]  16 fingerprints and 16 expiry times each
 *   entries[sets*16]    what each entry is: (kind, key, id), compared in full
 *
 * The creator writes everything, then the magic last (a release store): an
 * opener that finds the file waits (at most 5 s) for the magic, then checks
 * the version and every size against its own, the owner (the same euid:
 * root is refused another user's segment too) and the mode (nothing for
 * group or others), and refuses anything else with a message naming the
 * file and the fix.  Nothing is read from a segment before those checks.
 *
 * The table.  A check's key picks its stripe (a keyed SipHash of the key,
 * the key random per segment, so nobody can aim keys at one stripe), so
 * every entry of one key (each rate's bucket, the concurrency set and its
 * slots) is under one lock: a check of several rates takes one lock and is
 * atomic.  Within the stripe an entry may live in any of three sets chosen
 * by the hash of (kind, key, id) and goes to the emptiest ("the power of
 * choices": the sets fill evenly); the 16 fingerprints of a set are one
 * cache line, so a look-up reads at most three lines and then the entries
 * whose fingerprint matches.  An entry is worthless once its time has
 * passed (a rate's TAT: the bucket is full again, the same as no entry; a
 * concurrency set's latest slot expiry; a slot's expiry): a new entry
 * reuses a worthless one (an eviction, counted), and when its three sets
 * hold only live entries the check is answered RG_SHM_FULL: the failure
 * mode decides ("overloaded").  The table has 1.25 slots per bucket of
 * `capacity`, so `capacity` live buckets fit: with keys spread by the hash,
 * the first check that found no room came at 107% to 114% of the default
 * capacity live (tests/test_shm.py measures it every run; a simulation of
 * 40 fills: 107% to 114%, mean 111%).  Memory: 256 bytes per entry and 12
 * of index, so about 335 bytes per bucket of capacity (21 MiB for the
 * default 65,536), reserved at creation.
 *
 * Stripes: 64 (fewer for a small table).  A critical section is a few
 * hundred nanoseconds, so 4 to 8 workers hammering different keys rarely
 * meet on one lock; one hot key serialises on its stripe, as it must.
 *
 * Time: CLOCK_MONOTONIC, the same clock for every process of the host,
 * read after the lock is taken, so the times of the operations on one key
 * increase in the order the lock orders them; stored as microseconds since
 * the creator's reading (doubles, exact as in memory://).
 *
 * Crash safety: robust mutexes, not a lock-free design.  A GCRA bucket is
 * one 64-bit value and a single rate could be a compare-and-swap, but a
 * check of several rates must consume from all or from none, a concurrency
 * slot is taken in the same decision, and a new bucket needs an entry
 * claimed: a lock-free version of that needs multi-word CAS or per-key
 * sequence locks, which a process killed at the wrong instruction leaves
 * half done just the same.  With PTHREAD_MUTEX_ROBUST the kernel releases
 * the lock of a thread that dies holding it (its robust futex list, walked
 * at exit even after SIGKILL) and the next locker gets EOWNERDEAD; what it
 * must then make consistent is bounded by how the holder writes:
 *
 *   - Claiming an entry writes its payload and expiry first and its
 *     fingerprint last (one aligned 4-byte store): killed before, the entry
 *     is still free; after, it is a new entry that holds no tokens yet
 *     (expiry 0: a full bucket).  Freeing is one store (fingerprint 0).
 *   - Everything a decision changes (the buckets' TATs, the slot, the set's
 *     count) is first written to the stripe's journal as (offset, value)
 *     pairs; then jstate = 1 (the commit, one store); then the values go in
 *     place; then jstate = 0.  The new owner of a lock taken over with
 *     EOWNERDEAD applies a committed journal again (the writes are plain
 *     stores of final values: applying twice is applying once) and drops
 *     an uncommitted one, then calls pthread_mutex_consistent.  Compiler
 *     barriers keep the stores in this order; stores a thread executed
 *     before it was killed are seen by whoever takes its lock next (the
 *     kernel's futex hand-over orders them), so no fence is needed on the
 *     hot path.
 *
 * So every operation is all or nothing, and the state is always one that
 * some sequence of completed operations produced: exact.  What a process
 * SIGKILLed mid-check can cost: that one check.  If it died before the
 * commit, the check never happened; after, it happened (the tokens are
 * consumed, the slot taken) but nobody received the decision.  So with k
 * processes killed, the decisions received across all processes admit at
 * least limit - k * cost and never more than the limit (a taken slot is
 * given back by its ttl, as when a process dies holding one).  Nothing can
 * be admitted twice, and no lock is left held: the survivors never hang on
 * a dead process.  A *stopped* process (SIGSTOP, a debugger) does hold its
 * lock: a check waits at most the Limiter's `timeout` for it, and is then
 * answered by the failure mode ("timeout").
 *
 * Concurrency slots: a set entry (key, "c") counts its slots (n) and keeps
 * the earliest expiry among them (minexp, a lower bound); each slot is an
 * entry (key, "c", slot id) with its expiry.  While now < minexp no
 * counted slot has expired, so n is exact; otherwise the stripe is scanned
 * once for the key's slots (expired ones freed, n and minexp recomputed).
 * A set whose latest expiry has passed has no live slot.  A live slot is
 * always counted (created counted; a set is only evicted or reset to 0
 * when none of its slots is live; clear() frees slots before sets), so n
 * never under-counts: the limit holds exactly.
 *
 * fork(): the mapping is inherited and nothing here depends on the pid or
 * a thread: a child keeps using its parent's rg_shm.  A robust mutex is
 * owned by a thread (the kernel's TID), so a pid reused by another process
 * cannot be mistaken for the dead owner.
 *
 * Threads: every call is made with the GIL held (pylocal.c), so the threads
 * of one process never meet here; the locks order processes.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "shmstore.h"

#include "cache.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <openssl/sha.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#endif

#define HEADER_SIZE 4096u
#define OPEN_WAIT_NS 5000000000ULL /* for a creator to finish initialising */
#define W RG_SHM_WAYS

_Static_assert(sizeof(rg_shm_header) <= HEADER_SIZE, "the header is one page");
_Static_assert(sizeof(rg_shm_entry) == 256, "an entry is 256 bytes");
_Static_assert(RG_SHM_KHEAD + SHA256_DIGEST_LENGTH == RG_SHM_KMAX, "a hashed key fills k");
_Static_assert(RG_MAX_RATES + 4 <= RG_SHM_JMAX, "the journal holds any one operation");

/* ---- hashing --------------------------------------------------------------------- */

/* SipHash-1-3 (Aumasson and Bernstein), keyed by the segment's random key,
 * written from the paper.  Words are read in host order: every process of
 * a host agrees, which is all a segment needs. */
#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                                         \
    do {                                                                                 \
        v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);                          \
        v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                                             \
        v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                                             \
        v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);                          \
    } while (0)

static uint64_t
siphash13(const uint64_t key[2], const void *src, size_t len)
{
    uint64_t v0 = key[0] ^ 0x736f6d6570736575ULL, v1 = key[1] ^ 0x646f72616e646f6dULL;
    uint64_t v2 = key[0] ^ 0x6c7967656e657261ULL, v3 = key[1] ^ 0x7465646279746573ULL;
    uint64_t b = (uint64_t)len << 56, m;
    const unsigned char *p = src;

    for (; len >= 8; p += 8, len -= 8) {
        memcpy(&m, p, 8);
        v3 ^= m;
        SIPROUND;
        v0 ^= m;
    }
    switch (len) {
    case 7: b |= (uint64_t)p[6] << 48; /* fall through */
    case 6: b |= (uint64_t)p[5] << 40; /* fall through */
    case 5: b |= (uint64_t)p[4] << 32; /* fall through */
    case 4: b |= (uint64_t)p[3] << 24; /* fall through */
    case 3: b |= (uint64_t)p[2] << 16; /* fall through */
    case 2: b |= (uint64_t)p[1] << 8;  /* fall through */
    case 1: b |= (uint64_t)p[0];       /* fall through */
    default: break;
    }
    v3 ^= b;
    SIPROUND;
    v0 ^= b;
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

/* A key as entries store it: itself up to RG_SHM_KMAX bytes, else its
 * first RG_SHM_KHEAD bytes and its SHA-256 (collisions: none known, so
 * two keys share an entry only if they are equal).  kh hashes the stored
 * form, so it can be recomputed from an entry. */
typedef struct shm_key {
    const char *k;
    uint16_t klen;
    uint8_t flags;
    uint32_t kfull;
    uint64_t kh;
    char buf[RG_SHM_KMAX];
} shm_key;

static void
key_hash(const rg_shm *s, shm_key *k)
{
    k->kh = siphash13(s->hdr->seed, k->k, k->klen) ^ (k->flags ? 0x9e3779b97f4a7c15ULL : 0);
}

static void
key_make(const rg_shm *s, const char *key, size_t keylen, shm_key *k)
{
    k->kfull = (uint32_t)keylen;
    if (keylen <= RG_SHM_KMAX) {
        k->k = key;
        k->klen = (uint16_t)keylen;
        k->flags = 0;
    } else {
        memcpy(k->buf, key, RG_SHM_KHEAD);
        SHA256((const unsigned char *)key, keylen, (unsigned char *)k->buf + RG_SHM_KHEAD);
        k->k = k->buf;
        k->klen = RG_SHM_KMAX;
        k->flags = RG_SHM_KHASHED;
    }
    key_hash(s, k);
}

/* The key of an existing entry (for scans: its set, its slots' set). */
static void
key_of_entry(const rg_shm_entry *e, shm_key *k)
{
    k->k = e->k;
    k->klen = e->klen;
    k->flags = e->flags & RG_SHM_KHASHED;
    k->kfull = e->kfull;
    k->kh = e->kh;
}

typedef struct shm_id {
    const char *p;
    uint8_t kind, flags, len;
    char buf[SHA256_DIGEST_LENGTH];
} shm_id;

static void
id_rate(shm_id *id, const rg_spec *spec, int j)
{
    id->kind = RG_SHM_RATE;
    id->flags = 0;
    id->p = spec->key_id[j];
    id->len = spec->key_id_len[j];
}

static void
id_head(shm_id *id)
{
    id->kind = RG_SHM_HEAD;
    id->flags = 0;
    id->p = "c";
    id->len = 1;
}

static void
id_slot(shm_id *id, const char *sid, size_t sidlen)
{
    id->kind = RG_SHM_SLOT;
    if (sidlen <= RG_SHM_SIDMAX) {
        id->flags = 0;
        id->p = sid;
        id->len = (uint8_t)sidlen;
    } else {
        SHA256((const unsigned char *)sid, sidlen, (unsigned char *)id->buf);
        id->flags = RG_SHM_IDHASHED;
        id->p = id->buf;
        id->len = SHA256_DIGEST_LENGTH;
    }
}

static uint64_t
ident_hash(const shm_key *k, const shm_id *id)
{
    uint64_t h = 0xcbf29ce484222325ULL ^ id->kind ^ ((uint64_t)id->flags << 8);
    uint8_t i;
    for (i = 0; i < id->len; i++) {
        h ^= (unsigned char)id->p[i];
        h *= 0x100000001b3ULL;
    }
    return rg_mix64(k->kh ^ rg_mix64(h));
}

static int
entry_is(const rg_shm_entry *e, const shm_key *k, const shm_id *id)
{
    return e->kh == k->kh && e->kind == id->kind && e->klen == k->klen &&
           e->idlen == id->len && e->flags == (k->flags | id->flags) &&
           memcmp(e->k, k->k, k->klen) == 0 && memcmp(e->id, id->p, id->len) == 0;
}

/* Whether an entry's lengths and kind are ones we write: the walks over
 * every entry (scans, entries(), clear()) read only those, so a segment
 * scribbled on by another program of the same user is never read past an
 * entry.  (A look-up compares the lengths with its own first.) */
static int
entry_sane(const rg_shm_entry *e)
{
    return e->klen <= RG_SHM_KMAX && e->idlen <= RG_SHM_IDMAX && e->kind >= RG_SHM_RATE &&
           e->kind <= RG_SHM_SLOT;
}

static int
entry_has_key(const rg_shm_entry *e, const shm_key *k)
{
    return e->kh == k->kh && e->klen == k->klen &&
           (e->flags & RG_SHM_KHASHED) == k->flags && memcmp(e->k, k->k, k->klen) == 0;
}

/* ---- the table ----------------------------------------------------------------- */

/* Entries are named by their index g in the whole table: set g / W, way g % W. */
static inline rg_shm_set *
set_of(const rg_shm *s, uint64_t g)
{
    return &s->sets[g / W];
}

static inline double *
exp_of(const rg_shm *s, uint64_t g)
{
    return &s->sets[g / W].exp[g % W];
}

static inline uint32_t *
fp_ptr(const rg_shm *s, uint64_t g)
{
    return &s->sets[g / W].fp[g % W];
}

static inline uint32_t
load_fp(const rg_shm *s, uint64_t g)
{
    return __atomic_load_n(fp_ptr(s, g), __ATOMIC_RELAXED);
}

static inline double
load_exp(const rg_shm *s, uint64_t g)
{
    uint64_t bits = __atomic_load_n((uint64_t *)exp_of(s, g), __ATOMIC_RELAXED);
    double d;
    memcpy(&d, &bits, sizeof(d));
    return d;
}

static inline uint32_t
fp_of(uint64_t h)
{
    uint32_t f = (uint32_t)((h * 0x9e3779b97f4a7c15ULL) >> 32);
    return f ? f : 1;
}

/* The operation in progress on one stripe, holding its lock. */
typedef struct shm_txn {
    rg_shm *s;
    rg_shm_stripe *st;
    uint64_t first; /* the stripe's first entry */
    double now;
    int nused;
    uint64_t used[RG_MAX_RATES + 4]; /* entries this operation holds: never evicted by it */
    int nj;
    rg_shm_jw j[RG_SHM_JMAX];
} shm_txn;

static uint32_t
stripe_of(const rg_shm *s, const shm_key *k)
{
    return (uint32_t)(k->kh >> 40) & (s->nstripes - 1);
}

static void
txn_init(shm_txn *t, rg_shm *s, uint32_t stripe)
{
    t->s = s;
    t->st = &s->stripes[stripe];
    t->first = (uint64_t)stripe * s->sps * W;
    t->nused = 0;
    t->nj = 0;
}

/* The (up to) three distinct sets of an entry in its stripe, as the
 * indexes of their way 0. */
#define CHOICES 3
static int
choices(const shm_txn *t, uint64_t h, uint64_t out[CHOICES])
{
    uint64_t sps = t->s->sps, a = h % sps, b, c;
    out[0] = t->first + a * W;
    if (sps < 2)
        return 1;
    b = (a + 1 + rg_mix64(h ^ 0x243f6a8885a308d3ULL) % (sps - 1)) % sps; /* != a */
    out[1] = t->first + b * W;
    if (sps < 3)
        return 2;
    c = rg_mix64(h ^ 0x13198a2e03707344ULL) % sps;
    while (c == a || c == b)
        c = (c + 1) % sps;
    out[2] = t->first + c * W;
    return 3;
}

static int64_t
find(shm_txn *t, const shm_key *k, const shm_id *id, uint64_t h)
{
    uint64_t c[CHOICES];
    uint32_t fp = fp_of(h);
    int nc = choices(t, h, c), i, w;

    for (i = 0; i < nc; i++) {
        const rg_shm_set *set = set_of(t->s, c[i]);
        for (w = 0; w < W; w++)
            if (set->fp[w] == fp && entry_is(&t->s->entries[c[i] + w], k, id))
                return (int64_t)(c[i] + w);
    }
    return -1;
}

static int
used(const shm_txn *t, uint64_t g)
{
    int i;
    for (i = 0; i < t->nused; i++)
        if (t->used[i] == g)
            return 1;
    return 0;
}

/* Claim an entry for (k, id) in the emptiest of its sets: a free one, or
 * one whose time has passed (evicted).  -1: its sets are full of live
 * entries. */
static int64_t
claim(shm_txn *t, const shm_key *k, const shm_id *id, uint64_t h)
{
    uint64_t c[CHOICES], g;
    int nc = choices(t, h, c), i, w, best = -1, bestn = 0, pick = -1;
    rg_shm_set *set;
    rg_shm_entry *e;

    for (i = 0; i < nc; i++) {
        int n = 0;
        set = set_of(t->s, c[i]);
        for (w = 0; w < W; w++)
            if ((set->fp[w] == 0 || set->exp[w] <= t->now) && !used(t, c[i] + w))
                n++;
        if (n > bestn) {
            bestn = n;
            best = i;
        }
    }
    if (best < 0)
        return -1;
    set = set_of(t->s, c[best]);
    for (w = 0; w < W && pick < 0; w++) /* a free one first */
        if (set->fp[w] == 0 && !used(t, c[best] + w))
            pick = w;
    for (w = 0; w < W && pick < 0; w++)
        if (set->exp[w] <= t->now && !used(t, c[best] + w))
            pick = w;
    g = c[best] + (uint64_t)pick;
    if (set->fp[pick] != 0) {
        /* Evict a worthless entry: one store, and it is gone. */
        __atomic_store_n(&set->fp[pick], 0, __ATOMIC_RELAXED);
        __atomic_fetch_add(&t->s->hdr->evicted, 1, __ATOMIC_RELAXED);
    }
    e = &t->s->entries[g];
    e->kh = k->kh;
    e->minexp = HUGE_VAL;
    e->n = 0;
    e->kfull = k->kfull;
    e->klen = k->klen;
    e->kind = id->kind;
    e->flags = k->flags | id->flags;
    e->idlen = id->len;
    memcpy(e->k, k->k, k->klen);
    memcpy(e->id, id->p, id->len);
    set->exp[pick] = 0.0; /* holds nothing yet: a full bucket, an empty set */
    /* The fingerprint last: until it is stored, the entry is free. */
    atomic_signal_fence(memory_order_seq_cst);
    __atomic_store_n(&set->fp[pick], fp_of(h), __ATOMIC_RELAXED);
    return (int64_t)g;
}

static int64_t
find_or_claim(shm_txn *t, const shm_key *k, const shm_id *id)
{
    uint64_t h = ident_hash(k, id);
    int64_t g = find(t, k, id, h);
    if (g < 0)
        g = claim(t, k, id, h);
    if (g >= 0)
        t->used[t->nused++] = (uint64_t)g;
    return g;
}

/* ---- the journal and the lock ---------------------------------------------------- */

static void
jw(shm_txn *t, void *addr, uint64_t val, uint32_t size)
{
    rg_shm_jw *w = &t->j[t->nj++];
    w->off = (uint64_t)((char *)addr - t->s->base);
    w->val = val;
    w->size = size;
    w->pad = 0;
}

static void
jw_double(shm_txn *t, double *addr, double v)
{
    uint64_t bits;
    memcpy(&bits, &v, sizeof(bits));
    jw(t, addr, bits, 8);
}

static void
apply(char *base, const rg_shm_jw *w)
{
    if (w->size == 8)
        __atomic_store_n((uint64_t *)(base + w->off), w->val, __ATOMIC_RELAXED);
    else
        __atomic_store_n((uint32_t *)(base + w->off), (uint32_t)w->val, __ATOMIC_RELAXED);
}

/* The crash tests' fault injection (off unless a test turned it on). */
static void
point(const rg_shm *s, int where)
{
    if (s->test_hold_ns) {
        uint64_t until = rg_now_ns() + s->test_hold_ns;
        while (rg_now_ns() < until)
            ;
    }
    if (s->test_hang == where)
        for (;;)
            pause();
}

/* Make the operation's writes, all or none (see the top of the file). */
static void
commit(shm_txn *t)
{
    rg_shm_stripe *st = t->st;
    int i;

    if (t->nj == 0)
        return;
    memcpy(st->j, t->j, (size_t)t->nj * sizeof(rg_shm_jw));
    st->jn = (uint32_t)t->nj;
    point(t->s, 1);
    atomic_signal_fence(memory_order_seq_cst);
    __atomic_store_n(&st->jstate, 1, __ATOMIC_RELAXED);
    atomic_signal_fence(memory_order_seq_cst);
    point(t->s, 2);
    for (i = 0; i < t->nj; i++) {
        apply(t->s->base, &st->j[i]);
        if (i == 0)
            point(t->s, 3);
    }
    atomic_signal_fence(memory_order_seq_cst);
    __atomic_store_n(&st->jstate, 0, __ATOMIC_RELAXED);
}

/* The lock's previous holder died: redo its committed journal (every
 * write checked to land inside the table: a journal is never trusted to
 * write anywhere else), drop an uncommitted one. */
static void
recover(rg_shm *s, rg_shm_stripe *st)
{
    uint64_t lo = s->hdr->sets_off;
    uint32_t i, n = st->jn;

    if (st->jstate == 1 && n <= RG_SHM_JMAX)
        for (i = 0; i < n; i++) {
            const rg_shm_jw *w = &st->j[i];
            if ((w->size == 8 || w->size == 4) && w->off >= lo && w->off % w->size == 0 &&
                w->off + w->size <= s->size)
                apply(s->base, w);
        }
    st->jstate = 0;
    st->jn = 0;
}

static int
lock(rg_shm *s, rg_shm_stripe *st, uint64_t timeout_ns)
{
    int rc = pthread_mutex_trylock(&st->mu);
    if (rc == EBUSY) {
        struct timespec ts;
        __atomic_fetch_add(&s->hdr->waits, 1, __ATOMIC_RELAXED);
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += (time_t)(timeout_ns / 1000000000u);
        ts.tv_nsec += (long)(timeout_ns % 1000000000u);
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        rc = pthread_mutex_timedlock(&st->mu, &ts);
#if defined(__SANITIZE_THREAD__)
        /* ThreadSanitizer's timedlock interceptor records a lock only when
         * it returns 0 (its trylock and lock interceptors take EOWNERDEAD
         * too): tell it we hold this one, or our unlock is reported as the
         * unlock of an unlocked mutex.  (GCC 12's libtsan has no clocklock
         * interceptor, which handles it, so timedlock it is.) */
        if (rc == EOWNERDEAD) {
            __tsan_mutex_pre_lock(&st->mu, __tsan_mutex_try_lock);
            __tsan_mutex_post_lock(&st->mu, __tsan_mutex_try_lock, 0);
        }
#endif
    }
    if (rc == EOWNERDEAD) {
        recover(s, st);
        if (pthread_mutex_consistent(&st->mu) != 0) {
            pthread_mutex_unlock(&st->mu);
            return RG_SHM_BROKEN;
        }
        __atomic_fetch_add(&s->hdr->recovered, 1, __ATOMIC_RELAXED);
        rc = 0;
    }
    if (rc == 0)
        return RG_SHM_OK;
    return rc == ETIMEDOUT ? RG_SHM_TIMEOUT : RG_SHM_BROKEN;
}

static double
shm_now(const rg_shm *s)
{
    uint64_t ns = rg_now_ns(), t0 = s->hdr->t0_ns;
    return ns <= t0 ? 0.0 : (double)(ns - t0) / 1000.0;
}

static int
begin(shm_txn *t, rg_shm *s, const shm_key *k, uint64_t timeout_ns)
{
    int rc;
    txn_init(t, s, stripe_of(s, k));
    if ((rc = lock(s, t->st, timeout_ns)) != RG_SHM_OK)
        return rc;
    t->now = shm_now(s);
    return RG_SHM_OK;
}

static void
end(shm_txn *t)
{
    commit(t);
    pthread_mutex_unlock(&t->st->mu);
}

/* ---- concurrency slots ------------------------------------------------------------ */

/* Count the key's live slots in its stripe; free its expired ones (each
 * one store: an expired slot is worth nothing). */
static void
slots_scan(shm_txn *t, const shm_key *k, uint64_t *n, double *minexp)
{
    uint64_t g, last = t->first + t->s->sps * W, cnt = 0;
    double mn = HUGE_VAL;

    for (g = t->first; g < last; g++) {
        const rg_shm_entry *e = &t->s->entries[g];
        double x;
        if (set_of(t->s, g)->fp[g % W] == 0 || e->kind != RG_SHM_SLOT || !entry_sane(e) ||
            !entry_has_key(e, k))
            continue;
        x = *exp_of(t->s, g);
        if (x <= t->now) {
            __atomic_store_n(fp_ptr(t->s, g), 0, __ATOMIC_RELAXED);
        } else {
            cnt++;
            if (x < mn)
                mn = x;
        }
    }
    *n = cnt;
    *minexp = mn;
}

/* Take slot sid of the key (the rates allowed it): as the script does.
 * RG_SHM_OK (out says whether the concurrency limit allowed it) or
 * RG_SHM_FULL. */
static int
slot_take(shm_txn *t, const shm_key *k, const rg_spec *spec, const char *sid, size_t sidlen,
          rg_result *out)
{
    shm_id hid, slid;
    int64_t hg, sg;
    rg_shm_entry *he;
    uint64_t hn, n0;
    double hexp, hmin, min0, sexp;

    id_head(&hid);
    if ((hg = find_or_claim(t, k, &hid)) < 0)
        return RG_SHM_FULL;
    he = &t->s->entries[hg];
    hn = n0 = he->n;
    hmin = min0 = he->minexp;
    hexp = *exp_of(t->s, (uint64_t)hg);
    if (hexp <= t->now) { /* no live slot: none counted is left */
        hn = 0;
        hmin = HUGE_VAL;
    } else if (t->now >= hmin) { /* a counted slot has expired: count again */
        slots_scan(t, k, &hn, &hmin);
    }
    if (hn >= (uint64_t)spec->conc_limit) {
        /* Denied by the concurrency limit: reported as rate n, retry in a
         * second (as the script). */
        memset(out, 0, sizeof(*out));
        out->rate = spec->n;
        out->retry_us = 1000000;
        if (hn != n0 || hmin != min0) {
            jw(t, &he->n, hn, 8);
            jw_double(t, &he->minexp, hmin);
        }
        return RG_SHM_OK;
    }
    id_slot(&slid, sid, sidlen);
    sg = find(t, k, &slid, ident_hash(k, &slid));
    if (sg < 0 || *exp_of(t->s, (uint64_t)sg) <= t->now) {
        /* A new slot (an expired one of the same id is not counted: see
         * the top of the file). */
        if (sg < 0 && (sg = claim(t, k, &slid, ident_hash(k, &slid))) < 0)
            return RG_SHM_FULL;
        hn++;
    } /* else: held already, its expiry renewed */
    sexp = t->now + spec->conc_ttl_us;
    if (sexp > hexp)
        hexp = sexp;
    if (sexp < hmin)
        hmin = sexp;
    jw_double(t, exp_of(t->s, (uint64_t)sg), sexp);
    jw(t, &he->n, hn, 8);
    jw_double(t, &he->minexp, hmin);
    jw_double(t, exp_of(t->s, (uint64_t)hg), hexp);
    if (spec->n == 0) {
        out->rate = 0;
        out->remaining = spec->conc_limit - (int64_t)hn;
    }
    return RG_SHM_OK;
}

static void
slot_release(shm_txn *t, const shm_key *k, const char *sid, size_t sidlen)
{
    shm_id hid, slid;
    int64_t hg, sg;

    id_slot(&slid, sid, sidlen);
    if ((sg = find(t, k, &slid, ident_hash(k, &slid))) < 0)
        return;
    jw(t, fp_ptr(t->s, (uint64_t)sg), 0, 4);
    if (*exp_of(t->s, (uint64_t)sg) <= t->now)
        return; /* expired: not counted */
    id_head(&hid);
    hg = find(t, k, &hid, ident_hash(k, &hid));
    if (hg >= 0 && *exp_of(t->s, (uint64_t)hg) > t->now) {
        rg_shm_entry *he = &t->s->entries[hg];
        uint64_t hn = he->n ? he->n - 1 : 0;
        jw(t, &he->n, hn, 8);
        if (hn == 0) { /* the set goes with its last slot */
            jw_double(t, &he->minexp, HUGE_VAL);
            jw_double(t, exp_of(t->s, (uint64_t)hg), 0.0);
        }
    }
}

/* ---- operations ------------------------------------------------------------------- */

int
rg_shm_op(rg_shm *s, int op, const rg_spec *spec, const char *key, size_t keylen,
          const char *sid, size_t sidlen, int64_t cost, uint64_t timeout_ns, rg_result *out)
{
    shm_key k;
    shm_id id;
    shm_txn t;
    int64_t g[RG_MAX_RATES];
    double tats[RG_MAX_RATES];
    int j, n = spec->n, rc;
    int conc = spec->conc_limit > 0 && op != RG_OP_CHARGE;

    memset(out, 0, sizeof(*out));
    out->allowed = 1;
    key_make(s, key, keylen, &k);
    if ((rc = begin(&t, s, &k, timeout_ns)) != RG_SHM_OK)
        return rc;
    if (op == RG_OP_RELEASE) {
        if (conc)
            slot_release(&t, &k, sid, sidlen);
        goto done;
    }
    for (j = 0; j < n; j++) {
        id_rate(&id, spec, j);
        if ((g[j] = find_or_claim(&t, &k, &id)) < 0) {
            rc = RG_SHM_FULL;
            goto done;
        }
        tats[j] = *exp_of(s, (uint64_t)g[j]);
    }
    if (op == RG_OP_CHARGE) {
        rg_gcra_charge(spec->rates, n, t.now, cost, tats, out);
        for (j = 0; j < n; j++)
            jw_double(&t, exp_of(s, (uint64_t)g[j]), tats[j]);
        goto done;
    }
    if (!rg_gcra_check(spec->rates, n, t.now, cost, tats, out))
        goto done;
    if (conc && ((rc = slot_take(&t, &k, spec, sid, sidlen, out)) != RG_SHM_OK || !out->allowed))
        goto done;
    if (cost > 0)
        for (j = 0; j < n; j++)
            jw_double(&t, exp_of(s, (uint64_t)g[j]), tats[j]);
done:
    end(&t);
    if (rc == RG_SHM_FULL)
        __atomic_fetch_add(&s->hdr->full, 1, __ATOMIC_RELAXED);
    return rc;
}

int
rg_shm_delete(rg_shm *s, const rg_spec *spec, const char *key, size_t keylen, uint64_t timeout_ns)
{
    shm_key k;
    shm_id id;
    shm_txn t;
    int j, rc;

    key_make(s, key, keylen, &k);
    if ((rc = begin(&t, s, &k, timeout_ns)) != RG_SHM_OK)
        return rc;
    for (j = 0; j < spec->n; j++) {
        int64_t g;
        id_rate(&id, spec, j);
        if ((g = find(&t, &k, &id, ident_hash(&k, &id))) >= 0)
            jw_double(&t, exp_of(s, (uint64_t)g), 0.0); /* a full bucket */
    }
    end(&t);
    return RG_SHM_OK;
}

/* The key's concurrency set, from one of its slots' entries; -1 if none. */
static int64_t
head_of(shm_txn *t, const rg_shm_entry *slot)
{
    shm_key k;
    shm_id hid;
    key_of_entry(slot, &k);
    id_head(&hid);
    return find(t, &k, &hid, ident_hash(&k, &hid));
}

/* For each stripe in turn, locked: count[i] = the live slots of the set at
 * entry first + i (entries() and clear() report sets by them). */
static void
count_slots(shm_txn *t, uint32_t *count)
{
    uint64_t g, last = t->first + t->s->sps * W;
    memset(count, 0, t->s->sps * W * sizeof(*count));
    for (g = t->first; g < last; g++) {
        const rg_shm_entry *e = &t->s->entries[g];
        int64_t hg;
        if (set_of(t->s, g)->fp[g % W] != 0 && e->kind == RG_SHM_SLOT && entry_sane(e) &&
            *exp_of(t->s, g) > t->now && (hg = head_of(t, e)) >= 0)
            count[(uint64_t)hg - t->first]++;
    }
}

/* Lock stripe i into t for a walk of its entries (clear(), entries()), and
 * count its sets' live slots into slots (count_slots): RG_SHM_OK, or the
 * lock's failure (not held).  The caller unlocks. */
static int
walk_begin(rg_shm *s, uint32_t i, uint64_t timeout_ns, shm_txn *t, uint32_t *slots)
{
    int rc;
    txn_init(t, s, i);
    if ((rc = lock(s, t->st, timeout_ns)) != RG_SHM_OK)
        return rc;
    t->now = shm_now(s);
    count_slots(t, slots);
    return RG_SHM_OK;
}

/* What entries() lists for the used entry g of the walked stripe: a rate's
 * microseconds until its bucket is full, a set head's live slots; 0 for
 * what is not live (a full bucket, a set with no live slot, a slot). */
static double
live_value(const shm_txn *t, const uint32_t *slots, uint64_t g)
{
    const rg_shm_entry *e = &t->s->entries[g];
    double x = *exp_of(t->s, g);
    if (e->kind == RG_SHM_RATE && x > t->now)
        return x - t->now;
    if (e->kind == RG_SHM_HEAD && slots[g - t->first] > 0)
        return (double)slots[g - t->first];
    return 0;
}

int
rg_shm_clear(rg_shm *s, uint64_t timeout_ns, uint64_t *count)
{
    uint32_t i, *slots = malloc(s->sps * W * sizeof(uint32_t));
    int rc = RG_SHM_OK;

    *count = 0;
    if (slots == NULL)
        return RG_SHM_FULL;
    for (i = 0; i < s->nstripes && rc == RG_SHM_OK; i++) {
        shm_txn t;
        uint64_t g, last;
        int pass;
        if ((rc = walk_begin(s, i, timeout_ns, &t, slots)) != RG_SHM_OK)
            break;
        last = t.first + s->sps * W;
        /* Slots before sets: a live slot never outlives its set's count. */
        for (pass = 0; pass < 2; pass++)
            for (g = t.first; g < last; g++) {
                if (set_of(s, g)->fp[g % W] == 0 ||
                    (s->entries[g].kind == RG_SHM_SLOT) != (pass == 0))
                    continue;
                if (live_value(&t, slots, g) > 0)
                    (*count)++;
                __atomic_store_n(fp_ptr(s, g), 0, __ATOMIC_RELAXED);
            }
        pthread_mutex_unlock(&t.st->mu);
    }
    free(slots);
    return rc;
}

static int
prefix_match(const rg_shm_entry *e, const char *p, size_t plen, const unsigned char *pdigest)
{
    if (!(e->flags & RG_SHM_KHASHED))
        return plen <= e->klen && memcmp(e->k, p, plen) == 0;
    if (plen <= RG_SHM_KHEAD)
        return memcmp(e->k, p, plen) == 0;
    /* Longer than what is kept of the key: only the whole key matches. */
    return plen == e->kfull && memcmp(e->k, p, RG_SHM_KHEAD) == 0 &&
           memcmp(e->k + RG_SHM_KHEAD, pdigest, SHA256_DIGEST_LENGTH) == 0;
}

int
rg_shm_entries(rg_shm *s, const char *prefix, size_t plen, uint64_t timeout_ns,
               rg_shm_item **items, size_t *n)
{
    unsigned char pdigest[SHA256_DIGEST_LENGTH];
    uint32_t i, *slots = malloc(s->sps * W * sizeof(uint32_t));
    size_t cap = 0;
    int rc = RG_SHM_OK;

    *items = NULL;
    *n = 0;
    if (slots == NULL)
        return RG_SHM_FULL;
    if (plen > RG_SHM_KHEAD)
        SHA256((const unsigned char *)prefix, plen, pdigest);
    for (i = 0; i < s->nstripes && rc == RG_SHM_OK; i++) {
        shm_txn t;
        uint64_t g, last;
        if ((rc = walk_begin(s, i, timeout_ns, &t, slots)) != RG_SHM_OK)
            break;
        last = t.first + s->sps * W;
        for (g = t.first; g < last && rc == RG_SHM_OK; g++) {
            const rg_shm_entry *e = &s->entries[g];
            rg_shm_item *it;
            double v;
            if (set_of(s, g)->fp[g % W] == 0 || !entry_sane(e) ||
                (v = live_value(&t, slots, g)) <= 0 || !prefix_match(e, prefix, plen, pdigest))
                continue;
            if (*n == cap) {
                size_t nc = cap ? cap * 2 : 64;
                rg_shm_item *ni = realloc(*items, nc * sizeof(**items));
                if (ni == NULL) {
                    rc = RG_SHM_FULL;
                    break;
                }
                *items = ni;
                cap = nc;
            }
            it = &(*items)[(*n)++];
            it->value = v;
            it->klen = (e->flags & RG_SHM_KHASHED) ? RG_SHM_KHEAD : e->klen;
            it->idlen = e->idlen;
            memcpy(it->k, e->k, it->klen);
            memcpy(it->id, e->id, e->idlen);
        }
        pthread_mutex_unlock(&t.st->mu);
    }
    free(slots);
    if (rc != RG_SHM_OK) {
        free(*items);
        *items = NULL;
        *n = 0;
    }
    return rc;
}

void
rg_shm_info_get(rg_shm *s, rg_shm_info *out)
{
    uint64_t g, slots = (uint64_t)s->nstripes * s->sps * W;
    double now = shm_now(s);

    out->capacity = s->hdr->capacity;
    out->slots = slots;
    out->nstripes = s->nstripes;
    out->bytes = s->size;
    out->full = __atomic_load_n(&s->hdr->full, __ATOMIC_RELAXED);
    out->recovered = __atomic_load_n(&s->hdr->recovered, __ATOMIC_RELAXED);
    out->evicted = __atomic_load_n(&s->hdr->evicted, __ATOMIC_RELAXED);
    out->waits = __atomic_load_n(&s->hdr->waits, __ATOMIC_RELAXED);
    out->live = 0;
    for (g = 0; g < slots; g++)
        if (load_fp(s, g) != 0 && load_exp(s, g) > now)
            out->live++;
}

/* ---- the segment ------------------------------------------------------------------ */

int
rg_shm_name(const char *name, char *out, size_t outsize)
{
    size_t i, n = strlen(name);
    if (n < 1 || n > RG_SHM_NAME_MAX)
        return -1;
    for (i = 0; i < n; i++) {
        char c = name[i];
        int alnum = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
        if (!alnum && (i == 0 || (c != '.' && c != '_' && c != '-')))
            return -1;
    }
    snprintf(out, outsize, "/rategate.%s", name);
    return 0;
}

typedef struct layout {
    uint32_t nstripes;
    uint64_t sps, stripes_off, sets_off, entries_off, total;
} layout;

static void
layout_of(uint32_t nstripes, uint64_t sps, layout *L)
{
    uint64_t sets = (uint64_t)nstripes * sps;
    L->nstripes = nstripes;
    L->sps = sps;
    L->stripes_off = HEADER_SIZE;
    L->sets_off = (L->stripes_off + nstripes * sizeof(rg_shm_stripe) + 63) & ~(uint64_t)63;
    L->entries_off = L->sets_off + sets * sizeof(rg_shm_set);
    L->total = L->entries_off + sets * W * sizeof(rg_shm_entry);
    L->total = (L->total + 4095) & ~(uint64_t)4095;
}

static void
layout_for(uint64_t capacity, layout *L)
{
    uint64_t slots = (capacity * 5 + 3) / 4, sets = (slots + W - 1) / W;
    uint32_t ns = 1;
    if (sets < 1)
        sets = 1;
    /* at least 32 sets a stripe: the choices balance within a stripe */
    while (ns * 2 <= RG_SHM_MAX_STRIPES && ns * 2 <= sets / 32)
        ns *= 2;
    layout_of(ns, (sets + ns - 1) / ns, L);
}

uint64_t
rg_shm_size_for(uint64_t capacity)
{
    layout L;
    layout_for(capacity, &L);
    return L.total;
}

static void
map(rg_shm *s, char *base, size_t size)
{
    s->base = base;
    s->size = size;
    s->hdr = (rg_shm_header *)base;
    s->stripes = (rg_shm_stripe *)(base + s->hdr->stripes_off);
    s->sets = (rg_shm_set *)(base + s->hdr->sets_off);
    s->entries = (rg_shm_entry *)(base + s->hdr->entries_off);
    s->nstripes = s->hdr->nstripes;
    s->sps = s->hdr->sets_per_stripe;
}

static int
fail(char *err, size_t errsize, int kind, const char *fmt, ...) __attribute__((format(printf, 4, 5)));

static int
fail(char *err, size_t errsize, int kind, const char *fmt, ...)
{
    va_list ap;
    int saved = errno;
    va_start(ap, fmt);
    vsnprintf(err, errsize, fmt, ap);
    va_end(ap);
    errno = saved;
    return kind;
}

static int
create(rg_shm *s, int fd, const char *shmname, const char *name, uint64_t capacity, char *err,
       size_t errsize)
{
    layout L;
    char *base;
    rg_shm_header *h;
    uint32_t i;
    int rc;

    layout_for(capacity, &L);
    if (fchmod(fd, 0600) < 0 || ftruncate(fd, (off_t)L.total) < 0) {
        rc = fail(err, errsize, RG_SHM_EOS, "cannot create the shm segment %s: %s", s->path,
                  strerror(errno));
        goto undo;
    }
    /* Reserve the memory now: on tmpfs a page that cannot be had later is
     * a SIGBUS in whichever process touches it first. */
    rc = posix_fallocate(fd, 0, (off_t)L.total);
    if (rc != 0 && rc != EINVAL && rc != EOPNOTSUPP) {
        errno = rc;
        rc = fail(err, errsize, RG_SHM_EOS,
                  "cannot create the shm segment %s: it needs %.1f MiB for capacity=%llu, and "
                  "%s (%s): lower capacity, or give /dev/shm more room (docker run --shm-size, "
                  "or mount -o remount,size=... /dev/shm)",
                  s->path, (double)L.total / 1048576.0, (unsigned long long)capacity,
                  errno == ENOSPC ? "/dev/shm has no room for it" : "reserving it failed",
                  strerror(errno));
        goto undo;
    }
    base = mmap(NULL, L.total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        rc = fail(err, errsize, RG_SHM_EOS, "cannot map the shm segment %s: %s", s->path,
                  strerror(errno));
        goto undo;
    }
    h = (rg_shm_header *)base;
    h->version = RG_SHM_VERSION;
    h->header_size = HEADER_SIZE;
    h->stripe_size = sizeof(rg_shm_stripe);
    h->set_size = sizeof(rg_shm_set);
    h->entry_size = sizeof(rg_shm_entry);
    h->mutex_size = sizeof(pthread_mutex_t);
    h->ways = W;
    h->kmax = RG_SHM_KMAX;
    h->jmax = RG_SHM_JMAX;
    h->nstripes = L.nstripes;
    h->sets_per_stripe = L.sps;
    h->capacity = capacity;
    h->total_size = L.total;
    h->stripes_off = L.stripes_off;
    h->sets_off = L.sets_off;
    h->entries_off = L.entries_off;
    h->t0_ns = rg_now_ns();
    h->creator_uid = (uint32_t)geteuid();
    h->creator_pid = (uint32_t)getpid();
    if (getrandom(h->seed, sizeof(h->seed), 0) != (ssize_t)sizeof(h->seed)) {
        rc = fail(err, errsize, RG_SHM_EOS, "cannot create the shm segment %s: getrandom: %s",
                  s->path, strerror(errno));
        munmap(base, L.total);
        goto undo;
    }
    map(s, base, L.total);
    for (i = 0; i < L.nstripes; i++) {
        pthread_mutexattr_t a;
        int e = pthread_mutexattr_init(&a);
        if (e == 0 && (e = pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED)) == 0 &&
            (e = pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST)) == 0)
            e = pthread_mutex_init(&s->stripes[i].mu, &a);
        pthread_mutexattr_destroy(&a);
        if (e != 0) {
            errno = e;
            rc = fail(err, errsize, RG_SHM_EOS,
                      "cannot create the shm segment %s: a robust process-shared mutex: %s",
                      s->path, strerror(e));
            munmap(base, L.total);
            s->base = NULL;
            goto undo;
        }
    }
    /* Last: from here on openers may use it. */
    __atomic_store_n(&h->magic, RG_SHM_MAGIC, __ATOMIC_RELEASE);
    close(fd);
    return 0;
undo:
    (void)name;
    shm_unlink(shmname);
    close(fd);
    return rc;
}

long rg_shm_test_euid = -1;

static unsigned
euid(void)
{
    return rg_shm_test_euid >= 0 ? (unsigned)rg_shm_test_euid : (unsigned)geteuid();
}

static int
attach(rg_shm *s, int fd, const char *name, uint64_t capacity, char *err, size_t errsize)
{
    uint64_t deadline = rg_now_ns() + OPEN_WAIT_NS;
    rg_shm_header *h = NULL;
    struct stat sb;
    layout L;
    char *base;
    int rc;

    for (;;) {
        uint64_t magic;
        if (fstat(fd, &sb) < 0) {
            rc = fail(err, errsize, RG_SHM_EOS, "cannot open the shm segment %s: %s", s->path,
                      strerror(errno));
            goto out;
        }
        if (sb.st_uid != euid()) {
            rc = fail(err, errsize, RG_SHM_EPERM,
                      "the shm segment %s belongs to another user (uid %u; this process runs as "
                      "uid %u): every process sharing shm://%s must run as one user. Run this one "
                      "as uid %u, or use another NAME (or remove it as its owner: rm %s)",
                      s->path, (unsigned)sb.st_uid, euid(), name,
                      (unsigned)sb.st_uid, s->path);
            goto out;
        }
        if (sb.st_mode & 077) {
            rc = fail(err, errsize, RG_SHM_EPERM,
                      "the shm segment %s is open to other users (mode %04o; rategate makes it "
                      "0600): it was not made by rategate, or its mode was changed. Remove it "
                      "(rm %s, or rategate.shm_unlink(\"%s\")) and start again",
                      s->path, (unsigned)(sb.st_mode & 07777), s->path, name);
            goto out;
        }
        if (sb.st_size >= (off_t)HEADER_SIZE) {
            base = mmap(NULL, HEADER_SIZE, PROT_READ, MAP_SHARED, fd, 0);
            if (base == MAP_FAILED) {
                rc = fail(err, errsize, RG_SHM_EOS, "cannot map the shm segment %s: %s",
                          s->path, strerror(errno));
                goto out;
            }
            h = (rg_shm_header *)base;
            magic = __atomic_load_n(&h->magic, __ATOMIC_ACQUIRE);
            if (magic == RG_SHM_MAGIC)
                break;
            munmap(base, HEADER_SIZE);
            h = NULL;
            if (magic != 0) {
                rc = fail(err, errsize, RG_SHM_ELAYOUT,
                          "the shm segment %s is not a rategate segment (it starts with "
                          "0x%016llx): something else made a file of that name. Use another "
                          "NAME, or remove it (rm %s) if nothing needs it",
                          s->path, (unsigned long long)magic, s->path);
                goto out;
            }
        }
        if (rg_now_ns() > deadline) {
            rc = fail(err, errsize, RG_SHM_ELAYOUT,
                      "the shm segment %s was never initialised (%lld bytes, no header after "
                      "%d s): the process creating it died, or it is not rategate's. Remove it "
                      "(rm %s, or rategate.shm_unlink(\"%s\")) and start again",
                      s->path, (long long)sb.st_size, (int)(OPEN_WAIT_NS / 1000000000u), s->path,
                      name);
            goto out;
        }
        {
            struct timespec ms = {0, 1000000};
            nanosleep(&ms, NULL);
        }
    }
    if (h->version != RG_SHM_VERSION) {
        rc = fail(err, errsize, RG_SHM_ELAYOUT,
                  "the shm segment %s was made by another version of rategate (layout version "
                  "%u; this one reads version %u): stop the processes using it, remove it (rm %s, "
                  "or rategate.shm_unlink(\"%s\")), and start them again",
                  s->path, h->version, RG_SHM_VERSION, s->path, name);
        goto out;
    }
    if (h->header_size != HEADER_SIZE || h->stripe_size != sizeof(rg_shm_stripe) ||
        h->set_size != sizeof(rg_shm_set) || h->entry_size != sizeof(rg_shm_entry) ||
        h->mutex_size != sizeof(pthread_mutex_t) || h->ways != W || h->kmax != RG_SHM_KMAX ||
        h->jmax != RG_SHM_JMAX) {
        rc = fail(err, errsize, RG_SHM_ELAYOUT,
                  "the shm segment %s has a layout this build of rategate cannot read (sizes "
                  "%u/%u/%u/%u/%u, expected %u/%u/%u/%u/%u: a build for another platform or "
                  "C library made it): give each build its own NAME, or remove it (rm %s)",
                  s->path, h->header_size, h->stripe_size, h->set_size, h->entry_size,
                  h->mutex_size, HEADER_SIZE, (unsigned)sizeof(rg_shm_stripe),
                  (unsigned)sizeof(rg_shm_set), (unsigned)sizeof(rg_shm_entry),
                  (unsigned)sizeof(pthread_mutex_t), s->path);
        goto out;
    }
    /* Every number the mapping is computed from, checked before use. */
    layout_of(h->nstripes, h->sets_per_stripe, &L);
    if (h->nstripes < 1 || h->nstripes > RG_SHM_MAX_STRIPES ||
        (h->nstripes & (h->nstripes - 1)) != 0 || h->sets_per_stripe < 1 ||
        h->sets_per_stripe > (1ULL << 32) || h->capacity < 1 ||
        h->capacity > RG_SHM_MAX_CAPACITY || L.total != h->total_size ||
        L.stripes_off != h->stripes_off || L.sets_off != h->sets_off ||
        L.entries_off != h->entries_off || (uint64_t)sb.st_size < L.total) {
        rc = fail(err, errsize, RG_SHM_ELAYOUT,
                  "the shm segment %s is damaged (its header does not add up, or the file is "
                  "%lld bytes, short of its %llu): remove it (rm %s) and start again",
                  s->path, (long long)sb.st_size, (unsigned long long)h->total_size, s->path);
        goto out;
    }
    if (capacity != 0 && capacity != h->capacity) {
        rc = fail(err, errsize, RG_SHM_EOPT,
                  "the shm segment %s was created with capacity=%llu, and this Limiter asks "
                  "for capacity=%llu: give the same (or leave capacity out to use the "
                  "segment's), or remove the segment (rategate.shm_unlink(\"%s\")) once no "
                  "process uses it, to make it anew",
                  s->path, (unsigned long long)h->capacity, (unsigned long long)capacity, name);
        goto out;
    }
    munmap(h, HEADER_SIZE);
    h = NULL;
    base = mmap(NULL, L.total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        rc = fail(err, errsize, RG_SHM_EOS, "cannot map the shm segment %s: %s", s->path,
                  strerror(errno));
        goto out;
    }
    map(s, base, L.total);
    rc = 0;
out:
    if (h != NULL)
        munmap(h, HEADER_SIZE);
    close(fd);
    return rc;
}

int
rg_shm_open(rg_shm *s, const char *name, uint64_t capacity, char *err, size_t errsize)
{
    char shmname[16 + RG_SHM_NAME_MAX];
    int attempt;

    memset(s, 0, sizeof(*s));
    if (rg_shm_name(name, shmname, sizeof(shmname)) < 0)
        return fail(err, errsize, RG_SHM_EOPT,
                    "bad shm name %.120s: 1 to %d letters, digits, '.', '_' or '-', starting "
                    "with a letter or digit",
                    name, RG_SHM_NAME_MAX);
    if (capacity > RG_SHM_MAX_CAPACITY)
        return fail(err, errsize, RG_SHM_EOPT, "capacity must be from 1 to %llu, got %llu",
                    RG_SHM_MAX_CAPACITY, (unsigned long long)capacity);
    snprintf(s->path, sizeof(s->path), "/dev/shm%s", shmname);
    /* Create it, or open it; a segment removed in between is created. */
    for (attempt = 0; attempt < 100; attempt++) {
        int fd = shm_open(shmname, O_RDWR | O_CREAT | O_EXCL, 0600);
        if (fd >= 0)
            return create(s, fd, shmname, name, capacity ? capacity : RG_SHM_DEFAULT_CAPACITY,
                          err, errsize);
        if (errno != EEXIST)
            return fail(err, errsize, RG_SHM_EOS, "cannot create the shm segment %s: %s",
                        s->path, strerror(errno));
        fd = shm_open(shmname, O_RDWR, 0);
        if (fd >= 0)
            return attach(s, fd, name, capacity, err, errsize);
        if (errno == EACCES) {
            struct stat sb;
            int owner = stat(s->path, &sb) == 0 ? (int)sb.st_uid : -1;
            errno = EACCES;
            return fail(err, errsize, RG_SHM_EPERM,
                        "the shm segment %s belongs to another user (uid %d; this process runs "
                        "as uid %u): every process sharing shm://%s must run as one user. Run "
                        "this one as uid %d, or use another NAME",
                        s->path, owner, (unsigned)geteuid(), name, owner);
        }
        if (errno != ENOENT)
            return fail(err, errsize, RG_SHM_EOS, "cannot open the shm segment %s: %s", s->path,
                        strerror(errno));
    }
    return fail(err, errsize, RG_SHM_EOS,
                "cannot open the shm segment %s: it keeps disappearing (removed as fast as it is "
                "made?)",
                s->path);
}

void
rg_shm_close(rg_shm *s)
{
    if (s->base != NULL)
        munmap(s->base, s->size);
    s->base = NULL;
}

int
rg_shm_unlink(const char *name)
{
    char shmname[16 + RG_SHM_NAME_MAX];
    if (rg_shm_name(name, shmname, sizeof(shmname)) < 0) {
        errno = EINVAL;
        return -1;
    }
    if (shm_unlink(shmname) == 0)
        return 1;
    return errno == ENOENT ? 0 : -1;
}
