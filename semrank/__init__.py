"""semrank: the command line (`semrank.cli`, one module per command group), the demo, and the
generated gRPC stubs (`semrank.ranking.v1`, from protos/ by `make proto`).

Import rules: the CLI may import every package; nothing imports the CLI. featurizer, ranker and
training never import semrank; serving imports only the generated stubs. No module circles.
tests/test_import_rules.py enforces this.
"""
