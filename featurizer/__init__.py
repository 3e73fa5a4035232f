"""featurizer: events and the catalog -> point-in-time features (offline, polars) and the online store.

Sub-packages: `contracts/` (the formats one side writes and another reads: the data schema,
exposure logs, the experiments file), `offline/` (the training-time pipeline), `online/` (the
serving-time feature state), `store/` (one module per online-store backend). `errors.py` holds
`SemrankError`, the root of every error semrank raises on purpose.

Import rules: featurizer imports no other semrank package (not ranker, serving, training or the
CLI), so both training and serving can build on it. tests/test_import_rules.py enforces this.
"""
