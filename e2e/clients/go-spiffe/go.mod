module sigil.dev/e2e/go-spiffe-client

go 1.24

require github.com/spiffe/go-spiffe/v2 v2.8.1
