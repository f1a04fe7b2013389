/*
 * shmstore.h: shm://NAME, the buckets of every process of one host (same
 * user) in one POSIX shared memory segment, decided in the caller's thread.
 * The design, why it is exact, and what a killed process can cost: the
 * comment at the top of shmstore.c.
 *
 * No Python here (tests/test_thread_boundary.py): pylocal.c is the Python
 * type over it, and calls it with the GIL held.  Nothing in an rg_shm is
 * per thread; everything per process is in the rg_shm itself (a mapping is
 * inherited across fork() and keeps working in the child).
 */
#ifndef RG_SHMSTORE_H
#define RG_SHMSTORE_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "check.h"

/* "RGATSHM1" read as a little-endian integer: the first 8 bytes of a
 * segment, written last by its creator (0 until it is initialised). */
#define RG_SHM_MAGIC 0x314d485354414752ULL
/* Bumped whenever anything below changes how a segment is laid out or read. */
#define RG_SHM_VERSION 1u

#define RG_SHM_WAYS 16          /* entries per set; an entry may live in 3 sets */
#define RG_SHM_KMAX 172         /* key bytes stored as they are */
#define RG_SHM_KHEAD 140        /* of a longer key: its first bytes, then its SHA-256 */
#define RG_SHM_IDMAX 48         /* a rate's key_id (< 48), "c", or a slot id */
#define RG_SHM_SIDMAX 48        /* slot ids longer than this are stored as their SHA-256 */
#define RG_SHM_JMAX 32          /* the writes of one operation, journaled */
#define RG_SHM_MAX_STRIPES 64
#define RG_SHM_NAME_MAX 100     /* NAME of shm://NAME, bytes */
#define RG_SHM_DEFAULT_CAPACITY 65536
#define RG_SHM_MAX_CAPACITY 100000000ULL

/* Results of the operations (0: done). */
enum {
    RG_SHM_OK = 0,
    RG_SHM_FULL = 1,    /* no room for a new bucket: every entry it may use is live */
    RG_SHM_TIMEOUT = 2, /* the stripe's lock was not had within the timeout */
    RG_SHM_BROKEN = 3,  /* the lock cannot be used (ENOTRECOVERABLE, ...) */
};

/* Why rg_shm_open failed: the error class pylocal.c raises. */
enum {
    RG_SHM_EOS = 1,     /* a system call failed: errno says which (OSError) */
    RG_SHM_EPERM,       /* another user's segment, or open to others (PermissionError) */
    RG_SHM_ELAYOUT,     /* not a rategate segment, another version or layout (ValueError) */
    RG_SHM_EOPT,        /* an option disagrees with the existing segment (ValueError) */
};

/* One page at offset 0.  Every field but the counters is written once, by
 * the creator, before `magic`; the counters are updated with atomics. */
typedef struct rg_shm_header {
    uint64_t magic;
    uint32_t version;
    uint32_t header_size;
    uint32_t stripe_size, set_size, entry_size, mutex_size;
    uint32_t ways, kmax, jmax, nstripes;
    uint64_t sets_per_stripe;
    uint64_t capacity;      /* as asked when it was created */
    uint64_t total_size;
    uint64_t stripes_off, sets_off, entries_off;
    uint64_t seed[2];       /* the hash key, random per segment */
    uint64_t t0_ns;         /* CLOCK_MONOTONIC at creation: the origin of every time */
    uint32_t creator_uid, creator_pid;
    /* counters for every process (atomic, relaxed) */
    uint64_t full;          /* checks that found no room (overloaded) */
    uint64_t recovered;     /* locks taken over from a process that died holding them */
    uint64_t evicted;       /* entries of full buckets reused for new ones */
    uint64_t waits;         /* operations that found their stripe's lock held */
} rg_shm_header;

/* The journal of a stripe: the writes of the operation in progress, for
 * whoever takes the lock over if its holder dies (see shmstore.c). */
typedef struct rg_shm_jw {
    uint64_t off;  /* from the segment's start */
    uint64_t val;
    uint32_t size; /* 4 or 8 */
    uint32_t pad;
} rg_shm_jw;

typedef struct rg_shm_stripe {
    pthread_mutex_t mu; /* robust, process-shared */
    uint32_t jstate;    /* 1: the journal is committed and may be half applied */
    uint32_t jn;
    rg_shm_jw j[RG_SHM_JMAX];
} __attribute__((aligned(64))) rg_shm_stripe;

/* The index of RG_SHM_WAYS entries: a fingerprint (0: free) and the time
 * the entry becomes worthless (a rate: its TAT; a concurrency set: its
 * latest slot expiry; a slot: its expiry), microseconds since t0_ns. */
typedef struct rg_shm_set {
    uint32_t fp[RG_SHM_WAYS];
    double exp[RG_SHM_WAYS];
} __attribute__((aligned(64))) rg_shm_set;

enum { RG_SHM_RATE = 1, RG_SHM_HEAD = 2, RG_SHM_SLOT = 3 };
#define RG_SHM_KHASHED 1 /* k is the key's first RG_SHM_KHEAD bytes + its SHA-256 */
#define RG_SHM_IDHASHED 2 /* id is the slot id's SHA-256 */

/* What an entry is: (kind, key, id), compared in full.  256 bytes. */
typedef struct rg_shm_entry {
    uint64_t kh;     /* hash of the stored key (scans compare it first) */
    double minexp;   /* a concurrency set: no counted slot expires before */
    uint64_t n;      /* a concurrency set: slots counted (see shmstore.c) */
    uint32_t kfull;  /* the key's length as given */
    uint16_t klen;   /* bytes in k */
    uint8_t kind, flags, idlen;
    uint8_t pad[3];
    char id[RG_SHM_IDMAX];
    char k[RG_SHM_KMAX];
} rg_shm_entry;

/* One process's view of a segment (a mapping). */
typedef struct rg_shm {
    char *base;             /* NULL: closed */
    size_t size;
    rg_shm_header *hdr;
    rg_shm_stripe *stripes;
    rg_shm_set *sets;
    rg_shm_entry *entries;
    uint32_t nstripes;
    uint64_t sps;           /* sets per stripe */
    char path[32 + RG_SHM_NAME_MAX]; /* /dev/shm/rategate.NAME, for messages */
    /* fault injection for the crash tests (0: off): spin this long at each
     * of the three points of a journaled write; or stop for good at point
     * `hang` (1: before the commit, 2: committed, 3: half applied). */
    uint64_t test_hold_ns;
    int test_hang;
} rg_shm;

/* For the tests of the owner check when they cannot run as another user:
 * the euid a segment's owner is compared with (-1: geteuid()). */
extern long rg_shm_test_euid;

/* The shm_open name of NAME ("/rategate.NAME"); 0, or -1 if NAME is not
 * 1 to RG_SHM_NAME_MAX of [A-Za-z0-9._-] starting with a letter or digit. */
int rg_shm_name(const char *name, char *out, size_t outsize);

/*
 * Open (or create) the segment of NAME.  capacity 0: the existing
 * segment's, or RG_SHM_DEFAULT_CAPACITY for a new one; otherwise an
 * existing segment must have been made with the same.  0, or an RG_SHM_E*
 * with a message in err (naming the segment's file and the fix); errno is
 * kept for RG_SHM_EOS.
 */
int rg_shm_open(rg_shm *s, const char *name, uint64_t capacity, char *err, size_t errsize);
void rg_shm_close(rg_shm *s);
/* Remove NAME's segment: 1 removed, 0 there was none, -1 (errno). */
int rg_shm_unlink(const char *name);

/* The live buckets' share of memory: bytes of the segment for `capacity`. */
uint64_t rg_shm_size_for(uint64_t capacity);

/*
 * One check, as memstore's rg_memstore_op: op RG_OP_HIT (with the spec's
 * concurrency limit, take slot `sid`), RG_OP_CHARGE or RG_OP_RELEASE.
 * timeout_ns bounds the wait for the stripe's lock.  RG_SHM_OK with *out
 * set, or RG_SHM_FULL / RG_SHM_TIMEOUT / RG_SHM_BROKEN (nothing consumed).
 */
int rg_shm_op(rg_shm *s, int op, const rg_spec *spec, const char *key, size_t keylen,
              const char *sid, size_t sidlen, int64_t cost, uint64_t timeout_ns,
              rg_result *out);
/* Forget the key's buckets for the spec's rates (reset). */
int rg_shm_delete(rg_shm *s, const rg_spec *spec, const char *key, size_t keylen,
                  uint64_t timeout_ns);
/* Remove every entry; *count: the live buckets and concurrency sets that went. */
int rg_shm_clear(rg_shm *s, uint64_t timeout_ns, uint64_t *count);

/* A live entry, as entries() lists it. */
typedef struct rg_shm_item {
    double value;    /* a rate: us until full; a set: live slots */
    uint16_t klen;
    uint8_t idlen;
    char k[RG_SHM_KMAX];
    char id[RG_SHM_IDMAX];
} rg_shm_item;

/* Every live entry whose key starts with prefix, into *items (malloc'd,
 * *n of them; the caller frees).  A key stored hashed (longer than
 * RG_SHM_KMAX) is listed by its first RG_SHM_KHEAD bytes. */
int rg_shm_entries(rg_shm *s, const char *prefix, size_t plen, uint64_t timeout_ns,
                   rg_shm_item **items, size_t *n);

typedef struct rg_shm_info {
    uint64_t capacity, slots, live, full, recovered, evicted, waits, bytes;
    uint32_t nstripes;
} rg_shm_info;
/* A snapshot without locks (counts may be a moment old). */
void rg_shm_info_get(rg_shm *s, rg_shm_info *out);

#endif
