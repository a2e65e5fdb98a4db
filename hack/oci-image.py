#!/usr/bin/env python3
"""Writes an OCI image layout as one tar (what `ctr images import` reads), without Docker.

    oci-image.py --out x.tar --name docker.io/sigil-local/x:dev \
        --layer DIR [--layer DIR ...] [--owner PATH=UID:GID ...] \
        --config '{"User": "65532:65532", "Entrypoint": ["/x"], "Env": [...]}'

Each --layer directory becomes one uncompressed layer. Layers are reproducible: entries
sorted, mtimes 0, owner root unless an --owner names the path (relative to the layer,
e.g. home/nonroot=65532:65532), so the same inputs give the same digests and layers
shared between images are stored once by containerd.
"""

import argparse
import hashlib
import io
import json
import os
import stat
import tarfile


def layer_tar(root, owners):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        entries = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                entries.append(os.path.join(dirpath, name))
        entries.sort(key=lambda p: os.path.relpath(p, root))
        for path in entries:
            rel = os.path.relpath(path, root)
            info = tar.gettarinfo(path, arcname=rel)
            info.mtime = 0
            uid, gid = owners.get(rel, (0, 0))
            info.uid, info.gid = uid, gid
            info.uname = info.gname = ""
            if info.isreg():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return buf.getvalue()


def blob(blobs, data):
    digest = hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return "sha256:" + digest


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", required=True, help="fully qualified image name with tag")
    ap.add_argument("--layer", action="append", default=[])
    ap.add_argument("--owner", action="append", default=[])
    ap.add_argument("--config", required=True, help="the image config's `config` object (JSON)")
    args = ap.parse_args()

    owners = {}
    for o in args.owner:
        path, ids = o.split("=", 1)
        uid, gid = ids.split(":")
        owners[path.strip("/")] = (int(uid), int(gid))

    blobs = {}
    layers, diff_ids = [], []
    for d in args.layer:
        data = layer_tar(d, owners)
        digest = blob(blobs, data)
        diff_ids.append(digest)
        layers.append({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": digest,
            "size": len(data),
        })
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": json.loads(args.config),
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "hack/images.sh (layer %d)" % i} for i in range(len(layers))],
    }
    config_data = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": blob(blobs, config_data),
            "size": len(config_data),
        },
        "layers": layers,
    }
    manifest_data = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    tag = args.name.rsplit(":", 1)[1] if ":" in args.name.rsplit("/", 1)[-1] else "latest"
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": blob(blobs, manifest_data),
            "size": len(manifest_data),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": args.name,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    }

    tmp = args.out + ".tmp"
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as out:
        def add(name, data, mode=0o644):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            out.addfile(info, io.BytesIO(data))
        add("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add("index.json", json.dumps(index, sort_keys=True).encode())
        for digest in sorted(blobs):
            add("blobs/sha256/" + digest, blobs[digest])
    os.replace(tmp, args.out)
    print(index["manifests"][0]["digest"])


if __name__ == "__main__":
    main()
