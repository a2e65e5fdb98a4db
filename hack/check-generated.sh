#!/usr/bin/env bash
# Fails when committed generated files (CRD YAML, protobuf code) differ from what the
# sources generate. The protobuf check runs as the identity crate's `codegen` test.
set -euo pipefail
cd "$(dirname "$0")/.."
if cargo metadata --no-deps --format-version 1 2>/dev/null | grep -q '"name":"sigil-crdgen"'; then
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  cargo run -q --locked -p sigil-operator --bin sigil-crdgen -- "$tmp"
  if ! diff -ru crds "$tmp" >/dev/null; then
    diff -ru crds "$tmp" | head -40
    echo "crds/ is stale: run 'make crds' and commit the result" >&2
    exit 1
  fi
  echo "crds/: up to date"
fi
