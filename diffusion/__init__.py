"""Shared diffusion mechanics, written once and used by every method.

backbone      load SD1.x / SD2.x / SDXL (or the tiny model), encode prompts and images
tiny          build the tiny random pipeline used by tests
clip_tokenizer  write a CLIP-format tokenizer for small models
tokens        placeholder tokens: add, train their rows, export/import textual-inversion files
attention     attention processors with recording and editing controllers
sampling      DDIM sampling with classifier-free guidance, DDIM inversion
artifacts     one loader for every method's run (read_artifact, load_artifact)
"""
