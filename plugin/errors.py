"""The one exception hierarchy of strata.

Every layer (archive, state, backends, driver) raises these; the server maps
them once (``server.app.handle``) to ``{"Err": "..."}`` and an HTTP status.  The
message is what the operator and dockerd see, so it names the layer ID and the
path or cause involved.  Model: moby ``daemon/graphdriver/errors.go``.
"""

from __future__ import annotations


class StrataError(Exception):
    """Base of every error strata reports to dockerd."""

    #: HTTP status the server answers with for a non-streamed call.  JSON calls
    #: answer 200 with ``Err`` (dockerd shows the text verbatim); only Diff,
    #: whose 200 body is read as tar, needs the status itself.
    http_status = 500


class NotSupported(StrataError):
    """The driver or backend cannot do this (e.g. a storage option)."""

    http_status = 501


class Prerequisites(StrataError):
    """The host lacks something the backend needs (kernel feature, tool)."""

    http_status = 500


class IncompatibleFS(StrataError):
    """The backing filesystem of Home cannot carry this backend."""

    http_status = 500


class NotFound(StrataError):
    """A layer ID (or its parent) does not exist."""

    http_status = 404


class AlreadyExists(StrataError):
    """Create of an ID that already exists."""

    http_status = 409


class Busy(StrataError):
    """The layer is in use (mounted, or another call holds it)."""

    http_status = 409


class FailedPrecondition(StrataError):
    """The layer is not in a state that allows the call: Remove of a layer that
    still has child layers (containerd's snapshotters answer the same with
    FAILED_PRECONDITION)."""

    http_status = 409


class InvalidArgument(StrataError):
    """Bad input: a malformed ID, body, option or tar stream."""

    http_status = 400


class ResourceExhausted(StrataError):
    """A request larger than strata takes: a containerd snapshot key, label set
    or gRPC message past the limits of ``plugin.snapshotter.limits``."""

    http_status = 413


class NotInitialized(StrataError):
    """A GraphDriver call arrived before Init (and nothing was persisted)."""

    http_status = 503


class DeadlineExceeded(StrataError):
    """A backend operation did not finish within its deadline."""

    http_status = 504


class ConfigError(InvalidArgument):
    """A setting that cannot be used: an unknown key in the config file, a value
    of the wrong type, a named config file that is missing (the message names the
    key and the file or variable)."""
