"""Kubernetes' CRI API (runtime.v1) as grpclib stubs, for tests/containerd/test_cri.py."""
