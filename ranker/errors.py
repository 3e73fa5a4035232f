"""The ranker's error: a bundle that cannot be served (ranker.bundle re-exports it)."""

from __future__ import annotations

from featurizer.errors import SemrankError


class BundleError(SemrankError, ValueError):
    """A bundle directory that cannot be served; the message says what is wrong and where."""

    grpc_code = "FAILED_PRECONDITION"
    reason = "BUNDLE_INVALID"
