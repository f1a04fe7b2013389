/*
 * gate.h: the request path's pure C parts (gate.c): client addresses as the
 * middleware keys them (rategate/keys.py client_ip is the reference), and
 * small integers as header bytes.  No Python object here: pygate.c holds
 * the Python side and calls these with the GIL held; they keep no state.
 */
#ifndef RG_GATE_H
#define RG_GATE_H

#include <stddef.h>
#include <stdint.h>

/* An address: version 4 or 6, and its 4 or 16 bytes (IPv4 in b[0..4)). */
typedef struct rg_ip {
    int version;
    uint8_t b[16];
} rg_ip;

/* A trusted network: the address masked to its prefix. */
typedef struct rg_net {
    rg_ip ip;
    int prefix;
} rg_net;

/* The longest text a key of rg_ip_key may need (an IPv6 network: 39 + "/128"). */
#define RG_IP_KEY_MAX 48

/*
 * keys._parse_ip: an address from a hop or a peer, as bytes (latin-1: a
 * socket address given as str is passed only when it is ASCII).  Surrounding
 * whitespace (str.strip's, over latin-1) is dropped; "1.2.3.4:80",
 * "[v6]", "[v6]:443" and a zone ("%eth0") are accepted; IPv4-mapped IPv6
 * becomes IPv4.  1: *out is set; 0: not an address.
 */
int rg_ip_parse(const char *s, size_t n, rg_ip *out);

/* Whether ip lies in one of nets[0..n). */
int rg_ip_trusted(const rg_ip *ip, const rg_net *nets, size_t n);

/* The key of an address, as str(ip) would write it (IPv6 compressed, lower
 * case), or with v6prefix (1..128; 0: none) an IPv6 address as its network,
 * str(ip_network(f"{ip}/{v6prefix}", strict=False)).  Returns the length
 * written to buf (RG_IP_KEY_MAX bytes). */
size_t rg_ip_key(const rg_ip *ip, int v6prefix, char *buf);

/* Whether c is whitespace to str.strip() (of a latin-1 character). */
int rg_is_strip_space(unsigned char c);

#endif
