package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/defaults"
	"github.com/containerd/containerd/pkg/dialer"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/native"
	"github.com/containerd/containerd/snapshots/overlay"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
)

// newBackend builds containerd's own snapshotter the way its plugin registration does
// (overlayfs gets AsynchronousRemove, as snapshots/overlay/plugin registers it).
func newBackend(backend, root string) (snapshots.Snapshotter, error) {
	switch backend {
	case "overlayfs":
		return overlay.NewSnapshotter(root, overlay.AsynchronousRemove)
	case "native":
		return native.NewSnapshotter(root)
	default:
		return nil, fmt.Errorf("unknown backend %q (want overlayfs or native)", backend)
	}
}

func serveMain(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	backend := fs.String("backend", "", "overlayfs or native")
	root := fs.String("root", "", "snapshotter root directory")
	socket := fs.String("socket", "", "unix socket to listen on")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *backend == "" || *root == "" || *socket == "" {
		return errors.New("--backend, --root and --socket are required")
	}
	sn, err := newBackend(*backend, *root)
	if err != nil {
		return err
	}
	defer sn.Close()

	if err := os.Remove(*socket); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	listener, err := net.Listen("unix", *socket)
	if err != nil {
		return err
	}
	defer os.Remove(*socket)
	server := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(server, snapshotservice.FromSnapshotter(sn))

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-signals
		server.Stop()
	}()
	return server.Serve(listener)
}

// dialProxy connects to a proxy snapshotter socket with the options containerd 1.6 uses
// for its [proxy_plugins] (services/server/server.go, proxyClients.getClient).
func dialProxy(socket string) (*grpc.ClientConn, error) {
	backoffConfig := backoff.DefaultConfig
	backoffConfig.MaxDelay = 3 * time.Second
	return grpc.Dial(dialer.DialAddress(socket),
		grpc.WithInsecure(),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoffConfig}),
		grpc.WithContextDialer(dialer.ContextDialer),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(defaults.DefaultMaxRecvMsgSize)),
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(defaults.DefaultMaxSendMsgSize)),
	)
}

// waitForSocket returns once something accepts on socket, or the deadline or exited fires.
func waitForSocket(ctx context.Context, socket string, exited <-chan struct{}) error {
	for {
		conn, err := net.Dial("unix", socket)
		if err == nil {
			return conn.Close()
		}
		select {
		case <-exited:
			return fmt.Errorf("server exited before listening on %s", socket)
		case <-ctx.Done():
			return fmt.Errorf("nothing listening on %s: %w", socket, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}
