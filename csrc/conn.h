/*
 * conn.h: one connection to one Redis server (loop thread only).
 *
 * libuv owns the socket (uv_tcp_t or uv_pipe_t), hostnames are resolved on
 * libuv's thread pool (never on the loop thread), bytes read go into our
 * buffer and through hiredis's redisReader (hiredis is the RESP codec only),
 * and with TLS through OpenSSL's memory BIOs in between.  The handshake
 * (AUTH [user] pass, SELECT db, SCRIPT LOAD, ROLE) is pipelined behind the
 * connect and bounded, with resolution, by connect_timeout.  Every TCP
 * connection has keepalive on, so a peer that vanished is found even while
 * nothing is owed.
 *
 * The connection knows nothing of shards, checks or batches.  Its owner
 * sends whole commands (already in RESP) each with an opaque `priv`, and
 * learns what happened through the callbacks it registered (rg_conn_ops):
 * the connection keeps the privs in a FIFO and hands each back with its
 * reply, in order.  One owner may hold any number of connections.
 *
 * The TLS context (SSL_CTX) is made once on the Python thread when the
 * engine is built (rg_tls_ctx_new), so bad files are a ValueError there;
 * loop threads only make SSL objects from it (OpenSSL >= 1.1 makes that
 * safe without locks of ours).
 */
#ifndef RG_CONN_H
#define RG_CONN_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

struct redisReply;
struct ssl_ctx_st;
struct ssl_session_st;

/*
 * What the connections to one server remember from one to the next: the
 * TLS session to resume (no full handshake on a reconnect or a map
 * refresh), and whether one ever became ready (a port once reached in
 * plain is no TLS port: no "use rediss://" hint when it drops).  The
 * owner's, on its loop thread; emptied with rg_conn_memo_clear.
 */
typedef struct rg_conn_memo {
    struct ssl_session_st *session;
    int ready;
} rg_conn_memo;

void rg_conn_memo_clear(rg_conn_memo *m);

/* Where and how to connect; owned by the caller, read-only, and must
 * outlive every connection made from it. */
typedef struct rg_conn_cfg {
    const char *host;       /* TCP host name or address, or NULL */
    int port;
    const char *path;       /* unix socket path, or NULL */
    const char *username;   /* ACL user (Redis 6+), or NULL */
    size_t username_len;
    const char *password;   /* or NULL: no AUTH */
    size_t password_len;
    int db;                 /* 0: no SELECT */
    const char *script;     /* SCRIPT LOAD'ed in the handshake; its SHA goes to ready() */
    size_t script_len;
    uint64_t connect_timeout_ns;  /* resolve + connect + TLS + handshake */
    struct ssl_ctx_st *tls;       /* NULL: plain */
    int tls_check_hostname;       /* verify the name (or IP) against the certificate */
    unsigned resolve_delay_ms;    /* tests only: hold resolution this long */
    int check_role;               /* ROLE in the handshake: a server not a master fails it */
    rg_conn_memo *memo;           /* or NULL: nothing remembered */
} rg_conn_cfg;

typedef struct rg_conn rg_conn;

/*
 * The owner's callbacks; every one runs on the loop thread, from inside a
 * libuv callback of the connection (never from inside an rg_conn_* call,
 * except reply(NULL) from rg_conn_close).
 *
 * ready(owner, c, sha): the handshake is done; commands may be sent.
 * reply(owner, c, priv, r): the reply to the command sent with priv.  r is
 *     NULL when no reply will come (the connection is lost or closed); r is
 *     freed when the callback returns.  The owner may call rg_conn_send or
 *     rg_conn_close from here.
 * lost(owner, c, was_ready, why): the connection failed (before ready: the
 *     connect or handshake failed; after: it dropped).  Called first, then
 *     reply(NULL) for every command still owed, in order; c is freed after
 *     those, so the owner forgets it here.  `why` names the cause for a
 *     person ("connect failed: 127.0.0.1:6390: connection refused").
 * settle(owner): the end of an event that ran callbacks (one read may carry
 *     many replies): the place to flush finished work once.
 * push(owner, c, r): optional (NULL: such a reply is a protocol error): a
 *     reply that arrived with no command owed, i.e. a pub/sub message on a
 *     subscribed connection.  r is freed when the callback returns; the
 *     owner may call rg_conn_close from here.
 */
typedef struct rg_conn_ops {
    void (*ready)(void *owner, rg_conn *c, const char *sha);
    void (*reply)(void *owner, rg_conn *c, void *priv, struct redisReply *r);
    void (*lost)(void *owner, rg_conn *c, int was_ready, const char *why);
    void (*settle)(void *owner);
    void (*push)(void *owner, rg_conn *c, struct redisReply *r);
} rg_conn_ops;

/* A growable byte buffer (a command being written). */
typedef struct rg_buf {
    char *p;
    size_t len, cap;
} rg_buf;

int rg_buf_reserve(rg_buf *b, size_t more);
void rg_buf_free(rg_buf *b);
/* RESP writers; the buffer must have been reserved for them (see batch.c). */
void rg_resp_header(rg_buf *b, char c, size_t n); /* "$<n>\r\n", "*<n>\r\n" */
void rg_resp_array(rg_buf *b, size_t n);
void rg_resp_bulk(rg_buf *b, const char *s, size_t n);
void rg_resp_bulk_int(rg_buf *b, long long v);
/* Bytes rg_resp_bulk needs at most for n bytes of payload. */
#define RG_RESP_BULK_MAX(n) ((n) + 32)

/*
 * Start connecting; NULL (with a reason in err) if that could not even
 * begin.  Otherwise exactly one of ready() or lost() follows, later.
 */
rg_conn *rg_conn_open(uv_loop_t *loop, const rg_conn_cfg *cfg, const rg_conn_ops *ops,
                      void *owner, char *err, size_t errlen);
/*
 * Send one command, already in RESP, whose reply goes to reply(priv).  The
 * connection takes cmd's memory (cmd is emptied) whatever the outcome.
 * Only after ready().  -1 if the connection cannot take it (closing, out of
 * memory): then priv is not kept and no callback will name it.
 */
int rg_conn_send(rg_conn *c, rg_buf *cmd, void *priv);
/* The owner lets go: reply(NULL) for every command owed, before this
 * returns; no lost(), no settle(); c is invalid after. */
void rg_conn_close(rg_conn *c);
/* Commands sent and not yet answered. */
size_t rg_conn_owed(const rg_conn *c);

/* Build the TLS context on the Python thread.  NULL with a message naming
 * the option and file in err on failure.  verify: ssl_cert_reqs=required. */
struct ssl_ctx_st *rg_tls_ctx_new(const char *ca_certs, const char *certfile,
                                  const char *keyfile, int verify, char *err, size_t errlen);
void rg_tls_ctx_free(struct ssl_ctx_st *ctx);

#endif
