"""TLS, mutual TLS and API keys on a real 2-rank server, with certificates made here by the
`cryptography` package: every inference route of every protocol needs a key (gRPC metadata and
HTTP header, wrong and missing keys refused and counted), health stays open (and the plaintext
--health-port answers), metrics stay open unless --protect-metrics, and under mutual TLS a client
without a certificate signed by the CA cannot connect at all."""

from __future__ import annotations

import datetime
import ipaddress

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.dist_harness import free_port
from tests.server_proc import ServerProc
from tests.tiny_models import build_tiny_model_with_tokenizer
from tpserve.client import Client, open_channel

pytestmark = pytest.mark.slow
KEYS = ["k-alpha-0123456789abcdef", "k-beta-0123456789abcdef"]
PROMPT = [5, 6, 7, 8]


def _name(cn):
    from cryptography.x509.oid import NameOID
    from cryptography import x509

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject, issuer_name, issuer_key, key, ca=False, san=None):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 / localhost, a client certificate from the CA and
    one from a stranger CA; PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    d = tmp_path_factory.mktemp("pki")
    out = {}

    def write(name, key, cert):
        (d / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
        (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[name] = (str(d / f"{name}.pem"), str(d / f"{name}.key"))

    for ca_name in ("ca", "stranger"):
        key = ec.generate_private_key(ec.SECP256R1())
        write(ca_name, key, _cert(ca_name, _name(ca_name), key, key, ca=True))
        out[ca_name + "_key"] = key
    ca_key, ca_name = out["ca_key"], _name("ca")
    server_key = ec.generate_private_key(ec.SECP256R1())
    write("server", server_key, _cert("tpserve", ca_name, ca_key, server_key,
                                      san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]))
    client_key = ec.generate_private_key(ec.SECP256R1())
    write("client", client_key, _cert("backend", ca_name, ca_key, client_key))
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    write("rogue", rogue_key, _cert("rogue", _name("stranger"), out["stranger_key"], rogue_key))
    keys = d / "keys.txt"
    keys.write_text(f"# the backends' keys\n{KEYS[0]}\n\n{KEYS[1]}\n")
    out["keys"] = str(keys)
    return out


@pytest.fixture(scope="module")
def model_dir(tiny_dir):
    return build_tiny_model_with_tokenizer(tiny_dir)


def tls_context(ca, pair=None):
    import ssl

    ctx = ssl.create_default_context(cafile=ca)
    if pair is not None:
        ctx.load_cert_chain(*pair)
    return ctx


def health(channel, service=""):
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def tls_ready(srv, ca, timeout=180.0, **client):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open_channel(srv.address, ca, **client) as ch:
            try:
                if health(ch, "tpserve.v1.Generation") == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        if srv.proc.poll() is not None:
            raise RuntimeError(srv.tail())
        time.sleep(0.2)
    raise TimeoutError(srv.tail())


def test_tls_and_api_keys(model_dir, pki, tmp_path):
    ca = pki["ca"][0]
    health_port = free_port()
    srv = ServerProc(model_dir, tmp_path / "server.log",
                     extra=["--num-kv-blocks", "64", "--served-model-name", "tiny", "--tls-cert", pki["server"][0],
                            "--tls-key", pki["server"][1], "--api-key-file", pki["keys"],
                            "--health-port", str(health_port)])
    try:
        tls_ready(srv, ca)
        # gRPC: each key works, wrong and missing keys do not; health needs none.
        want = None
        for key in KEYS:
            with Client(srv.address, 30, tls_ca=ca, api_key=key) as c:
                got = c.generate(PROMPT, max_tokens=8, temperature=0.0, ignore_eos=True).token_ids
                assert want is None or got == want
                want = got
        for key in (None, "k-wrong-0123456789abcdef", KEYS[0][:-1]):
            with Client(srv.address, 30, tls_ca=ca, api_key=key) as c:
                with pytest.raises(grpc.RpcError) as e:
                    c.generate(PROMPT, max_tokens=4)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "Bearer" in e.value.details()
                with pytest.raises(grpc.RpcError) as e:
                    c.server_info()
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with open_channel(srv.address, ca) as ch:
            assert health(ch) == health_pb2.HealthCheckResponse.SERVING
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING  # (a coroutine-style method)
            watch.cancel()
            from tritonclient.grpc import service_pb2 as kpb
            from tritonclient.grpc import service_pb2_grpc as kpb_grpc

            oip = kpb_grpc.GRPCInferenceServiceStub(ch)
            assert oip.ServerLive(kpb.ServerLiveRequest(), timeout=5).live  # a probe: open
            req = kpb.ModelInferRequest(model_name="tiny")
            req.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"hi")
            with pytest.raises(grpc.RpcError) as e:
                oip.ModelInfer(req, timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # A plaintext client cannot talk to the TLS port; the health port is plaintext.
        with grpc.insecure_channel(srv.address) as ch, pytest.raises(grpc.RpcError) as e:
            health(ch)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as ch:
            assert health(ch, "tpserve.v1.Generation") == health_pb2.HealthCheckResponse.SERVING
        # HTTPS: the same keys.
        with httpx.Client(base_url=srv.http_url.replace("http://", "https://"), verify=ca, timeout=30) as http:
            body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
            ok = http.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {KEYS[1]}"})
            assert ok.status_code == 200, ok.text
            for headers in ({}, {"Authorization": "Bearer nope-nope-nope-nope"}, {"Authorization": KEYS[0]}):
                r = http.post("/v1/completions", json=body, headers=headers)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
                assert r.json()["error"]["type"] == "authentication_error"
            assert http.get("/v1/models").status_code == 401
            assert http.get("/health").status_code == 200
            metrics = http.get("/metrics")  # open without --protect-metrics
            assert metrics.status_code == 200
            counted = {line.split("protocol=\"")[1].split("\"")[0]: float(line.rsplit(" ", 1)[1])
                       for line in metrics.text.splitlines() if line.startswith("tpserve:request_unauthenticated_total")}
            assert counted == {"grpc": 7.0, "http": 4.0}, counted
        with pytest.raises((httpx.ConnectError, httpx.RemoteProtocolError)):  # TLS only
            httpx.get(f"{srv.http_url}/health", timeout=5, verify=ca)
    finally:
        srv.close()


def test_mutual_tls_and_protected_metrics(model_dir, pki, tmp_path):
    ca = pki["ca"][0]
    srv = ServerProc(model_dir, tmp_path / "server.log",
                     extra=["--num-kv-blocks", "64", "--served-model-name", "tiny", "--tls-cert", pki["server"][0],
                            "--tls-key", pki["server"][1], "--tls-client-ca", ca, "--protect-metrics"],
                     env={"TPSERVE_API_KEY": KEYS[0]})
    try:
        client_pair = dict(client_cert=pki["client"][0], client_key=pki["client"][1])
        tls_ready(srv, ca, **client_pair)
        with Client(srv.address, 30, tls_ca=ca, api_key=KEYS[0], **client_pair) as c:
            assert len(c.generate(PROMPT, max_tokens=4, temperature=0.0, ignore_eos=True).token_ids) == 4
        for pair in ({}, dict(client_cert=pki["rogue"][0], client_key=pki["rogue"][1])):
            with Client(srv.address, 10, tls_ca=ca, api_key=KEYS[0], **pair) as c, pytest.raises(grpc.RpcError) as e:
                c.generate(PROMPT, max_tokens=4)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails
        url = srv.http_url.replace("http://", "https://")
        with httpx.Client(base_url=url, verify=tls_context(ca, pki["client"]), timeout=30) as http:
            assert http.get("/metrics").status_code == 401
            assert http.get("/metrics", headers={"Authorization": f"Bearer {KEYS[0]}"}).status_code == 200
            assert http.get("/health").status_code == 200
        for cert in (None, pki["rogue"]):
            with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
                httpx.get(f"{url}/health", verify=tls_context(ca, cert), timeout=5)
    finally:
        srv.close()


def test_bad_tls_and_key_settings_refuse_to_start(pki, tmp_path):
    import argparse

    from tpserve.config import ConfigError
    from tpserve.server.security import Security, add_security_args

    p = argparse.ArgumentParser()
    add_security_args(p)
    cases = [
        (["--tls-cert", pki["server"][0]], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", pki["ca"][0]], "--tls-client-ca (mutual TLS) needs --tls-cert"),
        (["--tls-cert", pki["server"][0], "--tls-key", pki["client"][1]], "--tls-cert"),
        (["--api-key", "short"], "an API key of 5 characters is refused"),
        (["--api-key-file", str(tmp_path / "missing")], "is not a file"),
    ]
    for argv, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            Security.from_args(p.parse_args(argv), environ={})
    sec = Security.from_args(p.parse_args(["--api-key", KEYS[0]]), environ={"TPSERVE_API_KEY": KEYS[1]})
    assert sec.authorized(f"Bearer {KEYS[0]}") and sec.authorized(f"bearer {KEYS[1]}")
    assert not sec.authorized(KEYS[0]) and not sec.authorized(None) and not sec.authorized(f"Bearer {KEYS[0]}x")
    assert sec.http_needs_key("/v1/completions") and not sec.http_needs_key("/health")
    assert not sec.http_needs_key("/metrics")
