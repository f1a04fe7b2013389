/*
 * check.c: allocation of checks and specs (see check.h).
 */
#include "check.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "port.h"

atomic_long rg_live_checks;
atomic_long rg_live_ports;

void
rg_spec_decref(rg_spec *s)
{
    if (atomic_fetch_sub_explicit(&s->refcnt, 1, memory_order_acq_rel) == 1)
        free(s);
}

rg_check *
rg_check_new(const char *key, size_t keylen)
{
    rg_check *c = malloc(sizeof(*c) + keylen);
    if (c == NULL)
        return NULL;
    memset(c, 0, sizeof(*c));
    atomic_fetch_add_explicit(&rg_live_checks, 1, memory_order_relaxed);
    memcpy(c->key, key, keylen);
    c->keylen = (uint32_t)keylen;
    return c;
}

void
rg_check_free(rg_check *c)
{
    if (c->spec != NULL)
        rg_spec_decref(c->spec);
    if (c->port != NULL)
        rg_port_decref(c->port);
    atomic_fetch_sub_explicit(&rg_live_checks, 1, memory_order_relaxed);
    free(c);
}

uint64_t
rg_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}
