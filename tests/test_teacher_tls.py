"""TLS, mutual TLS and bearer-token auth over loopback, with certificates made in the test."""

from __future__ import annotations

import datetime
import ipaddress

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from teacher_server.client import TeacherClient, TeacherUnavailableError
from teacher_server.service import CHANNEL_OPTIONS, SERVICE
from teacher_server.wire import pb
from tests.teacher_helpers import reference_logprobs, running_server

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

TOKEN = "t0ken-for-tests"


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key, issuer_name, issuer_key, *, ca=False, server_names=(), client=False):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
    if server_names:
        sans = [x509.IPAddress(ipaddress.ip_address(n)) if n[0].isdigit() else x509.DNSName(n) for n in server_names]
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    if client:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return b.sign(issuer_key or key, hashes.SHA256())


class _CA:
    def __init__(self, name: str):
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = _cert(name, self.key, None, None, ca=True)
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, subject: str, **kw) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(subject, key, self.cert.subject, self.key, **kw)
        return _pem_key(key), cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, other = _CA("opd test CA"), _CA("some other CA")
    server_key, server_cert = ca.issue("teacher", server_names=("localhost", "127.0.0.1"))
    files = {"ca.pem": ca.pem, "server.key": server_key, "server.pem": server_cert}
    for name, data in files.items():
        (d / name).write_bytes(data)
    return {"dir": d, "ca": ca.pem, "client": ca.issue("trainer", client=True),
            "stranger": other.issue("stranger", client=True), "other_ca": other.pem}


def _tls_kw(pki, mutual=False, token=None):
    d = pki["dir"]
    kw = {"tls_cert": str(d / "server.pem"), "tls_key": str(d / "server.key")}
    if mutual:
        kw["tls_client_ca"] = str(d / "ca.pem")
    if token:
        kw["auth_token"] = token
    return kw


def _secure_channel(url, root, client=None):
    key, chain = client if client else (None, None)
    return grpc.secure_channel(url, grpc.ssl_channel_credentials(root, key, chain), options=CHANNEL_OPTIONS)


def _get_info(channel, metadata=()):
    call = channel.unary_unary(f"/{SERVICE}/GetInfo", request_serializer=pb.GetInfoRequest.SerializeToString,
                               response_deserializer=pb.TeacherInfo.FromString)
    try:
        return call(pb.GetInfoRequest(), timeout=10, metadata=metadata)
    finally:
        channel.close()


def _check_scores(model_dir, client, url_label):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 512, size=24) for _ in range(3)]
    from teacher_server.client import ScoreSettings

    got = client.score(seqs, [1] * 3, settings=ScoreSettings(value_encoding="fp32"))
    for ids, g in zip(seqs, got):
        ref = reference_logprobs(model_dir, ids)[:-1]
        np.testing.assert_allclose(g.sampled_logprobs, ref[np.arange(23), ids[1:]], atol=1e-5, err_msg=url_label)


def test_tls_server_authenticated_by_ca_plaintext_refused(tiny_model_dir, pki):
    with running_server(tiny_model_dir, **_tls_kw(pki)) as (_, url):
        port = url.rsplit(":", 1)[1]
        for target in (url, f"localhost:{port}"):  # the certificate names both
            with TeacherClient(target, root_certificates=pki["ca"]) as c:
                _check_scores(tiny_model_dir, c, target)
        # a plaintext client cannot talk to a TLS port
        with pytest.raises(grpc.RpcError) as ei:
            _get_info(grpc.insecure_channel(url))
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        # a client that trusts another CA refuses the server's certificate
        with pytest.raises(grpc.RpcError) as ei:
            _get_info(_secure_channel(url, pki["other_ca"]))
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        with TeacherClient(url, root_certificates=pki["other_ca"], max_retries=0) as c:
            with pytest.raises(TeacherUnavailableError):
                c.info()


def test_mutual_tls_refuses_clients_without_a_trusted_certificate(tiny_model_dir, pki):
    with running_server(tiny_model_dir, **_tls_kw(pki, mutual=True)) as (_, url):
        # no client certificate: the handshake fails
        with pytest.raises(grpc.RpcError) as ei:
            _get_info(_secure_channel(url, pki["ca"]))
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        # a certificate from a CA the server does not trust: refused too
        with pytest.raises(grpc.RpcError) as ei:
            _get_info(_secure_channel(url, pki["ca"], client=pki["stranger"]))
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        with TeacherClient(url, root_certificates=pki["ca"], max_retries=0) as c:
            with pytest.raises(TeacherUnavailableError):
                c.score([[1, 2, 3]], [1])
        # the right certificate: served
        assert _get_info(_secure_channel(url, pki["ca"], client=pki["client"])).vocab_size == 512
        with TeacherClient(url, root_certificates=pki["ca"], client_cert=pki["client"]) as c:
            _check_scores(tiny_model_dir, c, url)


def test_token_over_mutual_tls_and_health_stays_open(tiny_model_dir, pki):
    with running_server(tiny_model_dir, **_tls_kw(pki, mutual=True, token=TOKEN)) as (_, url):
        for md in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
            with pytest.raises(grpc.RpcError) as ei:
                _get_info(_secure_channel(url, pki["ca"], client=pki["client"]), metadata=md)
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED, md
        with TeacherClient(url, root_certificates=pki["ca"], client_cert=pki["client"], max_retries=0) as c:
            with pytest.raises(grpc.RpcError) as ei:
                c.score([[1, 2, 3]], [1])
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED  # not retried: a config error
            assert c.retries == 0
        with TeacherClient(url, root_certificates=pki["ca"], client_cert=pki["client"], token=TOKEN) as c:
            _check_scores(tiny_model_dir, c, url)
        # health checks need no token (load balancers and kubelets probe them)
        ch = _secure_channel(url, pki["ca"], client=pki["client"])
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
        ch.close()


def test_token_without_tls_and_the_server_binds_loopback_by_default(tiny_model_dir):
    from teacher_server.service import ServerConfig

    assert ServerConfig().host == "127.0.0.1"
    with running_server(tiny_model_dir, auth_token=TOKEN) as (srv, url):
        assert url.startswith("127.0.0.1:")
        ch = grpc.insecure_channel(url)
        with pytest.raises(grpc.RpcError) as ei:
            list(ch.stream_stream(f"/{SERVICE}/Score", request_serializer=pb.ScoreRequest.SerializeToString,
                                  response_deserializer=pb.ScoreResult.FromString)(iter([]), timeout=10))
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ch.close()
        with TeacherClient(url, token=TOKEN) as c:
            _check_scores(tiny_model_dir, c, url)
