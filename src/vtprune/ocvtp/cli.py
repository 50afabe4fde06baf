"""``vtprune ocvtp extract|train``: train an OC-VTP pruner for a model's vision tower.

Li, Zhao, Deng, Wang, Pajarinen, "Object-Centric Vision Token Pruning for Vision Language Models",
arXiv 2511.20439.

    vtprune ocvtp extract --model PATH --images DIR --out FEATS [--layer 9] [--batch-size 8] [--device cuda]
    vtprune ocvtp train --features FEATS --out CKPT [--epochs 30] [--batch-size 12] [--lr 1e-3]
    accelerate launch -m vtprune.ocvtp.cli train --features FEATS --out CKPT     # several GPUs

then ``vtprune.apply(model, "ocvtp", keep=64, checkpoint="CKPT")``.
"""
from __future__ import annotations

import argparse
import sys


def _slots(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--slots takes comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"--slots takes positive integers, got {text!r}")
    return values


def _extract(args) -> int:
    from .extract import extract_folder, read_index

    out = extract_folder(args.model, args.images, args.out, layer=args.layer, batch_size=args.batch_size,
                         device=args.device, image_size=args.image_size, shard_size=args.shard_size,
                         dtype=args.dtype, progress=not args.quiet, squash=args.squash)
    index = read_index(out)
    print(f"[ocvtp] {index['count']} images × {index['num_tokens']} tokens × {index['dim']} "
          f"(block {index['layer']} of {index['tower']['depth']}) in {len(index['shards'])} shard(s) under {out}")
    return 0


def _train(args) -> int:
    import torch

    from .train import train

    result = train(args.features, args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                   slots=args.slots, val_fraction=args.val_fraction, warmup_epochs=args.warmup_epochs,
                   weight_decay=args.weight_decay, max_steps=args.max_steps, slot_dim=args.slot_dim,
                   seed=args.seed, log_every=args.log_every, val_every=args.val_every, save_every=args.save_every,
                   num_workers=args.num_workers, mixed_precision=args.mixed_precision, cpu=args.cpu,
                   resume=not args.no_resume, progress=not args.quiet,
                   save_dtype=torch.float16 if args.save_fp16 else None)
    from accelerate import PartialState

    if PartialState().is_main_process:
        vals = "" if result.first_val is None else (
            f", validation loss {result.first_val:.4g} → best {result.best_val:.4g}")
        weights = result.out_dir / "pruner.safetensors"
        size = weights.stat().st_size / 1e6 if weights.is_file() else 0.0
        print(f"[ocvtp] {result.steps} steps in {result.seconds:.0f} s{vals}; pruner {weights} ({size:.2f} MB)")
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Add the ``ocvtp`` command group (``extract``, ``train``) to a ``vtprune`` subparsers object."""
    parser = subparsers.add_parser("ocvtp", help="OC-VTP: extract tower features and train the slot pruner",
                                   description="Train an OC-VTP pruner for a model's vision tower.")
    sub = parser.add_subparsers(dest="ocvtp_command", required=True)

    e = sub.add_parser("extract", help="store a middle layer of the model's vision tower over an image folder",
                       description="Run the model's own vision tower over an image folder and store the tokens "
                                   "after block --layer (CLS removed; Qwen: merged 2x2 units) as fp16 safetensors "
                                   "shards plus index.json. Resumable: shards already written are skipped.")
    e.add_argument("--model", required=True, help="local model folder (transformers from_pretrained; no download)")
    e.add_argument("--images", required=True, help="folder of images (searched recursively)")
    e.add_argument("--out", required=True, help="output folder of the feature set")
    e.add_argument("--layer", type=int, default=None,
                   help="hidden_states index = encoder blocks run (default: 9 for a 24-block tower, the same "
                        "relative depth otherwise)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    e.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="load the model in this dtype (default: the checkpoint's)")
    e.add_argument("--image-size", type=int, default=None,
                   help="Qwen towers: resize images to this square size (a multiple of patch x merge; default 448)")
    e.add_argument("--shard-size", type=int, default=256, help="images per shard")
    e.add_argument("--squash", action="store_true",
                   help="LLaVA: resize images to the tower's square input first, as the public code's extraction "
                        "(default: the model's processor, as at inference)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=_extract)

    t = sub.add_parser("train", help="train the pruner on an extracted feature set",
                       description="Train the slot-attention pruner with the masked slot decoder and the "
                                   "area-weighted MSE. Writes pruner.safetensors + pruner.json (the pruner alone), "
                                   "state/ (resumable), history.json and loss.png. Runs on several GPUs under "
                                   "`accelerate launch`.")
    t.add_argument("--features", required=True, help="folder written by `vtprune ocvtp extract`")
    t.add_argument("--out", required=True, help="checkpoint folder")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    t.add_argument("--batch-size", type=int, default=12, help="images per batch and process")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--warmup-epochs", type=float, default=4.0, help="linear warm-up (at most a quarter of the run)")
    t.add_argument("--slots", type=_slots, default=[16, 32, 64, 128, 192, 256],
                   help="slot counts K drawn per batch (clipped to the token count)")
    t.add_argument("--slot-dim", type=int, default=512, help="slot-attention width (512 in the paper)")
    t.add_argument("--val-fraction", type=float, default=0.05, help="held-out share of the images")
    t.add_argument("--val-every", type=int, default=None, help="validate every N steps (default: every epoch)")
    t.add_argument("--save-every", type=int, default=None, help="also write the resumable state every N steps")
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    t.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    t.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    t.add_argument("--save-fp16", action="store_true", help="store the pruner's weights in fp16 (half the size)")
    t.add_argument("--no-resume", action="store_true", help="ignore an existing state/ and start over")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vtprune", description="OC-VTP pruner tools")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["ocvtp", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
