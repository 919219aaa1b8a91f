// gosnap: containerd's own Go code as the judge of a proxy snapshotter (issue 18).
//
// Built in GOPATH mode from Debian's golang-github-containerd-containerd-dev sources
// (standard library + containerd and the packages it vendors through Debian); nothing
// binary is committed. Subcommands:
//
//	gosnap serve --backend overlayfs|native --root DIR --socket PATH
//	    containerd's own overlayfs or native snapshotter behind contrib/snapshotservice on a
//	    unix socket: what a Go proxy snapshotter is, and the baseline strata is held to.
//	gosnap testsuite --name NAME [--run REGEX] [--parallel N] [--tmpdir DIR]
//	        (--inprocess overlayfs|native
//	        | --socket PATH | -- SERVER-ARGV with {root} and {socket})
//	    containerd 1.6's snapshots/testsuite (SnapshotterSuite) run through testing.Main in a
//	    child process in a private mount namespace, so a mount a failing case leaves dies
//	    with it. The suite gives each case a fresh root through its constructor; a proxied
//	    snapshotter gets it one of two ways. After "--", SERVER-ARGV is started per case with
//	    {root} replaced by that case's root (under --tmpdir) and {socket} by a fresh socket
//	    path under $TMPDIR, and stopped by its process group after the case. --socket drives
//	    one already running server for all cases at once instead: the cases' keys do not
//	    overlap, but they repeat from run to run (fixed names, and names from the unseeded
//	    math/rand), so such a server must be fresh for each run. Either way the suite talks
//	    to it through containerd's proxy client (snapshots/proxy over grpc, dialled with the
//	    options containerd uses for [proxy_plugins]). --inprocess runs containerd's own
//	    snapshotter in this process, as its overlay_test.go / native_test.go do.
//	    Prints the `go test -v` output, then one "CASE <name> PASS|FAIL|SKIP" line per case
//	    and a "SUMMARY pass=P fail=F skip=S" line; exits non-zero if any case failed.
//	gosnap bench --socket PATH [--n N]
//	    N rounds of Prepare (no parent), Mounts, Commit, Stat, then Remove of each, through
//	    the proxy client after min(N, 20) untimed rounds; one JSON line per op with p50/p90
//	    in nanoseconds. Keys carry the pid, so a shared server is fine.
package main

import (
	"fmt"
	"os"
)

const usage = `usage:
  gosnap serve --backend overlayfs|native --root DIR --socket PATH
  gosnap testsuite --name NAME [--run REGEX] [--parallel N] [--tmpdir DIR]
                   (--inprocess overlayfs|native | --socket PATH | -- ARGV with {root} {socket})
  gosnap bench --socket PATH [--n N]
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = serveMain(os.Args[2:])
	case "testsuite":
		var code int
		code, err = testsuiteMain(os.Args[2:])
		if err == nil {
			os.Exit(code)
		}
	case suiteChildCommand:
		suiteChildMain(os.Args[2:]) // exits through testing.Main
	case "bench":
		err = benchMain(os.Args[2:])
	default:
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "gosnap %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}
