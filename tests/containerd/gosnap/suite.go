package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
)

const (
	suiteChildCommand = "_suite-child"
	topTestName       = "Suite"
	serverStartWait   = 30 * time.Second
	serverStopWait    = 10 * time.Second
	serverLogTail     = 4096
)

// suiteConfig travels from the parent to the child process as JSON.
type suiteConfig struct {
	Name       string
	InProcess  string
	Socket     string
	ServerArgv []string
	SocketDir  string // per-case sockets: short, whatever the run dir's length
}

var socketSeq atomic.Int64

var caseLine = regexp.MustCompile(`^\s*--- (PASS|FAIL|SKIP): ` + topTestName + `/(\S+) \(`)

func testsuiteMain(args []string) (int, error) {
	fs := flag.NewFlagSet("testsuite", flag.ContinueOnError)
	var cfg suiteConfig
	fs.StringVar(&cfg.Name, "name", "", "snapshotter name (the suite's temp dir prefix)")
	fs.StringVar(&cfg.InProcess, "inprocess", "", "overlayfs or native, run in this process")
	fs.StringVar(&cfg.Socket, "socket", "", "one already running server for every case")
	run := fs.String("run", "", "regular expression selecting cases (e.g. '^(Basic|Walk)$')")
	parallel := fs.Int("parallel", 0, "cases run at once (default GOMAXPROCS)")
	timeout := fs.Duration("timeout", 20*time.Minute, "whole-suite timeout")
	tmpDir := fs.String("tmpdir", "", "where the cases' roots go (e.g. a btrfs mount; default $TMPDIR)")
	if err := fs.Parse(args); err != nil {
		return 0, err
	}
	cfg.ServerArgv = fs.Args()
	if err := cfg.validate(); err != nil {
		return 0, err
	}
	if os.Geteuid() != 0 {
		return 0, errors.New("the suite mounts what the snapshotter returns: run as root")
	}
	runDir, err := os.MkdirTemp(*tmpDir, "gosnap-suite-")
	if err != nil {
		return 0, err
	}
	defer removeRunDir(runDir)
	if cfg.SocketDir, err = os.MkdirTemp("", "gosnap-sock-"); err != nil {
		return 0, err
	}
	defer os.RemoveAll(cfg.SocketDir)

	encoded, err := json.Marshal(cfg)
	if err != nil {
		return 0, err
	}
	childArgs := []string{suiteChildCommand, string(encoded), "-test.v", "-test.root",
		"-test.timeout", timeout.String()}
	if *run != "" {
		childArgs = append(childArgs, "-test.run", "^"+topTestName+"$/"+*run)
	}
	if *parallel > 0 {
		childArgs = append(childArgs, "-test.parallel", fmt.Sprint(*parallel))
	}
	return runChild(runDir, childArgs)
}

func (cfg *suiteConfig) validate() error {
	modes := 0
	for _, set := range []bool{cfg.InProcess != "", cfg.Socket != "", len(cfg.ServerArgv) > 0} {
		if set {
			modes++
		}
	}
	if cfg.Name == "" || modes != 1 {
		return errors.New("--name and exactly one of --inprocess, --socket or -- SERVER-ARGV")
	}
	if len(cfg.ServerArgv) > 0 && !strings.Contains(strings.Join(cfg.ServerArgv, " "), "{socket}") {
		return errors.New("SERVER-ARGV must contain {socket} (and should contain {root})")
	}
	return nil
}

// runChild runs the suite in a child in its own mount namespace (Go makes / rprivate
// there), so a mount a failing case leaves behind dies with the child, not on the host.
func runChild(runDir string, childArgs []string) (int, error) {
	self, err := os.Executable()
	if err != nil {
		return 0, err
	}
	cmd := exec.Command(self, childArgs...)
	cmd.Env = append(os.Environ(), "TMPDIR="+runDir)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return 0, err
	}
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("starting the suite in a private mount namespace: %w", err)
	}
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(signals)
	go func() {
		for sig := range signals {
			_ = cmd.Process.Signal(sig)
		}
	}()

	results := map[string]string{}
	scanner := bufio.NewScanner(stdout)
	scanner.Buffer(make([]byte, 1<<20), 1<<24)
	for scanner.Scan() {
		line := scanner.Text()
		fmt.Println(line)
		if m := caseLine.FindStringSubmatch(line); m != nil {
			results[m[2]] = m[1]
		}
	}
	waitErr := cmd.Wait()
	code := printSummary(results)
	if waitErr != nil && code == 0 {
		code = 1
		fmt.Printf("suite process: %v\n", waitErr)
	}
	return code, nil
}

func printSummary(results map[string]string) int {
	names := make([]string, 0, len(results))
	for name := range results {
		names = append(names, name)
	}
	sort.Strings(names)
	counts := map[string]int{}
	for _, name := range names {
		fmt.Printf("CASE %s %s\n", name, results[name])
		counts[results[name]]++
	}
	fmt.Printf("SUMMARY pass=%d fail=%d skip=%d\n", counts["PASS"], counts["FAIL"], counts["SKIP"])
	if counts["FAIL"] > 0 || len(names) == 0 {
		return 1
	}
	return 0
}

// removeRunDir takes away the run's temp tree; anything still mounted under it (only
// possible if a server mounted in the host namespace) is detached first, never followed.
func removeRunDir(runDir string) {
	mountpoints, err := mountpointsUnder(runDir)
	if err != nil {
		fmt.Fprintf(os.Stderr, "gosnap: reading mountinfo: %v\n", err)
	}
	for i := len(mountpoints) - 1; i >= 0; i-- {
		_ = mount.Unmount(mountpoints[i], syscall.MNT_DETACH)
	}
	if err := os.RemoveAll(runDir); err != nil {
		fmt.Fprintf(os.Stderr, "gosnap: removing %s: %v\n", runDir, err)
	}
}

// mountpointsUnder lists this namespace's mountpoints below dir, in mount order.
func mountpointsUnder(dir string) ([]string, error) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	unescape := strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`)
	var found []string
	for _, line := range strings.Split(string(data), "\n") {
		fields := strings.Fields(line)
		if len(fields) < 5 {
			continue
		}
		if point := unescape.Replace(fields[4]); strings.HasPrefix(point, dir+"/") {
			found = append(found, point)
		}
	}
	return found, nil
}

func suiteChildMain(args []string) {
	var cfg suiteConfig
	if len(args) < 1 || json.Unmarshal([]byte(args[0]), &cfg) != nil {
		fmt.Fprintln(os.Stderr, "gosnap: internal command, run `gosnap testsuite`")
		os.Exit(2)
	}
	os.Args = append([]string{os.Args[0]}, args[1:]...)
	constructor := cfg.constructor()
	tests := []testing.InternalTest{{
		Name: topTestName,
		F:    func(t *testing.T) { testsuite.SnapshotterSuite(t, cfg.Name, constructor) },
	}}
	testing.Main(regexp.MatchString, tests, nil, nil)
}

func (cfg *suiteConfig) constructor() testsuite.SnapshotterFunc {
	switch {
	case cfg.InProcess != "":
		return func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
			sn, err := newBackend(cfg.InProcess, root)
			if err != nil {
				return nil, nil, err
			}
			return sn, sn.Close, nil
		}
	case cfg.Socket != "":
		return func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
			conn, err := dialProxy(cfg.Socket)
			if err != nil {
				return nil, nil, err
			}
			client := snapshotsapi.NewSnapshotsClient(conn)
			return proxy.NewSnapshotter(client, cfg.Name), conn.Close, nil
		}
	default:
		return cfg.serverPerCase
	}
}

// serverPerCase starts SERVER-ARGV for this case's root and a socket beside it, and hands
// the suite containerd's proxy client for it; the cleanup stops that server by its pid.
func (cfg *suiteConfig) serverPerCase(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	socket := filepath.Join(cfg.SocketDir, fmt.Sprintf("%d.sock", socketSeq.Add(1)))
	argv := make([]string, len(cfg.ServerArgv))
	for i, arg := range cfg.ServerArgv {
		argv[i] = strings.NewReplacer("{root}", root, "{socket}", socket).Replace(arg)
	}
	srv, err := startServer(argv)
	if err != nil {
		return nil, nil, err
	}
	waitCtx, cancel := context.WithTimeout(ctx, serverStartWait)
	defer cancel()
	if err := waitForSocket(waitCtx, socket, srv.done); err != nil {
		return nil, nil, srv.failure(ctx, err)
	}
	conn, err := dialProxy(socket)
	if err != nil {
		return nil, nil, srv.failure(ctx, err)
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), cfg.Name)
	cleanup := func() error {
		_ = conn.Close()
		return srv.stop(ctx)
	}
	return sn, cleanup, nil
}

type server struct {
	cmd     *exec.Cmd
	output  *tailBuffer
	done    chan struct{}
	waitErr error
}

func startServer(argv []string) (*server, error) {
	srv := &server{output: &tailBuffer{}, done: make(chan struct{})}
	srv.cmd = exec.Command(argv[0], argv[1:]...)
	srv.cmd.Stdout = srv.output
	srv.cmd.Stderr = srv.output
	// Its own process group, so a wrapper (a shell, `python -m`) goes with it on stop.
	srv.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := srv.cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting server %q: %w", argv, err)
	}
	go func() {
		srv.waitErr = srv.cmd.Wait()
		close(srv.done)
	}()
	return srv, nil
}

// stop ends the server by its process group id: SIGTERM, then SIGKILL after a grace time.
// A server that died during the case is an error of the case.
func (s *server) stop(ctx context.Context) error {
	select {
	case <-s.done:
		return s.failure(ctx, fmt.Errorf("server exited during the case: %v", s.waitErr))
	default:
	}
	pgid := s.cmd.Process.Pid
	_ = syscall.Kill(-pgid, syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(serverStopWait):
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		<-s.done
		return s.failure(ctx, fmt.Errorf("server ignored SIGTERM for %s", serverStopWait))
	}
	s.logOutput(ctx)
	return nil
}

func (s *server) failure(ctx context.Context, err error) error {
	if s.cmd.ProcessState == nil {
		_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
		<-s.done
	}
	return fmt.Errorf("%w; server output (tail): %s", err, s.output.String())
}

// logOutput puts the server's output tail into the case's log (t.Log through logtest).
func (s *server) logOutput(ctx context.Context) {
	if out := strings.TrimSpace(s.output.String()); out != "" {
		log.G(ctx).Debugf("server output (tail):\n%s", out)
	}
}

// tailBuffer keeps the last serverLogTail bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	buf []byte
}

func (b *tailBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf = append(b.buf, p...)
	if len(b.buf) > serverLogTail {
		b.buf = b.buf[len(b.buf)-serverLogTail:]
	}
	return len(p), nil
}

func (b *tailBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return string(b.buf)
}
