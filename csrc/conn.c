/*
 * conn.c: one connection to one Redis server (see conn.h).  Loop thread
 * only, except rg_tls_ctx_new/free (the Python thread, at engine build and
 * free) and the resolver's work function (libuv's thread pool, touching only
 * its own request).
 */
#include "conn.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
#include <hiredis/hiredis.h>
#include <hiredis/read.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "check.h"

#define RG_READ_CHUNK 65536
#define RG_TLS_CHUNK 16384 /* a TLS record's plaintext */

enum conn_state {
    CS_RESOLVING,  /* host name on the thread pool */
    CS_CONNECTING, /* uv_tcp_connect / uv_pipe_connect */
    CS_HELLO,      /* TLS handshake and/or AUTH/SELECT/SCRIPT LOAD owed */
    CS_READY,
    CS_CLOSED,     /* lost or closed: no more callbacks; freed when handles close */
};

/* A resolution in flight.  It outlives the connection when the connection
 * gives up first (a resolver that does not answer cannot be interrupted):
 * `conn` is then NULL and the request frees itself when done. */
typedef struct resolve_req {
    uv_work_t work;
    struct rg_conn *conn;
    unsigned delay_ms;
    int port;
    int err;               /* getaddrinfo's */
    int sys_errno;         /* errno, for EAI_SYSTEM */
    struct addrinfo *ai;
    char host[];
} resolve_req;

typedef struct write_req {
    uv_write_t req;
    uv_buf_t buf;
    rg_conn *conn;
} write_req;

struct rg_conn {
    uv_loop_t *loop;
    const rg_conn_cfg *cfg;
    const rg_conn_ops *ops;
    void *owner;
    int state;
    int ever_ready;
    int handles;             /* initialised handles still to close */
    union {
        uv_handle_t handle;
        uv_stream_t stream;
        uv_tcp_t tcp;
        uv_pipe_t pipe;
    } h;
    int h_init;
    uv_connect_t connect_req;
    uv_timer_t timer;        /* connect timeout */
    resolve_req *resolving;
    struct addrinfo *ai, *ai_next; /* the name's addresses; the next to try */
    redisReader *reader;
    int hello_left;          /* handshake replies still owed (they come first) */
    int hello_script;        /* hello_left when the SCRIPT LOAD / PING reply comes */
    int got_bytes;           /* anything was read (for the TLS hint of a failure) */
    unsigned char first_byte; /* the first byte read */
    char sha[41];
    /* TLS: SSL reads network bytes from rbio and writes them to wbio. */
    SSL *ssl;
    BIO *rbio, *wbio;
    int tls_done;            /* the TLS handshake finished */
    rg_buf pending;          /* plaintext held until the TLS handshake is done */
    rg_buf out;              /* plain: bytes for the socket at the end of the turn */
    uv_prepare_t flusher;    /* writes them (flush_cb) */
    /* privs of the commands owed, a ring */
    void **fifo;
    size_t fhead, fcount, fcap;
    char addr[300];          /* "host:port" or the socket path, for messages */
    char why[400];           /* a failure to report from the timer (fail_later) */
    char rbuf[RG_READ_CHUNK];
};

/* ---- buffers and RESP ------------------------------------------------------- */

int
rg_buf_reserve(rg_buf *b, size_t more)
{
    size_t cap;
    char *p;

    if (b->len + more <= b->cap)
        return 0;
    cap = b->cap ? b->cap : 256;
    while (cap < b->len + more)
        cap *= 2;
    p = realloc(b->p, cap);
    if (p == NULL)
        return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

void
rg_buf_free(rg_buf *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

/* Decimal digits of v at out (no NUL); their count.  sprintf costs more
 * than the rest of a batch's writing together. */
static size_t
udec(char *out, uint64_t v)
{
    char tmp[20];
    size_t n = 0, i;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v != 0);
    for (i = 0; i < n; i++)
        out[i] = tmp[n - 1 - i];
    return n;
}

/* "<c><n>\r\n": an array or bulk header. */
void
rg_resp_header(rg_buf *b, char c, size_t n)
{
    b->p[b->len++] = c;
    b->len += udec(b->p + b->len, n);
    b->p[b->len++] = '\r';
    b->p[b->len++] = '\n';
}

void
rg_resp_array(rg_buf *b, size_t n)
{
    rg_resp_header(b, '*', n);
}

void
rg_resp_bulk(rg_buf *b, const char *s, size_t n)
{
    rg_resp_header(b, '$', n);
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len++] = '\r';
    b->p[b->len++] = '\n';
}

void
rg_resp_bulk_int(rg_buf *b, long long v)
{
    char tmp[24];
    size_t n = 0;
    if (v < 0)
        tmp[n++] = '-';
    n += udec(tmp + n, v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v);
    rg_resp_bulk(b, tmp, n);
}

/* ---- the privs FIFO ------------------------------------------------------------ */

static int
fifo_push(rg_conn *c, void *priv)
{
    if (c->fcount == c->fcap) {
        size_t cap = c->fcap ? c->fcap * 2 : 16, i;
        void **f = malloc(cap * sizeof(*f));
        if (f == NULL)
            return -1;
        for (i = 0; i < c->fcount; i++)
            f[i] = c->fifo[(c->fhead + i) % c->fcap];
        free(c->fifo);
        c->fifo = f;
        c->fhead = 0;
        c->fcap = cap;
    }
    c->fifo[(c->fhead + c->fcount) % c->fcap] = priv;
    c->fcount++;
    return 0;
}

static void *
fifo_pop(rg_conn *c)
{
    void *p = c->fifo[c->fhead];
    c->fhead = (c->fhead + 1) % c->fcap;
    c->fcount--;
    return p;
}

size_t
rg_conn_owed(const rg_conn *c)
{
    return c->fcount;
}

/* ---- teardown ---------------------------------------------------------------- */

static void
conn_free(rg_conn *c)
{
    if (c->reader != NULL)
        redisReaderFree(c->reader);
    if (c->ssl != NULL) {
        /* OpenSSL makes the session of a connection that ended without
         * close_notify unresumable (a TLS 1.2-era rule; TLS 1.3 dropped
         * it): a Redis restart or a dropped connection would cost the next
         * connection a full handshake.  Once the handshake was done, the
         * end of the stream says nothing against the session. */
        if (c->tls_done)
            SSL_set_shutdown(c->ssl, SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN);
        SSL_free(c->ssl); /* frees both BIOs */
    }
    rg_buf_free(&c->pending);
    rg_buf_free(&c->out);
    if (c->ai != NULL)
        freeaddrinfo(c->ai);
    free(c->fifo);
    free(c);
    atomic_fetch_sub_explicit(&rg_live_conns, 1, memory_order_relaxed);
}

static void
handle_closed(uv_handle_t *h)
{
    rg_conn *c = h->data;
    if (--c->handles == 0)
        conn_free(c);
}

/* Close the handles (memory freed in their close callbacks) and let go of
 * a resolution still running.  No callback to the owner from here. */
static void
conn_shut(rg_conn *c)
{
    c->state = CS_CLOSED;
    if (c->resolving != NULL) {
        c->resolving->conn = NULL;
        uv_cancel((uv_req_t *)&c->resolving->work); /* may fail: it then frees itself */
        c->resolving = NULL;
    }
    if (c->h_init) {
        int fd;
        if (uv_fileno(&c->h.handle, &fd) == 0)
            rg_fd_disown(fd); /* before libuv closes it: see rg_fd_own */
        uv_close(&c->h.handle, handle_closed);
    }
    uv_close((uv_handle_t *)&c->timer, handle_closed);
    uv_close((uv_handle_t *)&c->flusher, handle_closed);
}

/* Answer every owed command with NULL, in order. */
static void
fail_owed(rg_conn *c)
{
    while (c->fcount > 0)
        c->ops->reply(c->owner, c, fifo_pop(c), NULL);
}

/* TLS close_notify, best effort: written now if the socket takes it at
 * once and nothing is queued before it (a record after a gap would be a
 * bad record, not a goodbye). */
static void
tls_goodbye(rg_conn *c)
{
    char buf[128];
    uv_buf_t b;
    int n;

    if (c->ssl == NULL || !c->tls_done || !c->h_init || c->out.len > 0)
        return;
    ERR_clear_error();
    if (SSL_shutdown(c->ssl) < 0) {
        ERR_clear_error();
        return;
    }
    n = BIO_read(c->wbio, buf, sizeof(buf));
    if (n > 0) {
        b = uv_buf_init(buf, (unsigned int)n);
        (void)uv_try_write(&c->h.stream, &b, 1);
    }
}

void
rg_conn_memo_clear(rg_conn_memo *m)
{
    if (m->session != NULL)
        SSL_SESSION_free(m->session);
    m->session = NULL;
    m->ready = 0;
}

void
rg_conn_close(rg_conn *c)
{
    if (c->state == CS_CLOSED)
        return;
    tls_goodbye(c);
    conn_shut(c);
    fail_owed(c);
}

/* The connection failed: tell the owner once, then answer what is owed. */
static void
conn_lose(rg_conn *c, const char *why)
{
    int was_ready = c->state == CS_READY;

    if (c->state == CS_CLOSED)
        return;
    conn_shut(c);
    c->ops->lost(c->owner, c, was_ready, why);
    fail_owed(c);
}

static void
conn_losef(rg_conn *c, const char *fmt, const char *a, const char *b)
{
    char why[512];
    rg_msgf(why, sizeof(why), fmt, a, b);
    conn_lose(c, why);
}

/* ---- TLS ------------------------------------------------------------------- */

/* Words a person can act on, for the reason OpenSSL gives. */
static const char *
tls_hint(long verify, unsigned long err)
{
    switch (verify) {
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
    case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
    case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
    case X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE:
        return "is ssl_ca_certs the CA that signed the server's certificate?";
    case X509_V_ERR_HOSTNAME_MISMATCH:
    case X509_V_ERR_IP_ADDRESS_MISMATCH:
        return "the server's certificate does not name this host: connect by a name (or "
               "address) it lists, or set ssl_check_hostname=False";
    case X509_V_ERR_CERT_HAS_EXPIRED:
    case X509_V_ERR_CERT_NOT_YET_VALID:
        return "check the certificate's dates and this machine's clock";
    default:
        break;
    }
    if (ERR_GET_LIB(err) == ERR_LIB_SSL) {
        switch (ERR_GET_REASON(err)) {
        case SSL_R_WRONG_VERSION_NUMBER:
        case SSL_R_PACKET_LENGTH_TOO_LONG:
            return "is this port speaking TLS? use redis:// for a plain port";
        case SSL_R_TLSV13_ALERT_CERTIFICATE_REQUIRED:
        case SSL_R_SSLV3_ALERT_HANDSHAKE_FAILURE:
            return "the server wants a client certificate: give ssl_certfile and ssl_keyfile";
        case SSL_R_TLSV1_ALERT_UNKNOWN_CA:
        case SSL_R_SSLV3_ALERT_BAD_CERTIFICATE:
            return "the server does not trust the client certificate (ssl_certfile): is it "
                   "signed by the CA the server trusts?";
        default:
            break;
        }
    }
    return NULL;
}

/* A TLS failure on c: name it (verify result, else OpenSSL's reason). */
static void
tls_fail(rg_conn *c, const char *when)
{
    char why[512], what[200];
    unsigned long e = ERR_peek_last_error();
    long v = c->ssl != NULL ? SSL_get_verify_result(c->ssl) : X509_V_OK;
    const char *hint;

    if (v != X509_V_OK)
        rg_msgf(what, sizeof(what), "certificate verify failed (%s)",
                 X509_verify_cert_error_string(v));
    else if (e != 0)
        rg_msgf(what, sizeof(what), "%s",
                 ERR_reason_error_string(e) ? ERR_reason_error_string(e) : "unknown error");
    else
        rg_msgf(what, sizeof(what), "the server closed the connection");
    hint = tls_hint(v, e);
    rg_msgf(why, sizeof(why), "TLS %s %s failed: %s%s%s", when, c->addr, what,
             hint ? ": " : "", hint ? hint : "");
    ERR_clear_error();
    conn_lose(c, why);
}

static void write_done(uv_write_t *req, int status);
static void flush_cb(uv_prepare_t *p);

/* Hand bytes to libuv; takes `data` (malloc'd) whatever happens. */
static int
write_raw(rg_conn *c, char *data, size_t len)
{
    write_req *w;
    int r;

    if (len == 0) {
        free(data);
        return 0;
    }
    w = malloc(sizeof(*w));
    if (w == NULL) {
        free(data);
        return -1;
    }
    w->buf = uv_buf_init(data, (unsigned int)len);
    w->conn = c;
    r = uv_write(&w->req, &c->h.stream, &w->buf, 1, write_done);
    if (r != 0) {
        free(data);
        free(w);
        return -1;
    }
    return 0;
}

/* Move what TLS has written to the memory BIO into the bytes that leave
 * at the end of the turn (out, handed to libuv whole, as the plain path
 * does): the BIO never holds more than one chunk, so its buffer, which
 * never shrinks, stays small. */
static int
tls_flush(rg_conn *c)
{
    size_t n = (size_t)BIO_ctrl_pending(c->wbio);

    if (n == 0)
        return 0;
    if (rg_buf_reserve(&c->out, n) != 0 || BIO_read(c->wbio, c->out.p + c->out.len, (int)n) != (int)n)
        return -1;
    c->out.len += n;
    uv_prepare_start(&c->flusher, flush_cb);
    return 0;
}

/*
 * Everything sent during one turn of the loop leaves in one write: the
 * prepare handle runs once the turn's callbacks are done, before the loop
 * waits again (a wake-up that dispatches 1,000 checks writes 10 script
 * calls with one syscall).
 */
static void
flush_cb(uv_prepare_t *p)
{
    rg_conn *c = p->data;
    int r;

    rg_buf o = c->out;

    uv_prepare_stop(p);
    if (c->state == CS_CLOSED)
        return;
    c->out.p = NULL;
    c->out.len = c->out.cap = 0;
    r = write_raw(c, o.p, o.len);
    if (r != 0) {
        conn_losef(c, "write to %s failed: %s", c->addr, "out of memory");
        c->ops->settle(c->owner);
    }
}

/* Plaintext out: to the socket at the end of the loop's turn, or through
 * TLS (held until the handshake is done).  Takes cmd's memory. */
static int
send_bytes(rg_conn *c, rg_buf *cmd)
{
    size_t off, n;
    int r = 0;

    if (c->ssl == NULL) {
        if (c->out.p == NULL) {
            c->out = *cmd; /* the usual case: the command's buffer goes as it is */
            cmd->p = NULL;
            cmd->len = cmd->cap = 0;
        } else if (rg_buf_reserve(&c->out, cmd->len) == 0) {
            memcpy(c->out.p + c->out.len, cmd->p, cmd->len);
            c->out.len += cmd->len;
            rg_buf_free(cmd);
        } else {
            rg_buf_free(cmd);
            return -1;
        }
        uv_prepare_start(&c->flusher, flush_cb);
        return 0;
    }
    if (!c->tls_done) {
        if (rg_buf_reserve(&c->pending, cmd->len) == 0) {
            memcpy(c->pending.p + c->pending.len, cmd->p, cmd->len);
            c->pending.len += cmd->len;
        } else {
            r = -1;
        }
        rg_buf_free(cmd);
        return r;
    }
    /* Memory BIOs take everything: SSL_write writes it all or fails.  In
     * chunks of a record, each moved out at once (see tls_flush). */
    for (off = 0; r == 0 && off < cmd->len; off += n) {
        n = cmd->len - off < RG_TLS_CHUNK ? cmd->len - off : RG_TLS_CHUNK;
        if (SSL_write(c->ssl, cmd->p + off, (int)n) <= 0 || tls_flush(c) != 0)
            r = -1;
    }
    rg_buf_free(cmd);
    return r;
}

/* Drive the TLS handshake with what has arrived; 0 to go on, -1 lost. */
static int
tls_step(rg_conn *c)
{
    int r;

    ERR_clear_error();
    r = SSL_do_handshake(c->ssl);
    if (tls_flush(c) != 0) {
        conn_lose(c, "out of memory in the TLS handshake");
        return -1;
    }
    if (r == 1) {
        c->tls_done = 1;
        if (c->pending.len > 0) {
            rg_buf p = c->pending;
            c->pending.p = NULL;
            c->pending.len = c->pending.cap = 0;
            if (send_bytes(c, &p) != 0) {
                conn_lose(c, "cannot write the handshake commands");
                return -1;
            }
        }
        return 0;
    }
    r = SSL_get_error(c->ssl, r);
    if (r == SSL_ERROR_WANT_READ)
        return 0;
    tls_fail(c, "handshake with");
    return -1;
}

static int
tls_begin(rg_conn *c)
{
    const rg_conn_cfg *cfg = c->cfg;
    unsigned char tmp[16];
    int is_ip = cfg->host != NULL && (inet_pton(AF_INET, cfg->host, tmp) == 1 ||
                                      inet_pton(AF_INET6, cfg->host, tmp) == 1);

    c->ssl = SSL_new(cfg->tls);
    c->rbio = BIO_new(BIO_s_mem());
    c->wbio = BIO_new(BIO_s_mem());
    if (c->ssl == NULL || c->rbio == NULL || c->wbio == NULL) {
        BIO_free(c->rbio);
        BIO_free(c->wbio);
        c->rbio = c->wbio = NULL;
        return -1;
    }
    SSL_set_bio(c->ssl, c->rbio, c->wbio); /* the SSL owns them now */
    SSL_set_connect_state(c->ssl);
    SSL_set_app_data(c->ssl, c); /* for new_session */
    if (cfg->memo != NULL && cfg->memo->session != NULL)
        SSL_set_session(c->ssl, cfg->memo->session); /* resumed if the server still has it */
    if (cfg->host != NULL) {
        /* SNI only for names (RFC 6066 forbids addresses). */
        if (!is_ip && !SSL_set_tlsext_host_name(c->ssl, cfg->host))
            return -1;
        if (cfg->tls_check_hostname) {
            X509_VERIFY_PARAM *vp = SSL_get0_param(c->ssl);
            if (is_ip ? !X509_VERIFY_PARAM_set1_ip_asc(vp, cfg->host)
                      : !SSL_set1_host(c->ssl, cfg->host))
                return -1;
        }
    }
    return tls_step(c) == 0 ? 0 : 1;
}

/* ---- reading ------------------------------------------------------------------ */

/* Whether a plain connection that failed in its set-up may have met a TLS
 * port: the first byte read is a TLS record's (alert 0x15, handshake
 * 0x16), or nothing came and no plain connection to this server was ever
 * ready. */
static int
tls_like(const rg_conn *c)
{
    if (c->got_bytes)
        return c->first_byte == 0x15 || c->first_byte == 0x16;
    return c->cfg->memo == NULL || !c->cfg->memo->ready;
}

/* Whether r, the reply to ROLE, says "master"; if not, what it says goes
 * into role (for a message). */
static int
role_master(const redisReply *r, char *role, size_t rolelen)
{
    const redisReply *e;

    if (r->type != REDIS_REPLY_ARRAY || r->elements == 0 ||
        r->element[0]->type != REDIS_REPLY_STRING) {
        rg_msgf(role, rolelen, "%s", "something unexpected");
        return 0;
    }
    e = r->element[0];
    if (e->len == 6 && memcmp(e->str, "master", 6) == 0)
        return 1;
    rg_msgf(role, rolelen, "%.*s", (int)(e->len > 40 ? 40 : e->len), e->str);
    return 0;
}

/* A reply of the handshake: AUTH, SELECT, SCRIPT LOAD (or PING), ROLE
 * (they come first, in that order; each within connect_timeout). */
static void
hello_reply(rg_conn *c, redisReply *r)
{
    char why[400], role[48];

    if (r->type == REDIS_REPLY_ERROR) {
        rg_msgf(why, sizeof(why), "Redis refused the connection set-up on %s: %.*s", c->addr,
                 (int)(r->len > 200 ? 200 : r->len), r->str);
        conn_lose(c, why);
        return;
    }
    if (c->hello_left == c->hello_script && c->cfg->script != NULL) {
        if (r->type != REDIS_REPLY_STRING || r->len != 40) {
            conn_lose(c, "unexpected reply to SCRIPT LOAD");
            return;
        }
        memcpy(c->sha, r->str, 40);
        c->sha[40] = '\0';
    }
    if (c->hello_left == 1 && c->cfg->check_role && !role_master(r, role, sizeof(role))) {
        /* A stale answer (a failover under way, a demoted master back up). */
        rg_msgf(why, sizeof(why), "%s answers ROLE as %s, not master", c->addr, role);
        conn_lose(c, why);
        return;
    }
    if (--c->hello_left > 0)
        return;
    c->state = CS_READY;
    c->ever_ready = 1;
    if (c->cfg->memo != NULL)
        c->cfg->memo->ready = 1;
    uv_timer_stop(&c->timer);
    c->ops->ready(c->owner, c, c->sha);
}

static void
feed(rg_conn *c, const char *p, size_t n)
{
    void *r;

    if (redisReaderFeed(c->reader, p, n) != REDIS_OK) {
        conn_lose(c, "out of memory reading a reply");
        return;
    }
    while (c->state != CS_CLOSED) {
        if (redisReaderGetReply(c->reader, &r) != REDIS_OK) {
            conn_losef(c, "protocol error from %s: %s", c->addr,
                       c->state == CS_HELLO && tls_like(c) ? "(is this a TLS port? use rediss://)"
                                                           : c->reader->errstr);
            return;
        }
        if (r == NULL)
            return;
        if (c->hello_left > 0) {
            hello_reply(c, r);
        } else if (c->fcount == 0 && c->ops->push != NULL) {
            c->ops->push(c->owner, c, r);
        } else if (c->fcount == 0) {
            conn_losef(c, "protocol error from %s: %s", c->addr, "a reply nobody asked for");
        } else {
            void *priv = fifo_pop(c);
            c->ops->reply(c->owner, c, priv, r);
        }
        freeReplyObject(r);
    }
}

static void
alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    rg_conn *c = h->data;
    (void)suggested;
    *buf = uv_buf_init(c->rbuf, sizeof(c->rbuf));
}

static void
read_cb(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
    rg_conn *c = st->data;
    (void)buf;

    if (c->state == CS_CLOSED || nread == 0)
        return;
    if (nread < 0) {
        if (c->ssl != NULL && !c->tls_done)
            tls_fail(c, "handshake with");
        else {
            /* Dropped before the handshake's replies: a TLS port answers a
             * plain client so (Redis resets or closes it), and so does a
             * server being killed: the hint only when what came looks like
             * TLS, or this server was never reached in plain. */
            const char *hint = c->state != CS_HELLO ? ""
                               : c->ssl == NULL && tls_like(c) ? " during the set-up (if this is a TLS port, use rediss://)"
                                                               : " during the set-up";
            char why[512];
            if (nread == UV_EOF)
                rg_msgf(why, sizeof(why), "connection closed by %s%s", c->addr, hint);
            else
                rg_msgf(why, sizeof(why), "connection to %s failed: %s%s", c->addr,
                     uv_strerror((int)nread), hint);
            conn_lose(c, why);
        }
        goto out;
    }
    if (!c->got_bytes) {
        c->got_bytes = 1;
        c->first_byte = (unsigned char)c->rbuf[0];
    }
    if (c->ssl == NULL) {
        feed(c, c->rbuf, (size_t)nread);
        goto out;
    }
    if (BIO_write(c->rbio, c->rbuf, (int)nread) != (int)nread) {
        conn_lose(c, "out of memory in TLS");
        goto out;
    }
    if (!c->tls_done && tls_step(c) != 0)
        goto out;
    while (c->tls_done && c->state != CS_CLOSED) {
        char plain[16384];
        int n;
        ERR_clear_error();
        n = SSL_read(c->ssl, plain, sizeof(plain));
        if (n > 0) {
            feed(c, plain, (size_t)n);
            continue;
        }
        n = SSL_get_error(c->ssl, n);
        if (n == SSL_ERROR_WANT_READ) {
            /* A read may have produced bytes to send (a key update). */
            if (tls_flush(c) != 0)
                conn_lose(c, "out of memory in TLS");
        } else if (n == SSL_ERROR_ZERO_RETURN) {
            conn_losef(c, "connection closed by %s%s", c->addr, "");
        } else {
            tls_fail(c, c->state == CS_READY ? "connection to" : "set-up with");
        }
        break;
    }
out:
    c->ops->settle(c->owner);
}

static void
write_done(uv_write_t *req, int status)
{
    write_req *w = (write_req *)req;
    rg_conn *c = w->conn;

    free(w->buf.base);
    free(w);
    if (status < 0 && status != UV_ECANCELED && c->state != CS_CLOSED) {
        conn_losef(c, "write to %s failed: %s", c->addr, uv_strerror(status));
        c->ops->settle(c->owner);
    }
}

/* ---- connecting ----------------------------------------------------------------- */

/* AUTH / SELECT / SCRIPT LOAD, pipelined behind the connect. */
static int
send_hello(rg_conn *c)
{
    const rg_conn_cfg *cfg = c->cfg;
    rg_buf b = {0};
    int r = -1;

    c->hello_left = 0;
    if (cfg->password != NULL) {
        if (rg_buf_reserve(&b, 64 + RG_RESP_BULK_MAX(cfg->password_len) +
                                   (cfg->username ? RG_RESP_BULK_MAX(cfg->username_len) : 0)))
            goto done;
        rg_resp_array(&b, cfg->username ? 3 : 2);
        rg_resp_bulk(&b, "AUTH", 4);
        if (cfg->username != NULL)
            rg_resp_bulk(&b, cfg->username, cfg->username_len);
        rg_resp_bulk(&b, cfg->password, cfg->password_len);
        c->hello_left++;
    }
    if (cfg->db != 0) {
        if (rg_buf_reserve(&b, 96))
            goto done;
        rg_resp_array(&b, 2);
        rg_resp_bulk(&b, "SELECT", 6);
        rg_resp_bulk_int(&b, cfg->db);
        c->hello_left++;
    }
    if (cfg->script != NULL) {
        if (rg_buf_reserve(&b, 64 + RG_RESP_BULK_MAX(cfg->script_len)))
            goto done;
        rg_resp_array(&b, 3);
        rg_resp_bulk(&b, "SCRIPT", 6);
        rg_resp_bulk(&b, "LOAD", 4);
        rg_resp_bulk(&b, cfg->script, cfg->script_len);
        c->hello_left++;
    } else {
        if (rg_buf_reserve(&b, 32))
            goto done;
        rg_resp_array(&b, 1);
        rg_resp_bulk(&b, "PING", 4);
        c->hello_left++;
    }
    c->hello_script = 1;
    if (cfg->check_role) {
        if (rg_buf_reserve(&b, 32))
            goto done;
        rg_resp_array(&b, 1);
        rg_resp_bulk(&b, "ROLE", 4);
        /* counted so: the replies are numbered by what is left */
        c->hello_script = 2;
        c->hello_left++;
    }
    r = send_bytes(c, &b);
done:
    rg_buf_free(&b);
    return r;
}

static void connect_to(rg_conn *c, const struct sockaddr *sa);

/* TCP keepalive: a peer that vanished (a host gone, a silent middlebox)
 * is found in about 30 s even while nothing is owed: probes after 15 s
 * idle, every 5 s, 3 unanswered.  Best effort. */
static void
keepalive(rg_conn *c)
{
    int fd, v;

    if (uv_tcp_keepalive(&c->h.tcp, 1, 15) != 0 || uv_fileno(&c->h.handle, &fd) != 0)
        return;
    v = 5;
    (void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &v, sizeof(v));
    v = 3;
    (void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &v, sizeof(v));
}

/* The failed attempt's socket is closed: connect to the next address. */
static void
next_addr(uv_handle_t *h)
{
    rg_conn *c = h->data;
    struct addrinfo *a = c->ai_next;

    c->handles--;
    if (c->state == CS_CLOSED) {
        if (c->handles == 0)
            conn_free(c);
        return;
    }
    c->ai_next = a->ai_next;
    connect_to(c, a->ai_addr);
    c->ops->settle(c->owner);
}

static void
connected_cb(uv_connect_t *req, int status)
{
    rg_conn *c = req->data;
    int fd, r;

    if (c->state == CS_CLOSED)
        return; /* closed while connecting: the handle's close cancels us */
    if (status < 0 && c->ai_next != NULL && status != UV_ECANCELED) {
        /* Try the name's next address once this socket is closed. */
        c->h_init = 0;
        uv_close(&c->h.handle, next_addr);
        return;
    }
    if (status < 0) {
        conn_losef(c, "connect failed: %s: %s", c->addr, uv_strerror(status));
        goto out;
    }
    if (uv_fileno(&c->h.handle, &fd) == 0)
        rg_fd_own(fd);
    if (c->cfg->host != NULL) {
        uv_tcp_nodelay(&c->h.tcp, 1);
        keepalive(c);
    }
    c->state = CS_HELLO;
    if (uv_read_start(&c->h.stream, alloc_cb, read_cb) != 0) {
        conn_losef(c, "connect failed: %s: %s", c->addr, "cannot read the socket");
        goto out;
    }
    if (c->cfg->tls != NULL) {
        r = tls_begin(c);
        if (r == 1)
            goto out; /* lost, reported */
        if (r != 0) {
            conn_losef(c, "TLS set-up for %s failed: %s", c->addr, "out of memory");
            goto out;
        }
    }
    if (send_hello(c) != 0)
        conn_losef(c, "connect failed: %s: %s", c->addr, "cannot write the handshake");
out:
    c->ops->settle(c->owner);
}

static void
connect_to(rg_conn *c, const struct sockaddr *sa)
{
    int r;

    c->state = CS_CONNECTING;
    c->connect_req.data = c;
    if (c->cfg->path != NULL) {
        r = uv_pipe_init(c->loop, &c->h.pipe, 0);
        if (r == 0) {
            c->h_init = 1;
            c->handles++;
            c->h.handle.data = c;
            uv_pipe_connect(&c->connect_req, &c->h.pipe, c->cfg->path, connected_cb);
            return; /* errors come to connected_cb */
        }
    } else {
        r = uv_tcp_init(c->loop, &c->h.tcp);
        if (r == 0) {
            c->h_init = 1;
            c->handles++;
            c->h.handle.data = c;
            r = uv_tcp_connect(&c->connect_req, &c->h.tcp, sa, connected_cb);
            if (r == 0)
                return;
        }
    }
    conn_losef(c, "connect failed: %s: %s", c->addr, uv_strerror(r));
}

static void
resolve_work(uv_work_t *w)
{
    resolve_req *q = w->data;
    struct addrinfo hints;
    char port[16];

    if (q->delay_ms > 0)
        usleep(q->delay_ms * 1000u);
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    rg_msgf(port, sizeof(port), "%d", q->port);
    q->err = getaddrinfo(q->host, port, &hints, &q->ai);
    q->sys_errno = errno;
}

static void
resolve_done(uv_work_t *w, int status)
{
    resolve_req *q = w->data;
    rg_conn *c = q->conn;

    if (c == NULL || status != 0) {
        /* The connection gave up (or the work was cancelled): only ours. */
        if (q->ai != NULL)
            freeaddrinfo(q->ai);
        free(q);
        return;
    }
    c->resolving = NULL;
    if (q->err != 0 || q->ai == NULL) {
        conn_losef(c, "cannot resolve %s: %s", c->addr,
                   q->err == EAI_SYSTEM ? strerror(q->sys_errno) : gai_strerror(q->err));
        if (q->ai != NULL)
            freeaddrinfo(q->ai);
    } else {
        /* Kept: a name may have several addresses (localhost: ::1 and
         * 127.0.0.1), tried in turn until one accepts. */
        c->ai = q->ai;
        c->ai_next = q->ai->ai_next;
        connect_to(c, q->ai->ai_addr);
    }
    free(q);
    c->ops->settle(c->owner);
}

static void
timeout_cb(uv_timer_t *t)
{
    rg_conn *c = t->data;
    static const char *const phase[] = {"resolving the host name", "connecting", "the set-up"};
    char why[400];

    if (c->state == CS_HELLO && c->ssl != NULL && !c->tls_done) {
        rg_msgf(why, sizeof(why), "TLS handshake with %s failed: no answer within %llu ms: is this "
             "port speaking TLS? use redis:// for a plain port", c->addr,
             (unsigned long long)(c->cfg->connect_timeout_ns / 1000000u));
    } else if (c->why[0] != '\0') {
        /* A failure found inside an rg_conn_* call, reported from here so
         * that the owner never gets lost() from inside its own call. */
        rg_msgf(why, sizeof(why), "%s", c->why);
    } else {
        rg_msgf(why, sizeof(why), "connect timeout (%llu ms) to %s while %s",
                 (unsigned long long)(c->cfg->connect_timeout_ns / 1000000u), c->addr,
                 c->state <= CS_HELLO ? phase[c->state] : "ready");
    }
    conn_lose(c, why);
    c->ops->settle(c->owner);
}

static void
fail_later(rg_conn *c, const char *why)
{
    rg_msgf(c->why, sizeof(c->why), "%s", why);
    uv_timer_start(&c->timer, timeout_cb, 0, 0);
}

/* The first turn: resolve (names) or connect (addresses, paths). */
static void
start_cb(uv_timer_t *t)
{
    rg_conn *c = t->data;
    const rg_conn_cfg *cfg = c->cfg;
    struct sockaddr_storage ss;

    uv_timer_start(&c->timer, timeout_cb, (cfg->connect_timeout_ns + 999999) / 1000000, 0);
    if (cfg->path != NULL) {
        connect_to(c, NULL);
    } else if (uv_ip4_addr(cfg->host, cfg->port, (struct sockaddr_in *)&ss) == 0 ||
               uv_ip6_addr(cfg->host, cfg->port, (struct sockaddr_in6 *)&ss) == 0) {
        connect_to(c, (struct sockaddr *)&ss);
    } else {
        size_t hl = strlen(cfg->host);
        resolve_req *q = calloc(1, sizeof(*q) + hl + 1);
        int r = UV_ENOMEM;
        if (q != NULL) {
            memcpy(q->host, cfg->host, hl + 1);
            q->port = cfg->port;
            q->delay_ms = cfg->resolve_delay_ms;
            q->conn = c;
            q->work.data = q;
            c->state = CS_RESOLVING;
            r = uv_queue_work(c->loop, &q->work, resolve_work, resolve_done);
            if (r == 0)
                c->resolving = q;
            else
                free(q);
        }
        if (r != 0)
            conn_losef(c, "cannot resolve %s: %s", c->addr, uv_strerror(r));
    }
    c->ops->settle(c->owner);
}

rg_conn *
rg_conn_open(uv_loop_t *loop, const rg_conn_cfg *cfg, const rg_conn_ops *ops, void *owner,
             char *err, size_t errlen)
{
    rg_conn *c = calloc(1, sizeof(*c));

    if (c == NULL || (c->reader = redisReaderCreate()) == NULL) {
        free(c);
        rg_msgf(err, errlen, "out of memory");
        return NULL;
    }
    atomic_fetch_add_explicit(&rg_live_conns, 1, memory_order_relaxed);
    c->loop = loop;
    c->cfg = cfg;
    c->ops = ops;
    c->owner = owner;
    if (cfg->path != NULL)
        rg_msgf(c->addr, sizeof(c->addr), "%s", cfg->path);
    else if (strchr(cfg->host, ':') != NULL)
        rg_msgf(c->addr, sizeof(c->addr), "[%s]:%d", cfg->host, cfg->port);
    else
        rg_msgf(c->addr, sizeof(c->addr), "%s:%d", cfg->host, cfg->port);
    uv_timer_init(loop, &c->timer); /* these cannot fail on a live loop */
    uv_prepare_init(loop, &c->flusher);
    c->timer.data = c;
    c->flusher.data = c;
    c->handles = 2;
    c->state = CS_CONNECTING;
    /* Start on the loop's next turn: any failure then reaches the owner
     * through lost(), never from inside this call. */
    uv_timer_start(&c->timer, start_cb, 0, 0);
    return c;
}

int
rg_conn_send(rg_conn *c, rg_buf *cmd, void *priv)
{
    if (c->state != CS_READY || fifo_push(c, priv) != 0) {
        rg_buf_free(cmd);
        return -1;
    }
    if (send_bytes(c, cmd) != 0) {
        /* Bytes may be half out: the stream is unusable.  The priv is owed
         * now: it is answered NULL with the others, after lost(). */
        char why[400];
        rg_msgf(why, sizeof(why), "write to %s failed: out of memory", c->addr);
        fail_later(c, why);
    }
    return 0;
}

/* ---- the TLS context (Python thread) --------------------------------------------- */

static int
file_check(const char *opt, const char *path, char *err, size_t errlen)
{
    struct stat st;
    if (stat(path, &st) != 0) {
        rg_msgf(err, errlen, "%s: cannot read %s: %s", opt, path, strerror(errno));
        return -1;
    }
    if (!S_ISREG(st.st_mode)) {
        rg_msgf(err, errlen, "%s: %s is not a file", opt, path);
        return -1;
    }
    return 0;
}

static void
ssl_reason(char *buf, size_t len)
{
    unsigned long e = ERR_peek_last_error();
    const char *r = e ? ERR_reason_error_string(e) : NULL;
    rg_msgf(buf, len, "%s", r ? r : "not understood");
    ERR_clear_error();
}

/* A session ticket (TLS 1.3 sends them after the handshake): kept in the
 * server's memo for the next connection (loop thread, inside SSL_read or
 * the handshake of a live connection).  1: we took the reference. */
static int
new_session(SSL *ssl, SSL_SESSION *sess)
{
    rg_conn *c = SSL_get_app_data(ssl);
    rg_conn_memo *m = c != NULL ? c->cfg->memo : NULL;

    if (m == NULL)
        return 0;
    if (m->session != NULL)
        SSL_SESSION_free(m->session);
    m->session = sess;
    return 1;
}

struct ssl_ctx_st *
rg_tls_ctx_new(const char *ca_certs, const char *certfile, const char *keyfile, int verify,
               char *err, size_t errlen)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    char why[200];

    ERR_clear_error();
    if (ctx == NULL) {
        ssl_reason(why, sizeof(why));
        rg_msgf(err, errlen, "cannot make a TLS context: %s", why);
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    /* Sessions are kept per server by the connections' owners (memo), not
     * in the context's cache: resumed on reconnects and map refreshes. */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(ctx, new_session);
    SSL_CTX_set_verify(ctx, verify ? SSL_VERIFY_PEER : SSL_VERIFY_NONE, NULL);
    if (ca_certs != NULL) {
        if (file_check("ssl_ca_certs", ca_certs, err, errlen) != 0)
            goto fail;
        if (SSL_CTX_load_verify_locations(ctx, ca_certs, NULL) != 1) {
            ssl_reason(why, sizeof(why));
            rg_msgf(err, errlen, "ssl_ca_certs: %s holds no PEM certificate OpenSSL accepts (%s)",
                     ca_certs, why);
            goto fail;
        }
    } else if (verify && SSL_CTX_set_default_verify_paths(ctx) != 1) {
        ssl_reason(why, sizeof(why));
        rg_msgf(err, errlen, "cannot load the system CA store (%s): give ssl_ca_certs", why);
        goto fail;
    }
    if (keyfile != NULL && certfile == NULL) {
        rg_msgf(err, errlen, "ssl_keyfile %s was given without ssl_certfile", keyfile);
        goto fail;
    }
    if (certfile != NULL) {
        const char *key = keyfile != NULL ? keyfile : certfile;
        if (file_check("ssl_certfile", certfile, err, errlen) != 0)
            goto fail;
        if (SSL_CTX_use_certificate_chain_file(ctx, certfile) != 1) {
            ssl_reason(why, sizeof(why));
            rg_msgf(err, errlen, "ssl_certfile: %s is not a PEM certificate OpenSSL accepts (%s)",
                     certfile, why);
            goto fail;
        }
        if (file_check(keyfile != NULL ? "ssl_keyfile" : "ssl_certfile (as the key)", key, err,
                       errlen) != 0)
            goto fail;
        if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
            if (ERR_GET_REASON(ERR_peek_last_error()) == X509_R_KEY_VALUES_MISMATCH) {
                rg_msgf(err, errlen, "ssl_keyfile: %s is not the key of the certificate in %s", key,
                     certfile);
                goto fail;
            }
            ssl_reason(why, sizeof(why));
            rg_msgf(err, errlen, "%s: %s holds no PEM private key OpenSSL accepts (%s)%s",
                     keyfile != NULL ? "ssl_keyfile" : "ssl_certfile", key, why,
                     keyfile != NULL ? "" : "; give the key as ssl_keyfile");
            goto fail;
        }
        if (SSL_CTX_check_private_key(ctx) != 1) {
            ssl_reason(why, sizeof(why));
            rg_msgf(err, errlen, "ssl_keyfile: %s is not the key of the certificate in %s (%s)",
                     key, certfile, why);
            goto fail;
        }
    }
    return ctx;
fail:
    SSL_CTX_free(ctx);
    ERR_clear_error();
    return NULL;
}

void
rg_tls_ctx_free(struct ssl_ctx_st *ctx)
{
    SSL_CTX_free(ctx);
}
