// cert-manager-controller runs the real cert-manager controllers (the pinned
// github.com/cert-manager/cert-manager module's own code) for Sigil's e2e tests.
//
// cert-manager's cmd/controller is a separate Go module that the Go module proxy does
// not serve, so this is the smallest main that does what its app does for the
// controllers named in -controllers: build the controller context from a kubeconfig,
// construct each registered controller, start the shared informers and run them. No
// leader election, no webhook, no metrics server: the tests run one instance against a
// throwaway API server.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"k8s.io/klog/v2"

	controllerpkg "github.com/cert-manager/cert-manager/pkg/controller"
	// Registration by init(): the approver, the CA issuer's CertificateRequest
	// controller, and the Issuer / ClusterIssuer readiness controllers.
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificaterequests/approver"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificaterequests/ca"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificaterequests/selfsigned"
	_ "github.com/cert-manager/cert-manager/pkg/controller/clusterissuers"
	_ "github.com/cert-manager/cert-manager/pkg/controller/issuers"
	_ "github.com/cert-manager/cert-manager/pkg/issuer/ca"
	_ "github.com/cert-manager/cert-manager/pkg/issuer/selfsigned"
	logf "github.com/cert-manager/cert-manager/pkg/logs"
)

func main() {
	kubeconfig := flag.String("kubeconfig", "", "kubeconfig of the API server")
	controllers := flag.String("controllers", "issuers,clusterissuers,certificaterequests-approver,certificaterequests-issuer-ca",
		"comma-separated controllers to run (of those this binary registers)")
	clusterResourceNamespace := flag.String("cluster-resource-namespace", "cert-manager",
		"namespace of the Secrets that ClusterIssuers reference")
	flag.Parse()

	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer cancel()
	ctx = logf.NewContext(ctx, klog.Background())

	if err := run(ctx, *kubeconfig, *controllers, *clusterResourceNamespace); err != nil {
		fmt.Fprintln(os.Stderr, "cert-manager-controller:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, kubeconfig, names, clusterResourceNamespace string) error {
	factory, err := controllerpkg.NewContextFactory(ctx, controllerpkg.ContextOptions{
		Kubeconfig:         kubeconfig,
		KubernetesAPIQPS:   50,
		KubernetesAPIBurst: 100,
		IssuerOptions: controllerpkg.IssuerOptions{
			ClusterResourceNamespace: clusterResourceNamespace,
		},
		CertificateOptions: controllerpkg.CertificateOptions{
			CertificateRequestMinimumBackoffDuration: time.Second,
			CertificateRequestMaximumBackoffDuration: 10 * time.Second,
		},
	})
	if err != nil {
		return err
	}

	known := controllerpkg.Known()
	var running []controllerpkg.Interface
	for _, name := range strings.Split(names, ",") {
		name = strings.TrimSpace(name)
		if name == "" {
			continue
		}
		construct, ok := known[name]
		if !ok {
			return fmt.Errorf("unknown controller %q", name)
		}
		c, err := construct(factory)
		if err != nil {
			return fmt.Errorf("constructing %s: %w", name, err)
		}
		running = append(running, c)
		klog.Infof("controller %s constructed", name)
	}

	// The informers every controller asked for are shared; start them once all exist.
	shared, err := factory.Build()
	if err != nil {
		return err
	}
	shared.KubeSharedInformerFactory.Start(ctx.Done())
	shared.SharedInformerFactory.Start(ctx.Done())

	var wg sync.WaitGroup
	errs := make(chan error, len(running))
	for _, c := range running {
		wg.Add(1)
		go func(c controllerpkg.Interface) {
			defer wg.Done()
			if err := c.Run(1, ctx); err != nil {
				errs <- err
			}
		}(c)
	}
	klog.Info("cert-manager controllers running")
	wg.Wait()
	close(errs)
	for err := range errs {
		return err
	}
	return nil
}
