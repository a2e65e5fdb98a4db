// envoy-sds-client is an SDS v3 client for Sigil's tests, built on Envoy's own generated
// Go types (github.com/envoyproxy/go-control-plane/envoy) and grpc-go. No Envoy binary
// is available from any registry in the test environment, so this program stands in
// for Envoy: it speaks the state-of-the-world xDS protocol as Envoy's SDS subscriptions
// do (a Node on the first request, resource names, ACK with the version and nonce it
// received, NACK with error_detail and the version it keeps, subscription changes on the
// same stream, a reconnect sending the last accepted version with no nonce), and it
// checks every Secret it receives as Envoy would before using it:
//
//   - the Any unpacks to envoy.extensions.transport_sockets.tls.v3.Secret and passes the
//     protoc-gen-validate rules Envoy enforces (ValidateAll);
//   - a tls_certificate's chain and key are PEM that parse, and the key matches the
//     leaf (crypto/tls.X509KeyPair, as BoringSSL's SSL_CTX_check_private_key);
//   - a validation_context's trusted_ca is PEM with at least one certificate, and a
//     SPIFFE validator configuration unpacks, validates and holds PEM bundles;
//   - every certificate chain received verifies against every received validation
//     context of its trust domain (trusted_ca, or the SPIFFE validator's bundle for the
//     leaf's trust domain).
//
// Usage:
//
//	envoy-sds-client -socket PATH scenario -names default,ROOTCA [-extra a,b] [-quiet 1s]
//	envoy-sds-client -socket PATH watch -names default,ROOTCA
//	envoy-sds-client -socket PATH fetch -names a,b
//	envoy-sds-client -socket PATH streams -count N -names default,ROOTCA
//	envoy-sds-client -socket PATH flood -count N
//	envoy-sds-client -socket PATH long -count N -pad BYTES
//	envoy-sds-client files -dir DIR
//	envoy-sds-client grpc-serve -dir DIR [-listen 127.0.0.1:0]
//	envoy-sds-client grpc-dial -dir DIR -connect HOST:PORT -server-id ID
//
// scenario runs one Envoy session and prints one JSON object: the first response, that
// nothing follows an ACK, the response to a subscription change (names + extra), that
// nothing follows a NACK, that a stale request is ignored, and the response on a new
// stream after a reconnect.
//
// watch prints one JSON line per response (ACKing each) until killed.
//
// fetch calls FetchSecrets once.
//
// long is a long-lived proxy in a hurry: after its first response it ACKs it N times,
// each request carrying its Node with BYTES of metadata (as Envoy does unless
// set_node_on_first_message_only), then changes its subscription and must still get an
// answer on the same stream: a stream's past requests do not count against it.
//
// flood is a misbehaving client: after its first response it sends N requests at once
// and reports how the stream ended.
//
// streams (for benchmarks) holds N StreamSecrets streams, each on its own connection,
// ACKing every response; prints "ready" once every stream has its first response, then
// "updated" once every stream has received a second one; exits when stdin closes.
//
// files reads a sigil-csi files-mode volume written with formats istio, grpc and
// credential-bundle as their readers do: gRPC-Go's own file watcher certificate provider
// (credentials/tls/certprovider/pemfile, which proxyless gRPC's xDS file_watcher plugin
// uses) loads cert-chain.pem + key.pem with the SPIFFE trust bundle map
// spiffe-bundle-map.json, and the leaf must verify against the map's bundle for its trust
// domain, as gRPC's SPIFFE verification looks it up; root-cert.pem must hold the roots;
// credential-bundle.pem must be one PKCS#8 PRIVATE KEY block then the chain, the key
// matching the leaf.
//
// grpc-serve and grpc-dial are two gRPC-Go workloads doing mutual TLS with the files of a
// files-mode volume (formats grpc): gRPC's pemfile provider loads svid.pem, svid_key.pem
// and spiffe-bundle-map.json at every handshake, and each side verifies the other as
// grpc proposal A87 specifies for a SPIFFE trust bundle map: the peer's leaf must carry
// one SPIFFE ID, the bundle of that ID's trust domain is taken from the map (a trust
// domain missing from it is refused), and the chain must verify against it. The server
// serves the gRPC health service and prints {"listening": ADDR}, then {"peer": ID} for
// every client it accepts; the client checks the server's SPIFFE ID and prints the
// health status it got.
//
// Exit status 0 with JSON on stdout, or 1 with the error on stderr.
package main

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"sort"
	"strings"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/credentials/tls/certprovider"
	"google.golang.org/grpc/credentials/tls/certprovider/pemfile"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"
)

const secretType = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(1)
}

func out(v any) {
	b, err := json.Marshal(v)
	if err != nil {
		fail("json: %v", err)
	}
	fmt.Println(string(b))
}

func splitNames(s string) []string {
	var names []string
	for _, n := range strings.Split(s, ",") {
		if n = strings.TrimSpace(n); n != "" {
			names = append(names, n)
		}
	}
	return names
}

// node is what Envoy sends on the first request of a stream.
func node() *corev3.Node {
	md, _ := structpb.NewStruct(map[string]any{"ISTIO_VERSION": "test", "CLUSTER_ID": "Kubernetes"})
	return &corev3.Node{
		Id:                   "sidecar~10.0.0.1~web-1.default~default.svc.cluster.local",
		Cluster:              "web.default",
		Metadata:             md,
		UserAgentName:        "envoy",
		UserAgentVersionType: &corev3.Node_UserAgentVersion{UserAgentVersion: "1.36.0"},
	}
}

// checked is what a Secret was found to hold.
type checked struct {
	Name        string   `json:"name"`
	Kind        string   `json:"kind"`
	SpiffeID    string   `json:"spiffe_id,omitempty"`
	LeafSHA256  string   `json:"leaf_sha256,omitempty"`
	LeafDERHex  string   `json:"leaf_der_hex,omitempty"`
	ChainLen    int      `json:"chain_len,omitempty"`
	CAs         int      `json:"cas,omitempty"`
	TrustDomain []string `json:"trust_domains,omitempty"`
	chain       []*x509.Certificate
	roots       map[string]*x509.CertPool // trust domain name ("" = any) -> roots
}

func parseCerts(pemBytes []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for {
		var b *pem.Block
		b, pemBytes = pem.Decode(pemBytes)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("PEM block %q where certificates belong", b.Type)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, err
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, errors.New("no certificate in PEM")
	}
	return certs, nil
}

func pool(certs []*x509.Certificate) *x509.CertPool {
	p := x509.NewCertPool()
	for _, c := range certs {
		p.AddCert(c)
	}
	return p
}

func inline(ds *corev3.DataSource) ([]byte, error) {
	if ds == nil {
		return nil, errors.New("no data source")
	}
	b := ds.GetInlineBytes()
	if b == nil {
		if s := ds.GetInlineString(); s != "" {
			return []byte(s), nil
		}
		return nil, fmt.Errorf("data source is not inline (%T): a proxy would read a file or variable", ds.GetSpecifier())
	}
	return b, nil
}

// check unpacks and checks one resource as Envoy would.
func check(r interface {
	GetTypeUrl() string
}, secret *tlsv3.Secret) (*checked, error) {
	if err := secret.ValidateAll(); err != nil {
		return nil, fmt.Errorf("secret %q fails Envoy's validation rules: %w", secret.GetName(), err)
	}
	c := &checked{Name: secret.GetName()}
	switch t := secret.GetType().(type) {
	case *tlsv3.Secret_TlsCertificate:
		c.Kind = "tls_certificate"
		chainPEM, err := inline(t.TlsCertificate.GetCertificateChain())
		if err != nil {
			return nil, fmt.Errorf("%s certificate_chain: %w", c.Name, err)
		}
		keyPEM, err := inline(t.TlsCertificate.GetPrivateKey())
		if err != nil {
			return nil, fmt.Errorf("%s private_key: %w", c.Name, err)
		}
		if b, _ := pem.Decode(keyPEM); b == nil || b.Type != "PRIVATE KEY" {
			return nil, fmt.Errorf("%s private_key is not a PKCS#8 PEM key", c.Name)
		}
		if _, err := tls.X509KeyPair(chainPEM, keyPEM); err != nil {
			return nil, fmt.Errorf("%s: key does not match the chain: %w", c.Name, err)
		}
		chain, err := parseCerts(chainPEM)
		if err != nil {
			return nil, fmt.Errorf("%s chain: %w", c.Name, err)
		}
		if len(chain[0].URIs) != 1 || chain[0].URIs[0].Scheme != "spiffe" {
			return nil, fmt.Errorf("%s: the leaf has no single SPIFFE ID", c.Name)
		}
		sum := sha256.Sum256(chain[0].Raw)
		c.SpiffeID = chain[0].URIs[0].String()
		c.LeafSHA256 = hex.EncodeToString(sum[:])
		c.LeafDERHex = hex.EncodeToString(chain[0].Raw)
		c.ChainLen = len(chain)
		c.chain = chain
	case *tlsv3.Secret_ValidationContext:
		c.Kind = "validation_context"
		vc := t.ValidationContext
		c.roots = map[string]*x509.CertPool{}
		if vc.GetTrustedCa() != nil {
			b, err := inline(vc.GetTrustedCa())
			if err != nil {
				return nil, fmt.Errorf("%s trusted_ca: %w", c.Name, err)
			}
			cas, err := parseCerts(b)
			if err != nil {
				return nil, fmt.Errorf("%s trusted_ca: %w", c.Name, err)
			}
			c.CAs = len(cas)
			c.roots[""] = pool(cas)
		}
		if cv := vc.GetCustomValidatorConfig(); cv != nil {
			if cv.GetName() != "envoy.tls.cert_validator.spiffe" {
				return nil, fmt.Errorf("%s: unknown validator %q", c.Name, cv.GetName())
			}
			var cfg tlsv3.SPIFFECertValidatorConfig
			if err := cv.GetTypedConfig().UnmarshalTo(&cfg); err != nil {
				return nil, fmt.Errorf("%s: SPIFFE validator config: %w", c.Name, err)
			}
			if err := cfg.ValidateAll(); err != nil {
				return nil, fmt.Errorf("%s: SPIFFE validator config fails Envoy's rules: %w", c.Name, err)
			}
			for _, td := range cfg.GetTrustDomains() {
				b, err := inline(td.GetTrustBundle())
				if err != nil {
					return nil, fmt.Errorf("%s/%s: %w", c.Name, td.GetName(), err)
				}
				cas, err := parseCerts(b)
				if err != nil {
					return nil, fmt.Errorf("%s/%s: %w", c.Name, td.GetName(), err)
				}
				c.CAs += len(cas)
				c.roots[td.GetName()] = pool(cas)
				c.TrustDomain = append(c.TrustDomain, td.GetName())
			}
		}
		if len(c.roots) == 0 {
			return nil, fmt.Errorf("%s: a validation context with nothing to validate with", c.Name)
		}
	default:
		return nil, fmt.Errorf("%s: unexpected secret type %T", c.Name, t)
	}
	return c, nil
}

// checkResponse checks every resource of a response and every chain against every
// validation context of its trust domain. Validation contexts for a single trust domain
// are recognised by name: ROOTCA (-own-td) or spiffe://<td>.
func checkResponse(resp *discoveryv3.DiscoveryResponse, ownTD string) ([]*checked, error) {
	if resp.GetTypeUrl() != secretType {
		return nil, fmt.Errorf("response type_url %q", resp.GetTypeUrl())
	}
	if resp.GetVersionInfo() == "" {
		return nil, errors.New("response without version_info")
	}
	var all []*checked
	for _, r := range resp.GetResources() {
		if r.GetTypeUrl() != secretType {
			return nil, fmt.Errorf("resource type_url %q", r.GetTypeUrl())
		}
		var s tlsv3.Secret
		if err := r.UnmarshalTo(&s); err != nil {
			return nil, fmt.Errorf("resource does not unpack as a Secret: %w", err)
		}
		c, err := check(r, &s)
		if err != nil {
			return nil, err
		}
		all = append(all, c)
	}
	for _, cert := range all {
		if cert.chain == nil {
			continue
		}
		td := cert.chain[0].URIs[0].Host
		for _, vc := range all {
			if vc.roots == nil {
				continue
			}
			roots := vc.roots[td]
			if roots == nil {
				single := vc.Name == "spiffe://"+td || (vc.Name != "" && !strings.HasPrefix(vc.Name, "spiffe://") && td == ownTD)
				if !single || vc.roots[""] == nil {
					continue
				}
				roots = vc.roots[""]
			}
			inter := x509.NewCertPool()
			for _, c := range cert.chain[1:] {
				inter.AddCert(c)
			}
			if _, err := cert.chain[0].Verify(x509.VerifyOptions{
				Roots:         roots,
				Intermediates: inter,
				KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
			}); err != nil {
				return nil, fmt.Errorf("%s does not verify against %s: %w", cert.Name, vc.Name, err)
			}
		}
	}
	return all, nil
}

type response struct {
	Version   string     `json:"version"`
	Nonce     string     `json:"nonce"`
	Names     []string   `json:"names"`
	Resources []*checked `json:"resources"`
	AtMs      int64      `json:"at_ms"`
}

func summarize(resp *discoveryv3.DiscoveryResponse, ownTD string) (*response, error) {
	cs, err := checkResponse(resp, ownTD)
	if err != nil {
		return nil, err
	}
	r := &response{Version: resp.GetVersionInfo(), Nonce: resp.GetNonce(), Resources: cs, AtMs: time.Now().UnixMilli()}
	for _, c := range cs {
		r.Names = append(r.Names, c.Name)
	}
	sort.Strings(r.Names)
	return r, nil
}

func dial(socket string) *grpc.ClientConn {
	// Envoy's SDS cluster for Istio: a pipe address, plain HTTP/2, no security header.
	conn, err := grpc.NewClient("passthrough:///sds",
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		}))
	if err != nil {
		fail("dial %s: %v", socket, err)
	}
	return conn
}

type stream struct {
	s    secretv3.SecretDiscoveryService_StreamSecretsClient
	msgs chan *discoveryv3.DiscoveryResponse
	errs chan error
}

func open(ctx context.Context, conn *grpc.ClientConn) *stream {
	s, err := secretv3.NewSecretDiscoveryServiceClient(conn).StreamSecrets(ctx)
	if err != nil {
		fail("StreamSecrets: %v", err)
	}
	st := &stream{s: s, msgs: make(chan *discoveryv3.DiscoveryResponse, 16), errs: make(chan error, 1)}
	go func() {
		for {
			m, err := s.Recv()
			if err != nil {
				st.errs <- err
				return
			}
			st.msgs <- m
		}
	}()
	return st
}

func (st *stream) send(req *discoveryv3.DiscoveryRequest) {
	req.TypeUrl = secretType
	if err := st.s.Send(req); err != nil {
		fail("send: %v", err)
	}
}

// next waits for a response; nil when none comes within `wait`.
func (st *stream) next(wait time.Duration) *discoveryv3.DiscoveryResponse {
	select {
	case m := <-st.msgs:
		return m
	case err := <-st.errs:
		fail("stream ended: %v", err)
	case <-time.After(wait):
	}
	return nil
}

// checkFiles reads a files-mode volume's proxy formats as their readers do.
func checkFiles(dir string) map[string]any {
	p, err := pemfile.NewProvider(pemfile.Options{
		CertFile:            dir + "/cert-chain.pem",
		KeyFile:             dir + "/key.pem",
		SPIFFEBundleMapFile: dir + "/spiffe-bundle-map.json",
		RefreshDuration:     time.Hour,
	})
	if err != nil {
		fail("pemfile provider: %v", err)
	}
	defer p.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	km, err := p.KeyMaterial(ctx)
	if err != nil {
		fail("gRPC's pemfile provider did not load the volume: %v", err)
	}
	if len(km.Certs) != 1 || km.SPIFFEBundleMap == nil {
		fail("gRPC key material: %d certs, bundle map %v", len(km.Certs), km.SPIFFEBundleMap != nil)
	}
	leaf, err := x509.ParseCertificate(km.Certs[0].Certificate[0])
	if err != nil || len(leaf.URIs) != 1 {
		fail("gRPC's leaf: %v", err)
	}
	td := leaf.URIs[0].Host
	b, ok := km.SPIFFEBundleMap[td]
	if !ok {
		fail("the bundle map has no bundle for the leaf's trust domain %q", td)
	}
	inter := x509.NewCertPool()
	for _, der := range km.Certs[0].Certificate[1:] {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			fail("chain: %v", err)
		}
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool(b.X509Authorities()), Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		fail("the leaf does not verify against the bundle map: %v", err)
	}
	var tds []string
	for k := range km.SPIFFEBundleMap {
		tds = append(tds, k)
	}
	sort.Strings(tds)
	// Istio's root-cert.pem: the same roots.
	rootPEM, err := os.ReadFile(dir + "/root-cert.pem")
	if err != nil {
		fail("%v", err)
	}
	roots, err := parseCerts(rootPEM)
	if err != nil {
		fail("root-cert.pem: %v", err)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool(roots), Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		fail("the leaf does not verify against root-cert.pem: %v", err)
	}
	// The credential bundle: a PKCS#8 key, then the chain.
	cb, err := os.ReadFile(dir + "/credential-bundle.pem")
	if err != nil {
		fail("%v", err)
	}
	first, rest := pem.Decode(cb)
	if first == nil || first.Type != "PRIVATE KEY" {
		fail("credential-bundle.pem does not start with a PKCS#8 PRIVATE KEY block")
	}
	if _, err := x509.ParsePKCS8PrivateKey(first.Bytes); err != nil {
		fail("credential-bundle.pem key: %v", err)
	}
	chain, err := parseCerts(rest)
	if err != nil {
		fail("credential-bundle.pem chain: %v", err)
	}
	if _, err := tls.X509KeyPair(rest, pem.EncodeToMemory(first)); err != nil {
		fail("credential-bundle.pem: key does not match the chain: %v", err)
	}
	sum := sha256.Sum256(leaf.Raw)
	cbSum := sha256.Sum256(chain[0].Raw)
	return map[string]any{
		"spiffe_id":              leaf.URIs[0].String(),
		"leaf_sha256":            hex.EncodeToString(sum[:]),
		"bundle_map_tds":         tds,
		"root_cert_cas":          len(roots),
		"credential_leaf_sha256": hex.EncodeToString(cbSum[:]),
		"credential_chain_len":   len(chain),
	}
}

// volumeProvider is gRPC's file watcher over a files-mode volume's SVID and bundle map.
func volumeProvider(dir string) certprovider.Provider {
	p, err := pemfile.NewProvider(pemfile.Options{
		CertFile:            dir + "/svid.pem",
		KeyFile:             dir + "/svid_key.pem",
		SPIFFEBundleMapFile: dir + "/spiffe-bundle-map.json",
		RefreshDuration:     time.Second,
	})
	if err != nil {
		fail("pemfile provider: %v", err)
	}
	return p
}

func keyMaterial(p certprovider.Provider) *certprovider.KeyMaterial {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	km, err := p.KeyMaterial(ctx)
	if err != nil {
		fail("key material: %v", err)
	}
	return km
}

// verifyA87 verifies a peer's chain with the bundle map as grpc proposal A87 says, and
// returns the peer's SPIFFE ID.
func verifyA87(p certprovider.Provider, rawCerts [][]byte) (string, error) {
	if len(rawCerts) == 0 {
		return "", errors.New("the peer sent no certificate")
	}
	var chain []*x509.Certificate
	for _, raw := range rawCerts {
		c, err := x509.ParseCertificate(raw)
		if err != nil {
			return "", err
		}
		chain = append(chain, c)
	}
	leaf := chain[0]
	if len(leaf.URIs) != 1 || leaf.URIs[0].Scheme != "spiffe" {
		return "", errors.New("the peer's leaf does not carry exactly one SPIFFE ID")
	}
	td := leaf.URIs[0].Host
	b, ok := keyMaterial(p).SPIFFEBundleMap[td]
	if !ok {
		return "", fmt.Errorf("no bundle for the peer's trust domain %q in the SPIFFE bundle map", td)
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool(b.X509Authorities()), Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return "", err
	}
	return leaf.URIs[0].String(), nil
}

func grpcServe(dir, listen string) {
	p := volumeProvider(dir)
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS12,
		ClientAuth: tls.RequireAnyClientCert,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return &keyMaterial(p).Certs[0], nil
		},
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			id, err := verifyA87(p, raw)
			if err != nil {
				return err
			}
			out(map[string]any{"peer": id})
			return nil
		},
	}
	lis, err := net.Listen("tcp", listen)
	if err != nil {
		fail("listen: %v", err)
	}
	s := grpc.NewServer(grpc.Creds(credentials.NewTLS(cfg)))
	healthpb.RegisterHealthServer(s, health.NewServer())
	out(map[string]any{"listening": lis.Addr().String()})
	if err := s.Serve(lis); err != nil {
		fail("serve: %v", err)
	}
}

func grpcDial(dir, addr, serverID string) {
	p := volumeProvider(dir)
	var got string
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS12,
		// The server is verified below against the SPIFFE bundle map, not web PKI.
		InsecureSkipVerify: true,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return &keyMaterial(p).Certs[0], nil
		},
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			id, err := verifyA87(p, raw)
			if err != nil {
				return err
			}
			if id != serverID {
				return fmt.Errorf("the server is %s, not %s", id, serverID)
			}
			got = id
			return nil
		},
	}
	conn, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		fail("dial: %v", err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		fail("health check over mTLS: %v", err)
	}
	out(map[string]any{"status": resp.GetStatus().String(), "server_id": got})
}

func main() {
	socket := flag.String("socket", "", "the agent's socket")
	flag.Parse()
	if flag.NArg() >= 1 && (flag.Arg(0) == "grpc-serve" || flag.Arg(0) == "grpc-dial") {
		fs := flag.NewFlagSet(flag.Arg(0), flag.ExitOnError)
		dir := fs.String("dir", "", "the files-mode volume")
		listen := fs.String("listen", "127.0.0.1:0", "where to listen (grpc-serve)")
		connect := fs.String("connect", "", "the server's address (grpc-dial)")
		serverID := fs.String("server-id", "", "the server's SPIFFE ID (grpc-dial)")
		_ = fs.Parse(flag.Args()[1:])
		if flag.Arg(0) == "grpc-serve" {
			grpcServe(*dir, *listen)
		} else {
			grpcDial(*dir, *connect, *serverID)
		}
		return
	}
	if flag.NArg() >= 1 && flag.Arg(0) == "files" {
		fs := flag.NewFlagSet("files", flag.ExitOnError)
		dir := fs.String("dir", "", "the volume")
		_ = fs.Parse(flag.Args()[1:])
		out(checkFiles(*dir))
		return
	}
	if *socket == "" || flag.NArg() < 1 {
		fail("usage: envoy-sds-client -socket PATH scenario|watch|fetch [flags]")
	}
	cmd := flag.Arg(0)
	fs := flag.NewFlagSet(cmd, flag.ExitOnError)
	names := fs.String("names", "default,ROOTCA", "resource names to subscribe to")
	extra := fs.String("extra", "", "names added by the subscription change (scenario)")
	quiet := fs.Duration("quiet", 1500*time.Millisecond, "how long nothing must follow an ACK or a NACK (scenario)")
	ownTD := fs.String("own-td", "", "the trust domain ROOTCA stands for")
	wait := fs.Duration("wait", 30*time.Second, "how long to wait for a response")
	count := fs.Int("count", 100, "streams to hold (streams), requests to send (flood, long)")
	pad := fs.Int("pad", 4000, "metadata bytes in each request's Node (long)")
	_ = fs.Parse(flag.Args()[1:])
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	conn := dial(*socket)
	defer conn.Close()
	subscribed := splitNames(*names)

	switch cmd {
	case "fetch":
		resp, err := secretv3.NewSecretDiscoveryServiceClient(conn).FetchSecrets(ctx, &discoveryv3.DiscoveryRequest{
			Node: node(), ResourceNames: subscribed, TypeUrl: secretType,
		})
		if err != nil {
			fail("FetchSecrets: %v", err)
		}
		r, err := summarize(resp, *ownTD)
		if err != nil {
			fail("%v", err)
		}
		out(r)

	case "long":
		big := node()
		big.Metadata.Fields["PADDING"] = structpb.NewStringValue(strings.Repeat("x", *pad))
		st := open(ctx, conn)
		st.send(&discoveryv3.DiscoveryRequest{Node: big, ResourceNames: subscribed})
		first := st.next(*wait)
		if first == nil {
			fail("no first response")
		}
		sent := 0
		for i := 0; i < *count; i++ {
			req := &discoveryv3.DiscoveryRequest{Node: big, VersionInfo: first.GetVersionInfo(), ResponseNonce: first.GetNonce(), ResourceNames: subscribed}
			st.send(req)
			sent += proto.Size(req)
		}
		changed := append(append([]string{}, subscribed...), "spiffe://not-mine.test")
		st.send(&discoveryv3.DiscoveryRequest{Node: big, VersionInfo: first.GetVersionInfo(), ResponseNonce: first.GetNonce(), ResourceNames: changed})
		if m := st.next(*wait); m == nil {
			fail("no answer to a subscription change after %d bytes of requests", sent)
		}
		out(map[string]any{"request_bytes": sent, "answered": true})

	case "flood":
		st := open(ctx, conn)
		st.send(&discoveryv3.DiscoveryRequest{Node: node(), ResourceNames: subscribed})
		first := st.next(*wait)
		if first == nil {
			fail("no first response")
		}
		for i := 0; i < *count; i++ {
			if err := st.s.Send(&discoveryv3.DiscoveryRequest{TypeUrl: secretType, VersionInfo: first.GetVersionInfo(), ResponseNonce: first.GetNonce(), ResourceNames: subscribed}); err != nil {
				break
			}
		}
		select {
		case err := <-st.errs:
			fail("stream ended: %v", err)
		case <-time.After(*wait):
			out(map[string]any{"ended": false})
		}

	case "streams":
		streams := make([]*stream, 0, *count)
		for i := 0; i < *count; i++ {
			st := open(ctx, dial(*socket))
			st.send(&discoveryv3.DiscoveryRequest{Node: node(), ResourceNames: subscribed})
			streams = append(streams, st)
		}
		ack := func(st *stream) {
			resp := st.next(5 * time.Minute)
			if resp == nil {
				fail("a stream got no response")
			}
			st.send(&discoveryv3.DiscoveryRequest{VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce(), ResourceNames: subscribed})
		}
		for _, st := range streams {
			ack(st)
		}
		fmt.Println("ready")
		for _, st := range streams {
			ack(st)
		}
		fmt.Println("updated")
		buf := make([]byte, 1)
		_, _ = os.Stdin.Read(buf)

	case "watch":
		st := open(ctx, conn)
		st.send(&discoveryv3.DiscoveryRequest{Node: node(), ResourceNames: subscribed})
		for {
			resp := st.next(24 * time.Hour)
			r, err := summarize(resp, *ownTD)
			if err != nil {
				fail("%v", err)
			}
			out(r)
			st.send(&discoveryv3.DiscoveryRequest{VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce(), ResourceNames: subscribed})
		}

	case "scenario":
		report := map[string]any{}
		st := open(ctx, conn)
		// 1. Subscribe (Envoy's first request: node, names, no version, no nonce).
		st.send(&discoveryv3.DiscoveryRequest{Node: node(), ResourceNames: subscribed})
		first := st.next(*wait)
		if first == nil {
			fail("no response to the first request within %s", *wait)
		}
		r, err := summarize(first, *ownTD)
		if err != nil {
			fail("first response: %v", err)
		}
		report["first"] = r
		// 2. ACK: nothing follows.
		st.send(&discoveryv3.DiscoveryRequest{VersionInfo: first.GetVersionInfo(), ResponseNonce: first.GetNonce(), ResourceNames: subscribed})
		if m := st.next(*quiet); m != nil {
			fail("a response (version %s) followed an ACK of unchanged content", m.GetVersionInfo())
		}
		report["quiet_after_ack"] = true
		acked := first
		// 3. Change the subscription on the same stream.
		changedNames := append(append([]string{}, subscribed...), splitNames(*extra)...)
		st.send(&discoveryv3.DiscoveryRequest{VersionInfo: acked.GetVersionInfo(), ResponseNonce: acked.GetNonce(), ResourceNames: changedNames})
		changed := st.next(*wait)
		if changed == nil {
			fail("no response to a subscription change")
		}
		r, err = summarize(changed, *ownTD)
		if err != nil {
			fail("response to the subscription change: %v", err)
		}
		report["changed"] = r
		// 4. NACK it (keeping the acked version): the rejected content is not resent.
		st.send(&discoveryv3.DiscoveryRequest{
			VersionInfo:   acked.GetVersionInfo(),
			ResponseNonce: changed.GetNonce(),
			ResourceNames: changedNames,
			ErrorDetail:   &rpcstatus.Status{Code: 3, Message: "test: rejected as a proxy would reject a bad secret"},
		})
		if m := st.next(*quiet); m != nil {
			fail("the NACKed content was sent again (version %s)", m.GetVersionInfo())
		}
		report["quiet_after_nack"] = true
		// 5. A stale request (an old nonce) is ignored.
		st.send(&discoveryv3.DiscoveryRequest{VersionInfo: acked.GetVersionInfo(), ResponseNonce: "stale", ResourceNames: subscribed})
		if m := st.next(*quiet); m != nil {
			fail("a response (version %s) to a request with a stale nonce", m.GetVersionInfo())
		}
		report["stale_ignored"] = true
		// 6. Reconnect: a new stream with the last accepted version and no nonce gets
		// the full state again.
		st.s.CloseSend()
		cancel()
		ctx2, cancel2 := context.WithCancel(context.Background())
		defer cancel2()
		st2 := open(ctx2, conn)
		st2.send(&discoveryv3.DiscoveryRequest{Node: node(), VersionInfo: acked.GetVersionInfo(), ResourceNames: subscribed})
		again := st2.next(*wait)
		if again == nil {
			fail("no response after reconnecting")
		}
		r, err = summarize(again, *ownTD)
		if err != nil {
			fail("response after reconnecting: %v", err)
		}
		report["reconnected"] = r
		out(report)

	default:
		fail("unknown command %q", cmd)
	}
}
