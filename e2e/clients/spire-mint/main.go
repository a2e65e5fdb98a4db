// spire-mint drives SPIRE server's X509-SVID signing path for the side-by-side benches and
// prints its result as JSON. Two APIs:
//
//   - -api admin: the server API's MintX509SVID over the admin socket (what `spire-server
//     x509 mint` does), one pre-made CSR.
//   - -api node: the node-facing path agents use. It makes a join token on the admin
//     socket, attests over TCP/TLS (AttestAgent with join_token, verifying the server
//     against the bundle from the admin socket), creates -entries entries parented to its
//     agent ID, waits until the server authorises them, then calls BatchNewX509SVID over
//     mTLS with its agent SVID, -batch CSRs per call. One pre-made CSR per entry, so the
//     figure is the server's cost to authorise, sign and return SVIDs, not the client's
//     key generation.
//
// Output: a {"ready":true} line when set-up is over and the load starts, then one line
// {"minted", "failed", "seconds", "per_s"}.
//
//	spire-mint -api admin -socket /path/server.sock -td spire.bench -duration 10s -concurrency 4
//	spire-mint -api node -socket /path/server.sock -server 127.0.0.1:8081 -td spire.bench \
//	    -entries 100 -batch 100 -duration 10s -concurrency 2
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/url"
	"os"
	"sync"
	"sync/atomic"
	"time"

	agentv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/server/agent/v1"
	bundlev1 "github.com/spiffe/spire-api-sdk/proto/spire/api/server/bundle/v1"
	entryv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/server/entry/v1"
	svidv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/server/svid/v1"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
)

type options struct {
	api, socket, server, td string
	duration                time.Duration
	concurrency             int
	entries, batch          int
}

func main() {
	var o options
	flag.StringVar(&o.api, "api", "admin", "admin (MintX509SVID) or node (BatchNewX509SVID as an attested agent)")
	flag.StringVar(&o.socket, "socket", "", "spire-server admin socket")
	flag.StringVar(&o.server, "server", "", "spire-server host:port (node API)")
	flag.StringVar(&o.td, "td", "", "trust domain")
	flag.DurationVar(&o.duration, "duration", 10*time.Second, "how long to sign")
	flag.IntVar(&o.concurrency, "concurrency", 4, "concurrent callers")
	flag.IntVar(&o.entries, "entries", 100, "entries to create for the node API")
	flag.IntVar(&o.batch, "batch", 100, "CSRs per BatchNewX509SVID call")
	flag.Parse()
	var err error
	switch o.api {
	case "admin":
		err = runAdmin(o)
	case "node":
		err = runNode(o)
	default:
		err = fmt.Errorf("-api must be admin or node, not %q", o.api)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

// newCSR makes a P-256 key and a CSR for spiffe://<td><path>.
func newCSR(td, path string) (*ecdsa.PrivateKey, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	id, err := url.Parse("spiffe://" + td + path)
	if err != nil {
		return nil, nil, err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{id}}, key)
	return key, csr, err
}

// drive prints {"ready":true} (set-up is over: a caller can start measuring the server's
// CPU), calls `call` from `concurrency` goroutines until `duration` is over and prints the
// result line; `call` returns how many SVIDs it got and how many were refused.
func drive(duration time.Duration, concurrency int, call func() (int, int)) error {
	if err := json.NewEncoder(os.Stdout).Encode(map[string]any{"ready": true}); err != nil {
		return err
	}
	var signed, failed atomic.Int64
	start := time.Now()
	deadline := start.Add(duration)
	var wg sync.WaitGroup
	for range concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) {
				ok, bad := call()
				signed.Add(int64(ok))
				failed.Add(int64(bad))
			}
		}()
	}
	wg.Wait()
	secs := time.Since(start).Seconds()
	return json.NewEncoder(os.Stdout).Encode(map[string]any{
		"minted": signed.Load(), "failed": failed.Load(), "seconds": secs,
		"per_s": float64(signed.Load()) / secs,
	})
}

func runAdmin(o options) error {
	_, csr, err := newCSR(o.td, "/mint")
	if err != nil {
		return err
	}
	conn, err := grpc.NewClient("unix://"+o.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	client := svidv1.NewSVIDClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), o.duration+30*time.Second)
	defer cancel()
	// One call first, so a configuration problem is an error and not a zero rate.
	if _, err := client.MintX509SVID(ctx, &svidv1.MintX509SVIDRequest{Csr: csr}); err != nil {
		return fmt.Errorf("MintX509SVID: %w", err)
	}
	return drive(o.duration, o.concurrency, func() (int, int) {
		if _, err := client.MintX509SVID(ctx, &svidv1.MintX509SVIDRequest{Csr: csr}); err != nil {
			return 0, 1
		}
		return 1, 0
	})
}

// serverTLS verifies the server's certificate chain against the bundle's X.509
// authorities and its SPIFFE ID spiffe://<td>/spire/server (no DNS names: SPIRE's server
// certificate carries only the URI SAN, so Go's hostname check cannot be used).
func serverTLS(roots *x509.CertPool, td string, client []tls.Certificate) *tls.Config {
	want := "spiffe://" + td + "/spire/server"
	return &tls.Config{
		Certificates:       client,
		InsecureSkipVerify: true, // replaced by VerifyPeerCertificate below
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			if len(raw) == 0 {
				return errors.New("server sent no certificate")
			}
			certs := make([]*x509.Certificate, len(raw))
			for i, r := range raw {
				c, err := x509.ParseCertificate(r)
				if err != nil {
					return err
				}
				certs[i] = c
			}
			inter := x509.NewCertPool()
			for _, c := range certs[1:] {
				inter.AddCert(c)
			}
			if _, err := certs[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter}); err != nil {
				return fmt.Errorf("server certificate: %w", err)
			}
			for _, u := range certs[0].URIs {
				if u.String() == want {
					return nil
				}
			}
			return fmt.Errorf("server certificate is not %s", want)
		},
	}
}

func runNode(o options) error {
	ctx, cancel := context.WithTimeout(context.Background(), o.duration+120*time.Second)
	defer cancel()
	admin, err := grpc.NewClient("unix://"+o.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer admin.Close()

	bundle, err := bundlev1.NewBundleClient(admin).GetBundle(ctx, &bundlev1.GetBundleRequest{})
	if err != nil {
		return fmt.Errorf("GetBundle: %w", err)
	}
	roots := x509.NewCertPool()
	for _, a := range bundle.X509Authorities {
		c, err := x509.ParseCertificate(a.Asn1)
		if err != nil {
			return err
		}
		roots.AddCert(c)
	}
	token, err := agentv1.NewAgentClient(admin).CreateJoinToken(ctx, &agentv1.CreateJoinTokenRequest{Ttl: 600})
	if err != nil {
		return fmt.Errorf("CreateJoinToken: %w", err)
	}

	// Attest as an agent: join token, a CSR for the agent SVID.
	agentKey, agentCSR, err := newCSR(o.td, "/spire-mint-agent")
	if err != nil {
		return err
	}
	bootstrap, err := grpc.NewClient(o.server, grpc.WithTransportCredentials(credentials.NewTLS(serverTLS(roots, o.td, nil))))
	if err != nil {
		return err
	}
	stream, err := agentv1.NewAgentClient(bootstrap).AttestAgent(ctx)
	if err != nil {
		return fmt.Errorf("AttestAgent: %w", err)
	}
	if err := stream.Send(&agentv1.AttestAgentRequest{Step: &agentv1.AttestAgentRequest_Params_{Params: &agentv1.AttestAgentRequest_Params{
		Data:   &types.AttestationData{Type: "join_token", Payload: []byte(token.Value)},
		Params: &agentv1.AgentX509SVIDParams{Csr: agentCSR},
	}}}); err != nil {
		return fmt.Errorf("AttestAgent send: %w", err)
	}
	resp, err := stream.Recv()
	if err != nil {
		return fmt.Errorf("AttestAgent: %w", err)
	}
	result := resp.GetResult()
	if result == nil || result.Svid == nil {
		return errors.New("AttestAgent: no SVID in the answer")
	}
	_ = stream.CloseSend()
	bootstrap.Close()
	agentID := result.Svid.Id

	// Entries parented to this agent, one CSR each.
	entries := make([]*types.Entry, o.entries)
	for i := range entries {
		entries[i] = &types.Entry{
			SpiffeId:  &types.SPIFFEID{TrustDomain: o.td, Path: fmt.Sprintf("/spire-mint/%d", i)},
			ParentId:  agentID,
			Selectors: []*types.Selector{{Type: "unix", Value: fmt.Sprintf("uid:%d", 50000+i)}},
		}
	}
	created, err := entryv1.NewEntryClient(admin).BatchCreateEntry(ctx, &entryv1.BatchCreateEntryRequest{Entries: entries})
	if err != nil {
		return fmt.Errorf("BatchCreateEntry: %w", err)
	}
	params := make([]*svidv1.NewX509SVIDParams, 0, len(created.Results))
	for _, r := range created.Results {
		if r.Status.GetCode() != 0 {
			return fmt.Errorf("BatchCreateEntry: %s", r.Status.GetMessage())
		}
		_, csr, err := newCSR(o.td, r.Entry.SpiffeId.Path)
		if err != nil {
			return err
		}
		params = append(params, &svidv1.NewX509SVIDParams{EntryId: r.Entry.Id, Csr: csr})
	}
	batches := [][]*svidv1.NewX509SVIDParams{}
	for len(params) > 0 {
		n := min(o.batch, len(params))
		batches = append(batches, params[:n])
		params = params[n:]
	}

	cert := tls.Certificate{Certificate: result.Svid.CertChain, PrivateKey: agentKey}
	conn, err := grpc.NewClient(o.server, grpc.WithTransportCredentials(credentials.NewTLS(serverTLS(roots, o.td, []tls.Certificate{cert}))))
	if err != nil {
		return err
	}
	defer conn.Close()
	client := svidv1.NewSVIDClient(conn)
	sign := func(batch []*svidv1.NewX509SVIDParams) (int, int, error) {
		r, err := client.BatchNewX509SVID(ctx, &svidv1.BatchNewX509SVIDRequest{Params: batch})
		if err != nil {
			return 0, len(batch), err
		}
		ok := 0
		for _, x := range r.Results {
			if x.Status.GetCode() == 0 && x.Svid != nil {
				ok++
			}
		}
		return ok, len(r.Results) - ok, nil
	}
	// The server authorises entries from its cache of them: wait until it has them all.
	waitUntil := time.Now().Add(60 * time.Second)
	for _, b := range batches {
		for {
			ok, _, err := sign(b)
			if err == nil && ok == len(b) {
				break
			}
			if time.Now().After(waitUntil) {
				return fmt.Errorf("entries not authorised within 60s (%d of %d signed, err %v)", ok, len(b), err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	var next atomic.Int64
	return drive(o.duration, o.concurrency, func() (int, int) {
		b := batches[int(next.Add(1))%len(batches)]
		ok, bad, _ := sign(b)
		return ok, bad
	})
}
