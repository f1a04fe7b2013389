"""Throwaway certificates for the TLS tests, made with the ``openssl`` command.

:func:`make_certs` writes into a directory:

- ``ca.pem`` / ``ca.key``: a test CA;
- ``server.pem`` / ``server.key``: signed by it, SANs ``IP:127.0.0.1`` and
  ``DNS:localhost``;
- ``wrongname.pem`` / ``wrongname.key``: signed by it, naming only
  ``other.invalid`` and ``10.255.255.1`` (a hostname mismatch);
- ``client.pem`` / ``client.key``: a client certificate signed by it;
- ``other-ca.pem``: a second CA that signed nothing here (the wrong CA);
- ``garbage.pem``: a file that is not PEM.

Elliptic-curve keys: quick to make, so the session fixture costs little.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

OPENSSL = os.environ.get("RATEGATE_OPENSSL", "openssl")


@dataclass(frozen=True)
class Certs:
    dir: str

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    @property
    def server_tls(self) -> tuple[str, str, str]:
        """RedisServer's ``tls=``: the good server certificate, its key, the CA."""
        return (self.server_cert, self.server_key, self.ca)

    @property
    def ca(self) -> str:
        return self.path("ca.pem")

    @property
    def other_ca(self) -> str:
        return self.path("other-ca.pem")

    @property
    def server_cert(self) -> str:
        return self.path("server.pem")

    @property
    def server_key(self) -> str:
        return self.path("server.key")

    @property
    def wrongname_cert(self) -> str:
        return self.path("wrongname.pem")

    @property
    def wrongname_key(self) -> str:
        return self.path("wrongname.key")

    @property
    def client_cert(self) -> str:
        return self.path("client.pem")

    @property
    def client_key(self) -> str:
        return self.path("client.key")


def _run(*args: str, cwd: str) -> None:
    r = subprocess.run([OPENSSL, *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{r.stderr}")


_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _ca(name: str, cn: str, d: str) -> None:
    # Key usage and key identifiers: Python 3.13's ssl verifies strictly
    # (VERIFY_X509_STRICT), and refuses a CA without keyUsage.
    _run("req", "-x509", *_KEY, "-keyout", f"{name}.key", "-out", f"{name}.pem",
         "-days", "3", "-subj", f"/CN={cn}",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign",
         "-addext", "subjectKeyIdentifier=hash", cwd=d)


def _leaf(name: str, cn: str, ext: str, d: str) -> None:
    with open(os.path.join(d, f"{name}.ext"), "w") as f:
        f.write(ext + "keyUsage=critical,digitalSignature\n"
                "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
    _run("req", *_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    _run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", f"{name}.pem", "-days", "3", "-extfile", f"{name}.ext", cwd=d)


def make_certs(d: str) -> Certs:
    _ca("ca", "rategate test CA", d)
    _ca("other-ca", "rategate unrelated CA", d)
    _leaf("server", "localhost",
          "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n", d)
    _leaf("wrongname", "other.invalid",
          "subjectAltName=DNS:other.invalid,IP:10.255.255.1\nextendedKeyUsage=serverAuth\n", d)
    _leaf("client", "rategate test client", "extendedKeyUsage=clientAuth\n", d)
    with open(os.path.join(d, "garbage.pem"), "w") as f:
        f.write("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    return Certs(d)
