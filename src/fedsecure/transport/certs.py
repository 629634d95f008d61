"""Certificates for a test federation: one CA, one key and certificate per party.

Every gRPC connection (model owner to worker, worker to worker) runs over mutual
TLS, and a worker knows who is calling only from the common name (CN) of the
certificate the caller presented. So a party's name is its identity: the CA signs
a leaf certificate with ``CN=<name>`` for each party, and the same name becomes
the file name ``<name>.pem``, which is why names are restricted to a safe set of
characters and never let a file land outside the federation's directory.

Keys are ECDSA P-256: gRPC's TLS stack (BoringSSL) accepts them, while a handshake
with Ed25519 certificates fails (no common signature algorithm). This is tooling for tests and small deployments;
keep ``ca.key`` away from the workers (only ``ca.pem`` and each party's own key
and certificate go to that party).

On the command line: ``fedsecure certs DIR --party bob --party alice ...`` (`fedsecure.cli.certs`).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsecure.aggregate.identity import SigningIdentity
from fedsecure.errors import SecAggInputError
from fedsecure.worker.secure import SecAggIdentity

DEFAULT_CA_NAME = "fedsecure test CA"
DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
DEFAULT_DAYS = 365
CA = "ca"  # file stem of the CA's files; no party may take it
SECAGG_KEY = ".secagg.key"  # suffix of a party's secure aggregation signing key

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_DNS = re.compile(
    r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_CLOCK_SKEW = datetime.timedelta(minutes=5)  # backdate notBefore so a peer's slow clock still accepts it


@dataclass(frozen=True, slots=True)
class Paths:
    """Where one party's (or the CA's) key and certificate were written."""

    key: Path
    cert: Path


def check_name(name: str) -> str:
    """Return ``name`` if it may be a party's name (and file stem); raise ValueError otherwise."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"invalid party name {name!r}: use 1 to 64 characters, only letters, digits, '-', '_' "
            "and '.' (the name becomes the certificate's common name and the file name NAME.pem)"
        )
    if name.startswith("."):
        raise ValueError(f"invalid party name {name!r}: it must not start with '.' (a hidden file, or '..')")
    return name


def _check_days(days: int) -> datetime.timedelta:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValueError(f"days must be a whole number of days >= 1, not {days!r}")
    return datetime.timedelta(days=days)


def _san(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        if not isinstance(host, str):
            raise ValueError(f"invalid host {host!r}: hosts are strings (DNS names or IP addresses)")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        if len(host) > 253 or not _DNS.fullmatch(host):
            raise ValueError(
                f"invalid host {host!r}: give an IP address (127.0.0.1, ::1) or a DNS name "
                "(localhost, worker1.example.org) under which the party is reached"
            )
        names.append(x509.DNSName(host.lower()))
    return names


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _subject(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates (and revocation lists); a party signs its TLS handshakes."""
    return x509.KeyUsage(
        digital_signature=not ca, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False,
    )


def make_ca(common_name: str = DEFAULT_CA_NAME, *, days: int = DEFAULT_DAYS) -> tuple[bytes, bytes]:
    """A new self-signed CA: ``(key_pem, cert_pem)``, valid for ``days`` days from now."""
    if not common_name or len(common_name) > 64:
        raise ValueError(f"the CA's common name must have 1 to 64 characters, not {common_name!r}")
    lifetime = _check_days(days)
    key = _new_key()
    now = datetime.datetime.now(datetime.UTC)
    name = _subject(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def _load_ca(ca_key_pem: bytes, ca_cert_pem: bytes) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = serialization.load_pem_private_key(ca_key_pem, password=None)
    cert = x509.load_pem_x509_certificate(ca_cert_pem)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"the CA key is a {type(key).__name__}; make the CA with make_ca() (ECDSA P-256)")
    if key.public_key() != cert.public_key():
        raise ValueError("the CA key does not belong to the CA certificate; pass the ca.key made with ca.pem")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ValueError(
            f"{cert.subject.rfc4514_string()} is not a CA certificate (BasicConstraints ca=False)"
        )
    return key, cert


def _authority_key_id(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:  # a CA made elsewhere
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())


def issue(
    ca_key_pem: bytes,
    ca_cert_pem: bytes,
    name: str,
    *,
    hosts: Iterable[str] = DEFAULT_HOSTS,
    days: int = DEFAULT_DAYS,
    client: bool = True,
    server: bool = True,
) -> tuple[bytes, bytes]:
    """A new key and a certificate for party ``name`` signed by the CA: ``(key_pem, cert_pem)``.

    ``hosts`` (DNS names and IP addresses) are the names a server is reached under;
    the certificate never outlives the CA. ``client``/``server`` choose the extended
    key usages (a party that both calls and serves, as every worker does, needs both).
    """
    check_name(name)
    lifetime = _check_days(days)
    if not (client or server):
        raise ValueError("a certificate must allow client or server authentication (or both)")
    san = _san(hosts)
    if server and not san:
        raise ValueError(
            f"a server certificate for {name!r} needs at least one host (DNS name or IP address)"
        )
    ca_key, ca_cert = _load_ca(ca_key_pem, ca_cert_pem)
    key = _new_key()
    now = datetime.datetime.now(datetime.UTC)
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(_subject(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(min(now + lifetime, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_id(ca_key, ca_cert), critical=False)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def common_name(cert_pem: bytes) -> str:
    """The subject's common name of a PEM certificate: the party's identity."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    values = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(values) != 1:
        raise ValueError(
            f"certificate {cert.subject.rfc4514_string()!r} has {len(values)} common names, not 1"
        )
    value = values[0].value
    return value.decode() if isinstance(value, bytes) else value


def load_pem(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a PEM file (key or certificate), checked to be PEM."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} not found; make a test federation's certificates with "
            "`fedsecure certs DIR --party NAME ...`"
        ) from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{path} is not a PEM file (no '-----BEGIN' line)")
    return data


def _target(directory: Path, stem: str, suffix: str) -> Path:
    path = directory / f"{stem}{suffix}"
    resolved = path.resolve()
    if resolved.parent != directory.resolve():
        raise ValueError(f"refusing to write {path}: it resolves to {resolved}, outside {directory}")
    return path


def _write(path: Path, data: bytes, *, mode: int, overwrite: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    # Without overwrite, O_EXCL refuses any existing entry (a symlink too). With it, write a
    # fresh file beside the target and rename it over, which replaces a link instead of following it.
    target = path.with_name(f".{path.name}.tmp") if overwrite else path
    if overwrite and os.path.lexists(target):
        target.unlink()
    fd = os.open(target, flags, mode)
    try:
        os.fchmod(fd, mode)  # os.open's mode is filtered by the umask
        os.write(fd, data)
    finally:
        os.close(fd)
    if overwrite:
        os.replace(target, path)


def write_federation(
    directory: str | os.PathLike[str],
    names: Iterable[str],
    *,
    hosts: Iterable[str] = DEFAULT_HOSTS,
    days: int = DEFAULT_DAYS,
    ca_name: str = DEFAULT_CA_NAME,
    overwrite: bool = False,
    secagg: Iterable[str] = (),
) -> dict[str, Paths]:
    """Write a new CA and one key and certificate per party into ``directory``.

    Writes ``ca.pem``, ``ca.key`` and ``NAME.pem``, ``NAME.key`` for each name (keys
    readable by the owner only) and returns their paths by party name, the CA's
    under ``"ca"``. Nothing is written if any file exists, unless ``overwrite``.

    ``secagg``: the parties that take part in secure aggregation against a malicious server
    (the data owners). Each gets ``NAME.secagg.key``, its Ed25519 signing key, and all share the
    public ``secagg.json`` (name -> client id and verification key), the PKI of Bonawitz et al.'s
    consistency check (`load_secagg_identity`, `load_secagg_ids`).
    """
    names = list(names)
    signers = list(dict.fromkeys(secagg))
    _check_parties(names, signers)
    ca_key, ca_cert = make_ca(ca_name, days=days)  # everything is made (and checked) before a write
    made = {CA: (ca_key, ca_cert)}
    hosts = list(hosts)
    for name in names:
        made[name] = issue(ca_key, ca_cert, name, hosts=hosts, days=days)

    root = Path(directory)
    created = not root.exists()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    if created:
        root.chmod(0o700)
    paths = {
        stem: Paths(key=_target(root, stem, ".key"), cert=_target(root, stem, ".pem"))
        for stem in [CA, *names]
    }
    extra = _secagg_files(root, signers)
    if not overwrite:
        _refuse_existing(paths, extra)
    for stem, (key, cert) in made.items():
        _write(paths[stem].key, key, mode=0o600, overwrite=overwrite)
        _write(paths[stem].cert, cert, mode=0o644, overwrite=overwrite)
    for path, data in extra.items():
        _write(path, data, mode=0o644 if path.suffix == ".json" else 0o600, overwrite=overwrite)
    return paths


def _check_parties(names: list[str], signers: list[str]) -> None:
    unknown = sorted(set(signers) - set(names))
    if unknown:
        raise ValueError(f"--secagg names {unknown}, which are not parties: add them with --party too")
    if not names:
        raise ValueError("name at least one party (for example bob, alice, secure_worker, owner)")
    for name in names:
        check_name(name)
        if name.lower() == CA:
            raise ValueError(f"{name!r} cannot be a party's name: ca.pem and ca.key are the CA's files")
    folded = [name.lower() for name in names]  # bob.pem and Bob.pem are one file on some file systems
    repeated = sorted({name for name, low in zip(names, folded, strict=True) if folded.count(low) > 1})
    if repeated:
        raise ValueError(f"party names must differ (also in case): {repeated}")


def _secagg_files(root: Path, signers: list[str]) -> dict[Path, bytes]:
    """Each signer's ``NAME.secagg.key``, and the public ``secagg.json`` that all of them share."""
    signing = {name: Ed25519PrivateKey.generate() for name in signers}
    files = {_target(root, name, SECAGG_KEY): key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        for name, key in signing.items()}
    if signers:
        pki = {"clients": {name: {"id": i, "verify_key": key.public_key().public_bytes_raw().hex()}
                           for i, (name, key) in enumerate(signing.items(), start=1)}}
        files[_target(root, "secagg", ".json")] = (json.dumps(pki, indent=2) + "\n").encode()
    return files


def _refuse_existing(paths: dict[str, Paths], extra: dict[Path, bytes]) -> None:
    for path in extra:
        if os.path.lexists(path):
            raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
    for party in paths.values():
        for path in (party.key, party.cert):
            if os.path.lexists(path):
                raise FileExistsError(
                    f"{path} already exists; pass overwrite=True (--overwrite) to replace the "
                    "federation's files, or choose another directory"
                )


def load_secagg_ids(pki: str | os.PathLike[str]) -> dict[str, int]:
    """Each party's client id in a ``secagg.json`` PKI: what the model owner passes as
    ``SecureSettings(client_ids=...)``."""
    return {name: cid for name, (cid, _) in _read_pki(Path(pki)).items()}


def load_secagg_identity(key: str | os.PathLike[str], pki: str | os.PathLike[str], name: str) -> SecAggIdentity:
    """Party ``name``'s secure aggregation identity: its signing key (``NAME.secagg.key``) and the
    federation's verification keys (``secagg.json``), both from its own operator's files."""
    members = _read_pki(Path(pki))
    if name not in members:
        raise ValueError(f"{pki} has no secure aggregation key for {name!r}; it lists {sorted(members)}")
    private = serialization.load_pem_private_key(load_pem(key), password=None)
    if not isinstance(private, Ed25519PrivateKey):
        raise ValueError(f"{key} is not an Ed25519 private key")
    identity = SigningIdentity(private, {cid: public for cid, public in members.values()})
    try:
        return SecAggIdentity(members[name][0], identity)
    except SecAggInputError:
        raise ValueError(f"{key} is not the key {pki} lists for {name!r}") from None


def _read_pki(path: Path) -> dict[str, tuple[int, bytes]]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the secure aggregation PKI {path}: {exc}") from None
    clients = raw.get("clients") if isinstance(raw, dict) else None
    if not isinstance(clients, dict) or not clients:
        raise ValueError(f"{path} must be {{\"clients\": {{name: {{\"id\": int, \"verify_key\": hex}}}}}}")
    out: dict[str, tuple[int, bytes]] = {}
    for name, entry in clients.items():
        ok = isinstance(entry, dict) and type(entry.get("id")) is int and isinstance(entry.get("verify_key"), str)
        try:
            key = bytes.fromhex(entry["verify_key"]) if ok else b""
        except ValueError:
            key = b""
        if not ok or not 0 < entry["id"] < 1 << 32 or len(key) != 32:
            raise ValueError(f"{path}: the entry for {name!r} must hold an id in [1, 2^32) and a 64-digit hex key")
        out[name] = (entry["id"], key)
    if len({cid for cid, _ in out.values()}) != len(out):
        raise ValueError(f"{path}: two parties share one client id")
    return out
