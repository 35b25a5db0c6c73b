"""The shapes world: procedurally rendered scenes whose every attribute, mask and identity is known.

world.py   vocabulary, scene sampling and captions
render.py  a batched, supersampled renderer (torch; CPU or GPU)
"""
