"""LPIPS (Zhang et al. 2018) with AlexNet or VGG16 features read from a local torchvision weights file.

The calibrated linear heads ship with torchmetrics (lpips_models/{alex,vgg}.pth); the ImageNet
backbone is the file torchvision would download (alexnet-owt-7be5be79.pth, vgg16-397923af.pth),
given by path, so nothing is fetched. The computation is torchmetrics' (`_LPIPS`): inputs scaled
to the backbone's statistics, each layer's features unit-normalised over channels, squared
differences weighted by the heads and averaged over space, summed over layers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from metrics.base import PerImageMean
from utils.errors import ConfigError

# torchvision's `features` stacks, and where LPIPS taps them (after these ReLUs)
ALEX = [("conv", 3, 64, 11, 4, 2), ("relu",), ("pool",), ("conv", 64, 192, 5, 1, 2), ("relu",), ("pool",),
        ("conv", 192, 384, 3, 1, 1), ("relu",), ("conv", 384, 256, 3, 1, 1), ("relu",),
        ("conv", 256, 256, 3, 1, 1), ("relu",)]
ALEX_TAPS = (2, 5, 8, 10, 12)
VGG16 = [("conv", 3, 64), ("relu",), ("conv", 64, 64), ("relu",), ("pool",),
         ("conv", 64, 128), ("relu",), ("conv", 128, 128), ("relu",), ("pool",),
         ("conv", 128, 256), ("relu",), ("conv", 256, 256), ("relu",), ("conv", 256, 256), ("relu",), ("pool",),
         ("conv", 256, 512), ("relu",), ("conv", 512, 512), ("relu",), ("conv", 512, 512), ("relu",), ("pool",),
         ("conv", 512, 512), ("relu",), ("conv", 512, 512), ("relu",), ("conv", 512, 512), ("relu",)]
VGG16_TAPS = (4, 9, 16, 23, 30)
NETS = {"alex": (ALEX, ALEX_TAPS, (64, 192, 384, 256, 256)), "vgg": (VGG16, VGG16_TAPS, (64, 128, 256, 512, 512))}
HEADS_DIR = Path(__import__("torchmetrics").__file__).parent / "functional" / "image" / "lpips_models"
SHIFT = (-0.030, -0.088, -0.188)  # LPIPS' input scaling (ImageNet statistics in [-1, 1] units)
SCALE = (0.458, 0.448, 0.450)


def build_features(net: str) -> nn.Sequential:
    """The torchvision `features` stack of AlexNet or VGG16 (same module indices, random weights)."""
    layers: list[nn.Module] = []
    for spec in NETS[net][0]:
        if spec[0] == "conv":
            cin, cout, *rest = spec[1:]
            k, s, p = rest if rest else (3, 1, 1)
            layers.append(nn.Conv2d(cin, cout, k, s, p))
        elif spec[0] == "relu":
            layers.append(nn.ReLU(inplace=False))
        else:
            layers.append(nn.MaxPool2d(3, 2) if net == "alex" else nn.MaxPool2d(2, 2))
    return nn.Sequential(*layers)


class LPIPSNet(nn.Module):
    """Per-image LPIPS distance [B] between images in [-1, 1]."""

    def __init__(self, net: str = "alex", weights: str | Path | None = None, key: str = "metrics.lpips.weights"):
        super().__init__()
        if net not in NETS:
            raise ConfigError(f"LPIPS net {net!r} is unknown; use one of {sorted(NETS)}")
        self.features = build_features(net)
        self.taps = NETS[net][1]
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in NETS[net][2])
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        if weights is not None:
            self.load_backbone(weights, key)
        heads = torch.load(HEADS_DIR / f"{net}.pth", map_location="cpu", weights_only=True)
        for k, head in enumerate(self.heads):
            head.weight.data.copy_(heads[f"lin{k}.model.1.weight"])
        self.requires_grad_(False).eval()

    def load_backbone(self, weights: str | Path, key: str) -> None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(f"{key}={path} does not exist; give torchvision's ImageNet weights file for the "
                              f"LPIPS backbone (e.g. alexnet-owt-7be5be79.pth)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        try:
            self.features.load_state_dict(features)
        except RuntimeError as e:  # missing, unexpected or misshapen layers
            raise ConfigError(f"{key}={path} does not hold this backbone's features "
                              f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})") from None

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x = torch.cat([a, b]).float()
        x = (x - self.shift) / self.scale
        total = x.new_zeros(len(a))
        start = 0
        for head, tap in zip(self.heads, self.taps):
            x = self.features[start:tap](x)
            start = tap
            fa, fb = x.chunk(2)
            fa = fa / torch.sqrt(1e-8 + fa.square().sum(1, keepdim=True))
            fb = fb / torch.sqrt(1e-8 + fb.square().sum(1, keepdim=True))
            total = total + head((fa - fb).square()).mean((1, 2, 3))
        return total


class LPIPS(PerImageMean):
    """Mean per-image LPIPS over everything updated (images in [0, 1], or [-1, 1] with normalize=False)."""

    higher_is_better = False

    def __init__(self, net: str = "alex", weights: str | Path | None = None, normalize: bool = True,
                 key: str = "metrics.lpips.weights", **kwargs):
        super().__init__(**kwargs)
        if weights is None:
            raise ConfigError(f"{key} is not set; give torchvision's ImageNet weights file for the LPIPS backbone "
                              f"(alexnet-owt-7be5be79.pth or vgg16-397923af.pth)")
        self.net = LPIPSNet(net, weights, key)
        self.normalize = normalize

    def update(self, images: torch.Tensor, references: torch.Tensor) -> None:
        if images.shape != references.shape:
            raise ValueError(f"images {tuple(images.shape)} and references {tuple(references.shape)} differ in shape")
        if self.normalize:
            images, references = images * 2 - 1, references * 2 - 1
        self.add(self.net(images, references))
