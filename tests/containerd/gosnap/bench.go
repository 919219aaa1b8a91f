package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"sort"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
)

const benchWarmup = 20

// benchOps are timed in this order each round; Remove runs after all rounds, leaf first.
var benchOps = []string{"Prepare", "Mounts", "Commit", "Stat", "Remove"}

func benchMain(args []string) error {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	socket := fs.String("socket", "", "proxy snapshotter socket")
	n := fs.Int("n", 200, "timed rounds")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *socket == "" || *n < 1 {
		return errors.New("--socket and a positive --n are required")
	}
	conn, err := dialProxy(*socket)
	if err != nil {
		return err
	}
	defer conn.Close()
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "bench")
	ctx := namespaces.WithNamespace(context.Background(), "gosnap-bench")
	prefix := fmt.Sprintf("gosnap-bench-%d", os.Getpid())

	if _, err := benchRounds(ctx, sn, prefix+"-warm", min(*n, benchWarmup)); err != nil {
		return err
	}
	times, err := benchRounds(ctx, sn, prefix, *n)
	if err != nil {
		return err
	}
	// overlayfs removes asynchronously: Cleanup is where its directories go. A server
	// whose snapshotter has no Cleanup (native) answers Unimplemented, as containerd allows.
	if cleaner, ok := sn.(snapshots.Cleaner); ok {
		if err := cleaner.Cleanup(ctx); err != nil && !errdefs.IsNotImplemented(err) {
			return fmt.Errorf("Cleanup: %w", err)
		}
	}
	for _, op := range benchOps {
		line, err := json.Marshal(summarize(op, times[op]))
		if err != nil {
			return err
		}
		fmt.Println(string(line))
	}
	return nil
}

// benchRounds makes n committed snapshots (Prepare, Mounts, Commit, Stat each), then
// removes them; it returns the per-op durations.
func benchRounds(ctx context.Context, sn snapshots.Snapshotter, prefix string, n int) (map[string][]time.Duration, error) {
	times := map[string][]time.Duration{}
	timed := func(op string, call func() error) error {
		start := time.Now()
		err := call()
		times[op] = append(times[op], time.Since(start))
		if err != nil {
			return fmt.Errorf("%s: %w", op, err)
		}
		return nil
	}
	for i := 0; i < n; i++ {
		key, name := fmt.Sprintf("%s-active-%d", prefix, i), fmt.Sprintf("%s-%d", prefix, i)
		steps := []struct {
			op   string
			call func() error
		}{
			{"Prepare", func() error { _, err := sn.Prepare(ctx, key, ""); return err }},
			{"Mounts", func() error { _, err := sn.Mounts(ctx, key); return err }},
			{"Commit", func() error { return sn.Commit(ctx, name, key) }},
			{"Stat", func() error { _, err := sn.Stat(ctx, name); return err }},
		}
		for _, step := range steps {
			if err := timed(step.op, step.call); err != nil {
				return nil, err
			}
		}
	}
	for i := 0; i < n; i++ {
		name := fmt.Sprintf("%s-%d", prefix, i)
		if err := timed("Remove", func() error { return sn.Remove(ctx, name) }); err != nil {
			return nil, err
		}
	}
	return times, nil
}

type opSummary struct {
	Op    string `json:"op"`
	N     int    `json:"n"`
	P50Ns int64  `json:"p50_ns"`
	P90Ns int64  `json:"p90_ns"`
}

func summarize(op string, durations []time.Duration) opSummary {
	sorted := append([]time.Duration(nil), durations...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i] < sorted[j] })
	at := func(q float64) int64 { return int64(sorted[int(q*float64(len(sorted)-1))]) }
	return opSummary{Op: op, N: len(sorted), P50Ns: at(0.5), P90Ns: at(0.9)}
}

func min(a, b int) int {
	if a < b {
		return a
	}
	return b
}
