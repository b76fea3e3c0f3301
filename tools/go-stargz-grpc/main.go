// Go's containerd-stargz-grpc, as a baseline for our benchmarks only. Debian ships the Go
// stargz-snapshotter library (golang-github-containerd-stargz-snapshotter-dev, 0.12) but not this
// daemon, so scripts/go-daemon.sh builds this small main around the library's `service` package:
// the same flags (--address --root --config --log-level), JSON logs, the same config file, SIGINT
// cleans up (unmounts) and SIGTERM leaves mounts for a restart. Differences from upstream's main:
// no docker-config/CRI keychains (the test registries need no credentials), no metrics, no
// sd_notify. The service package is compiled without its CRI resolver (it needs k8s cri-api,
// which Debian does not package).
package main

import (
	"context"
	"flag"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/log"
	service "gostargzgrpc/svc"
	"github.com/pelletier/go-toml"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
)

func main() {
	address := flag.String("address", "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock", "socket")
	configPath := flag.String("config", "/etc/containerd-stargz-grpc/config.toml", "config")
	logLevel := flag.String("log-level", "info", "log level")
	root := flag.String("root", "/var/lib/containerd-stargz-grpc", "root")
	flag.Parse()
	lvl, err := logrus.ParseLevel(*logLevel)
	if err != nil {
		log.L.WithError(err).Fatal("log level")
	}
	logrus.SetLevel(lvl)
	logrus.SetFormatter(&logrus.JSONFormatter{})
	ctx := log.WithLogger(context.Background(), log.L)

	var config service.Config
	if tree, err := toml.LoadFile(*configPath); err == nil {
		if err := tree.Unmarshal(&config); err != nil {
			log.G(ctx).WithError(err).Fatal("config")
		}
	} else if !os.IsNotExist(err) {
		log.G(ctx).WithError(err).Fatal("config")
	}
	rs, err := service.NewStargzSnapshotterService(ctx, *root, &config)
	if err != nil {
		log.G(ctx).WithError(err).Fatal("snapshotter")
	}
	rpc := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(rpc, snapshotservice.FromSnapshotter(rs))
	if err := os.MkdirAll(filepath.Dir(*address), 0700); err != nil {
		log.G(ctx).WithError(err).Fatal("mkdir")
	}
	os.Remove(*address)
	l, err := net.Listen("unix", *address)
	if err != nil {
		log.G(ctx).WithError(err).Fatal("listen")
	}
	errCh := make(chan error, 1)
	go func() { errCh <- rpc.Serve(l) }()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	cleanup := false
	select {
	case s := <-sig:
		cleanup = s == syscall.SIGINT
	case err := <-errCh:
		log.G(ctx).WithError(err).Error("serve")
	}
	if cleanup {
		rs.Close()
	}
}
