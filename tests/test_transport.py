"""Collector addresses and TLS settings shared by the job and the CLI (agent/transport.py)."""

from __future__ import annotations

import pytest

from layrot.agent.transport import AddressError, TLSConfig, check_address, open_channel


@pytest.mark.parametrize("good", ["localhost:50051", "127.0.0.1:1", "[::1]:65535", "collector-0.layrot.svc:50051"])
def test_good_addresses(good):
    assert check_address(good) == good


@pytest.mark.parametrize(
    "bad, words",
    [
        ("", "empty"),
        ("http://localhost:50051", "scheme"),
        ("localhost", "no port"),
        ("localhost:0", "1 to 65535"),
        ("localhost:99999", "1 to 65535"),
        ("localhost:http", "1 to 65535"),
        ("local host:50051", "not a host"),
        (":50051", "no port"),
    ],
)
def test_bad_addresses_say_why(bad, words):
    with pytest.raises(AddressError, match=words):
        check_address(bad)
    with pytest.raises(AddressError):
        open_channel(bad)


def test_tls_from_env_and_unreadable_files(monkeypatch, tmp_path):
    monkeypatch.setenv("LAYROT_TLS_CA", str(tmp_path / "missing-ca.pem"))
    tls = TLSConfig.from_env()
    assert tls.enabled and tls.ca.endswith("missing-ca.pem")
    with pytest.raises(ValueError, match="missing-ca.pem"):
        tls.credentials()
    with pytest.raises(ValueError, match="both a client certificate and its key"):
        TLSConfig(ca=tls.ca, cert="c.pem").credentials()
    monkeypatch.delenv("LAYROT_TLS_CA")
    assert not TLSConfig.from_env().enabled
