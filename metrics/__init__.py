"""Metrics (CLIP, DINO, LPIPS, structure distance, mask IoU, shapes-world probes) as torchmetrics Metrics."""
