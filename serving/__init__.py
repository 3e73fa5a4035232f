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
