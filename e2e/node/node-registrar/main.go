// node-registrar registers a CSI node plugin with the kubelet, in the place of the
// upstream node-driver-registrar, whose v2 releases the Go module proxy does not serve
// (their go.mod lacks the /v2 suffix). It takes the upstream flags the Sigil chart
// passes, so the chart runs either image unchanged:
//
//	node-registrar --csi-address=/csi/csi.sock \
//	  --kubelet-registration-path=/var/lib/kubelet/plugins/csi.sigil.dev/csi.sock
//
// It asks the CSI driver for its name (Identity.GetPluginInfo, retried until the driver
// answers), serves the kubelet's plugin registration API on
// /registration/<name>-reg.sock, and exits non-zero when the kubelet reports that
// registration failed, so the container restarts. SIGTERM removes the socket.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	csi "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registration "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

type registrar struct {
	registration.UnimplementedRegistrationServer
	name, endpoint string
}

func (r *registrar) GetInfo(context.Context, *registration.InfoRequest) (*registration.PluginInfo, error) {
	log.Printf("kubelet asked for plugin info: %s at %s", r.name, r.endpoint)
	return &registration.PluginInfo{
		Type:              registration.CSIPlugin,
		Name:              r.name,
		Endpoint:          r.endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (r *registrar) NotifyRegistrationStatus(_ context.Context, s *registration.RegistrationStatus) (*registration.RegistrationStatusResponse, error) {
	if !s.PluginRegistered {
		log.Printf("the kubelet refused the registration: %s", s.Error)
		os.Exit(1)
	}
	log.Printf("registered %s with the kubelet", r.name)
	return &registration.RegistrationStatusResponse{}, nil
}

func main() {
	csiAddress := flag.String("csi-address", "/run/csi/socket", "the CSI driver's socket, as this container sees it")
	kubeletPath := flag.String("kubelet-registration-path", "", "the CSI driver's socket, as the kubelet sees it (a host path)")
	regDir := flag.String("plugin-registration-path", "/registration", "the kubelet's plugins_registry directory, as this container sees it")
	timeout := flag.Duration("timeout", 10*time.Second, "deadline of one GetPluginInfo call")
	// Accepted for compatibility with the upstream image's flags; not used.
	flag.Int("v", 0, "log verbosity (ignored)")
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	if *kubeletPath == "" {
		log.Fatal("--kubelet-registration-path is required")
	}

	name := driverName(*csiAddress, *timeout)
	sock := filepath.Join(*regDir, name+"-reg.sock")
	if err := os.Remove(sock); err != nil && !errors.Is(err, os.ErrNotExist) {
		log.Fatalf("remove the stale %s: %v", sock, err)
	}
	lis, err := net.Listen("unix", sock)
	if err != nil {
		log.Fatalf("listen on %s: %v", sock, err)
	}
	srv := grpc.NewServer()
	registration.RegisterRegistrationServer(srv, &registrar{name: name, endpoint: *kubeletPath})

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		s := <-sigs
		log.Printf("%v: removing %s", s, sock)
		srv.Stop()
		_ = os.Remove(sock)
		os.Exit(0)
	}()
	log.Printf("serving the registration of %s on %s", name, sock)
	if err := srv.Serve(lis); err != nil {
		log.Fatalf("serve: %v", err)
	}
}

// driverName asks the driver for its name, waiting for it to listen.
func driverName(address string, timeout time.Duration) string {
	target := address
	if !strings.HasPrefix(target, "unix://") {
		target = "unix://" + target
	}
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatalf("connect to %s: %v", address, err)
	}
	defer conn.Close()
	client := csi.NewIdentityClient(conn)
	for attempt := 1; ; attempt++ {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		info, err := client.GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
		cancel()
		if err == nil && info.GetName() != "" {
			return info.GetName()
		}
		if err == nil {
			err = fmt.Errorf("empty driver name")
		}
		log.Printf("GetPluginInfo on %s (attempt %d): %v", address, attempt, err)
		time.Sleep(time.Second)
	}
}
