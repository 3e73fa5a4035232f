"""`semrank train encoder`: two-tower contrastive fine-tuning of the text encoder."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def cmd_train_encoder(args: argparse.Namespace) -> int:
    from featurizer.contracts.schema import read_dataset
    from training.encoder.train import EncoderTrainConfig, train_encoder

    cfg = EncoderTrainConfig(
        method=args.method,
        seed=args.seed,
        max_minutes=args.max_minutes,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        history_items=args.history_items,
        max_length_user=args.max_length_user,
        max_length_item=args.max_length_item,
        val_users=args.val_users,
        eval_every=args.eval_every,
        test_days=args.test_days,
        valid_days=args.valid_days,
    )
    ds = read_dataset(args.data)
    log.info("data: %s", ds.report)
    s = train_encoder(ds, args.out, cfg, data_source=str(args.data))
    m = s["metrics"]
    print(f"\nencoder written to {Path(args.out) / 'encoder'} ({s['method']}, {s['steps']} steps, "
          f"{s['train_loop_seconds']:.0f} s, {s['examples_per_second']} examples/s)")
    print(f"validation, sampled-{cfg.val_negatives} ({m['frozen']['users']} users):")
    print("| model | ndcg@10 | hr@10 |\n|---|---:|---:|")
    for name, key in (("frozen", "frozen"), ("final", "final"), (f"best (step {m['best']['step']})", "best")):
        print(f"| {name} | {m[key]['ndcg@10']:.4f} | {m[key]['hr@10']:.4f} |")
    return 0


def register(sub, train_sub) -> None:
    from training.encoder.train import DEFAULT_METHOD, METHODS, EncoderTrainConfig

    d = EncoderTrainConfig()
    s = train_sub.add_parser(
        "encoder",
        help="fine-tune the text encoder (two-tower contrastive, from all-MiniLM-L6-v2)",
        description="Writes OUT/encoder/ (safetensors BertModel + tokenizer + training.json) and loss/validation "
        "curves; updates OUT/manifest.json when the bundle has one.",
    )
    s.add_argument("--data", required=True, type=Path, help="data directory (items + events)")
    s.add_argument("--out", required=True, type=Path, help="bundle directory; the encoder goes to OUT/encoder/")
    s.add_argument("--max-minutes", type=float, default=d.max_minutes, help="wall-time cap of the training loop, validation included")
    s.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (default: time only)")
    s.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD, help="full fine-tuning or LoRA adapters (merged on save)")
    s.add_argument("--seed", type=int, default=d.seed)
    s.add_argument("--batch-size", type=int, default=d.batch_size)
    s.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 5e-5 full, 5e-4 lora)")
    s.add_argument("--history-items", type=int, default=d.history_items, help="recent items in the user text")
    s.add_argument("--max-length-user", type=int, default=d.max_length_user, help="token budget of the user text")
    s.add_argument("--max-length-item", type=int, default=d.max_length_item, help="token budget of the item text")
    s.add_argument("--val-users", type=int, default=d.val_users, help="validation users (fixed, seeded subset)")
    s.add_argument("--eval-every", type=int, default=d.eval_every, help="validate every this many steps")
    s.add_argument("--test-days", type=float, default=d.test_days, help="impression data: last days never read (the ranker's test)")
    s.add_argument("--valid-days", type=float, default=d.valid_days, help="impression data: days before the test days, for validation")
    s.set_defaults(func=cmd_train_encoder)
