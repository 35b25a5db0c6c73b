"""Shapes-world metrics: known answers on renders, and the same value under 2-process CPU DDP."""

from __future__ import annotations

import random
import socket
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from datamodules.shapes.concepts import reference_scenes
from datamodules.shapes.render import render_batch
from datamodules.shapes.world import ObjectSpec, Scene, SceneSampler
from metrics.shapes_metrics import (ConceptIdentity, MaskIoU, ShapesAttributeAccuracy, ShapesReadout, SizeSlope,
                                    spearman)


def scenes(n: int, seed: int = 0) -> list[Scene]:
    sampler = SceneSampler()
    return [sampler.sample(random.Random(seed + i)) for i in range(n)]


def sweep(flip: bool = False) -> tuple[torch.Tensor, list[Scene], list[float], list[int]]:
    """Two prompts, each rendered at four sizes: area rises with alpha (or falls when flip)."""
    alphas = [0.0, 1.0, 2.0, 3.0]
    out, groups, values = [], [], []
    for g, (shape, colour) in enumerate((("circle", "red"), ("square", "blue"))):
        for a in alphas:
            size = 0.12 + 0.05 * (3 - a if flip else a)
            out.append(Scene("gray", [ObjectSpec(shape, colour, size, 0.5, 0.5)]))
            groups.append(g)
            values.append(a)
    images, _ = render_batch(out)
    return images, out, values, groups


def test_attribute_accuracy_is_one_on_renders_and_catches_a_wrong_caption():
    truth = scenes(12)
    images, _ = render_batch(truth)
    metric = ShapesAttributeAccuracy()
    metric.update(images, truth)
    assert all(v.item() >= 0.95 for v in metric.compute().values())

    wrong = [Scene(s.background, [replace(o, colour="green" if o.colour != "green" else "red") for o in s.objects],
                   s.relation) for s in truth]
    metric = ShapesAttributeAccuracy()
    metric.update(images, wrong)
    scores = metric.compute()
    stated_colours = sum(o.badge is None for s in truth for o in s.objects)
    assert stated_colours > 0 and scores["colour"].item() <= 0.05
    assert scores["shape"].item() >= 0.95 and "probe" not in dict(metric.state_dict())


def test_readout_reads_area_and_background_brightness():
    """The first object's read area grows with its size; a black background reads darker than a white one."""
    def readout(background: str, size: float) -> dict[str, float]:
        images, _ = render_batch([Scene(background, [ObjectSpec("circle", "red", size, 0.5, 0.5)])] * 2)
        metric = ShapesReadout()
        metric.update(images)
        return {k: v.item() for k, v in metric.compute().items()}

    small, large, dark = readout("white", 0.12), readout("white", 0.3), readout("black", 0.12)
    assert 0 < small["area"] < large["area"] < 1 and large["area"] / small["area"] > 3
    assert small["background_brightness"] > 0.85 and dark["background_brightness"] < 0.15
    assert abs(dark["area"] - small["area"]) < 0.02


def test_concept_identity_separates_concepts():
    images, _ = render_batch(reference_scenes("sun_medal"))
    same, other = ConceptIdentity("sun_medal"), ConceptIdentity("love_seal")
    same.update(images)
    other.update(images)
    assert same.compute()["identity_match"].item() == 1.0 and same.compute()["identity"].item() > 0.9
    assert other.compute()["identity_match"].item() == 0.0 and other.compute()["identity"].item() < 0.5


def test_size_slope_follows_the_sweep():
    rising, falling = SizeSlope(), SizeSlope()
    rising.update(*sweep())
    falling.update(*sweep(flip=True))
    up, down = rising.compute(), falling.compute()
    assert up["spearman"].item() == pytest.approx(1.0) and down["spearman"].item() == pytest.approx(-1.0)
    assert up["area@0"] < up["area@1"] < up["area@2"] < up["area@3"]
    with pytest.raises(ValueError, match="one of each per image"):
        rising.update(sweep()[0], sweep()[1], [0.0], [0])


def test_spearman_handles_ties_and_constants():
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([10.0, 20, 30, 40])).item() == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2, 2, 3]), torch.tensor([1.0, 2, 2, 3])).item() == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([5.0, 5, 5])).item() == 0.0


def test_mask_iou_known_values():
    a = torch.zeros(3, 8, 8)
    a[:, 2:6, 2:6] = 1
    b = a.clone()
    b[1] = 0
    b[1, 2:6, 4:8] = 1          # half overlap: 8 / 24
    b[2] = 0                    # no overlap: 0
    metric = MaskIoU()
    metric.update(a, a)
    assert metric.compute().item() == 1.0
    metric.reset()
    metric.update(a, b)
    assert metric.compute().item() == pytest.approx((1 + 8 / 24 + 0) / 3)
    metric.reset()
    metric.update(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4))
    assert metric.compute().item() == 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        metric.update(torch.zeros(1, 4, 4), torch.zeros(1, 4, 5))


# ----- DDP -----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _values(accuracy, iou, slope) -> dict[str, float]:
    out = {f"acc/{k}": v.item() for k, v in accuracy.compute().items()}
    out.update({f"slope/{k}": v.item() for k, v in slope.compute().items()}, iou=iou.compute().item())
    return out


def _update(rank: int, world: int, accuracy, iou, slope) -> None:
    truth = scenes(8, seed=100)
    images, masks = render_batch(truth)
    shifted = torch.roll(masks[:, 0], shifts=3, dims=-1)
    mine = slice(rank, None, world)
    accuracy.update(images[mine], truth[mine])
    iou.update(shifted[mine], masks[mine, 0])
    images, sweep_scenes, values, groups = sweep()
    keep = [i for i in range(len(values)) if i % world == rank]
    slope.update(images[keep], [sweep_scenes[i] for i in keep], [values[i] for i in keep], [groups[i] for i in keep])


def _ddp_worker(rank: int, world: int, port: int, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        metrics = (ShapesAttributeAccuracy(), MaskIoU(), SizeSlope())
        _update(rank, world, *metrics)
        results[rank] = _values(*metrics)  # compute() gathers every rank's states
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_one_process():
    single = (ShapesAttributeAccuracy(), MaskIoU(), SizeSlope())
    _update(0, 1, *single)
    expected = _values(*single)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(2, _free_port(), results), nprocs=2, join=True)
        ranks = [dict(results[r]) for r in range(2)]
    for got in ranks:
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-6), key
    assert expected["iou"] < 1.0
