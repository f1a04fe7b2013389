/*
 * gate.c: client addresses as the middleware keys them (see gate.h).
 *
 * The reference is rategate/keys.py (_parse_ip, client_ip._lookup) and
 * Python's ipaddress module, whose rules are followed here step by step
 * (strip, brackets and ports, zone, IPv4 then IPv6, leading zeros refused,
 * "::" once, an embedded IPv4 last), so that every text gives the same key
 * or the same refusal: tests/test_gate.py checks it on random input.
 * Pure C, no state, any thread (only the GIL holder calls it).
 */
#include "gate.h"

#include <stdio.h>
#include <string.h>

int
rg_is_strip_space(unsigned char c)
{
    return (c >= 9 && c <= 13) || (c >= 28 && c <= 32) || c == 0x85 || c == 0xa0;
}

/* str.isdigit() of a latin-1 character: 0-9 and the superscripts 1, 2, 3. */
static int
is_py_digit(unsigned char c)
{
    return (c >= '0' && c <= '9') || c == 0xb2 || c == 0xb3 || c == 0xb9;
}

static int
all_py_digits(const char *s, size_t n)
{
    size_t i;
    if (n == 0)
        return 0;
    for (i = 0; i < n; i++)
        if (!is_py_digit((unsigned char)s[i]))
            return 0;
    return 1;
}

/* IPv4Address's parser: four dot-separated decimal octets, ASCII digits,
 * at most 3, no leading zero, at most 255. */
static int
parse_v4(const char *s, size_t n, uint8_t out[4])
{
    size_t i = 0;
    int part;

    for (part = 0; part < 4; part++) {
        size_t start = i;
        unsigned v = 0;
        while (i < n && s[i] != '.') {
            if (s[i] < '0' || s[i] > '9')
                return 0;
            v = v * 10 + (unsigned)(s[i] - '0');
            i++;
            if (i - start > 3)
                return 0;
        }
        if (i == start || v > 255 || (i - start > 1 && s[start] == '0'))
            return 0;
        out[part] = (uint8_t)v;
        if (part < 3) {
            if (i >= n) /* fewer than four octets */
                return 0;
            i++; /* the dot */
        }
    }
    return i == n;
}

static int
hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* One hextet: 1 to 4 hex digits. */
static int
parse_hextet(const char *s, size_t n, unsigned *v)
{
    size_t i;
    if (n == 0 || n > 4)
        return 0;
    *v = 0;
    for (i = 0; i < n; i++) {
        int h = hexval(s[i]);
        if (h < 0)
            return 0;
        *v = *v * 16 + (unsigned)h;
    }
    return 1;
}

/* IPv6Address's parser (ipaddress._BaseV6._ip_int_from_string). */
static int
parse_v6(const char *s, size_t n, uint8_t out[16])
{
    const char *part[10];
    size_t plen[10], i, start = 0;
    unsigned hv[8];
    int np = 0, skip = -1, hi, lo, skipped, k, j;
    char v4hex[2][5];

    if (n == 0)
        return 0;
    for (i = 0; i <= n; i++) {
        if (i == n || s[i] == ':') {
            if (np == 10) /* more than 9 parts whatever follows */
                return 0;
            part[np] = s + start;
            plen[np] = i - start;
            np++;
            start = i + 1;
        }
    }
    if (np < 3)
        return 0;
    if (memchr(part[np - 1], '.', plen[np - 1]) != NULL) {
        uint8_t v4[4];
        if (!parse_v4(part[np - 1], plen[np - 1], v4) || np == 10)
            return 0;
        /* the two hextets of the IPv4 part, as Python writes them ("%x") */
        snprintf(v4hex[0], sizeof(v4hex[0]), "%x", (unsigned)(v4[0] << 8 | v4[1]));
        snprintf(v4hex[1], sizeof(v4hex[1]), "%x", (unsigned)(v4[2] << 8 | v4[3]));
        part[np - 1] = v4hex[0];
        plen[np - 1] = strlen(v4hex[0]);
        part[np] = v4hex[1];
        plen[np] = strlen(v4hex[1]);
        np++;
    }
    if (np > 9)
        return 0;
    for (k = 1; k < np - 1; k++)
        if (plen[k] == 0) {
            if (skip >= 0)
                return 0;
            skip = k;
        }
    if (skip >= 0) {
        hi = skip;
        lo = np - skip - 1;
        if (plen[0] == 0 && --hi != 0)
            return 0;
        if (plen[np - 1] == 0 && --lo != 0)
            return 0;
        skipped = 8 - (hi + lo);
        if (skipped < 1)
            return 0;
    } else {
        if (np != 8 || plen[0] == 0 || plen[np - 1] == 0)
            return 0;
        hi = np;
        lo = 0;
        skipped = 0;
    }
    j = 0;
    for (k = 0; k < hi; k++)
        if (!parse_hextet(part[k], plen[k], &hv[j++]))
            return 0;
    for (k = 0; k < skipped; k++)
        hv[j++] = 0;
    for (k = np - lo; k < np; k++)
        if (!parse_hextet(part[k], plen[k], &hv[j++]))
            return 0;
    for (k = 0; k < 8; k++) {
        out[2 * k] = (uint8_t)(hv[k] >> 8);
        out[2 * k + 1] = (uint8_t)hv[k];
    }
    return 1;
}

int
rg_ip_parse(const char *s, size_t n, rg_ip *out)
{
    size_t i, colons = 0;
    const char *pct;

    while (n > 0 && rg_is_strip_space((unsigned char)s[0])) {
        s++;
        n--;
    }
    while (n > 0 && rg_is_strip_space((unsigned char)s[n - 1]))
        n--;
    if (n == 0 || n > 64)
        return 0;
    if (s[0] == '[') {
        const char *end = memchr(s, ']', n);
        size_t rest;
        if (end == NULL)
            return 0;
        rest = n - (size_t)(end - s) - 1;
        if (rest > 0 && !(end[1] == ':' && all_py_digits(end + 2, rest - 1)))
            return 0;
        n = (size_t)(end - s) - 1;
        s++;
    } else {
        for (i = 0; i < n; i++)
            colons += s[i] == ':';
        if (colons == 1) { /* IPv4 with a port */
            const char *c = memchr(s, ':', n);
            if (!all_py_digits(c + 1, n - (size_t)(c - s) - 1))
                return 0;
            n = (size_t)(c - s);
        }
    }
    pct = memchr(s, '%', n); /* a zone id is not part of the client */
    if (pct != NULL)
        n = (size_t)(pct - s);
    memset(out, 0, sizeof(*out));
    if (memchr(s, ':', n) == NULL) {
        if (!parse_v4(s, n, out->b))
            return 0;
        out->version = 4;
        return 1;
    }
    if (!parse_v6(s, n, out->b))
        return 0;
    out->version = 6;
    for (i = 0; i < 10 && out->b[i] == 0; i++)
        ;
    if (i == 10 && out->b[10] == 0xff && out->b[11] == 0xff) { /* IPv4-mapped */
        memmove(out->b, out->b + 12, 4);
        memset(out->b + 4, 0, 12);
        out->version = 4;
    }
    return 1;
}

/* ip masked to its first `prefix` bits. */
static void
masked(const rg_ip *ip, int prefix, uint8_t *b)
{
    int nb = ip->version == 4 ? 4 : 16, i;
    for (i = 0; i < nb; i++) {
        int bits = prefix - 8 * i;
        b[i] = bits >= 8 ? ip->b[i] : bits <= 0 ? 0 : (uint8_t)(ip->b[i] & (0xff << (8 - bits)));
    }
}

int
rg_ip_trusted(const rg_ip *ip, const rg_net *nets, size_t n)
{
    size_t k;
    for (k = 0; k < n; k++) {
        uint8_t b[16];
        if (nets[k].ip.version != ip->version)
            continue;
        masked(ip, nets[k].prefix, b);
        if (memcmp(b, nets[k].ip.b, ip->version == 4 ? 4 : 16) == 0)
            return 1;
    }
    return 0;
}

/* str(IPv6Address): lower-case hextets without leading zeros, the longest
 * run of two or more zero hextets (the first of equals) as "::". */
static size_t
v6_text(const uint8_t *b, char *buf)
{
    unsigned h[8];
    int k, best = -1, bestlen = 0, cur = -1, curlen = 0;
    size_t n = 0;

    for (k = 0; k < 8; k++) {
        h[k] = (unsigned)b[2 * k] << 8 | b[2 * k + 1];
        if (h[k] == 0) {
            if (cur < 0)
                cur = k;
            if (++curlen > bestlen) {
                best = cur;
                bestlen = curlen;
            }
        } else {
            cur = -1;
            curlen = 0;
        }
    }
    if (bestlen < 2)
        best = -1;
    for (k = 0; k < 8; k++) {
        if (k == best) {
            buf[n++] = ':';
            if (k == 0)
                buf[n++] = ':';
            k += bestlen - 1;
            continue;
        }
        n += (size_t)sprintf(buf + n, "%x", h[k]);
        if (k < 7)
            buf[n++] = ':';
    }
    buf[n] = '\0';
    return n;
}

size_t
rg_ip_key(const rg_ip *ip, int v6prefix, char *buf)
{
    uint8_t b[16];
    size_t n;

    if (ip->version == 4) { /* "%u.%u.%u.%u", without printf */
        int k;
        n = 0;
        for (k = 0; k < 4; k++) {
            unsigned o = ip->b[k];
            if (o >= 100)
                buf[n++] = (char)('0' + o / 100);
            if (o >= 10)
                buf[n++] = (char)('0' + o / 10 % 10);
            buf[n++] = (char)('0' + o % 10);
            buf[n++] = k < 3 ? '.' : '\0';
        }
        return n - 1;
    }
    if (v6prefix <= 0)
        return v6_text(ip->b, buf);
    masked(ip, v6prefix, b);
    n = v6_text(b, buf);
    return n + (size_t)sprintf(buf + n, "/%d", v6prefix);
}
