"""The client's TLS setup: files checked before connecting, gRPC's failures told in one line."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from domsnap.client import connection
from domsnap.client.connection import TlsError, TlsFiles, channel_credentials, tls_failure
from tests.tlscerts import CA, Pair

ADDRESS = connection.parse_address("127.0.0.1:7411")
VERIFY_FAILED = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:7411: Tls handshake failed "
                 "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:"
                 "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate: OK")
CLOSED = "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:7411: Socket closed"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Pair, Pair, Pair]:
    folder = tmp_path_factory.mktemp("clientpki")
    ca = CA("ca")
    return ca.write(folder / "ca.crt"), ca.issue(folder, "me", "ops"), ca.issue(folder, "old", "ops", expired=True), \
        ca.issue(folder, "other", "monitor")


def test_good_files_make_credentials(certs: tuple[Path, Pair, Pair, Pair]) -> None:
    ca, me, _, _ = certs
    assert channel_credentials(TlsFiles(str(ca), str(me.cert), str(me.key))) is not None
    assert channel_credentials(TlsFiles(str(ca))) is not None


def test_expired_or_not_yet_valid_certificates_are_refused_before_connecting(
        certs: tuple[Path, Pair, Pair, Pair]) -> None:
    ca, me, old, _ = certs
    with pytest.raises(TlsError, match=rf"the client certificate {old.cert} expired on \d{{4}}-"):
        channel_credentials(TlsFiles(str(ca), str(old.cert), str(old.key)))
    with pytest.raises(TlsError, match="is not valid before"):
        channel_credentials(TlsFiles(str(ca), str(me.cert), str(me.key)), now=time.time() - 7 * 86400)


def test_file_mistakes(certs: tuple[Path, Pair, Pair, Pair], tmp_path: Path) -> None:
    ca, me, _, other = certs
    with pytest.raises(TlsError, match="--cert and --key go together"):
        channel_credentials(TlsFiles(str(ca), str(me.cert)))
    with pytest.raises(TlsError, match=r"is the key the certificate's\?"):
        channel_credentials(TlsFiles(str(ca), str(me.cert), str(other.key)))
    with pytest.raises(TlsError, match=r"cannot read --key .*: No such file or directory"):
        channel_credentials(TlsFiles(str(ca), str(me.cert), str(tmp_path / "nope")))
    with pytest.raises(TlsError, match="no CA certificate in it"):
        channel_credentials(TlsFiles(str(me.key)))


def test_grpc_failures_in_words(certs: tuple[Path, Pair, Pair, Pair]) -> None:
    ca, me, _, _ = certs
    tls = TlsFiles(str(ca), str(me.cert), str(me.key))
    assert tls_failure(VERIFY_FAILED, ADDRESS, tls) == (
        f"the agent's certificate at 127.0.0.1:7411 is not trusted by --ca {ca}: unable to get local issuer "
        "certificate")
    assert tls_failure(CLOSED, ADDRESS, tls) == (
        f"the agent at 127.0.0.1:7411 refused the client certificate {me.cert} (CN=ops): not issued by the CA it "
        "trusts for clients, or expired")
    assert "requires a client certificate" in (tls_failure(CLOSED, ADDRESS, TlsFiles(str(ca))) or "")
    refused = "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:7411: Connection refused"
    assert tls_failure(refused, ADDRESS, tls) is None


def test_environment_gives_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOMSNAP_CA", "/a")
    monkeypatch.setenv("DOMSNAP_CERT", "/b")
    monkeypatch.delenv("DOMSNAP_KEY", raising=False)
    assert TlsFiles.from_env() == TlsFiles("/a", "/b", None)
    assert TlsFiles.from_env().enabled
    assert not TlsFiles().enabled
