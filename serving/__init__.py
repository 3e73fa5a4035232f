"""serving: the gRPC ranking service, its Triton encoder, A/B assignment and offline batch scoring.

`server.py` assembles the process; `config.py` holds its typed settings. `api/` is the gRPC
layer (handlers, proto <-> domain conversion, validation, interceptors, the error mapping,
auth); `ranking/` the request-path engine, bundle registry and item store; `ingest/` the event
log, the atomic apply of events to the online store, item upserts and restore at start-up;
`encoding/` which encoder serves a bundle; `triton/` the Triton client, process and model
export; `experiments/` variant assignment and the exposure log; `batch/` offline scoring;
`observability/` logs and metrics.

Import rules: serving imports featurizer, ranker and the generated gRPC stubs, never training.
Inside serving, only `server.py` imports `api/`: the engine, ingest and batch code never depend
on the gRPC layer. No module circles. tests/test_import_rules.py enforces this.
"""

import os as _os
import sys as _sys

# Before grpc is imported, unless a caller chose: gRPC runs no fork handlers of its own, so the
# in-process store's forked snapshot writer never touches the server's connections (see
# featurizer.store.snapshot_write.fork_is_safe). Where grpc came first, that store copies instead.
if "grpc" not in _sys.modules:
    _os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
