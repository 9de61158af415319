"""A throw-away CA and server certificates for the lab's HTTPS servers (openssl, as an operator
would make a private CA)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def ca(directory: Path, name: str = "lab-ca") -> Path:
    """A CA certificate (name.pem) and key (name.key) in `directory`."""
    pem = directory / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
             "-subj", f"/CN={name}", "-keyout", str(directory / f"{name}.key"), "-out", str(pem))  # fmt: skip
    return pem


def server_cert(ca_pem: Path, host: str) -> tuple[Path, Path]:
    """(certificate, key) for `host` (a name, or an IP address), signed by the CA beside `ca_pem`."""
    d, key, csr, cert = (
        ca_pem.parent,
        ca_pem.parent / f"{host.replace(':', '_')}.key",
        ca_pem.parent / f"{host.replace(':', '_')}.csr",
        ca_pem.parent / f"{host.replace(':', '_')}.pem",
    )
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={host}",
             "-keyout", str(key), "-out", str(csr))  # fmt: skip
    ext = d / f"{host.replace(':', '_')}.ext"
    san = f"IP:{host}" if ":" in host or host.replace(".", "").isdigit() else f"DNS:{host}"
    ext.write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_pem), "-CAkey", str(ca_pem.with_suffix(".key")),
             "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert))  # fmt: skip
    return cert, key
