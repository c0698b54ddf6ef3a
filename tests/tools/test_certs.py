"""``edgecloud certs``: the CA, server, device and operator certificates it writes are valid, chain to
the CA, say what they are for (a device's fleet too), and keep their keys private. (The gateway and
broker TLS tests run on them too.)"""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgecloud_tools import cli


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def common_name(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def usages(cert: x509.Certificate) -> list:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_ca_server_and_device_certificates(tmp_path: Path, capsys) -> None:
    pki = tmp_path / "pki"
    assert cli.main(["certs", "ca", "--dir", str(pki), "--name", "plant-a-ca"]) == 0
    assert cli.main(["certs", "server", "--dir", str(pki), "--name", "gateway.plant-a",
                     "--host", "gateway.plant-a", "--host", "10.0.0.5"]) == 0
    assert cli.main(["certs", "device", "--dir", str(pki), "--device-id", "press-7"]) == 0
    capsys.readouterr()
    ca, server = load(pki / "ca.pem"), load(pki / "gateway.plant-a.pem")
    device = load(pki / "devices" / "press-7.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    for cert in (server, device):
        cert.verify_directly_issued_by(ca)
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["gateway.plant-a"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    assert usages(server) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert common_name(device) == "press-7" and usages(device) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    for key in (pki / "ca.key", pki / "gateway.plant-a.key", pki / "devices/press-7.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_refuses_to_overwrite_and_needs_a_ca(tmp_path: Path, capsys) -> None:
    pki = tmp_path / "pki"
    assert cli.main(["certs", "device", "--dir", str(pki), "--device-id", "press-7"]) == 2
    assert "edgecloud certs ca" in capsys.readouterr().err
    assert cli.main(["certs", "ca", "--dir", str(pki)]) == 0
    first = (pki / "ca.pem").read_bytes()
    assert cli.main(["certs", "ca", "--dir", str(pki)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err and (pki / "ca.pem").read_bytes() == first
    assert cli.main(["certs", "device", "--dir", str(pki), "--device-id", "../escape"]) == 2
    assert not list(tmp_path.rglob("escape*"))


def test_a_device_certificate_names_its_fleet_and_an_operator_has_its_own(tmp_path: Path, capsys) -> None:
    pki = tmp_path / "pki"
    assert cli.main(["certs", "ca", "--dir", str(pki)]) == 0
    assert cli.main(["certs", "device", "--dir", str(pki), "--device-id", "press-7",
                     "--fleet", "plant-a"]) == 0
    assert cli.main(["certs", "operator", "--dir", str(pki), "--name", "ops-alice"]) == 0
    device, operator = load(pki / "devices" / "press-7.pem"), load(pki / "operators" / "ops-alice.pem")
    assert device.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "plant-a"
    assert common_name(operator) == "ops-alice" and usages(operator) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert operator.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME) == []
    operator.verify_directly_issued_by(load(pki / "ca.pem"))
    assert stat.S_IMODE((pki / "operators" / "ops-alice.key").stat().st_mode) == 0o600
    capsys.readouterr()
    assert cli.main(["certs", "device", "--dir", str(pki), "--device-id", "press-8", "--fleet", "a/b"]) == 2
    assert "--fleet" in capsys.readouterr().err
