/*
 * check.c: allocation of checks and specs (see check.h).
 */
#include "check.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "port.h"

atomic_long rg_live_checks;
atomic_long rg_live_ports;
atomic_long rg_live_conns;

void
rg_spec_decref(rg_spec *s)
{
    if (atomic_fetch_sub_explicit(&s->refcnt, 1, memory_order_acq_rel) == 1)
        free(s);
}

rg_check *
rg_check_new(const char *key, size_t keylen, const char *sid, size_t sidlen)
{
    rg_check *c = malloc(sizeof(*c) + keylen + sidlen);
    if (c == NULL)
        return NULL;
    memset(c, 0, sizeof(*c));
    atomic_fetch_add_explicit(&rg_live_checks, 1, memory_order_relaxed);
    memcpy(c->key, key, keylen);
    c->keylen = (uint32_t)keylen;
    if (sidlen > 0)
        memcpy(c->key + keylen, sid, sidlen);
    c->sidlen = (uint32_t)sidlen;
    return c;
}

/* What r holds (its string, its elements), not r itself.  The depth is
 * bounded by hiredis's reader (nested arrays of depth 7 at most). */
static void
reply_clear(rg_reply *r)
{
    size_t i;

    free(r->str);
    for (i = 0; i < r->n; i++)
        reply_clear(&r->elem[i]);
    free(r->elem);
}

void
rg_reply_free(rg_reply *r)
{
    if (r == NULL)
        return;
    reply_clear(r);
    free(r);
}

void
rg_cmd_free(rg_cmd *cmd)
{
    if (cmd == NULL)
        return;
    free(cmd->resp);
    free(cmd->node);
    rg_reply_free(cmd->reply);
    if (cmd->group != NULL &&
        atomic_fetch_sub_explicit(&cmd->group->refcnt, 1, memory_order_acq_rel) == 1)
        free(cmd->group);
    free(cmd);
}

void
rg_check_free(rg_check *c)
{
    if (c->spec != NULL)
        rg_spec_decref(c->spec);
    if (c->port != NULL)
        rg_port_decref(c->port);
    rg_cmd_free(c->cmd);
    atomic_fetch_sub_explicit(&rg_live_checks, 1, memory_order_relaxed);
    free(c);
}

void
rg_msgf(char *buf, size_t len, const char *f, ...)
{
    va_list ap;
    va_start(ap, f);
    if (vsnprintf(buf, len, f, ap) < 0)
        buf[0] = '\0';
    va_end(ap);
}

uint64_t
rg_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---- fds owned by loop threads (see check.h) ---------------------------- */

#define RG_FD_SLOTS 1024
static atomic_int fd_slots[RG_FD_SLOTS]; /* fd + 1; 0: free */

void
rg_fd_own(int fd)
{
    int i;
    for (i = 0; i < RG_FD_SLOTS; i++) {
        int zero = 0;
        if (atomic_compare_exchange_strong(&fd_slots[i], &zero, fd + 1))
            return;
    }
    /* Full: a child would leak this fd, nothing worse. */
}

void
rg_fd_disown(int fd)
{
    int i;
    for (i = 0; i < RG_FD_SLOTS; i++) {
        int want = fd + 1;
        if (atomic_compare_exchange_strong(&fd_slots[i], &want, 0))
            return;
    }
}

/* In the child: the parent's loop threads do not exist here; close what
 * they owned (async-signal-safe: close() and atomics only). */
static void
fd_child(void)
{
    int i;
    for (i = 0; i < RG_FD_SLOTS; i++) {
        int v = atomic_exchange(&fd_slots[i], 0);
        if (v != 0)
            close(v - 1);
    }
}

static pthread_once_t fd_once = PTHREAD_ONCE_INIT;

static void
fd_install(void)
{
    pthread_atfork(NULL, NULL, fd_child);
}

void
rg_fd_install_atfork(void)
{
    pthread_once(&fd_once, fd_install);
}
