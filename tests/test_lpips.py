"""LPIPS: torchmetrics' computation on the same backbone weights, local weight files, known inputs."""

from __future__ import annotations

import pytest
import torch

from metrics.lpips import LPIPS, LPIPSNet, build_features
from utils.errors import ConfigError


def seeded_features(net: str) -> torch.nn.Sequential:
    torch.manual_seed(0)
    features = build_features(net)
    for m in features:
        if isinstance(m, torch.nn.Conv2d):  # ImageNet-like scale, so deep features are not vanishingly small
            torch.nn.init.kaiming_normal_(m.weight)
            torch.nn.init.normal_(m.bias, std=0.01)
    return features


def weights_file(tmp_path, net: str):
    """A torchvision-layout state dict (features.* plus a classifier the loader must ignore)."""
    state = {f"features.{k}": v for k, v in seeded_features(net).state_dict().items()}
    state["classifier.1.weight"] = torch.zeros(4, 4)
    path = tmp_path / f"{net}.pth"
    torch.save(state, path)
    return path


def images(n: int = 3, size: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.rand(n, 3, size, size, generator=g)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_matches_torchmetrics_lpips_on_the_same_backbone(net, tmp_path, monkeypatch):
    """torchmetrics' _LPIPS, handed the same backbone weights (its torchvision loader replaced), gives the
    same per-image distances to 1e-5."""
    import torchmetrics.functional.image.lpips as tm_lpips

    monkeypatch.setattr(tm_lpips, "_get_tv_model_features", lambda name, pretrained: seeded_features(net))
    reference = tm_lpips._LPIPS(pretrained=True, net=net).eval()
    a, b = images()
    expected = reference(a, b, normalize=True).flatten()
    ours = LPIPSNet(net, weights_file(tmp_path, net))
    assert torch.allclose(ours(a * 2 - 1, b * 2 - 1), expected, atol=1e-5, rtol=0)
    metric = LPIPS(net, weights_file(tmp_path, net))
    metric.update(a[:2], b[:2])
    metric.update(a[2:], b[2:])
    assert metric.compute().item() == pytest.approx(expected.mean().item(), abs=1e-5)


def test_identical_images_score_zero_and_shifts_score_more(tmp_path):
    metric = LPIPS("alex", weights_file(tmp_path, "alex"))
    x = torch.zeros(2, 3, 64, 64)
    x[:, :, 16:48, 16:48] = torch.tensor([0.9, 0.2, 0.1]).view(1, 3, 1, 1)
    metric.update(x, x)
    assert metric.compute().item() == pytest.approx(0.0, abs=1e-7)
    distances = []
    for shift in (2, 8):
        metric.reset()
        metric.update(torch.roll(x, shift, dims=-1), x)
        distances.append(metric.compute().item())
    assert 0 < distances[0] < distances[1]


def test_weights_errors(tmp_path):
    with pytest.raises(ConfigError, match="metrics.lpips.weights is not set"):
        LPIPS("alex", None)
    with pytest.raises(ConfigError, match=r"metrics.lpips.weights=.*nope.pth does not exist"):
        LPIPS("alex", tmp_path / "nope.pth")
    with pytest.raises(ConfigError, match="does not hold this backbone's features"):
        LPIPS("vgg", weights_file(tmp_path, "alex"))
    with pytest.raises(ConfigError, match="LPIPS net 'squeeze' is unknown"):
        LPIPSNet("squeeze")
    with pytest.raises(ValueError, match="differ in shape"):
        LPIPS("alex", weights_file(tmp_path, "alex")).update(torch.zeros(1, 3, 64, 64), torch.zeros(2, 3, 64, 64))
