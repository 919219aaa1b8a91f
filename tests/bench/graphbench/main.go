// graphbench: moby's graphtest benchmarks (daemon/graphdriver/graphtest/graphbench_unix.go)
// against dockerd's in-tree overlay2, or against a graphdriver plugin through dockerd's own
// plugin proxy (daemon/graphdriver/proxy.go, pkg/plugins' HTTP client), in one binary, so
// both columns of tests/bench/bench_graphtest.py run the same Go code.
//
//	graphbench -driver overlay2 [-bench DiffBase,...] [-n 20]
//	graphbench -driver strata -sock /path/to/plugin.sock [-bench ...] [-n 20]
//
// Layers live under $TMPDIR (graphtest's os.MkdirTemp). Prints one JSON line per
// benchmark: {"name": "DiffBase", "ns_per_op": 153197, "n": 20}.
//
// Built in GOPATH mode on Debian's golang-github-docker-docker-dev sources; the few
// packages that source tree lacks (quota, plugin/v2, gotest.tools/v3) come from the small
// stand-ins in shim/ (see bench_graphtest.py, which builds this).
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/docker/docker/daemon/graphdriver"
	"github.com/docker/docker/daemon/graphdriver/graphtest"
	_ "github.com/docker/docker/daemon/graphdriver/overlay2"
	"github.com/docker/docker/pkg/idtools"
	"github.com/docker/docker/pkg/plugingetter"
	"github.com/docker/docker/pkg/plugins"
	"github.com/docker/docker/pkg/reexec"
	"github.com/docker/go-connections/tlsconfig"
)

type benchFunc func(b *testing.B, driver string)

var benchmarks = map[string]benchFunc{
	"Exists":   func(b *testing.B, d string) { graphtest.DriverBenchExists(b, d) },
	"GetEmpty": func(b *testing.B, d string) { graphtest.DriverBenchGetEmpty(b, d) },
	"DiffBase": func(b *testing.B, d string) { graphtest.DriverBenchDiffBase(b, d) },
	"DiffSmallUpper": func(b *testing.B, d string) {
		graphtest.DriverBenchDiffN(b, 10, 10, d)
	},
	"Diff10KFileUpper": func(b *testing.B, d string) {
		graphtest.DriverBenchDiffN(b, 10, 10000, d)
	},
	"Diff10KFilesBottom": func(b *testing.B, d string) {
		graphtest.DriverBenchDiffN(b, 10000, 10, d)
	},
	"DiffApply100": func(b *testing.B, d string) { graphtest.DriverBenchDiffApplyN(b, 100, d) },
	"Diff20Layers": func(b *testing.B, d string) { graphtest.DriverBenchDeepLayerDiff(b, 20, d) },
	"Read20Layers": func(b *testing.B, d string) { graphtest.DriverBenchDeepLayerRead(b, 20, d) },
}

// A v1 plugin as dockerd's plugin store hands it to graphdriver: a name and an HTTP client
// built the way pkg/plugins builds one for a socket in /run/docker/plugins.
type v1Plugin struct {
	name   string
	client *plugins.Client
}

func (p *v1Plugin) Name() string                { return p.name }
func (p *v1Plugin) ScopedPath(path string) string { return path }
func (p *v1Plugin) IsV1() bool                  { return true }
func (p *v1Plugin) Client() *plugins.Client     { return p.client }

type oneGetter struct{ plugin *v1Plugin }

func (g oneGetter) Get(string, string, int) (plugingetter.CompatPlugin, error) {
	return g.plugin, nil
}
func (g oneGetter) GetAllByCap(string) ([]plugingetter.CompatPlugin, error) { return nil, nil }
func (g oneGetter) GetAllManagedPluginsByCap(string) []plugingetter.CompatPlugin {
	return nil
}
func (g oneGetter) Handle(string, func(string, *plugins.Client)) {}

// registerPlugin makes graphtest's GetDriver("strata") reach the plugin: graphtest passes
// no plugin getter, so a registered driver of that name does the plugin lookup itself.
func registerPlugin(sock string) error {
	client, err := plugins.NewClient("unix://"+sock, &tlsconfig.Options{InsecureSkipVerify: true})
	if err != nil {
		return err
	}
	getter := oneGetter{&v1Plugin{"strata", client}}
	return graphdriver.Register("strata", func(home string, options []string,
		uidMaps, gidMaps []idtools.IDMap) (graphdriver.Driver, error) {
		return graphdriver.GetDriver("strata-plugin", getter, graphdriver.Options{
			Root: home, DriverOptions: options, UIDMaps: uidMaps, GIDMaps: gidMaps,
			ExperimentalEnabled: true,
		})
	})
}

func main() {
	if reexec.Init() { // chrootarchive's docker-applyLayer child (overlay2's naive ApplyDiff)
		return
	}
	testing.Init()
	driver := flag.String("driver", "overlay2", "overlay2, or strata (with -sock)")
	sock := flag.String("sock", "", "the plugin's Unix socket (driver strata)")
	names := flag.String("bench", "DiffBase,DiffSmallUpper,DiffApply100,Diff20Layers",
		"comma-separated benchmark names")
	n := flag.Int("n", 20, "iterations per benchmark")
	flag.Parse()
	if err := flag.Set("test.benchtime", fmt.Sprintf("%dx", *n)); err != nil {
		fail(err)
	}
	if *driver == "strata" {
		if *sock == "" {
			fail(fmt.Errorf("-driver strata needs -sock"))
		}
		if err := registerPlugin(*sock); err != nil {
			fail(err)
		}
	}
	out := json.NewEncoder(os.Stdout)
	for _, name := range strings.Split(*names, ",") {
		bench, ok := benchmarks[name]
		if !ok {
			fail(fmt.Errorf("unknown benchmark %q", name))
		}
		failed := false
		result := testing.Benchmark(func(b *testing.B) {
			defer func() { failed = failed || b.Failed() }()
			bench(b, *driver)
		})
		if failed || result.N == 0 {
			fail(fmt.Errorf("benchmark %s failed on %s", name, *driver))
		}
		_ = out.Encode(map[string]interface{}{
			"name": name, "ns_per_op": result.NsPerOp(), "n": result.N})
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "graphbench:", err)
	os.Exit(1)
}
