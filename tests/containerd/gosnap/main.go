// gosnap: containerd's own Go code as the judge of a proxy snapshotter (issue 18).
//
// Built in GOPATH mode from Debian's golang-github-containerd-containerd-dev sources
// (standard library + containerd and the packages it vendors through Debian); nothing
// binary is committed. Subcommands:
//
//	gosnap serve --backend overlayfs|native --root DIR --socket PATH
//	    containerd's own overlayfs or native snapshotter behind contrib/snapshotservice on a
//	    unix socket: what a Go proxy snapshotter is, and the baseline strata is held to.
//	gosnap testsuite --name NAME [--run REGEX] [--parallel N] (--inprocess overlayfs|native
//	        | --socket PATH | -- SERVER-ARGV with {root} and {socket})
//	    containerd 1.6's snapshots/testsuite (SnapshotterSuite) run through testing.Main in a
//	    child process in a private mount namespace. The suite gives every case a fresh root
//	    and reuses fixed keys ("c1", "a1", "p", ...) across cases, so a proxied snapshotter
//	    needs one server per case: after "--", SERVER-ARGV is started per case with {root}
//	    replaced by that case's root and {socket} by a fresh socket path, and driven through
//	    containerd's proxy client (snapshots/proxy over grpc, dialled as containerd dials
//	    proxy plugins). --socket drives one already running server instead (good for one
//	    case at a time with --run; cases collide on a shared server). --inprocess runs the
//	    snapshotter in this process, as containerd's own overlay_test.go / native_test.go do.
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
  gosnap testsuite --name NAME [--run REGEX] [--parallel N]
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
