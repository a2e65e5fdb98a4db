"""py-spiffe-client: an independent Workload API client for Sigil's tests.

Calls the agent through py-spiffe (PyPI `spiffe`) and prints one JSON object:

    py-spiffe-client --socket unix:///run/sigil/agent/api.sock x509
    py-spiffe-client --socket ... jwt --audience A
    py-spiffe-client --socket ... validate --audience A --token T
    py-spiffe-client --socket ... bundles

Exit status 0 with JSON on stdout, or 1 with the library's error on stderr.
"""

import argparse
import hashlib
import json
import os
import sys

from cryptography.hazmat.primitives.serialization import Encoding
from spiffe import WorkloadApiClient


def main() -> int:
    p = argparse.ArgumentParser(prog="py-spiffe-client")
    p.add_argument("--socket", default=os.environ.get("SPIFFE_ENDPOINT_SOCKET"))
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("x509")
    j = sub.add_parser("jwt")
    j.add_argument("--audience", required=True)
    v = sub.add_parser("validate")
    v.add_argument("--audience", required=True)
    v.add_argument("--token", required=True)
    sub.add_parser("bundles")
    args = p.parse_args()

    try:
        with WorkloadApiClient(socket_path=args.socket) as client:
            if args.cmd == "x509":
                svid = client.fetch_x509_svid()
                leaf = svid.leaf.public_bytes(Encoding.DER)
                out = {
                    "spiffe_id": str(svid.spiffe_id),
                    "chain_len": len(svid.cert_chain),
                    "leaf_sha256": hashlib.sha256(leaf).hexdigest(),
                }
            elif args.cmd == "jwt":
                svid = client.fetch_jwt_svid(audience={args.audience})
                out = {"spiffe_id": str(svid.spiffe_id), "audience": sorted(svid.audience), "token": svid.token}
            elif args.cmd == "validate":
                svid = client.validate_jwt_svid(args.token, args.audience)
                out = {"spiffe_id": str(svid.spiffe_id), "audience": sorted(svid.audience)}
            else:
                x = client.fetch_x509_bundles()
                out = {"x509": {str(b.trust_domain): len(b.x509_authorities) for b in x.bundles}}
    except Exception as e:  # the library's own error is what the test wants to see
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
