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
        """n images (with repetition when the folder is smaller) and their prompts. The picks come from a host
        generator seeded as `generator` is, and the images go to a GPU through pinned memory: picks read back
        from the GPU, or a copy from pageable memory, would make the host wait for the GPU's queue."""
        host = torch.Generator().manual_seed(generator.initial_seed())
        images = self.images[torch.randint(0, len(self.images), (n,), generator=host)]
        if torch.device(device).type == "cuda":
            images = images.pin_memory().to(device, non_blocking=True)
        return images.to(device), [self.prompt] * n
