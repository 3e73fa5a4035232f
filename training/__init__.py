"""training: datasets, encoder fine-tuning, the LightGBM lambdarank ranker, evaluation and A/B analysis.

Sub-packages: `data/` (synthetic shop, public-dataset importers, leave-one-out split),
`encoder/` (pairs, fine-tuning, LoRA), `lambdarank/` (parameters, impression lists,
leave-one-out examples, negatives, first stage, the booster), `evaluation/` (protocol, models,
rankers, report), `ab/` (prepare, statistics, report, simulation). Functions take typed configs
and return results: no training code reads argparse namespaces or prints (that is semrank/cli).

Import rules: training imports featurizer and ranker, never serving; interest scores and bundle
input matrices come from ranker, as in serving. tests/test_import_rules.py enforces this.
"""
