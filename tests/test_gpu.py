"""GPU checks (skipped without CUDA): bf16 frozen weights with fp32 trained rows, CUDA determinism."""

from __future__ import annotations

import pytest
import torch

from tests.test_train import base, run_train  # noqa: F401 (base is a fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_textual_inversion_trains_in_bf16_on_gpu(base, tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    run_train(*[o for o in base if o != "trainer=cpu"], "trainer=gpu", "trainer.max_steps=10", f"hydra.run.dir={run}")
    rows = load_file(run / "learned_embeds.safetensors")["<concept>"]
    assert rows.dtype == torch.float32 and torch.isfinite(rows).all()
    timing = (run / "timing.json").read_text()
    assert "bf16-mixed" in timing and "peak_memory_gib" in timing


def test_module_keeps_frozen_bf16_and_trained_fp32(tiny_dir):
    import lightning as L

    from lightning_modules.textual_inversion import TextualInversionModule

    module = TextualInversionModule({"path": str(tiny_dir)}, {"name": "<t>", "initializer": "cat"},
                                    optimizer=torch.optim.AdamW)
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=1, logger=False,
                        enable_checkpointing=False)
    module.trainer = trainer
    module.configure_model()
    assert module.backbone.unet.dtype == torch.bfloat16
    assert module.backbone.text_encoders[0].dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in module.trainable_parameters())


def test_cuda_sampling_is_deterministic(tiny):
    from diffusion.sampling import generate

    tiny.to("cuda")
    a = generate(tiny, ["a red cat", "a dog"], seed=[3, 4], num_steps=4)
    b = generate(tiny, ["a red cat", "a dog"], seed=[3, 4], num_steps=4)
    assert torch.equal(a, b) and a.is_cuda
