// spire-mint drives SPIRE server's X509-SVID signing path for the side-by-side bench: it
// calls the server API's MintX509SVID over the admin socket (what `spire-server x509
// mint` does) from -concurrency goroutines for -duration and prints one JSON line.
//
//	spire-mint -socket /path/server.sock -td spire.bench -duration 10s -concurrency 4
//
// One CSR (P-256, URI SAN spiffe://<td>/mint) is made up front, so the figure is the
// server's cost to authorise, sign and return an SVID, not the client's key generation.
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"net/url"
	"os"
	"sync"
	"sync/atomic"
	"time"

	svidv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/server/svid/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

func main() {
	socket := flag.String("socket", "", "spire-server admin socket")
	td := flag.String("td", "", "trust domain")
	duration := flag.Duration("duration", 10*time.Second, "how long to mint")
	concurrency := flag.Int("concurrency", 4, "concurrent callers")
	flag.Parse()
	if err := run(*socket, *td, *duration, *concurrency); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func run(socket, td string, duration time.Duration, concurrency int) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	id, err := url.Parse("spiffe://" + td + "/mint")
	if err != nil {
		return err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{id}}, key)
	if err != nil {
		return err
	}
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	client := svidv1.NewSVIDClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), duration+30*time.Second)
	defer cancel()
	// One call first, so a configuration problem is an error and not a zero rate.
	if _, err := client.MintX509SVID(ctx, &svidv1.MintX509SVIDRequest{Csr: csr}); err != nil {
		return fmt.Errorf("MintX509SVID: %w", err)
	}
	var minted, failed atomic.Int64
	start := time.Now()
	deadline := start.Add(duration)
	var wg sync.WaitGroup
	for range concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) {
				if _, err := client.MintX509SVID(ctx, &svidv1.MintX509SVIDRequest{Csr: csr}); err != nil {
					failed.Add(1)
				} else {
					minted.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	secs := time.Since(start).Seconds()
	return json.NewEncoder(os.Stdout).Encode(map[string]any{
		"minted": minted.Load(), "failed": failed.Load(), "seconds": secs,
		"per_s": float64(minted.Load()) / secs,
	})
}
