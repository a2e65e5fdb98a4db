// go-spiffe-client is an independent Workload API client for Sigil's tests: it calls
// the agent through go-spiffe's workloadapi package and prints what it got as one JSON
// object, so a test can compare it with what the agent should have served.
//
//	go-spiffe-client -addr unix:///run/sigil/agent/api.sock x509
//	go-spiffe-client -addr ... jwt -audience A [-spiffe-id ID]
//	go-spiffe-client -addr ... validate -audience A -token T
//	go-spiffe-client -addr ... bundles
//	go-spiffe-client -addr ... serve -listen 127.0.0.1:0 -allow-td TD
//	go-spiffe-client -addr ... dial -connect HOST:PORT -server-id ID
//	go-spiffe-client -addr ... verify -audience A
//	go-spiffe-client fetch-bundle -url URL -trust-domain TD -endpoint-id ID -bundle-file F
//	    [-svid-file CHAIN.pem] [-token T -audience A]
//
// verify checks what the Workload API served with go-spiffe's own validators, not the
// agent's: every X509-SVID with x509svid.Verify against the X.509 bundles, and a freshly
// fetched JWT-SVID with jwtsvid.ParseAndValidate against the JWT bundles.
//
// fetch-bundle is a foreign trust domain's view: go-spiffe's federation client fetches a
// bundle endpoint with https_spiffe (-bundle-file holds the bootstrap bundle, a SPIFFE
// bundle or PEM), parses the bundle, and verifies the given X509-SVID chain and JWT-SVID
// against it.
//
// serve and dial are mutual TLS through go-spiffe's spiffetls with an X509Source: the
// server accepts one connection from any member of -allow-td (printing its address
// first, as {"listening": ...}), the client accepts only -server-id. Both verify the
// peer with the bundles their own Workload API served, federated ones included.
//
// Exit status 0 with JSON on stdout, or 1 with the client library's error on stderr.
package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	cx509 "crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"net"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

func main() {
	addr := flag.String("addr", os.Getenv("SPIFFE_ENDPOINT_SOCKET"), "Workload API address")
	timeout := flag.Duration("timeout", 10*time.Second, "deadline for the call")
	flag.Parse()
	if flag.NArg() < 1 {
		fail(fmt.Errorf("usage: go-spiffe-client -addr ADDR x509|jwt|validate|bundles [flags]"))
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	opt := workloadapi.WithAddr(*addr)
	sub := flag.NewFlagSet(flag.Arg(0), flag.ExitOnError)
	audience := sub.String("audience", "", "JWT audience")
	id := sub.String("spiffe-id", "", "JWT subject to ask for")
	token := sub.String("token", "", "JWT-SVID to validate")
	listen := sub.String("listen", "127.0.0.1:0", "serve: address to listen on")
	allowTD := sub.String("allow-td", "", "serve: trust domain whose members may connect")
	connect := sub.String("connect", "", "dial: server address")
	serverID := sub.String("server-id", "", "dial: the server's SPIFFE ID")
	url := sub.String("url", "", "fetch-bundle: bundle endpoint URL")
	trustDomain := sub.String("trust-domain", "", "fetch-bundle: the endpoint's trust domain")
	endpointID := sub.String("endpoint-id", "", "fetch-bundle: the endpoint's SPIFFE ID")
	bundleFile := sub.String("bundle-file", "", "fetch-bundle: bootstrap bundle (SPIFFE bundle or PEM)")
	svidFile := sub.String("svid-file", "", "fetch-bundle: X509-SVID chain (PEM) to verify")
	_ = sub.Parse(flag.Args()[1:])

	var out any
	var err error
	switch flag.Arg(0) {
	case "x509":
		out, err = x509(ctx, opt)
	case "jwt":
		out, err = jwt(ctx, opt, *audience, *id)
	case "validate":
		out, err = validate(ctx, opt, *audience, *token)
	case "bundles":
		out, err = bundles(ctx, opt)
	case "serve":
		out, err = serve(ctx, opt, *listen, *allowTD)
	case "dial":
		out, err = dial(ctx, opt, *connect, *serverID)
	case "verify":
		out, err = verify(ctx, opt, *audience)
	case "fetch-bundle":
		out, err = fetchBundle(ctx, *url, *trustDomain, *endpointID, *bundleFile, *svidFile, *token, *audience)
	default:
		err = fmt.Errorf("unknown command %q", flag.Arg(0))
	}
	if err != nil {
		fail(err)
	}
	_ = json.NewEncoder(os.Stdout).Encode(out)
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, err)
	os.Exit(1)
}

func x509(ctx context.Context, opt workloadapi.ClientOption) (any, error) {
	c, err := workloadapi.FetchX509Context(ctx, opt)
	if err != nil {
		return nil, err
	}
	type svid struct {
		SpiffeID   string `json:"spiffe_id"`
		Hint       string `json:"hint"`
		ChainLen   int    `json:"chain_len"`
		LeafSHA256 string `json:"leaf_sha256"`
		NotAfter   string `json:"not_after"`
	}
	res := struct {
		Svids   []svid         `json:"svids"`
		Bundles map[string]int `json:"bundles"`
	}{Bundles: map[string]int{}}
	for _, s := range c.SVIDs {
		sum := sha256.Sum256(s.Certificates[0].Raw)
		res.Svids = append(res.Svids, svid{s.ID.String(), s.Hint, len(s.Certificates), hex.EncodeToString(sum[:]), s.Certificates[0].NotAfter.UTC().Format(time.RFC3339)})
	}
	for _, b := range c.Bundles.Bundles() {
		res.Bundles[b.TrustDomain().String()] = len(b.X509Authorities())
	}
	return res, nil
}

func jwt(ctx context.Context, opt workloadapi.ClientOption, audience, id string) (any, error) {
	params := jwtsvid.Params{Audience: audience}
	if id != "" {
		sid, err := spiffeid.FromString(id)
		if err != nil {
			return nil, err
		}
		params.Subject = sid
	}
	s, err := workloadapi.FetchJWTSVID(ctx, params, opt)
	if err != nil {
		return nil, err
	}
	return map[string]any{"spiffe_id": s.ID.String(), "audience": s.Audience, "token": s.Marshal(), "expiry": s.Expiry.UTC().Format(time.RFC3339)}, nil
}

func validate(ctx context.Context, opt workloadapi.ClientOption, audience, token string) (any, error) {
	s, err := workloadapi.ValidateJWTSVID(ctx, token, audience, opt)
	if err != nil {
		return nil, err
	}
	return map[string]any{"spiffe_id": s.ID.String(), "audience": s.Audience}, nil
}

func bundles(ctx context.Context, opt workloadapi.ClientOption) (any, error) {
	x, err := workloadapi.FetchX509Bundles(ctx, opt)
	if err != nil {
		return nil, err
	}
	j, err := workloadapi.FetchJWTBundles(ctx, opt)
	if err != nil {
		return nil, err
	}
	res := map[string]map[string]int{"x509": {}, "jwt": {}}
	for _, b := range x.Bundles() {
		res["x509"][b.TrustDomain().String()] = len(b.X509Authorities())
	}
	for _, b := range j.Bundles() {
		keys := b.JWTAuthorities()
		ids := make([]string, 0, len(keys))
		for k := range keys {
			ids = append(ids, k)
		}
		sort.Strings(ids)
		res["jwt"][b.TrustDomain().String()] = len(ids)
	}
	return res, nil
}

func serve(ctx context.Context, opt workloadapi.ClientOption, listen, allowTD string) (any, error) {
	td, err := spiffeid.TrustDomainFromString(allowTD)
	if err != nil {
		return nil, err
	}
	source, own, err := ownSource(ctx, opt)
	if err != nil {
		return nil, err
	}
	defer source.Close()
	l, err := spiffetls.ListenWithMode(ctx, "tcp", listen, spiffetls.MTLSServerWithSource(tlsconfig.AuthorizeMemberOf(td), source))
	if err != nil {
		return nil, err
	}
	defer l.Close()
	_ = json.NewEncoder(os.Stdout).Encode(map[string]string{"listening": l.Addr().String()})
	if d, ok := ctx.Deadline(); ok {
		if tl, ok := l.(interface{ SetDeadline(time.Time) error }); ok {
			_ = tl.SetDeadline(d)
		}
	}
	conn, err := l.Accept()
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return nil, err
	}
	if _, err := fmt.Fprintf(conn, "hello from %s\n", own.ID); err != nil {
		return nil, err
	}
	return result(conn, own.ID, line)
}

func dial(ctx context.Context, opt workloadapi.ClientOption, connect, serverID string) (any, error) {
	id, err := spiffeid.FromString(serverID)
	if err != nil {
		return nil, err
	}
	source, own, err := ownSource(ctx, opt)
	if err != nil {
		return nil, err
	}
	defer source.Close()
	conn, err := spiffetls.DialWithMode(ctx, "tcp", connect, spiffetls.MTLSClientWithSource(tlsconfig.AuthorizeID(id), source))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintf(conn, "hello from %s\n", own.ID); err != nil {
		return nil, err
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return nil, err
	}
	return result(conn, own.ID, line)
}

// ownSource is an X509Source on the Workload API and the SVID it holds.
func ownSource(ctx context.Context, opt workloadapi.ClientOption) (*workloadapi.X509Source, *x509svid.SVID, error) {
	source, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(opt))
	if err != nil {
		return nil, nil, err
	}
	own, err := source.GetX509SVID()
	if err != nil {
		source.Close()
		return nil, nil, err
	}
	return source, own, nil
}

// result names both ends of an mTLS connection and the line the peer sent.
func result(conn net.Conn, own spiffeid.ID, line string) (any, error) {
	peer, err := spiffetls.PeerIDFromConn(conn)
	if err != nil {
		return nil, err
	}
	return map[string]string{"own_id": own.String(), "peer_id": peer.String(), "got": strings.TrimSuffix(line, "\n")}, nil
}

// verify validates the served SVIDs with go-spiffe's validators and the served bundles.
func verify(ctx context.Context, opt workloadapi.ClientOption, audience string) (any, error) {
	c, err := workloadapi.FetchX509Context(ctx, opt)
	if err != nil {
		return nil, err
	}
	verified := []string{}
	for _, s := range c.SVIDs {
		id, _, err := x509svid.Verify(s.Certificates, c.Bundles)
		if err != nil {
			return nil, fmt.Errorf("X509-SVID %s: %w", s.ID, err)
		}
		verified = append(verified, id.String())
	}
	res := map[string]any{"x509_verified": verified}
	if audience != "" {
		s, err := workloadapi.FetchJWTSVID(ctx, jwtsvid.Params{Audience: audience}, opt)
		if err != nil {
			return nil, err
		}
		jb, err := workloadapi.FetchJWTBundles(ctx, opt)
		if err != nil {
			return nil, err
		}
		v, err := jwtsvid.ParseAndValidate(s.Marshal(), jb, []string{audience})
		if err != nil {
			return nil, fmt.Errorf("JWT-SVID %s: %w", s.ID, err)
		}
		res["jwt_verified"] = v.ID.String()
	}
	return res, nil
}

// fetchBundle fetches a bundle endpoint as a foreign trust domain would and verifies
// SVIDs of that trust domain against what it got.
func fetchBundle(ctx context.Context, url, trustDomain, endpointID, bundleFile, svidFile, token, audience string) (any, error) {
	td, err := spiffeid.TrustDomainFromString(trustDomain)
	if err != nil {
		return nil, err
	}
	id, err := spiffeid.FromString(endpointID)
	if err != nil {
		return nil, err
	}
	raw, err := os.ReadFile(bundleFile)
	if err != nil {
		return nil, err
	}
	var bootstrap *spiffebundle.Bundle
	if strings.HasPrefix(strings.TrimSpace(string(raw)), "-----BEGIN") {
		xb, err := x509bundle.Parse(id.TrustDomain(), raw)
		if err != nil {
			return nil, err
		}
		bootstrap = spiffebundle.FromX509Bundle(xb)
	} else if bootstrap, err = spiffebundle.Parse(id.TrustDomain(), raw); err != nil {
		return nil, err
	}
	b, err := federation.FetchBundle(ctx, td, url, federation.WithSPIFFEAuth(bootstrap, id))
	if err != nil {
		return nil, err
	}
	seq, _ := b.SequenceNumber()
	hint, _ := b.RefreshHint()
	res := map[string]any{
		"trust_domain":      b.TrustDomain().String(),
		"x509_authorities":  len(b.X509Authorities()),
		"jwt_authorities":   len(b.JWTAuthorities()),
		"sequence":          seq,
		"refresh_hint_secs": int64(hint.Seconds()),
	}
	if svidFile != "" {
		pemChain, err := os.ReadFile(svidFile)
		if err != nil {
			return nil, err
		}
		certs, err := parseCerts(pemChain)
		if err != nil {
			return nil, err
		}
		vid, _, err := x509svid.Verify(certs, b)
		if err != nil {
			return nil, fmt.Errorf("X509-SVID against the fetched bundle: %w", err)
		}
		res["x509_verified"] = vid.String()
	}
	if token != "" {
		v, err := jwtsvid.ParseAndValidate(token, jwtbundle.NewSet(b.JWTBundle()), []string{audience})
		if err != nil {
			return nil, fmt.Errorf("JWT-SVID against the fetched bundle: %w", err)
		}
		res["jwt_verified"] = v.ID.String()
	}
	return res, nil
}

func parseCerts(pemChain []byte) ([]*cx509.Certificate, error) {
	var certs []*cx509.Certificate
	for {
		var block *pem.Block
		block, pemChain = pem.Decode(pemChain)
		if block == nil {
			break
		}
		c, err := cx509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, err
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("no certificates in the SVID file")
	}
	return certs, nil
}
