"""``edgecloud keygen``: an Ed25519 key pair for signing releases."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgecloud.signing import write_keypair


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "keygen", help="create an Ed25519 release signing key pair",
        description="Write PREFIX.key (PKCS#8 PEM, mode 0600: keep it with the publisher) and PREFIX.pub "
                    "(SubjectPublicKeyInfo PEM: give it to devices as a trusted key).")
    parser.add_argument("--out", required=True, type=Path, metavar="PREFIX",
                        help="path prefix of the two files")
    parser.add_argument("--force", action="store_true", help="overwrite existing key files")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    private_path, public_path, kid = write_keypair(args.out, overwrite=args.force)
    print(f"private key: {private_path} (keep secret)")
    print(f"public key:  {public_path} (devices: --trusted-key {public_path})")
    print(f"key id:      {kid}")
    return 0
