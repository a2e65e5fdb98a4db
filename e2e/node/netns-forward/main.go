// netns-forward makes a TCP port inside the test node's network namespace reachable on the
// host's loopback, and nothing else: it listens on a host address (loopback only) and,
// for each connection, dials the target from inside the namespace. The cluster's
// addresses stay inside the namespace; there is no route between it and the host.
//
//	netns-forward -netns /var/run/netns/sigil-cluster -listen 127.0.0.1:16443 -connect 127.0.0.1:6443
package main

import (
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/signal"
	"runtime"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

func main() {
	netns := flag.String("netns", "", "path of the network namespace to dial in")
	listen := flag.String("listen", "127.0.0.1:16443", "host address to listen on (loopback)")
	connect := flag.String("connect", "127.0.0.1:6443", "address to dial inside the namespace")
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	host, _, err := net.SplitHostPort(*listen)
	if err != nil {
		log.Fatalf("-listen %q: %v", *listen, err)
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		log.Fatalf("-listen %q: only loopback addresses", *listen)
	}
	if *netns == "" {
		log.Fatal("-netns is required")
	}
	lis, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatalf("listen on %s: %v", *listen, err)
	}
	log.Printf("forwarding %s to %s in %s", *listen, *connect, *netns)
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() { <-sigs; os.Exit(0) }()
	for {
		c, err := lis.Accept()
		if err != nil {
			log.Printf("accept: %v", err)
			time.Sleep(100 * time.Millisecond)
			continue
		}
		go forward(c, *netns, *connect)
	}
}

func forward(c net.Conn, netns, target string) {
	defer c.Close()
	up, err := dialIn(netns, target)
	if err != nil {
		log.Printf("dial %s in %s: %v", target, netns, err)
		return
	}
	defer up.Close()
	var wg sync.WaitGroup
	wg.Add(2)
	pipe := func(dst, src net.Conn) {
		defer wg.Done()
		_, _ = io.Copy(dst, src)
		if t, ok := dst.(*net.TCPConn); ok {
			_ = t.CloseWrite()
		}
	}
	go pipe(up, c)
	go pipe(c, up)
	wg.Wait()
}

// dialIn opens the connection from a thread that has entered the namespace; a socket
// keeps the namespace it was created in, so the thread goes back right after.
func dialIn(netns, target string) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		self, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
		if err != nil {
			ch <- result{err: err}
			runtime.UnlockOSThread()
			return
		}
		defer self.Close()
		nsFile, err := os.Open(netns)
		if err != nil {
			ch <- result{err: err}
			runtime.UnlockOSThread()
			return
		}
		defer nsFile.Close()
		if err := unix.Setns(int(nsFile.Fd()), unix.CLONE_NEWNET); err != nil {
			ch <- result{err: fmt.Errorf("setns: %w", err)}
			runtime.UnlockOSThread()
			return
		}
		c, err := net.DialTimeout("tcp", target, 10*time.Second)
		if err := unix.Setns(int(self.Fd()), unix.CLONE_NEWNET); err != nil {
			// The thread is stuck in the namespace: keep it locked so the runtime
			// retires it instead of reusing it for other goroutines.
			if c != nil {
				c.Close()
			}
			ch <- result{err: fmt.Errorf("setns back: %w", err)}
			return
		}
		runtime.UnlockOSThread()
		ch <- result{c, err}
	}()
	r := <-ch
	return r.c, r.err
}
