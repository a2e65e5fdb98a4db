// pause is the sandbox ("infra") container of the test node's pods: it holds the pod's
// namespaces open, reaps orphaned children (it is PID 1 when the pod shares its PID
// namespace), and exits 0 on SIGTERM or SIGINT. Built static (CGO_ENABLED=0), it is the
// only file of the sigil-test/pause image.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range sigs {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
