"""What every test ring shares, written once (STYLE.md §15; model: containerd
``snapshots/testsuite/helpers.go``), so that the tests themselves read as scenarios.

* ``procs``: processes by pid (wait, terminate, children, descendants, command
  lines), ``run`` for a tool, ``wait_for`` a condition, log tails.  Nothing here
  ends a process by name.
* ``mounts``: ``/proc/*/mountinfo`` parsed in one place (independently of the
  plugin's own parser, which the tests check), and unmounting what a test left.
* ``plugin``: the strata plugin under test, as a process (``python -m plugin
  serve``, the way dockerd finds it) or in the test's own event loop.
* ``client``: clients that speak to the plugin the way dockerd 20.10 does, one
  asynchronous (the rings) and one blocking (the benchmarks), on the same wire facts.
* ``files``: small file and layer-tar helpers.

The leaf is ``procs``; no module here imports a test ring.
"""
