"""``avkernels demo``: convert a torchvision ResNet-18, show its dead channels and TrackedBN's speed.

Everything printed is measured in this run: the per-layer dead-channel statistics that the
TrackedBN kernels collect while the network runs, and the time of a training step (forward +
backward with a materialised gradient) of TrackedBN against nn.BatchNorm2d on the ResNet-18 BN
shapes, as ratios.
"""

from __future__ import annotations

import argparse
import platform

import torch
from torch import nn

NAME = "demo"
HELP = "convert a ResNet-18 to TrackedBN, print its dead channels and TrackedBN's speed"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    parser.add_argument("--image-size", type=int, default=64, help="input side in pixels (default 64)")
    parser.add_argument("--steps", type=int, default=3, help="training steps before the report")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smaller timing shapes, for tests")


def _layer_report(model: nn.Module) -> list[tuple[str, int, float, float, int]]:
    from avkernels import TrackedBN

    rows = []
    for name, layer in model.named_modules():
        if isinstance(layer, TrackedBN):
            dead = layer.dead_fraction()
            rows.append(
                (
                    name,
                    layer.num_features,
                    dead.mean().item(),
                    layer.dead_sample_fraction().mean().item(),
                    int((dead > 0.99).sum()),
                )
            )
    return rows


def _time_training_step(layer: nn.Module, x: torch.Tensor) -> float:
    """Median seconds of forward + backward with a materialised gradient."""
    from torch.utils.benchmark import Timer

    x = x.detach().requires_grad_(True)
    grad = torch.randn_like(x)

    def step() -> None:
        layer(x).backward(grad)

    step()
    return Timer("step()", globals={"step": step}).blocked_autorange(min_run_time=0.3).median


def run(args: argparse.Namespace) -> int:
    from avkernels import HAS_EXTENSION, TrackedBN, convert
    from avkernels.cli import CommandError

    try:
        import torchvision
    except ImportError as error:
        raise CommandError(
            f"torchvision is needed for the demo ({error}); install it with "
            "`pip install 'avkernels[av]'`"
        ) from None
    if args.batch_size < 2 or args.image_size < 32 or args.steps < 1:
        raise CommandError("need --batch-size >= 2, --image-size >= 32 and --steps >= 1")

    torch.manual_seed(args.seed)
    model = convert(torchvision.models.resnet18(num_classes=10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    labels = torch.randint(0, 10, (args.batch_size,))
    print(f"avkernels demo: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, C++ kernels {'on' if HAS_EXTENSION else 'OFF'}")
    print(f"ResNet-18 converted to TrackedBN; {args.steps} training steps on a random batch "
          f"of {args.batch_size}x3x{args.image_size}x{args.image_size}, then one eval pass.\n")
    model.train()
    for _ in range(args.steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    for layer in model.modules():
        if isinstance(layer, TrackedBN):
            layer.reset_dead_stats()
    model.eval()
    with torch.no_grad():
        model(images)

    print(f"{'BN layer':<24}{'C':>5}{'outputs<=0':>12}{'dead maps':>11}{'dead ch.':>10}")
    for name, channels, dead, dead_maps, dead_channels in _layer_report(model):
        print(f"{name:<24}{channels:>5}{dead:>12.1%}{dead_maps:>11.1%}{dead_channels:>10}")
    print("(outputs<=0: mean over channels of the fraction ReLU would zero; dead maps: samples "
          "whose whole map is <= 0; dead ch.: channels with >99% outputs <= 0)\n")

    shapes = [(8, 64, 28, 28), (8, 512, 4, 4)] if args.quick else [
        (32, 64, 56, 56), (32, 128, 28, 28), (32, 512, 7, 7)]
    print(f"{'shape (N,C,H,W)':<22}{'TrackedBN / BatchNorm2d':>25}{'TrackedBN+ReLU / BN,ReLU':>27}")
    for shape in shapes:
        x = torch.randn(shape)
        channels = shape[1]
        plain = _time_training_step(nn.BatchNorm2d(channels), x)
        tracked = _time_training_step(TrackedBN(channels), x)
        plain_relu = _time_training_step(nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU()), x)
        tracked_relu = _time_training_step(TrackedBN(channels, activation="relu"), x)
        print(f"{str(shape):<22}{tracked / plain:>24.2f}x{tracked_relu / plain_relu:>26.2f}x")
    print("(training forward+backward, TrackedBN with dead statistics on; < 1 means faster)")
    return 0
