"""fedsecure.transport.certs: a test federation's CA and party certificates, and mutual TLS with them."""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsecure.cli import certs as certs_cli
from fedsecure.transport import certs

SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH


@pytest.fixture(scope="module")
def ca() -> tuple[bytes, bytes]:
    return certs.make_ca()


@pytest.fixture(scope="module")
def bob(ca: tuple[bytes, bytes]) -> tuple[bytes, bytes]:
    return certs.issue(*ca, "bob")


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _ext(cert: x509.Certificate, kind: type[Any]) -> Any:
    return cert.extensions.get_extension_for_class(kind)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the CA and the leaf certificates -------------------------------------------------------


def test_ca_is_a_self_signed_p256_ca(ca: tuple[bytes, bytes]) -> None:
    key_pem, cert_pem = ca
    cert = _cert(cert_pem)
    cert.verify_directly_issued_by(cert)
    assert certs.common_name(cert_pem) == "fedsecure test CA"
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
    basic = _ext(cert, x509.BasicConstraints)
    assert basic.critical and basic.value.ca
    usage = _ext(cert, x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert _ext(cert, x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(public)
    assert b"-----BEGIN PRIVATE KEY-----" in key_pem
    now = datetime.datetime.now(datetime.UTC)
    assert cert.not_valid_before_utc <= now
    assert cert.not_valid_after_utc - now > datetime.timedelta(days=364)


def test_leaf_is_signed_by_the_ca_and_names_the_party(
    ca: tuple[bytes, bytes], bob: tuple[bytes, bytes]
) -> None:
    ca_cert, leaf = _cert(ca[1]), _cert(bob[1])
    leaf.verify_directly_issued_by(ca_cert)
    assert certs.common_name(bob[1]) == "bob"
    assert leaf.issuer == ca_cert.subject
    assert not _ext(leaf, x509.BasicConstraints).value.ca
    assert _ext(leaf, x509.KeyUsage).value.digital_signature
    aki = _ext(leaf, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == _ext(ca_cert, x509.SubjectKeyIdentifier).value.digest
    now = datetime.datetime.now(datetime.UTC)
    assert ca_cert.not_valid_before_utc <= leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc
    assert leaf.not_valid_after_utc <= ca_cert.not_valid_after_utc


def test_another_ca_did_not_sign_the_leaf(bob: tuple[bytes, bytes]) -> None:
    other = _cert(certs.make_ca("another CA")[1])
    with pytest.raises(ValueError):
        _cert(bob[1]).verify_directly_issued_by(other)


verification = pytest.importorskip("cryptography.x509.verification")


def test_chain_verifies_as_a_server_for_each_host(ca: tuple[bytes, bytes], bob: tuple[bytes, bytes]) -> None:
    store = verification.Store([_cert(ca[1])])
    subjects: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    for subject in subjects:
        verifier = verification.PolicyBuilder().store(store).build_server_verifier(subject)
        chain = verifier.verify(_cert(bob[1]), [])
        assert chain[-1] == _cert(ca[1])
    wrong_host = verification.PolicyBuilder().store(store).build_server_verifier(x509.DNSName("evil.example"))
    with pytest.raises(verification.VerificationError):
        wrong_host.verify(_cert(bob[1]), [])


def test_chain_does_not_verify_against_another_ca(bob: tuple[bytes, bytes]) -> None:
    store = verification.Store([_cert(certs.make_ca("another CA")[1])])
    verifier = verification.PolicyBuilder().store(store).build_server_verifier(x509.DNSName("localhost"))
    with pytest.raises(verification.VerificationError):
        verifier.verify(_cert(bob[1]), [])


def test_chain_verifies_as_a_client(ca: tuple[bytes, bytes], bob: tuple[bytes, bytes]) -> None:
    if not hasattr(verification.PolicyBuilder, "build_client_verifier"):
        pytest.skip("cryptography < 45 has no client verifier")
    store = verification.Store([_cert(ca[1])])
    verified = verification.PolicyBuilder().store(store).build_client_verifier().verify(_cert(bob[1]), [])
    assert verified.chain[-1] == _cert(ca[1])


def test_default_sans_and_both_usages(bob: tuple[bytes, bytes]) -> None:
    leaf = _cert(bob[1])
    san = _ext(leaf, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert set(_ext(leaf, x509.ExtendedKeyUsage).value) == {SERVER_AUTH, CLIENT_AUTH}


def test_custom_hosts_and_single_usages(ca: tuple[bytes, bytes]) -> None:
    hosts = ("Worker1.Example.org", "10.0.0.7", "fd00::7")
    leaf = _cert(certs.issue(*ca, "alice", hosts=hosts, client=False)[1])
    san = _ext(leaf, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["worker1.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("fd00::7"),
    ]
    assert list(_ext(leaf, x509.ExtendedKeyUsage).value) == [SERVER_AUTH]
    client_only = _cert(certs.issue(*ca, "owner", hosts=(), server=False)[1])
    assert list(_ext(client_only, x509.ExtendedKeyUsage).value) == [CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        _ext(client_only, x509.SubjectAlternativeName)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"client": False, "server": False}, "client or server"),
        ({"hosts": ()}, "at least one host"),
        ({"hosts": ("bad host",)}, "invalid host"),
        ({"hosts": ("a/b",)}, "invalid host"),
        ({"days": 0}, "days"),
    ],
)
def test_issue_refuses_bad_arguments(ca: tuple[bytes, bytes], kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        certs.issue(*ca, "bob", **kwargs)


def test_leaf_never_outlives_its_ca() -> None:
    ca = certs.make_ca(days=1)
    leaf = _cert(certs.issue(*ca, "bob", days=365)[1])
    assert leaf.not_valid_after_utc <= _cert(ca[1]).not_valid_after_utc


def test_issue_refuses_a_key_of_another_ca_and_a_leaf_as_ca(
    ca: tuple[bytes, bytes], bob: tuple[bytes, bytes]
) -> None:
    other_key, _ = certs.make_ca("another CA")
    with pytest.raises(ValueError, match="does not belong"):
        certs.issue(other_key, ca[1], "alice")
    with pytest.raises(ValueError, match="not a CA"):
        certs.issue(bob[0], bob[1], "alice")


BAD_NAMES = [
    "../x",
    "",
    "a/b",
    "a" * 65,
    "..",
    ".hidden",
    "a\\b",
    "bo b",
    "bob\n",
    "bob\x00",
    "böb",
    "/etc/x",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused(ca: tuple[bytes, bytes], tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="invalid party name"):
        certs.issue(*ca, name)
    with pytest.raises(ValueError, match="invalid party name"):
        certs.write_federation(tmp_path / "fed", ["bob", name])
    assert not (tmp_path / "fed").exists() or not any((tmp_path / "fed").iterdir())


def test_longest_name_and_all_allowed_characters(ca: tuple[bytes, bytes]) -> None:
    for name in ("a" * 64, "Worker-1_eu.west", "7"):
        assert certs.common_name(certs.issue(*ca, name)[1]) == name


# --- files ------------------------------------------------------------------------------------


def test_write_federation_writes_keys_owner_only(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "federation"
    paths = certs.write_federation(directory, ["bob", "alice", "secure_worker", "owner"])
    assert _mode(directory) == 0o700
    assert set(paths) == {"ca", "bob", "alice", "secure_worker", "owner"}
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        f"{stem}{suffix}" for stem in paths for suffix in (".pem", ".key")
    )
    ca_cert = _cert(certs.load_pem(paths["ca"].cert))
    for name, party in paths.items():
        assert party.key.parent == directory and party.cert.parent == directory
        assert _mode(party.key) == 0o600, party.key
        assert _mode(party.cert) == 0o644, party.cert
        cert_pem = certs.load_pem(party.cert)
        _cert(cert_pem).verify_directly_issued_by(ca_cert)
        if name != "ca":
            assert certs.common_name(cert_pem) == name
    assert certs.common_name(certs.load_pem(paths["ca"].cert)) == "fedsecure test CA"


def test_write_federation_refuses_to_overwrite(tmp_path: Path) -> None:
    paths = certs.write_federation(tmp_path, ["bob"])
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(FileExistsError, match="ca.key already exists.*overwrite"):
        certs.write_federation(tmp_path, ["bob"])
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before
    again = certs.write_federation(tmp_path, ["bob"], overwrite=True)
    assert again == paths
    assert paths["ca"].cert.read_bytes() != before[paths["ca"].cert]
    assert _mode(paths["bob"].key) == 0o600
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_one_existing_file_stops_every_write(tmp_path: Path) -> None:
    (tmp_path / "bob.pem").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="bob.pem already exists"):
        certs.write_federation(tmp_path, ["alice", "bob"])
    assert [p.name for p in tmp_path.iterdir()] == ["bob.pem"]
    assert (tmp_path / "bob.pem").read_bytes() == b"mine"


def test_write_federation_never_follows_a_link_out_of_the_directory(tmp_path: Path) -> None:
    outside = tmp_path / "outside.pem"
    outside.write_bytes(b"not yours")
    directory = tmp_path / "federation"
    directory.mkdir()
    (directory / "bob.pem").symlink_to(outside)
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="bob.pem: it resolves to .*outside"):
            certs.write_federation(directory, ["bob"], overwrite=overwrite)
    (directory / "bob.pem").unlink()
    (directory / "bob.pem").symlink_to(tmp_path / "dangling.pem")
    with pytest.raises(ValueError, match="outside"):
        certs.write_federation(directory, ["bob"], overwrite=True)
    assert outside.read_bytes() == b"not yours"
    assert not (tmp_path / "dangling.pem").exists()
    assert sorted(p.name for p in directory.iterdir()) == ["bob.pem"]


@pytest.mark.parametrize(
    ("names", "kwargs", "message"),
    [
        ([], {}, "at least one party"),
        (["ca"], {}, "CA's files"),
        (["CA"], {}, "CA's files"),
        (["bob", "Bob"], {}, "differ"),
        (["bob"], {"hosts": ["no such host!"]}, "invalid host"),
        (["bob"], {"days": -1}, "days"),
        (["bob"], {"ca_name": ""}, "common name"),
    ],
)
def test_write_federation_checks_everything_before_writing(
    tmp_path: Path, names: list[str], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        certs.write_federation(tmp_path / "fed", names, **kwargs)
    assert not (tmp_path / "fed").exists()


def test_load_pem_says_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="fedsecure certs DIR --party"):
        certs.load_pem(tmp_path / "missing.pem")
    (tmp_path / "junk.pem").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a PEM file"):
        certs.load_pem(tmp_path / "junk.pem")


def test_common_name_refuses_a_certificate_without_one() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "no common name")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(ValueError, match="0 common names"):
        certs.common_name(cert.public_bytes(serialization.Encoding.PEM))


# --- the command line ---------------------------------------------------------------------------


def test_main_writes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(tmp_path / "fed"), "--party", "bob", "--party", "alice", "--host", "10.1.2.3", "--days", "30"]
    assert certs_cli.main(argv) == 0
    out = capsys.readouterr().out
    for name in ("ca", "bob", "alice"):
        assert str(tmp_path / "fed" / f"{name}.key") in out
    assert "10.1.2.3" in out and "30 days" in out
    leaf = _cert((tmp_path / "fed" / "bob.pem").read_bytes())
    assert _ext(leaf, x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.1.2.3")
    ]
    assert certs_cli.main(argv) == 1
    assert "already exists" in capsys.readouterr().err
    assert certs_cli.main([*argv, "--overwrite"]) == 0
    assert certs_cli.main([str(tmp_path / "other"), "--party", "../x"]) == 1
    assert "invalid party name '../x'" in capsys.readouterr().err


def test_main_help_and_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        certs_cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--party NAME" in out and "--overwrite" in out and "common name" in out
    with pytest.raises(SystemExit) as exit_:
        certs_cli.main(["somewhere"])  # no --party
    assert exit_.value.code == 2


def test_runs_as_a_module(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(certs.__file__).parents[2])}
    done = subprocess.run(
        [sys.executable, "-m", "fedsecure.cli.certs", str(tmp_path), "--party", "bob"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "bob.key").exists() and "bob.pem" in done.stdout


# --- mutual TLS with grpc -------------------------------------------------------------------------


def _reply_with_peer_name(request: bytes, context: grpc.ServicerContext) -> bytes:
    (name,) = context.auth_context()["x509_common_name"]
    return name


@contextmanager
def _serve(key: bytes, cert: bytes, ca_cert: bytes) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "fedsecure.Worker", {"Handle": grpc.unary_unary_rpc_method_handler(_reply_with_peer_name)}
    )
    server.add_generic_rpc_handlers((handler,))
    credentials = grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca_cert, require_client_auth=True
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    assert port > 0
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def _call(target: str, credentials: grpc.ChannelCredentials) -> bytes:
    with grpc.secure_channel(target, credentials) as channel:
        reply: bytes = channel.unary_unary("/fedsecure.Worker/Handle")(b"who am I?", timeout=5)
        return reply


def _refused(target: str, credentials: grpc.ChannelCredentials) -> None:
    with pytest.raises(grpc.RpcError) as error:
        _call(target, credentials)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_with_grpc(tmp_path: Path) -> None:
    paths = certs.write_federation(tmp_path, ["secure_worker", "alice", "owner"])
    ca_cert = certs.load_pem(paths["ca"].cert)

    def party(name: str) -> tuple[bytes, bytes]:
        return certs.load_pem(paths[name].key), certs.load_pem(paths[name].cert)

    with _serve(*party("secure_worker"), ca_cert) as target:
        for name in ("alice", "owner"):  # each caller is told apart by its certificate alone
            assert _call(target, grpc.ssl_channel_credentials(ca_cert, *party(name))) == name.encode()

        other_ca = certs.make_ca("another CA")
        stranger = certs.issue(*other_ca, "alice")
        _refused(target, grpc.ssl_channel_credentials(ca_cert, *stranger))  # right name, wrong CA
        _refused(target, grpc.ssl_channel_credentials(ca_cert))  # no client certificate
        ca_key = certs.load_pem(paths["ca"].key)
        client_only = certs.issue(ca_key, ca_cert, "carol", hosts=(), server=False)
        assert _call(target, grpc.ssl_channel_credentials(ca_cert, *client_only)) == b"carol"
        not_a_client = certs.issue(ca_key, ca_cert, "alice", client=False)
        _refused(target, grpc.ssl_channel_credentials(ca_cert, *not_a_client))  # no clientAuth usage
        # and the client refuses a server whose certificate another CA signed
        _refused(target, grpc.ssl_channel_credentials(other_ca[1], *party("alice")))


def test_secure_aggregation_keys_load_only_as_their_owners(tmp_path: Path) -> None:
    from fedsecure.transport.certs import load_secagg_identity, load_secagg_ids, write_federation

    with pytest.raises(ValueError, match="not parties"):
        write_federation(tmp_path / "x", ["bob"], secagg=["alice"])
    write_federation(tmp_path, ["owner", "bob", "alice"], secagg=["bob", "alice"])
    ids = load_secagg_ids(tmp_path / "secagg.json")
    assert sorted(ids) == ["alice", "bob"] and sorted(ids.values()) == [1, 2]
    bob = load_secagg_identity(tmp_path / "bob.secagg.key", tmp_path / "secagg.json", "bob")
    assert bob.client_id == ids["bob"]
    with pytest.raises(ValueError, match="not the key"):  # alice's key does not make one bob
        load_secagg_identity(tmp_path / "alice.secagg.key", tmp_path / "secagg.json", "bob")
    with pytest.raises(ValueError, match="no secure aggregation key for 'owner'"):
        load_secagg_identity(tmp_path / "bob.secagg.key", tmp_path / "secagg.json", "owner")
    (tmp_path / "bad.json").write_text('{"clients": {"bob": {"id": 0, "verify_key": "zz"}}}')
    with pytest.raises(ValueError, match="an id in"):
        load_secagg_ids(tmp_path / "bad.json")
    with pytest.raises(FileExistsError):  # nothing is replaced without overwrite
        write_federation(tmp_path, ["carol"], secagg=["carol"])
