// go-spiffe-client is an independent Workload API client for Sigil's tests: it calls
// the agent through go-spiffe's workloadapi package and prints what it got as one JSON
// object, so a test can compare it with what the agent should have served.
//
//	go-spiffe-client -addr unix:///run/sigil/agent/api.sock x509
//	go-spiffe-client -addr ... jwt -audience A [-spiffe-id ID]
//	go-spiffe-client -addr ... validate -audience A -token T
//	go-spiffe-client -addr ... bundles
//	go-spiffe-client -addr ... serve -listen 127.0.0.1:0 -allow-td TD[,TD2] [-accept N]
//	go-spiffe-client -addr ... dial -connect HOST:PORT -server-id ID
//	go-spiffe-client -addr ... verify -audience A
//	go-spiffe-client fetch-bundle -url URL -trust-domain TD -endpoint-id ID -bundle-file F
//	    [-svid-file CHAIN.pem] [-token T -audience A]
//	go-spiffe-client -addr ... watch
//	go-spiffe-client -addr ... https-get -url URL -server-id ID [-client svid|none|self-signed:ID]
//	go-spiffe-client first-svid [-addr ...]
//	go-spiffe-client files-check -dir DIR [-interval 100ms]
//	go-spiffe-client files-first -dir DIR
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
// The real node (e2e/tests/real_node.rs, e2e/benches/real_node.rs) runs these in pods:
//   - watch holds one X.509 stream (go-spiffe reconnects on its own) and prints a JSON
//     line per update and per error, until killed;
//   - https-get is an mTLS client of an HTTPS server that serves SVID files (nginx): with
//     -client svid it presents its own SVID and accepts only -server-id; with none or
//     self-signed:ID (an attacker's certificate claiming ID) it presents no SVID and
//     checks nothing of the server, and prints the status the server answered;
//   - first-svid retries every 20 ms until the Workload API serves an X509-SVID and prints
//     when the program started and when the SVID came (Unix nanoseconds);
//   - files-check reads a files-mode volume in a loop, a generation at a time (through
//     its ..data link), and prints a JSON line for every new certificate and for every
//     file missing or key not matching its certificate, and a count every 5 s;
//   - files-first is first-svid for a files-mode volume.
//
// serve and dial are mutual TLS through go-spiffe's spiffetls with an X509Source: the
// server accepts -accept connections (default one; several print {"connections": [...]})
// from any member of the -allow-td trust domains (printing its address first, as
// {"listening": ...}), the client accepts only -server-id. Both verify the
// peer with the bundles their own Workload API served, federated ones included.
//
// Exit status 0 with JSON on stdout, or 1 with the client library's error on stderr.
package main

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
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

var started = time.Now()

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
	id := sub.String("spiffe-id", "", "JWT subject to ask for; check, files-check: the SVID's expected ID")
	token := sub.String("token", "", "JWT-SVID to validate")
	listen := sub.String("listen", "127.0.0.1:0", "serve: address to listen on")
	allowTD := sub.String("allow-td", "", "serve: trust domains (comma-separated) whose members may connect")
	accept := sub.Int("accept", 1, "serve: connections to accept before exiting")
	connect := sub.String("connect", "", "dial: server address")
	serverID := sub.String("server-id", "", "dial, https-get: the server's SPIFFE ID")
	rawURL := sub.String("url", "", "https-get, fetch-bundle: the URL")
	client := sub.String("client", "svid", "https-get: svid, none or self-signed:ID")
	dir := sub.String("dir", "", "files-check, files-first: the volume's directory")
	interval := sub.Duration("interval", 100*time.Millisecond, "files-check, check: time between reads")
	trustDomain := sub.String("trust-domain", "", "fetch-bundle: the endpoint's trust domain")
	endpointID := sub.String("endpoint-id", "", "fetch-bundle: the endpoint's SPIFFE ID")
	bundleFile := sub.String("bundle-file", "", "fetch-bundle: bootstrap bundle (SPIFFE bundle or PEM); pod-cert: the ClusterTrustBundle projection")
	svidFile := sub.String("svid-file", "", "fetch-bundle: X509-SVID chain (PEM) to verify; pod-cert: the credential bundle")
	_ = sub.Parse(flag.Args()[1:])

	// The long-running commands print as they go and never return a result.
	switch flag.Arg(0) {
	case "watch":
		watch(opt)
		return
	case "files-check":
		filesCheck(*dir, *interval, *id)
		return
	case "check":
		check(opt, *timeout, *interval, *id)
		return
	}

	var out any
	var err error
	switch flag.Arg(0) {
	case "x509":
		out, err = fetchX509(ctx, opt)
	case "jwt":
		out, err = jwt(ctx, opt, *audience, *id)
	case "validate":
		out, err = validate(ctx, opt, *audience, *token)
	case "bundles":
		out, err = bundles(ctx, opt)
	case "serve":
		out, err = serve(ctx, opt, *listen, *allowTD, *accept)
	case "dial":
		out, err = dial(ctx, opt, *connect, *serverID)
	case "verify":
		out, err = verify(ctx, opt, *audience)
	case "fetch-bundle":
		out, err = fetchBundle(ctx, *rawURL, *trustDomain, *endpointID, *bundleFile, *svidFile, *token, *audience)
	case "https-get":
		out, err = httpsGet(ctx, opt, *rawURL, *serverID, *client)
	case "first-svid":
		out, err = firstSVID(ctx, opt)
	case "files-first":
		out, err = filesFirst(ctx, *dir)
	case "pod-cert":
		out, err = podCert(*svidFile, *bundleFile, *trustDomain)
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

func fetchX509(ctx context.Context, opt workloadapi.ClientOption) (any, error) {
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

func serve(ctx context.Context, opt workloadapi.ClientOption, listen, allowTD string, accept int) (any, error) {
	var tds []spiffeid.TrustDomain
	for _, name := range strings.Split(allowTD, ",") {
		td, err := spiffeid.TrustDomainFromString(name)
		if err != nil {
			return nil, err
		}
		tds = append(tds, td)
	}
	// A member of any of the trust domains (one, or several while a workload moves from
	// one to another).
	authorize := tlsconfig.AdaptMatcher(func(id spiffeid.ID) error {
		for _, td := range tds {
			if id.MemberOf(td) {
				return nil
			}
		}
		return fmt.Errorf("%s is not a member of %s", id, allowTD)
	})
	source, own, err := ownSource(ctx, opt)
	if err != nil {
		return nil, err
	}
	defer source.Close()
	l, err := spiffetls.ListenWithMode(ctx, "tcp", listen, spiffetls.MTLSServerWithSource(authorize, source))
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
	var all []any
	for i := 0; i < accept; i++ {
		r, err := serveOne(l, own.ID)
		if err != nil {
			return nil, err
		}
		all = append(all, r)
	}
	if accept == 1 {
		return all[0], nil
	}
	return map[string]any{"connections": all}, nil
}

// serveOne accepts one connection, reads the client's line and answers with ours.
func serveOne(l net.Listener, own spiffeid.ID) (any, error) {
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
	if _, err := fmt.Fprintf(conn, "hello from %s\n", own); err != nil {
		return nil, err
	}
	return result(conn, own, line)
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
func fetchBundle(ctx context.Context, endpointURL, trustDomain, endpointID, bundleFile, svidFile, token, audience string) (any, error) {
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
	b, err := federation.FetchBundle(ctx, td, endpointURL, federation.WithSPIFFEAuth(bootstrap, id))
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

func parseCerts(pemChain []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		block, pemChain = pem.Decode(pemChain)
		if block == nil {
			break
		}
		c, err := x509.ParseCertificate(block.Bytes)
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

// line prints one JSON object on its own line, with the time.
func line(v map[string]any) {
	v["t"] = time.Now().UTC().Format(time.RFC3339Nano)
	_ = json.NewEncoder(os.Stdout).Encode(v)
}

type watcher struct{}

func (watcher) OnX509ContextUpdate(c *workloadapi.X509Context) {
	for _, s := range c.SVIDs {
		sum := sha256.Sum256(s.Certificates[0].Raw)
		line(map[string]any{"update": s.ID.String(), "leaf_sha256": hex.EncodeToString(sum[:]), "not_after": s.Certificates[0].NotAfter.UTC().Format(time.RFC3339)})
	}
}

func (watcher) OnX509ContextWatchError(err error) {
	line(map[string]any{"error": err.Error()})
}

// watch holds one X.509 stream until killed; go-spiffe reconnects after errors.
func watch(opt workloadapi.ClientOption) {
	c, err := workloadapi.New(context.Background(), opt)
	if err != nil {
		fail(err)
	}
	defer c.Close()
	fail(c.WatchX509Context(context.Background(), watcher{}))
}

func httpsGet(ctx context.Context, opt workloadapi.ClientOption, rawURL, serverID, client string) (any, error) {
	if _, err := url.Parse(rawURL); err != nil {
		return nil, err
	}
	var cfg *tls.Config
	own := ""
	switch {
	case client == "svid":
		id, err := spiffeid.FromString(serverID)
		if err != nil {
			return nil, err
		}
		source, svid, err := ownSource(ctx, opt)
		if err != nil {
			return nil, err
		}
		defer source.Close()
		own = svid.ID.String()
		cfg = tlsconfig.MTLSClientConfig(source, source, tlsconfig.AuthorizeID(id))
	case client == "none":
		cfg = &tls.Config{InsecureSkipVerify: true} //nolint:gosec // the attacker checks nothing
	case strings.HasPrefix(client, "self-signed:"):
		cert, err := selfSigned(strings.TrimPrefix(client, "self-signed:"))
		if err != nil {
			return nil, err
		}
		// Sent whatever CAs the server names (a plain Certificates list would be withheld
		// from a server that names only the trust domain's CA).
		send := func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }
		cfg = &tls.Config{InsecureSkipVerify: true, GetClientCertificate: send} //nolint:gosec
	default:
		return nil, fmt.Errorf("-client %q: use svid, none or self-signed:ID", client)
	}
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: cfg}, Timeout: 10 * time.Second}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, rawURL, nil)
	if err != nil {
		return nil, err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64*1024))
	peer := ""
	if resp.TLS != nil && len(resp.TLS.PeerCertificates) > 0 {
		if id, err := x509svid.IDFromCert(resp.TLS.PeerCertificates[0]); err == nil {
			peer = id.String()
		}
	}
	return map[string]any{"status": resp.StatusCode, "body": string(body), "own_id": own, "peer_id": peer}, nil
}

// selfSigned makes a certificate that claims id, signed by nobody the server trusts.
func selfSigned(id string) (tls.Certificate, error) {
	u, err := url.Parse(id)
	if err != nil {
		return tls.Certificate{}, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		URIs:         []*url.URL{u},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

// firstSVID asks until the Workload API serves an X509-SVID.
func firstSVID(ctx context.Context, opt workloadapi.ClientOption) (any, error) {
	attempts := 0
	for {
		attempts++
		one, cancel := context.WithTimeout(ctx, 2*time.Second)
		c, err := workloadapi.FetchX509Context(one, opt)
		cancel()
		if err == nil && len(c.SVIDs) > 0 {
			return map[string]any{"started_unix_nano": started.UnixNano(), "svid_unix_nano": time.Now().UnixNano(), "attempts": attempts, "spiffe_id": c.SVIDs[0].ID.String()}, nil
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("no X509-SVID after %d attempts: %v", attempts, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// generation reads the identity files of the generation ..data names: the certificate
// chain, the key and the bundle, checking the key belongs to the certificate and the
// certificate chains to the bundle.
func generation(dir string) (gen string, leaf *x509.Certificate, err error) {
	gen, err = os.Readlink(filepath.Join(dir, "..data"))
	if err != nil {
		return "", nil, err
	}
	read := func(name string) ([]byte, error) { return os.ReadFile(filepath.Join(dir, gen, name)) }
	certPEM, err := read("svid.pem")
	if err != nil {
		return gen, nil, err
	}
	keyPEM, err := read("svid_key.pem")
	if err != nil {
		return gen, nil, err
	}
	bundlePEM, err := read("bundle.pem")
	if err != nil {
		return gen, nil, err
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return gen, nil, fmt.Errorf("svid.pem and svid_key.pem of %s: %w", gen, err)
	}
	leaf, err = x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return gen, nil, err
	}
	var chain []*x509.Certificate
	for _, der := range pair.Certificate {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return gen, nil, err
		}
		chain = append(chain, c)
	}
	id, err := x509svid.IDFromCert(leaf)
	if err != nil {
		return gen, nil, err
	}
	bundle, err := x509bundle.Parse(id.TrustDomain(), bundlePEM)
	if err != nil {
		return gen, nil, fmt.Errorf("bundle.pem of %s: %w", gen, err)
	}
	if _, _, err := x509svid.Verify(chain, bundle); err != nil {
		return gen, nil, fmt.Errorf("svid.pem of %s does not verify against its bundle.pem: %w", gen, err)
	}
	// The stable names users open must be there too.
	for _, name := range []string{"svid.pem", "svid_key.pem", "bundle.pem"} {
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			return gen, nil, err
		}
	}
	return gen, leaf, nil
}

// readGeneration is generation, retried once when ..data moved while it read (a swap is
// not a fault: the reader simply raced it).
func readGeneration(dir string) (*x509.Certificate, error) {
	gen, leaf, err := generation(dir)
	if err == nil {
		return leaf, nil
	}
	if now, lerr := os.Readlink(filepath.Join(dir, "..data")); lerr == nil && now != gen {
		_, leaf, err = generation(dir)
	}
	return leaf, err
}

func filesCheck(dir string, interval time.Duration, want string) {
	var last string
	checks, errs := 0, 0
	tick := time.Now()
	for {
		leaf, err := readGeneration(dir)
		if err == nil && want != "" {
			if id, _ := x509svid.IDFromCert(leaf); id.String() != want {
				err = fmt.Errorf("svid.pem is %s, not %s", id, want)
			}
		}
		checks++
		if err != nil {
			errs++
			line(map[string]any{"error": err.Error()})
		} else if serial := leaf.SerialNumber.Text(16); serial != last {
			last = serial
			id, _ := x509svid.IDFromCert(leaf)
			line(map[string]any{"serial": serial, "spiffe_id": id.String(), "not_after": leaf.NotAfter.UTC().Format(time.RFC3339)})
		}
		if time.Since(tick) >= 5*time.Second {
			tick = time.Now()
			line(map[string]any{"checks": checks, "errors": errs})
		}
		time.Sleep(interval)
	}
}

// check is the fault tests' invariant checker inside a pod: every interval, a new
// connection fetches the X509-SVIDs (within timeout) and the one of the wanted ID (else
// the default) is judged. Each check prints one line: "failed" when the fetch failed or
// held no SVID of that ID, "violation" when an SVID was served that must never be
// (outside its validity, or not chaining to the bundle served with it).
func check(opt workloadapi.ClientOption, timeout, interval time.Duration, want string) {
	for n := 1; ; n++ {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		c, err := workloadapi.FetchX509Context(ctx, opt)
		cancel()
		out := map[string]any{"check": n}
		var s *x509svid.SVID
		if err == nil {
			s = c.DefaultSVID()
			if want != "" {
				s = nil
				var ids []string
				for _, one := range c.SVIDs {
					ids = append(ids, one.ID.String())
					if one.ID.String() == want {
						s = one
					}
				}
				if s == nil {
					err = fmt.Errorf("no X509-SVID of %s among %v", want, ids)
				}
			}
		}
		if err != nil {
			out["failed"] = err.Error()
		} else {
			leaf, now := s.Certificates[0], time.Now()
			out["serial"] = leaf.SerialNumber.Text(16)
			out["not_after"] = leaf.NotAfter.UTC().Format(time.RFC3339)
			if now.After(leaf.NotAfter) || now.Before(leaf.NotBefore) {
				out["violation"] = fmt.Sprintf("served an SVID valid %s to %s at %s", leaf.NotBefore.UTC().Format(time.RFC3339), leaf.NotAfter.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
			} else if _, _, err := x509svid.Verify(s.Certificates, c.Bundles); err != nil {
				out["violation"] = fmt.Sprintf("the SVID does not chain to the bundle served with it: %v", err)
			}
		}
		line(out)
		time.Sleep(interval)
	}
}

// podCert reads a Kubernetes pod certificate credential bundle (the kubelet's layout:
// the PKCS#8 key, then the chain) as an X509-SVID, and verifies it against a
// ClusterTrustBundle projection (PEM) of the trust domain, as go-spiffe does for any SVID.
func podCert(credentialBundle, bundleFile, trustDomain string) (any, error) {
	raw, err := os.ReadFile(credentialBundle)
	if err != nil {
		return nil, err
	}
	// One file holds both: Parse reads the CERTIFICATE blocks as the chain and the
	// PRIVATE KEY block as the key, and checks that they match.
	svid, err := x509svid.Parse(raw, raw)
	if err != nil {
		return nil, fmt.Errorf("%s as an X509-SVID: %w", credentialBundle, err)
	}
	td, err := spiffeid.TrustDomainFromString(trustDomain)
	if err != nil {
		return nil, err
	}
	pemBundle, err := os.ReadFile(bundleFile)
	if err != nil {
		return nil, err
	}
	bundle, err := x509bundle.Parse(td, pemBundle)
	if err != nil {
		return nil, fmt.Errorf("%s as the bundle of %s: %w", bundleFile, td, err)
	}
	id, _, err := x509svid.Verify(svid.Certificates, bundle)
	if err != nil {
		return nil, fmt.Errorf("verify %s against %s: %w", credentialBundle, bundleFile, err)
	}
	leaf := svid.Certificates[0]
	return map[string]any{
		"started_unix_nano": started.UnixNano(),
		"svid_unix_nano":    time.Now().UnixNano(),
		"spiffe_id":         id.String(),
		"serial":            leaf.SerialNumber.Text(16),
		"not_before":        leaf.NotBefore.UTC().Format(time.RFC3339),
		"not_after":         leaf.NotAfter.UTC().Format(time.RFC3339),
		"chain_len":         len(svid.Certificates),
		"authorities":       len(bundle.X509Authorities()),
	}, nil
}

// filesFirst waits until the volume holds a valid generation.
func filesFirst(ctx context.Context, dir string) (any, error) {
	attempts := 0
	for {
		attempts++
		leaf, err := readGeneration(dir)
		if err == nil {
			id, _ := x509svid.IDFromCert(leaf)
			return map[string]any{"started_unix_nano": started.UnixNano(), "svid_unix_nano": time.Now().UnixNano(), "attempts": attempts, "spiffe_id": id.String()}, nil
		}
		if ctx.Err() != nil {
			return nil, errors.Join(fmt.Errorf("no valid files after %d attempts", attempts), err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
