"""Train the small Fashion-MNIST classifier that class fidelity labels samples with, and write it with its card.

    python training_scripts/train_classifier.py --output_dir diffusers_flat/metrics/classifiers/fashion-mnist-16

A `transformers` ResNet (two basic stages of 32 and 64 channels, 79k parameters) on the 60,000 training images as the
diffusion models see them (16x16, centre crop, uint8 scaled to [-1, 1]); its accuracy on the 10,000 test images goes
into its model card. Needs Debian's dataset-fashion-mnist.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import ModelCard
from tqdm.auto import tqdm

from diffusers_flat.data import fashion_mnist
from diffusers_flat.evaluation.real_images import load_real_images
from diffusers_flat.metrics.class_fidelity import TEST_COUNTS, classify
from diffusers_flat.run_directory import DataSource, write_json
from diffusers_flat.utils.cli import OneLineArgumentParser, UsageError, run_main

CARD = """---
library_name: transformers
pipeline_tag: image-classification
datasets:
- zalando-datasets/fashion_mnist
metrics:
- accuracy
---
# Fashion-MNIST classifier at {resolution}x{resolution} (diffusers-flat's class fidelity)

Labels samples of DDPMs trained on Fashion-MNIST at {resolution}x{resolution}, to measure whether a sample keeps its
class when the model's weights are quantized (`diffusers_flat.metrics.class_fidelity`). Not a strong classifier: a
yardstick that is the same for every model.

- Architecture: `ResNetForImageClassification`, basic blocks, stages of {hidden} channels, {parameters:,} parameters.
- Input: 1-channel {resolution}x{resolution} uint8 images as the diffusion models saw them (resized, centre crop),
  scaled to [-1, 1].
- Trained: the 60,000 training images, {epochs} epochs, batch {batch_size}, AdamW (lr {learning_rate}, cosine),
  seed {seed}, by `python training_scripts/train_classifier.py`.
- **Test accuracy: {accuracy:.2%}** on the 10,000 test images; how it labels them, per class, in
  `test_label_counts.json` (what class fidelity compares samples' labels with).
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True, help="Where the classifier and its card go.")
    parser.add_argument("--resolution", type=int, default=16, help="The diffusion models' image size.")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("resolution", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def main(args: argparse.Namespace) -> None:
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(args.seed)
    real = load_real_images(DataSource(dataset_name=fashion_mnist.NAME), args.resolution, 1)
    labels = {split: np.array(fashion_mnist.load_fashion_mnist(split)["label"]) for split in ("train", "test")}
    images = torch.from_numpy(real.uint8).permute(0, 3, 1, 2).float() / 127.5 - 1  # as `classify` scales them
    config = ResNetConfig(
        num_channels=1,
        embedding_size=32,
        hidden_sizes=[32, 64],
        depths=[1, 1],
        layer_type="basic",
        downsample_in_first_stage=False,
        num_labels=10,
        id2label=dict(enumerate(fashion_mnist.CLASS_NAMES)),
        label2id={name: i for i, name in enumerate(fashion_mnist.CLASS_NAMES)},
        image_size=args.resolution,
    )
    model = ResNetForImageClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    steps_per_epoch = math.ceil(len(images) / args.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs * steps_per_epoch)
    targets = torch.from_numpy(labels["train"])
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(images), generator=generator)
        progress = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}")
        for step in progress:
            batch = order[step * args.batch_size : (step + 1) * args.batch_size]
            loss = model(pixel_values=images[batch], labels=targets[batch]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            progress.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    test_labels = classify(model, real.held_out)
    accuracy = float((test_labels == labels["test"]).mean())
    model.save_pretrained(args.output_dir)
    counts = np.bincount(test_labels, minlength=config.num_labels).tolist()  # what a Space compares samples with
    write_json(Path(args.output_dir) / TEST_COUNTS, {"counts": counts, "split": "test", "images": len(test_labels)})
    card = CARD.format(
        resolution=args.resolution,
        hidden=" and ".join(map(str, config.hidden_sizes)),
        parameters=sum(p.numel() for p in model.parameters()),
        accuracy=accuracy,
        **{name: getattr(args, name) for name in ("epochs", "batch_size", "learning_rate", "seed")},
    )
    ModelCard(card).save(f"{args.output_dir}/README.md")
    print(f"test accuracy {accuracy:.4f}; written to {args.output_dir}")


if __name__ == "__main__":
    run_main(main, parse_args())
