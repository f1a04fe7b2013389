/*
 * port.h: where finished checks go back to one asyncio event loop.
 *
 * A port is a mutex-protected list of finished checks plus an eventfd that
 * the event loop watches (loop.add_reader).  Loop threads push; the Python
 * thread drains.  The eventfd is written once per batch of completions: a
 * push onto a port already signalled since its last drain writes nothing, so
 * many completions cost one wake-up.  The port is reference counted (atomic)
 * because checks in flight keep it alive after Python has let go of it; the
 * eventfd is closed with the last reference, never while a loop thread may
 * still write to it.
 */
#ifndef RG_PORT_H
#define RG_PORT_H

#include <pthread.h>
#include <stdatomic.h>

#include "check.h"

typedef struct rg_port {
    atomic_int refcnt;
    pthread_mutex_t mu;
    rg_check *head, *tail; /* finished checks, in push order */
    int signalled;         /* eventfd written since the last take */
    int closed;            /* Python has let go: free pushed checks at once */
    int efd;
} rg_port;

/* A new port with one reference; NULL with errno set on failure. */
rg_port *rg_port_new(void);
void rg_port_incref(rg_port *p);
void rg_port_decref(rg_port *p);
/* Append a chain of finished checks (linked by ->next); any thread.  It holds
 * its own reference across the eventfd write, so a port that Python shuts
 * down meanwhile keeps its fd open (and unreused) until the write is done.
 * Returns 1 if it wrote the eventfd (a wake-up of asyncio), else 0; a
 * wake-up is counted in *wakeups (may be NULL) BEFORE the write, so that
 * Python, woken by it, never reads a count that lacks it. */
int rg_port_push(rg_port *p, rg_check *head, rg_check *tail, atomic_long *wakeups);
/* Clear the eventfd and take every finished check (Python thread). */
rg_check *rg_port_take(rg_port *p);
/* Python has let go: later pushes are freed, queued ones returned to free. */
rg_check *rg_port_close(rg_port *p);

#endif
