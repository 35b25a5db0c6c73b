"""Prior preservation (DreamBooth): images of the concept's class, fitted beside the concept's images
under the plain class prompt ("a photo of a dog") so that fine-tuned weights keep the class as it was.

The images are a folder the user provides, typically samples of the base model for the class prompt
(`python evaluate.py metrics=none prompts='["a photo of a dog"]' seeds='[0,...,99]'` writes them).
"""

from __future__ import annotations

import torch

from datamodules.image_set import load_image, scan_image_set


class PriorImages:
    """Class images [N, 3, r, r] in [-1, 1], drawn a few per step by the module's step generator."""

    def __init__(self, images_dir: str, prompt: str, resolution: int, key: str = "module.prior.images_dir"):
        records = scan_image_set(images_dir, key=key)
        self.images = torch.stack([load_image(r.image, resolution) for r in records])
        self.prompt = prompt

    def __len__(self) -> int:
        return len(self.images)

    def draw(self, n: int, generator: torch.Generator, device) -> tuple[torch.Tensor, list[str]]:
        """n images (with repetition when the folder is smaller) and their prompts."""
        idx = torch.randint(0, len(self.images), (n,), generator=generator, device=generator.device).cpu()
        return self.images[idx].to(device), [self.prompt] * n
