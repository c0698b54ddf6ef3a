"""``edgecloud certs``: a private CA and the certificates TLS needs around a fleet.

- ``certs ca``: the CA (``ca.pem``, ``ca.key``) that devices, the gateway and the broker trust;
- ``certs server``: a server certificate (gateway or broker) for the host names and addresses clients
  dial, extended key usage serverAuth;
- ``certs device``: a device's client certificate, CN = its device id (the gateway takes the device id
  from it under mutual TLS) and, with ``--fleet``, OU = its fleet (whose releases it may download),
  extended key usage clientAuth;
- ``certs operator``: an operator's client certificate (CN = the name the gateway's ``auth.operators``
  lists: the identity that may upload releases), extended key usage clientAuth.

Keys are ECDSA P-256, written mode 0600. For a plant with its own PKI, use that instead: the services
only need PEM files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgecloud.clock import utc_now
from edgecloud.errors import ConfigError
from edgecloud.files import atomic_write
from edgecloud.mqtt.topics import check_id
from edgecloud.signing import write_secret

CA_CERT, CA_KEY = "ca.pem", "ca.key"


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


def _name(common_name: str, org_unit: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if org_unit:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, org_unit))
    return x509.Name(attributes)


def _key_usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=not ca,
                         encipher_only=False, decipher_only=False)


def _write(prefix: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, overwrite: bool) -> Issued:
    issued = Issued(prefix.with_name(prefix.name + ".pem"), prefix.with_name(prefix.name + ".key"))
    if not overwrite:
        for path in (issued.cert, issued.key):
            if path.exists():
                raise ConfigError(f"{path} exists; refusing to overwrite it (use --force)")
    write_secret(issued.key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    atomic_write(issued.cert, cert.public_bytes(serialization.Encoding.PEM))
    return issued


def make_ca(directory: Path, name: str = "edgecloud-ca", days: int = 3650, overwrite: bool = False) -> Issued:
    """A self-signed CA in ``directory`` (``ca.pem``, ``ca.key``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = utc_now()
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return _write(Path(directory) / Path(CA_CERT).stem, cert, key, overwrite)


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = Path(directory) / CA_CERT, Path(directory) / CA_KEY
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:  # TypeError: a passphrase-protected key
        raise ConfigError(f"no usable CA in {directory} ({e}); make one with `edgecloud certs ca` "
                          "(its key unencrypted)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{key_path}: not an EC private key")
    return cert, key


def _subject_alt_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def issue(ca_dir: Path, prefix: Path, common_name: str, *, hosts: Iterable[str] = (), client: bool = False,
          org_unit: str | None = None, days: int = 825, overwrite: bool = False) -> Issued:
    """A certificate signed by the CA in ``ca_dir``, written as ``PREFIX.pem`` and ``PREFIX.key``:
    a server's for ``hosts`` (DNS names or IP addresses), or with ``client`` a device's or an
    operator's (``org_unit``: a device's fleet)."""
    ca_cert, ca_key = _load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = utc_now()
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (x509.CertificateBuilder().subject_name(_name(common_name, org_unit))
               .issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(_key_usage(ca=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    names = _subject_alt_names(hosts)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return _write(Path(prefix), builder.sign(ca_key, hashes.SHA256()), key, overwrite)


# -- command line -------------------------------------------------------------------------------------
def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("certs", help="a private CA, server and device certificates for TLS",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="certs_action", required=True, metavar="ACTION")
    ca = actions.add_parser("ca", help="create the CA (DIR/ca.pem, DIR/ca.key)")
    ca.add_argument("--name", default="edgecloud-ca", help="the CA's common name")
    ca.add_argument("--days", type=int, default=3650, help="validity (default 3650)")
    server = actions.add_parser("server", help="a server certificate: DIR/NAME.pem, DIR/NAME.key")
    server.add_argument("--name", required=True, help="common name, e.g. the gateway's host name")
    server.add_argument("--host", action="append", default=[],
                        help="a DNS name or IP address clients dial (repeatable; default: --name)")
    device = actions.add_parser("device", help="a device certificate: DIR/devices/ID.pem, DIR/devices/ID.key")
    device.add_argument("--device-id", required=True, help="the agent's device_id (becomes the CN)")
    device.add_argument("--fleet", help="the device's fleet (becomes the OU): it may download that fleet's "
                        "releases from a gateway with client authentication")
    operator = actions.add_parser("operator", help="an operator certificate: DIR/operators/NAME.pem, "
                                  "DIR/operators/NAME.key")
    operator.add_argument("--name", required=True, help="the name auth.operators lists (becomes the CN)")
    for action in (server, device, operator):
        action.add_argument("--days", type=int, default=825, help="validity (default 825)")
    for action in (ca, server, device, operator):
        action.add_argument("--dir", type=Path, required=True, help="where the CA lives and files go")
        action.add_argument("--force", action="store_true", help="overwrite existing files")
        action.set_defaults(func=run)


def _check_id(flag: str, kind: str, value: str) -> None:
    try:
        check_id(kind, value)
    except ValueError as e:
        raise ConfigError(f"{flag}: {e}") from None


def run(args: argparse.Namespace) -> int:
    if args.certs_action == "ca":
        issued = make_ca(args.dir, args.name, args.days, overwrite=args.force)
    elif args.certs_action == "server":
        issued = issue(args.dir, args.dir / args.name, args.name, hosts=args.host or [args.name],
                       days=args.days, overwrite=args.force)
    elif args.certs_action == "operator":
        _check_id("--name", "operator", args.name)
        issued = issue(args.dir, args.dir / "operators" / args.name, args.name, client=True, days=args.days,
                       overwrite=args.force)
    else:
        _check_id("--device-id", "device", args.device_id)
        if args.fleet:
            _check_id("--fleet", "fleet", args.fleet)
        issued = issue(args.dir, args.dir / "devices" / args.device_id, args.device_id, client=True,
                       org_unit=args.fleet, days=args.days, overwrite=args.force)
    print(f"certificate: {issued.cert}")
    print(f"private key: {issued.key} (mode 0600)")
    return 0
