/*
 * redis.h: the shard's hiredis async connection (loop thread only).
 *
 * Connect (TCP or unix socket), AUTH / SELECT / SCRIPT LOAD pipelined behind
 * the connect, then READY.  A connect or handshake that does not finish in
 * connect_timeout, a dropped connection, or a connection silent past
 * stall_ns with replies owed, tears it down; reconnects follow with
 * exponential backoff (10 ms doubling to 500 ms, with jitter).
 *
 * hiredis 0.14's own libuv adapter ignores poll errors, so a refused connect
 * would never be reported; rg_attach() is our adapter, which hands errors to
 * hiredis and flushes finished checks once per batch of replies.
 */
#ifndef RG_REDIS_H
#define RG_REDIS_H

#include "engine.h"

void rg_conn_start(rg_shard *s);
/* Free the context now (not from inside a hiredis callback). */
void rg_conn_drop(rg_shard *s, int err);
/* Send checks[0..n) as one script call; they are already on s->sent. */
void rg_conn_send(rg_shard *s, rg_check **checks, int n);
void rg_conn_timer_cb(uv_timer_t *t);

#endif
