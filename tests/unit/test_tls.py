"""The TLS core (mqkit.tls), without a broker: the SSL context from settings, and what a
failed connection attempt means. The same failures against a real TLS node, on both
runtimes, are in tests/integration/test_tls.py."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from mqkit import tls
from mqkit.settings import Settings

URL = "amqps://127.0.0.1:5671/"


class Files:
    def __init__(self, root: Path) -> None:
        self.ca = trustme.CA()
        self.ca_file = str(root / "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)
        leaf = self.ca.issue_cert("client@example.invalid", common_name="client")
        self.cert_file, self.key_file = str(root / "cert.pem"), str(root / "key.pem")
        leaf.cert_chain_pems[0].write_to_path(self.cert_file)
        leaf.private_key_pem.write_to_path(self.key_file)
        other = trustme.CA().issue_cert("other@example.invalid")
        self.other_key_file = str(root / "other-key.pem")
        other.private_key_pem.write_to_path(self.other_key_file)
        key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
        self.encrypted_key_file = str(root / "encrypted-key.pem")
        Path(self.encrypted_key_file).write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"right pass phrase"),
            )
        )
        self.garbage = str(root / "garbage.pem")
        Path(self.garbage).write_text("not a PEM file\n")

    def settings(self, **overrides: object) -> Settings:
        values: dict[str, object] = {
            "url": URL,
            "ca_file": self.ca_file,
            "cert_file": self.cert_file,
            "key_file": self.key_file,
            "auth": "external",
        }
        values.update(overrides)
        return Settings(**values)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    return Files(tmp_path_factory.mktemp("tls"))


def _setup_error(settings: Settings) -> str:
    with pytest.raises(tls.TLSSetupError) as info:
        tls.ssl_context(settings)
    failure = tls.failure(URL, info.value)
    assert failure is not None
    assert str(failure).startswith(f"cannot connect to {URL}: TLS setup failed: ")
    return str(info.value)


def test_a_verifying_context_with_the_client_certificate(files: Files) -> None:
    context = tls.ssl_context(files.settings())
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert tls.external(files.settings())
    assert not tls.external(files.settings(url="amqps://u:p@h/", auth="plain"))


def test_a_missing_ca_file(files: Files) -> None:
    text = _setup_error(files.settings(ca_file="/nonexistent/ca.pem"))
    assert "ca_file '/nonexistent/ca.pem' cannot be read" in text and "MQKIT_CA_FILE" in text


def test_a_ca_file_that_is_not_pem(files: Files) -> None:
    text = _setup_error(files.settings(ca_file=files.garbage))
    assert "ca_file" in text and "holds no usable CA certificate" in text


def test_a_missing_certificate_or_key(files: Files) -> None:
    assert "cert_file '/nonexistent/c.pem' cannot be read" in _setup_error(
        files.settings(cert_file="/nonexistent/c.pem")
    )
    assert "key_file '/nonexistent/k.pem' cannot be read" in _setup_error(
        files.settings(key_file="/nonexistent/k.pem")
    )


def test_a_certificate_or_key_that_is_not_pem(files: Files) -> None:
    assert "cert_file" in _setup_error(files.settings(cert_file=files.garbage))
    assert "key_file" in _setup_error(files.settings(key_file=files.garbage))


def test_a_key_that_is_not_the_certificates(files: Files) -> None:
    text = _setup_error(files.settings(key_file=files.other_key_file))
    assert "is not the private key of cert_file" in text


def test_an_encrypted_key_never_prompts(files: Files) -> None:
    # Without key_password OpenSSL would prompt on the terminal; mqkit answers for it.
    text = _setup_error(files.settings(key_file=files.encrypted_key_file))
    assert "is encrypted and no key_password is set" in text and "MQKIT_KEY_PASSWORD" in text
    wrong = _setup_error(files.settings(key_file=files.encrypted_key_file, key_password="nope"))
    assert "key_password does not decrypt key_file" in wrong and "nope" not in wrong
    context = tls.ssl_context(
        files.settings(key_file=files.encrypted_key_file, key_password="right pass phrase")
    )
    assert context.verify_mode == ssl.CERT_REQUIRED


def test_failure_finds_ssl_errors_wrapped_by_client_libraries() -> None:
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    verify.verify_message = "self-signed certificate in certificate chain"
    wrapped = ConnectionError("could not connect")
    wrapped.__cause__ = verify
    failure = tls.failure(URL, wrapped)
    assert failure is not None
    assert "TLS certificate verification failed (self-signed certificate" in str(failure)
    assert "ca_file" in str(failure)

    class WorkflowFailed(Exception):  # pika keeps its attempts' errors in .exceptions
        def __init__(self, exceptions: list[BaseException]) -> None:
            super().__init__()
            self.exceptions = exceptions

    wrong_version = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    wrong_version.reason = "WRONG_VERSION_NUMBER"  # type: ignore[misc]
    failure = tls.failure(URL, WorkflowFailed([wrong_version]))
    assert failure is not None and "does not speak TLS" in str(failure)


def test_failure_reads_an_alert_from_the_text_of_a_wrapped_error() -> None:
    # pika reports an alert the broker sent as text inside its own exception.
    lost = ConnectionError(
        "StreamLostError: (\"Stream connection lost: SSLError(1, '[SSL: "
        "TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca (_ssl.c:2580)')\",)"
    )
    failure = tls.failure(URL, lost)
    assert failure is not None
    assert "refused the TLS handshake (TLSV1_ALERT_UNKNOWN_CA" in str(failure)


def test_failure_knows_the_external_answers() -> None:
    class AuthenticationError(Exception):
        pass

    class ProbableAuthenticationError(Exception):
        pass

    not_offered_pika = AuthenticationError(
        "Server and client could not negotiate use of the EXTERNAL authentication mechanism"
    )
    not_offered_aiormq = AuthenticationError("PLAIN AMQPLAIN", ["PLAIN", "EXTERNAL"])
    for error in (not_offered_pika, not_offered_aiormq):
        failure = tls.failure(URL, error)
        assert failure is not None and "rabbitmq_auth_mechanism_ssl" in str(failure)
    plain_not_offered = AuthenticationError("EXTERNAL", ["PLAIN", "EXTERNAL"])
    assert tls.failure(URL, plain_not_offered) is None  # a PLAIN problem: not ours
    refused = ProbableAuthenticationError(
        "ACCESS_REFUSED - Login was refused using authentication mechanism EXTERNAL."
    )
    failure = tls.failure(URL, refused)
    assert failure is not None and "refused the EXTERNAL login" in str(failure)
    plain_refused = ProbableAuthenticationError(
        "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN."
    )
    assert tls.failure(URL, plain_refused) is None


def test_failure_leaves_other_errors_alone() -> None:
    assert tls.failure(URL, ConnectionRefusedError(111, "Connection refused")) is None
    assert tls.failure(URL, TimeoutError("timed out")) is None


def test_only_a_plain_url_whose_port_closed_early_is_probed() -> None:
    reset = ConnectionError("Server connection reset")
    reset.__cause__ = ConnectionResetError(104, "Connection reset by peer")
    assert tls.probe_needed("amqp://h:5671/", reset)
    assert not tls.probe_needed("amqps://h:5671/", reset)
    assert not tls.probe_needed("amqp://h:5671/", ConnectionRefusedError(111, "refused"))


@pytest.fixture
def tls_server(files: Files, tmp_path: Path) -> Iterator[int]:
    """A loopback port that completes TLS handshakes (and nothing else)."""
    server_cert = files.ca.issue_cert("127.0.0.1")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_cert.configure_cert(context)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                with context.wrap_socket(sock, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                sock.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(5)
    listener.close()


def test_speaks_tls_tells_a_tls_port_from_a_plain_one(tls_server: int) -> None:
    assert tls.speaks_tls(f"amqp://127.0.0.1:{tls_server}/")
    with socket.create_server(("127.0.0.1", 0)) as plain:
        port = plain.getsockname()[1]

        def answer_garbage() -> None:
            sock, _ = plain.accept()
            with sock:
                sock.sendall(b"AMQP\x00\x00\x09\x01")

        thread = threading.Thread(target=answer_garbage, daemon=True)
        thread.start()
        assert not tls.speaks_tls(f"amqp://127.0.0.1:{port}/")
        thread.join(5)
    assert not tls.speaks_tls(f"amqp://127.0.0.1:{port}/", timeout=1.0)  # nothing listens
