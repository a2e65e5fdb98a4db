module sigil.dev/e2e/spire-templates

go 1.25
