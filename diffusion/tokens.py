"""Placeholder tokens: add them to the tokenizer(s), train their embedding rows, export/import them.

The trained rows live in their own fp32 parameter (`TokenRows.rows`) and are spliced into the
embedding lookup by a forward hook. The rest of the embedding table is frozen and never sees an
optimizer, so it cannot drift (which is why the reference scripts restore every other row after
each optimizer step); `TokenRows.write_back` copies the rows into the table for plain sampling.
Files use diffusers' textual-inversion format: {token: [n, d]} safetensors, or one key per text encoder,
{"clip_l": ..., "clip_g": ...} for SDXL, which `load_textual_inversion` reads; SD3 and FLUX files extend that
layout with T5's rows, {"clip_l", "clip_g" (SD3), "t5"} (`pipe.load_textual_inversion(state["t5"], token=...,
text_encoder=<the T5 encoder>, tokenizer=<its tokenizer>)`).
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors.torch import load_file
from torch import nn

from utils.errors import ArtifactError, ConfigError
from utils.io import write_safetensors

SDXL_KEYS = ("clip_l", "clip_g")
ENCODER_KEYS = ("clip_l", "clip_g", "t5")  # every per-encoder key a file may hold (backbones' embedding_keys)
log = logging.getLogger(__name__)


def fill_template(template: str, word: str) -> str:
    """A template's '{}' replaced by a word (a token, a class word, or nothing), spaces collapsed."""
    return " ".join(template.replace("{}", word).split())


def vector_names(token: str, num_vectors: int) -> list[str]:
    """diffusers' names for a multi-vector token: tok, tok_1, tok_2, ..."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


@torch.no_grad()
def grow_embedding(encoder: nn.Module, size: int) -> None:
    """Grow a text encoder's token table in place (same module, so hooks on it survive)."""
    embedding = encoder.get_input_embeddings()
    old = embedding.weight
    if size <= old.shape[0]:
        return
    new = old.new_empty(size, old.shape[1])
    new[: old.shape[0]] = old
    new[old.shape[0]:] = old.mean(0)
    embedding.weight = nn.Parameter(new, requires_grad=old.requires_grad)
    embedding.num_embeddings = size
    encoder.config.vocab_size = size


class TokenRows(nn.Module):
    """Trainable rows for some ids of one embedding table, spliced into its lookups.

    `scale` (None, a float, or a [batch] tensor) multiplies the spliced rows: Prompt Sliders
    scale the slider token by alpha in the prompt. With `enabled` False lookups read the table's own
    rows (the frozen model's predictions of a slider's target, an erased word's original meaning).
    """

    def __init__(self, embedding: nn.Embedding, token_ids: Sequence[int]):
        super().__init__()
        ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=embedding.weight.device)
        self.rows = nn.Parameter(embedding.weight.detach()[ids].float().clone())
        self.register_buffer("token_ids", ids, persistent=False)
        self.ids = tuple(int(i) for i in token_ids)  # the host's copy: reading the buffer would wait for the GPU
        self.scale: float | torch.Tensor | None = None
        self.enabled = True
        self._embedding = [embedding]  # a list: not a submodule, so not part of this module's state
        self._handle = embedding.register_forward_hook(self._splice)

    def _splice(self, module, args, out):
        if not self.enabled:
            return out
        match = args[0].unsqueeze(-1) == self.token_ids  # [..., n]: a handful of ids, no vocab-sized table
        hit = match.any(-1)  # no early exit when nothing hits: asking would wait for the GPU
        rows = self.rows[match.long().argmax(-1)]
        scale = self.scale
        if torch.is_tensor(scale) and scale.ndim:  # one scale per prompt of the batch
            rows = rows * scale.to(rows.dtype).view(-1, *([1] * (rows.ndim - 1)))
        elif scale is not None:  # a number multiplies as it is: a tensor made of it would be a blocking copy
            rows = rows * scale
        return torch.where(hit.unsqueeze(-1), rows.to(out.dtype), out)

    @torch.no_grad()
    def write_back(self) -> None:
        weight = self._embedding[0].weight
        weight[self.token_ids.to(weight.device)] = self.rows.to(weight.dtype)

    def remove(self) -> None:
        self._handle.remove()


class PlaceholderTokens(nn.Module):
    """One concept token (possibly several vectors) added to each text encoder of a backbone.

    train_existing=True trains the rows of a word already in the vocabulary (erasing a concept
    by its own name) instead of adding a new token.
    """

    def __init__(self, backbone, token: str, num_vectors: int = 1, initializer: str | None = None,
                 train_existing: bool = False, encoders: Sequence[int] | None = None, init_std: float | None = None,
                 init_seed: int = 0):
        super().__init__()
        if not token or not token.strip():
            raise ConfigError("token.name is empty; give the placeholder a name such as '<my-concept>'")
        if num_vectors < 1:
            raise ConfigError(f"token.num_vectors={num_vectors} must be at least 1")
        self.token = token
        self.train_existing = train_existing
        self.encoder_indices = list(range(len(backbone.text_encoders))) if encoders is None else list(encoders)
        self.names = [token] if train_existing else vector_names(token, num_vectors)
        self.rows = nn.ModuleList()
        if initializer and not train_existing:  # fail before any tokenizer is changed
            for i in self.encoder_indices:
                self._initializer_id(backbone.tokenizers[i], initializer)
        added: dict[int, list[int]] = {}  # a tokenizer two encoders share (in-memory pipelines) is extended once
        for i in self.encoder_indices:
            tokenizer, encoder = backbone.tokenizers[i], backbone.text_encoders[i]
            if train_existing:
                ids = self._existing_ids(tokenizer, token)
            elif id(tokenizer) in added:
                ids = added[id(tokenizer)]
                grow_embedding(encoder, len(tokenizer))
            else:
                ids = added[id(tokenizer)] = self._add(tokenizer, encoder)
            embedding = encoder.get_input_embeddings()
            if not train_existing:
                with torch.no_grad():
                    embedding.weight[ids] = self._initial_rows(tokenizer, embedding, initializer, len(ids), init_std,
                                                               init_seed)
            self.rows.append(TokenRows(embedding, ids))
        if train_existing:
            self.names = vector_names(token, len(self.rows[0].token_ids)) if len(self.rows[0].token_ids) > 1 else [token]

    # ----- construction --------------------------------------------------------------------------
    def _add(self, tokenizer, encoder) -> list[int]:
        vocab = tokenizer.get_vocab()
        clashes = [n for n in self.names if n in vocab or f"{n}</w>" in vocab]
        if clashes:
            raise ConfigError(f"token {clashes[0]!r} is already in the tokenizer's vocabulary; choose a new "
                              f"name (e.g. '<{clashes[0].strip('<>')}-2>') or set token.train_existing=true to "
                              f"train the existing word")
        tokenizer.add_tokens(self.names)
        grow_embedding(encoder, len(tokenizer))
        return list(tokenizer.convert_tokens_to_ids(self.names))

    @staticmethod
    def _existing_ids(tokenizer, word: str) -> list[int]:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if not ids:
            raise ConfigError(f"token {word!r} encodes to no tokens")
        return list(ids)

    @staticmethod
    def _initializer_id(tokenizer, initializer: str) -> int:
        ids = tokenizer(initializer, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ConfigError(f"token.initializer={initializer!r} is {len(ids)} tokens for this tokenizer; "
                              f"use a single-token word (or null for a random start)")
        return ids[0]

    @classmethod
    def _initial_rows(cls, tokenizer, embedding, initializer, n, init_std, init_seed=0) -> torch.Tensor:
        weight = embedding.weight.detach()
        if initializer:
            return weight[cls._initializer_id(tokenizer, initializer)].expand(n, -1).clone()
        std = init_std if init_std is not None else weight.float().std().item()
        g = torch.Generator().manual_seed(init_seed)  # tokens learnt together need different starts
        rows = torch.randn(n, weight.shape[1], generator=g, device="cpu")  # the same start on every device
        return (rows * std).to(weight.device, weight.dtype)

    # ----- use ------------------------------------------------------------------------------------
    def expand(self, prompt: str) -> str:
        """Spell a multi-vector token out in a prompt: '<t>' -> '<t> <t>_1 <t>_2'."""
        if self.train_existing or len(self.names) == 1:
            return prompt
        return re.sub(rf"(?<!\w){re.escape(self.token)}(?!\w)", " ".join(self.names), prompt)

    def set_scale(self, scale: float | torch.Tensor | None) -> None:
        for rows in self.rows:
            rows.scale = scale

    @contextlib.contextmanager
    def scaled(self, scale: float | torch.Tensor | None) -> Iterator[None]:
        """The token's rows times `scale` (a float, or one value per prompt of a batch) inside the block."""
        before = [rows.scale for rows in self.rows]
        self.set_scale(scale)
        try:
            yield
        finally:
            for rows, old in zip(self.rows, before):
                rows.scale = old

    @contextlib.contextmanager
    def original(self) -> Iterator[None]:
        """Lookups read the embedding table's own rows inside the block (the frozen model)."""
        for rows in self.rows:
            rows.enabled = False
        try:
            yield
        finally:
            for rows in self.rows:
                rows.enabled = True

    def write_back(self) -> None:
        for rows in self.rows:
            rows.write_back()

    def remove(self) -> None:
        for rows in self.rows:
            rows.remove()

    def embeddings(self) -> list[torch.Tensor]:
        return [r.rows.detach().float().cpu() for r in self.rows]

    # ----- files ----------------------------------------------------------------------------------
    def state_for_file(self, sdxl: bool = False, keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """The file's tensors: one per encoder under `keys` (a backbone's embedding_keys), else {token: rows}
        (SDXL's clip_l / clip_g with sdxl=True)."""
        rows = self.embeddings()
        if keys is not None:
            return {keys[i]: r for i, r in zip(self.encoder_indices, rows)}
        if sdxl and len(rows) == 2:
            return dict(zip(SDXL_KEYS, rows))
        if sdxl:
            return {SDXL_KEYS[self.encoder_indices[0]]: rows[0]}
        return {self.token: rows[0]}

    def save(self, path: str | Path, sdxl: bool = False, metadata: dict | None = None,
             keys: Sequence[str] | None = None) -> Path:
        meta = {"token": self.token, "num_vectors": str(len(self.names)),
                "train_existing": str(self.train_existing).lower(), **(metadata or {})}
        write_safetensors(path, self.state_for_file(sdxl, keys), metadata={k: str(v) for k, v in meta.items()})
        return Path(path)


def read_embedding_file(path: str | Path) -> tuple[str | None, dict[str, torch.Tensor]]:
    """(token name or None, tensors) from a textual-inversion safetensors file."""
    meta, tensors = _read_embedding_file(path)
    return meta.get("token"), tensors


def _read_embedding_file(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"embedding file {path} does not exist; pass the learned_embeds.safetensors of a run")
    try:
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - a corrupt file is one line for the user
        raise ArtifactError(f"{path} is not a readable safetensors file ({e})") from e
    return meta, tensors


def _per_encoder_rows(backbone, tensors: dict[str, torch.Tensor], path) -> dict[int, torch.Tensor]:
    """A per-encoder file's rows by the index of the text encoder they belong to on `backbone`. Keys this backbone
    has no encoder for are left out (an SDXL or FLUX file on SD1.x: the CLIP-L part transfers, the text encoder
    they share)."""
    keys = getattr(backbone, "embedding_keys", None) or SDXL_KEYS[:1]  # one encoder: CLIP-L (SD1.x)
    keys = keys[:len(backbone.text_encoders)]
    per_encoder = {keys.index(k): v for k, v in tensors.items() if k in keys}
    if not per_encoder:
        raise ArtifactError(f"{path} holds rows for {', '.join(tensors)}, none of this model's text encoders "
                            f"({', '.join(keys)}); load it on the model it was trained on")
    dropped = [k for k in tensors if k not in keys]
    if dropped:
        log.info("%s: %s has no text encoder on this model; using %s", path, ", ".join(dropped),
                 ", ".join(k for k in tensors if k in keys))
    return per_encoder


def load_embeddings(backbone, path: str | Path, token: str | None = None) -> list[str]:
    """Add the tokens of a textual-inversion file to a backbone (the inverse of `PlaceholderTokens.save`).

    Existing words in the file (erasing artifacts) overwrite their own rows. Returns the names added.
    """
    return load_embedding_ids(backbone, path, token)[0]


def load_embedding_ids(backbone, path: str | Path, token: str | None = None) -> tuple[list[str], dict[int, list[int]]]:
    """`load_embeddings`, also returning the token ids it wrote per text encoder index."""
    meta, tensors = _read_embedding_file(path)
    stored, existing_word = meta.get("token"), meta.get("train_existing") == "true"
    if tensors and all(k in ENCODER_KEYS for k in tensors):
        token = token or stored
        if token is None:
            raise ArtifactError(f"{path} has no token name; pass token=...")
        per_encoder = _per_encoder_rows(backbone, tensors, path)
    else:
        if len(tensors) != 1:
            raise ArtifactError(f"{path} holds {len(tensors)} tensors; expected one {{token: [n, d]}} entry")
        (name, value), = tensors.items()
        token = token or name
        per_encoder = {0: value}
    names: list[str] = []
    written: dict[int, list[int]] = {}
    for i, value in per_encoder.items():
        tokenizer, encoder = backbone.tokenizers[i], backbone.text_encoders[i]
        value = value.reshape(-1, value.shape[-1])
        embedding = encoder.get_input_embeddings()
        if value.shape[-1] != embedding.weight.shape[1]:
            raise ArtifactError(f"{path}: vectors of size {value.shape[-1]} do not fit text encoder {i} "
                                f"(size {embedding.weight.shape[1]}); the file was trained on another model: load it "
                                f"on that one")
        vocab = tokenizer.get_vocab()
        existing = existing_word or token in vocab or f"{token}</w>" in vocab or " " in token
        if existing:
            ids = tokenizer(token, add_special_tokens=False).input_ids
            if len(ids) != len(value):
                raise ArtifactError(f"{path}: {len(value)} vectors for the existing word {token!r} of {len(ids)} tokens")
            names = [token]
        else:
            names = vector_names(token, len(value))
            tokenizer.add_tokens(names)
            ids = tokenizer.convert_tokens_to_ids(names)
            grow_embedding(encoder, len(tokenizer))
        with torch.no_grad():
            embedding = encoder.get_input_embeddings()
            embedding.weight[ids] = value.to(device=embedding.weight.device, dtype=embedding.weight.dtype)
        written[i] = list(ids)
    return names, written
