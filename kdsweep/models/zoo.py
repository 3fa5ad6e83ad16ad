"""Model registry: the teacher/student architectures of the seed notebooks.

Every model is a :class:`Net` split into three stages,

    x --features--> feature map --embed--> embedding --classify--> logits

so a distillation method can ask for any of the three taps through one call,
``net.taps(x)``, and no method ever needs a "Modified" copy of a model.
For MLPs the feature "map" is the last hidden vector (no spatial extent);
methods that need a spatial map say so and the CLI refuses such a pair.
1D conv nets (signals (C, L)) expose their map as (C, 1, L), an image of
height 1, so the spatial methods serve them unchanged (see Conv1dNet).

Any other nn.Module (torchvision:NAME, timm:NAME, package.module:factory, a registered name:
specs.py) is wrapped in a taps.Tapped, which gives it the same interface through forward hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class Outputs(NamedTuple):
    """What a network hands to a distillation method."""

    logits: torch.Tensor
    feature: torch.Tensor  # last feature map (B, C, H, W), or (B, D) for MLPs
    embedding: torch.Tensor  # what the classifier reads (B, D)


TAPS = Outputs._fields  # the taps a method may read (Method.needs), declared once: Outputs' fields, in order


@dataclass(frozen=True)
class Shapes:
    """Per-sample shapes of a network's taps, handed to methods to size their heads."""

    feature: tuple[int, ...]
    embedding: tuple[int, ...]
    logits: tuple[int, ...]

    @property
    def spatial(self) -> bool:
        return len(self.feature) == 3


class Net(nn.Module):
    """Base of every registered model."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, f: torch.Tensor) -> torch.Tensor:
        # Global average pooling: the common case for conv nets.
        return f.mean((2, 3)) if f.dim() == 4 else f

    def classify(self, e: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def taps(self, x: torch.Tensor) -> Outputs:
        f = self.features(x)
        e = self.embed(f)
        return Outputs(self.classify(e), f, e)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(self.features(x)))

    def shapes(self, in_shape: tuple[int, ...]) -> Shapes:
        was_training = self.training
        self.eval()
        with torch.no_grad():
            p = next(self.parameters())
            o = self.taps(torch.zeros(2, *in_shape, device=p.device, dtype=p.dtype))
        self.train(was_training)
        # () for a tap the model cannot give (a hooked model without a final linear layer, see taps.py)
        per = lambda t: tuple(t.shape[1:]) if t is not None else ()  # noqa: E731
        return Shapes(per(o.feature), per(o.embedding), per(o.logits))


def _conv_bn(cin: int, cout: int, bias: bool = False) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=bias), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class ConvNet(Net):
    """A plain conv stack + pooled linear head (SmallNet, VGG, digit nets)."""

    def __init__(self, body: nn.Sequential, width: int, num_classes: int):
        super().__init__()
        self.body = body
        self.fc = nn.Linear(width, num_classes)

    def features(self, x):
        return self.body(x)

    def classify(self, e):
        return self.fc(e)


def _stack(cin: int, plan: list, bias: bool = False) -> tuple[nn.Sequential, int]:
    """Build conv-bn-relu layers from a plan of widths and 'M' (max-pool)."""
    layers: list[nn.Module] = []
    for item in plan:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += _conv_bn(cin, item, bias)
            cin = item
    return nn.Sequential(*layers), cin


def smallnet(in_shape, num_classes):
    """Seed 003's student (~141K params on CIFAR-10)."""
    body, w = _stack(in_shape[0], [32, 32, "M", 64, 64, "M", 128, "M"], bias=True)
    return ConvNet(body, w, num_classes)


def vgg9(in_shape, num_classes):
    """Seed 000's teacher VGGCifar9 (~9.2M params)."""
    body, w = _stack(in_shape[0], [64, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"])
    return ConvNet(body, w, num_classes)


def vgg5(in_shape, num_classes):
    """Seed 000's student VGGCifar5 (~964K params)."""
    body, w = _stack(in_shape[0], [64, "M", 128, "M", 256, "M", 256, "M"])
    return ConvNet(body, w, num_classes)


def digitnet_l(in_shape, num_classes):
    """Teacher sized for 8x8 digits: seconds per epoch on CPU."""
    body, w = _stack(in_shape[0], [32, 64, "M", 128])
    return ConvNet(body, w, num_classes)


def digitnet_s(in_shape, num_classes):
    """Student sized for 8x8 digits (~8x fewer parameters than digitnet_l)."""
    body, w = _stack(in_shape[0], [8, "M", 16])
    return ConvNet(body, w, num_classes)


class FlatConvNet(Net):
    """Seed 001's DeepNN/LightNN: conv features, flattened (not pooled) into an MLP head."""

    def __init__(self, in_shape, plan, hidden: int, dropout: float, num_classes: int):
        super().__init__()
        layers, cin = [], in_shape[0]
        for item in plan:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, item, 3, padding=1), nn.ReLU()]
                cin = item
        self.body = nn.Sequential(*layers)
        pools = plan.count("M")
        flat = cin * (in_shape[1] >> pools) * (in_shape[2] >> pools)
        self.head = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    def features(self, x):
        return self.body(x)

    def embed(self, f):
        return f.flatten(1)

    def classify(self, e):
        return self.head(e)


def deepnn(in_shape, num_classes):
    """Seed 001's teacher DeepNN (~1.19M params)."""
    return FlatConvNet(in_shape, [128, 64, "M", 64, 32, "M"], 512, 0.1, num_classes)


def lightnn(in_shape, num_classes):
    """Seed 001's student LightNN (~268K params)."""
    return FlatConvNet(in_shape, [16, "M", 16, "M"], 256, 0.1, num_classes)


class MLP(Net):
    """Seed 002's Hinton MLPs (and MNIST-1D's plain one): the 'feature' is the last hidden vector."""

    def __init__(self, in_shape, hidden: int, dropout: float, num_classes: int, batchnorm: bool = True):
        super().__init__()
        d = 1
        for s in in_shape:
            d *= s
        norm = nn.BatchNorm1d if batchnorm else (lambda _: nn.Identity())
        self.fc1, self.bn1 = nn.Linear(d, hidden), norm(hidden)
        self.fc2, self.bn2 = nn.Linear(hidden, hidden), norm(hidden)
        self.fc3 = nn.Linear(hidden, num_classes)
        self.dropout = dropout

    def features(self, x):
        x = F.relu(self.bn1(self.fc1(x.flatten(1))))
        x = F.dropout(x, self.dropout, self.training)
        x = F.relu(self.bn2(self.fc2(x)))
        return F.dropout(x, self.dropout, self.training)

    def classify(self, e):
        return self.fc3(e)


def mlp1200(in_shape, num_classes):
    """Seed 002's teacher: 2x1200 hidden units, BN, dropout."""
    # The seed's p=0.8 drops 80% of units; Hinton et al. keep 50%. 0.5 trains reliably.
    return MLP(in_shape, 1200, 0.5, num_classes)


def mlp800(in_shape, num_classes):
    """Seed 002's student: 2x800 hidden units, BN, no dropout."""
    return MLP(in_shape, 800, 0.0, num_classes)


def mlp100(in_shape, num_classes):
    """MNIST-1D's reference MLP (Greydanus & Kobak 2024): 2x100 hidden units, ReLU, no BN, no dropout."""
    return MLP(in_shape, 100, 0.0, num_classes, batchnorm=False)


class Conv1dNet(Net):
    """Conv1d(k, stride 2, padding 1) + ReLU layers over a signal (C, L), flattened into one linear layer.

    The feature tap is the last map (B, C, L) viewed as (B, C, 1, L): a signal is an image of
    height 1. Every method that reads spatial maps then applies unchanged and means the 1D thing:
    attention maps and pooling to a common size act along the length, a 1x1 projection is per
    position, and a 3x3 regressor with padding 1 is a width-3 kernel along the length (its top
    and bottom rows only ever see the zero padding).
    """

    def __init__(self, in_shape, plan: list[tuple[int, int]], num_classes: int):
        super().__init__()
        cin, length = in_shape
        layers: list[nn.Module] = []
        for width, k in plan:
            layers += [nn.Conv1d(cin, width, k, stride=2, padding=1), nn.ReLU()]
            cin, length = width, (length + 2 - k) // 2 + 1
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(cin * length, num_classes)

    def features(self, x):
        return self.body(x).unsqueeze(2)

    def embed(self, f):
        return f.flatten(1)

    def classify(self, e):
        return self.fc(e)


def cnn1d(in_shape, num_classes):
    """MNIST-1D's reference CNN (Greydanus & Kobak 2024): 3 conv layers of 25 channels, Linear(125, 10) (~5.2K params)."""
    return Conv1dNet(in_shape, [(25, 5), (25, 3), (25, 3)], num_classes)


def cnn1d_s(in_shape, num_classes):
    """A small CNN student for MNIST-1D: cnn1d's layout at 8 channels (~0.9K params)."""
    return Conv1dNet(in_shape, [(8, 5), (8, 3), (8, 3)], num_classes)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(Net):
    """CIFAR ResNet-18 (3x3 stem, no max-pool), seed 003's teacher (~11.2M params)."""

    def __init__(self, in_shape, num_classes):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_shape[0], 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        blocks, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, num_classes)

    def features(self, x):
        return self.layers(self.stem(x))

    def classify(self, e):
        return self.fc(e)


ARCHS: dict[str, Callable[[tuple[int, ...], int], Net]] = {
    "resnet18": ResNet18,
    "smallnet": smallnet,
    "vgg9": vgg9,
    "vgg5": vgg5,
    "deepnn": deepnn,
    "lightnn": lightnn,
    "mlp1200": mlp1200,
    "mlp800": mlp800,
    "digitnet_l": digitnet_l,
    "digitnet_s": digitnet_s,
    "mlp100": mlp100,
    "cnn1d": cnn1d,
    "cnn1d_s": cnn1d_s,
}


def tap_paths(model: nn.Module) -> dict[str, str]:
    """Where a model's taps come from, for provenance: module paths for a hooked model, its stages for a Net."""
    describe = getattr(model, "describe", None)
    return describe() if describe else {"feature": "features()", "embedding": "embed()"}


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
