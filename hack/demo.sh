#!/usr/bin/env bash
echo "make demo: not yet — the demo lands with the Helm/demo issue. Run 'make test' to see Sigil against a real control plane."
