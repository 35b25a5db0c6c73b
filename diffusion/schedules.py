"""Stable Diffusion's noise schedule and the DDIM settings its pipelines sample with (one place for both)."""

SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
SD_DDIM = {**SD_BETAS, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
