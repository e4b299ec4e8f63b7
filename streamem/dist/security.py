"""TLS for every cluster: a temporary certificate for local ones, files for remote ones.

Local clusters (``LocalCluster``, ``LocalCUDACluster``) get
:func:`local_security`: ``distributed.security.Security.temporary()``, one
self-signed key and certificate made in memory for this run (nothing on disk), with
``require_encryption``. Scheduler and workers accept only TLS connections whose
client certificate is signed by it (distributed sets ``CERT_REQUIRED`` both ways),
and only the job's own ``Client`` holds it: another process on the machine that
reads the scheduler's address (from the dashboard's ``/json/identity.json``, say)
is refused at the TLS handshake and cannot run code on the workers.

Remote clusters: :func:`client_security` takes ``--tls-ca-file/--tls-cert/--tls-key``
(all three, or none: then the Dask config's ``distributed.comm.tls.*``, e.g. the
``dask-tls.yaml`` that ``streamem cluster certs`` writes). distributed checks the
peer's certificate against the CA and not its host name (``check_hostname=False``:
a dedicated CA per cluster, addresses often IPs), so what protects a cluster is who
holds a key signed by its CA. :func:`make_certificates` makes such a CA and a key
and certificate for the scheduler, the workers and the clients (``cryptography``,
a dependency of streamem for exactly this and for ``Security.temporary``).

:func:`refusal` turns distributed's TLS failures into one line that says what to fix.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from streamem.errors import InputError

#: The roles that get a key and certificate from :func:`make_certificates`.
ROLES = ("scheduler", "worker", "client")
#: Validity of the certificates of ``streamem cluster certs`` (days).
DEFAULT_VALID_DAYS = 365
#: How to get what TLS needs.
CRYPTOGRAPHY_INSTALL = 'pip install "cryptography>=41"'


def local_security():
    """A fresh in-memory ``Security`` (one self-signed certificate, TLS required) for a
    cluster this process starts; InputError if ``cryptography`` is missing."""
    from distributed.security import Security

    try:
        return Security.temporary()
    except ImportError:
        raise InputError(
            None, f"TLS for the local cluster needs cryptography: {CRYPTOGRAPHY_INSTALL}"
        ) from None


def client_security(
    ca_file: str | Path | None = None,
    cert: str | Path | None = None,
    key: str | Path | None = None,
):
    """The client's ``Security`` for a remote scheduler.

    With ``ca_file``, ``cert`` and ``key`` (paths of PEM files, all three or none):
    TLS with them, required. With none: the Dask config (``distributed.comm.tls.*``,
    plain ``tcp://`` when it has no certificates). Missing or unreadable files, or a
    key that does not belong to the certificate, raise InputError naming the option.
    """
    import ssl

    from distributed.security import Security

    given = {"--tls-ca-file": ca_file, "--tls-cert": cert, "--tls-key": key}
    if not any(given.values()):
        return Security()
    missing = [flag for flag, value in given.items() if not value]
    if missing:
        raise InputError(
            None,
            f"give --tls-ca-file, --tls-cert and --tls-key together ({', '.join(missing)} missing)",
        )
    for flag, value in given.items():
        path = Path(value).expanduser()
        if not path.is_file():
            raise InputError(f"{flag} {value}", "no such file (a PEM file)")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{flag} {value}", f"cannot be read ({exc})") from None
        if "-----BEGIN " not in text:
            raise InputError(f"{flag} {value}", "is not a PEM file (no -----BEGIN line)")
    security = Security(
        require_encryption=True,
        tls_ca_file=str(Path(ca_file).expanduser()),
        tls_client_cert=str(Path(cert).expanduser()),
        tls_client_key=str(Path(key).expanduser()),
    )
    try:
        security.get_connection_args("client")  # loads CA, certificate and key now
    except (ssl.SSLError, ValueError) as exc:
        raise InputError(
            f"--tls-cert {cert} --tls-key {key}",
            f"not a usable certificate and key ({' '.join(str(exc).split())})",
        ) from None
    return security


def refusal(reason: str, address: str) -> str | None:
    """One line for a TLS failure of connecting to ``address`` (distributed's message
    ``reason``), or None when it is no TLS problem."""
    if "ssl_context" in reason or "TLS expects" in reason:
        return (
            f"{address} needs TLS certificates: --tls-ca-file, --tls-cert and --tls-key "
            "(or distributed.comm.tls.* in the Dask config)"
        )
    if "certificate does not match" in reason or "CERTIFICATE_VERIFY_FAILED" in reason:
        return (
            "the scheduler's TLS certificate is not signed by --tls-ca-file's CA "
            "(a certificate from another cluster?)"
        )
    if "UNKNOWN_CA" in reason or "BAD_CERTIFICATE" in reason or "CERTIFICATE_REQUIRED" in reason:
        return (
            "the scheduler refused our TLS certificate: it is not signed by the cluster's "
            "CA (--tls-cert from another cluster?)"
        )
    if "SSL" in reason:
        return f"TLS handshake failed ({reason})"
    return None


# -- making a CA and certificates ---------------------------------------------------------


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_certificates(
    cluster_name: str = "streamem",
    hostnames: tuple[str, ...] = (),
    valid_days: int = DEFAULT_VALID_DAYS,
) -> dict[str, bytes]:
    """A CA and a key + certificate per role, as PEM bytes by file name.

    Returns ``{"ca.pem", "ca-key.pem", "scheduler.pem", "scheduler-key.pem",
    "worker.pem", "worker-key.pem", "client.pem", "client-key.pem"}``. Keys are
    ECDSA P-256; certificates are signed by the CA (``CN=<cluster_name> CA``), valid
    from now for ``valid_days``, with ``hostnames`` (DNS names or IP addresses) as
    subject alternative names of the scheduler's and workers' certificates (distributed
    does not check host names, other TLS clients may). Pure: writes nothing.
    """
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if valid_days < 1:
        raise InputError(None, f"--days must be at least 1 (got {valid_days})")
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=valid_days)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    ca_key = _key()
    ca_name = name(f"{cluster_name} CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    alt_names: list[x509.GeneralName] = [x509.DNSName("dask-internal")]
    for host in hostnames:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    files = {
        "ca.pem": ca_cert.public_bytes(serialization.Encoding.PEM),
        "ca-key.pem": _pem_key(ca_key),
    }
    for role in ROLES:
        key = _key()
        # every role both serves and connects (workers talk to each other and the scheduler)
        usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(f"{cluster_name} {role}"))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        files[f"{role}.pem"] = cert.public_bytes(serialization.Encoding.PEM)
        files[f"{role}-key.pem"] = _pem_key(key)
    return files


def dask_tls_config(folder: Path, role: str) -> str:
    """A Dask config file's text (YAML) that gives ``role`` the certificates in ``folder``
    (``DASK_CONFIG=...`` or ``~/.config/dask/``), TLS required."""
    folder = Path(folder).resolve()
    return (
        "distributed:\n"
        "  comm:\n"
        "    require-encryption: true\n"
        "    tls:\n"
        f"      ca-file: {folder / 'ca.pem'}\n"
        f"      {role}:\n"
        f"        cert: {folder / f'{role}.pem'}\n"
        f"        key: {folder / f'{role}-key.pem'}\n"
    )
