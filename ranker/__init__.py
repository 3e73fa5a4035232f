"""ranker: the model. The bundle (`bundle.py`), the one `Encoder` protocol and encoder fingerprint
(`encoder.py`), the one interest-score function (`interest.py`), the one function that turns
online features into the bundle's input matrix (`feature_matrix.py`), and score explanations.

Import rules: ranker imports only featurizer. Training and serving both compute every interest
score and every bundle input matrix through ranker, so what a model was trained on is what it
is served with (tests/test_train_serve_parity.py). tests/test_import_rules.py enforces this.
"""
