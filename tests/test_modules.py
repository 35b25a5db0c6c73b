"""Module mechanics on the tiny model: lean checkpoints, exact resume state, attention hubs restored."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from datamodules.image_set import ImageSet, scan_image_set
from datamodules.prompts import resolve_templates
from datamodules.stream import IndexedStream
from diffusion.attention import AttentionStore, ControlledAttnProcessor
from lightning_modules.textual_inversion import TextualInversionModule
from utils.errors import ArtifactError


def make_module(tiny_dir, **token):
    return TextualInversionModule({"path": str(tiny_dir)}, {"name": "<t>", "initializer": "cat", **token},
                                  optimizer=torch.optim.AdamW, seed=3)


def loader(image_folder, batch_size=2):
    records = scan_image_set(image_folder / "images", min_size=64)
    images = ImageSet(records, 64, resolve_templates("object"), "<t>")
    return DataLoader(IndexedStream(images, batch_size), batch_size=batch_size)


def fit(module, image_folder, steps=2):
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=loader(image_folder))
    return trainer


class RecordingTI(TextualInversionModule):
    """Textual inversion that records cross-attention every step (stands in for methods that use the hub)."""

    def training_step(self, batch, batch_idx):
        store = AttentionStore(resolutions=[16])
        with self.attention_hub().using(store):
            loss = super().training_step(batch, batch_idx)
        assert store.maps, "the hub must record during training"
        return loss


def test_attention_processors_restored_after_fit(tiny_dir, image_folder):
    module = RecordingTI({"path": str(tiny_dir)}, {"name": "<t>", "initializer": "cat"}, optimizer=torch.optim.AdamW)
    fit(module, image_folder)
    processors = module.backbone.unet.attn_processors.values()
    assert processors and not any(isinstance(p, ControlledAttnProcessor) for p in processors)
    assert module._hub is None


def test_only_trained_rows_train_and_checkpoint(tiny_dir, image_folder, tmp_path):
    module = make_module(tiny_dir)
    module.configure_model()
    frozen = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    trainer = fit(module, image_folder, steps=3)
    assert all(torch.equal(frozen[k], v) for k, v in module.backbone.state_dict().items()
               if "token_embedding" not in k)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=False)
    assert set(ckpt["state_dict"]) == {"tokens.rows.0.rows"}
    assert torch.equal(ckpt["state_dict"]["tokens.rows.0.rows"], module.tokens.rows[0].rows.detach())


def test_checkpoint_of_another_setup_is_refused(tiny_dir):
    module = make_module(tiny_dir)
    module.configure_model()
    with pytest.raises(ArtifactError, match="lacks trained weights"):
        module.on_load_checkpoint({"state_dict": {"something.else": torch.zeros(1)}})


def test_step_generator_depends_on_seed_step_and_rank(tiny_dir):
    module = make_module(tiny_dir)
    draw = lambda: torch.rand(4, generator=module.step_generator())  # noqa: E731
    assert torch.equal(draw(), draw())
    other = make_module(tiny_dir)
    other.seed = 4
    assert not torch.equal(draw(), torch.rand(4, generator=other.step_generator()))


def test_teardown_writes_rows_into_the_table(tiny_dir, image_folder):
    module = make_module(tiny_dir)
    fit(module, image_folder)
    token_id = module.backbone.tokenizers[0].convert_tokens_to_ids("<t>")
    table = module.backbone.text_encoders[0].get_input_embeddings().weight
    assert torch.equal(table[token_id], module.tokens.rows[0].rows.detach()[0])


def test_kept_posteriors_give_the_losses_of_fresh_encodings_and_skip_the_encoder(tiny_dir, image_folder):
    module = make_module(tiny_dir)
    module.configure_model()
    batches = list(zip(range(4), loader(image_folder)))
    keys = [key for _, batch in batches for key in batch["image_key"]]
    assert len(set(keys)) < len(keys)  # images come back (some flipped) within a few steps
    encodes = []
    hook = module.backbone.vae.encoder.register_forward_hook(lambda *args: encodes.append(args[1][0].shape[0]))
    try:
        for step, batch in batches:
            prompts = [module.tokens.expand(p) for p in batch["prompt"]]
            fresh = module.diffusion_loss(batch["pixel_values"], prompts, torch.Generator().manual_seed(step))
            kept = module.diffusion_loss(batch["pixel_values"], prompts, torch.Generator().manual_seed(step),
                                         keys=batch["image_key"])
            torch.testing.assert_close(kept, fresh)  # equal up to the batch size the VAE ran at
    finally:
        hook.remove()
    fresh_rows = sum(len(batch["image_key"]) for _, batch in batches)
    assert sum(encodes) == fresh_rows + len(set(keys))  # each key's image encoded once with keys, every time without
    flipped = next(k for k in keys if k.endswith("f"))
    mean, _ = module._posteriors[flipped]
    unflipped, _ = module._posteriors.get(flipped[:-1], (None, None))
    assert unflipped is None or not torch.equal(mean, unflipped)
