"""`python -m certs root|cluster|workload`: build the mesh PKI folders from a shell."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import timedelta

from certs import layout
from certs.authority import CertificateAuthority
from certs.errors import CertError
from certs.times import parse_duration
from hbone.identity import Identity, IdentityError

EXIT_USAGE = 2  # argparse's own code for bad usage; bad input folders are the same kind of mistake


def _duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m certs",
        description="The mesh PKI: one root, one intermediate CA per cluster, workloads.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    root = commands.add_parser("root", help="create the mesh root CA")
    root.add_argument(
        "--out", required=True, metavar="DIR", help=f"writes {layout.ROOT_CERT}, {layout.ROOT_KEY}"
    )
    root.add_argument("--ttl", type=_duration, default="87600h", help="lifetime (default 87600h)")

    cluster = commands.add_parser("cluster", help="create a cluster's intermediate CA (Istio cacerts layout)")
    cluster.add_argument("--root", required=True, metavar="DIR", help="folder written by `root`")
    cluster.add_argument("--name", required=True, metavar="CLUSTER", help="cluster id, e.g. cluster1")
    cluster.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help=f"writes {layout.CA_CERT}, {layout.CA_KEY}, {layout.ROOT_CERT}, {layout.CERT_CHAIN}",
    )
    cluster.add_argument("--ttl", type=_duration, default="8760h", help="lifetime (default 8760h)")

    workload = commands.add_parser("workload", help="issue a workload certificate")
    workload.add_argument("--ca", required=True, metavar="DIR", help="cacerts folder written by `cluster`")
    workload.add_argument("--spiffe", required=True, metavar="ID", help="spiffe://TD/ns/NS/sa/SA")
    workload.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help=f"writes {layout.CERT_CHAIN}, {layout.WORKLOAD_KEY}, {layout.ROOT_CERT}",
    )
    workload.add_argument("--ttl", type=_duration, default="24h", help="lifetime (default 24h)")
    return parser


def _run(args: argparse.Namespace) -> str:
    if args.command == "root":
        ca = CertificateAuthority.create_root(args.ttl)
        ca.write_root(args.out)
        return f"root CA written to {args.out}, valid until {ca.not_after.isoformat()}"
    if args.command == "cluster":
        ca = CertificateAuthority.load_root(args.root).create_intermediate(args.name, args.ttl)
        ca.write_cacerts(args.out)
        return (
            f"intermediate CA for {args.name} written to {args.out}, valid until {ca.not_after.isoformat()}"
        )
    try:
        identity = Identity.parse(args.spiffe)
    except IdentityError as exc:
        raise CertError(f"--spiffe: {exc}") from None
    cert = CertificateAuthority.load(args.ca).issue(identity, args.ttl)
    cert.write(args.out)
    return f"certificate for {identity} written to {args.out}, valid until {cert.not_after.isoformat()}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        print(_run(args))
    except CertError as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0
