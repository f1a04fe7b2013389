/*
 * port.c: see port.h.
 */
#include "port.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

rg_port *
rg_port_new(void)
{
    rg_port *p = calloc(1, sizeof(*p));
    if (p == NULL)
        return NULL;
    p->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (p->efd < 0) {
        int e = errno;
        free(p);
        errno = e;
        return NULL;
    }
    if (pthread_mutex_init(&p->mu, NULL) != 0) {
        close(p->efd);
        free(p);
        errno = ENOMEM;
        return NULL;
    }
    atomic_init(&p->refcnt, 1);
    atomic_fetch_add_explicit(&rg_live_ports, 1, memory_order_relaxed);
    return p;
}

void
rg_port_incref(rg_port *p)
{
    atomic_fetch_add_explicit(&p->refcnt, 1, memory_order_relaxed);
}

void
rg_port_decref(rg_port *p)
{
    if (atomic_fetch_sub_explicit(&p->refcnt, 1, memory_order_acq_rel) != 1)
        return;
    /* Last reference: nobody can push any more, and Python closed us first
     * (it holds a reference until rg_port_close), so the list is empty. */
    close(p->efd);
    pthread_mutex_destroy(&p->mu);
    atomic_fetch_sub_explicit(&rg_live_ports, 1, memory_order_relaxed);
    free(p);
}

int
rg_port_push(rg_port *p, rg_check *head, rg_check *tail, atomic_long *wakeups)
{
    int wake = 0;

    tail->next = NULL;
    pthread_mutex_lock(&p->mu);
    if (p->closed) {
        pthread_mutex_unlock(&p->mu);
        /* Nobody will read these: free them here.  Freeing drops each
         * check's port reference, possibly the last, so unlock first. */
        while (head != NULL) {
            rg_check *next = head->next;
            rg_check_free(head);
            head = next;
        }
        return 0;
    }
    if (p->tail != NULL)
        p->tail->next = head;
    else
        p->head = head;
    p->tail = tail;
    if (!p->signalled) {
        p->signalled = 1;
        wake = 1;
        /* Counted under the lock: the Python thread this write wakes takes
         * the lock before it resolves anything, so it never reads a count
         * without this wake-up (test_spin counts them per check). */
        if (wakeups != NULL)
            atomic_fetch_add_explicit(wakeups, 1, memory_order_relaxed);
        /* Once unlocked, Python may take these checks, free them (dropping
         * their references) and shut the port down, closing the eventfd:
         * our own reference keeps the port and its fd alive for the write. */
        rg_port_incref(p);
    }
    pthread_mutex_unlock(&p->mu);

    if (wake) {
        uint64_t one = 1;
        /* EAGAIN only if the counter is saturated, which means a wake-up is
         * pending anyway; nothing else can fail on a live eventfd. */
        ssize_t r = write(p->efd, &one, sizeof(one));
        (void)r;
        rg_port_decref(p); /* possibly the last: closes the fd after us */
    }
    return wake;
}

rg_check *
rg_port_take(rg_port *p)
{
    uint64_t v;
    rg_check *head;

    /* Read before taking: a push racing with us either lands in this take
     * (it saw signalled == 1 and wrote nothing) or writes after it. */
    ssize_t r = read(p->efd, &v, sizeof(v));
    (void)r;
    pthread_mutex_lock(&p->mu);
    head = p->head;
    p->head = p->tail = NULL;
    p->signalled = 0;
    pthread_mutex_unlock(&p->mu);
    return head;
}

rg_check *
rg_port_close(rg_port *p)
{
    rg_check *head;

    pthread_mutex_lock(&p->mu);
    p->closed = 1;
    head = p->head;
    p->head = p->tail = NULL;
    pthread_mutex_unlock(&p->mu);
    return head;
}
