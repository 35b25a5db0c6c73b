"""Build a CLIP-format BPE tokenizer (vocab.json + merges.txt) from a word list.

Small models (the tiny test model, the shapes world) need a tokenizer that `CLIPTokenizer`
loads exactly like the real one, without downloading anything. The vocabulary follows CLIP's
layout: the 256 byte symbols, the same with the end-of-word marker `</w>`, one entry per merge,
then the two special tokens. Merges are learnt by byte-pair encoding over the given words (ties
broken by the pair's text, so builds are reproducible), so every listed word encodes to a single token.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterable

import torch

START, END = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """BPE merges that turn each (lower-cased) word into one token: repeatedly merge the most frequent adjacent
    pair, ties broken by the pair's text, so the same words give the same merges (and token ids) on every build."""
    corpus = [[*w[:-1], w[-1] + "</w>"] for w in sorted({w.lower() for w in words} - {""})]
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(pair for symbols in corpus for pair in zip(symbols, symbols[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        corpus = [_merge_pair(symbols, best) for symbols in corpus]


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def write_clip_tokenizer(words: Iterable[str], out_dir: str | Path, max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs CLIPTokenizer reads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges = learn_merges(words)
    vocab_list += ["".join(m) for m in merges]
    vocab_list += [START, END]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [" ".join(m) for m in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": START,
        "eos_token": END,
        "unk_token": END,
        "pad_token": END,
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    specials = {"bos_token": START, "eos_token": END, "unk_token": END, "pad_token": END}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return out


def extend_vocabulary(tokenizer, text_encoder, words: list[str]):
    """A tokenizer over `words` and the text encoder re-indexed to it: every token both vocabularies hold
    keeps its embedding row, a new one starts from the mean row. Returns the new tokenizer."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        new = CLIPTokenizer.from_pretrained(write_clip_tokenizer(words, tmp))
    old_rows = text_encoder.get_input_embeddings().weight.data
    old_ids = tokenizer.get_vocab()
    rows = old_rows.mean(0, keepdim=True).repeat(len(new), 1)
    for token, i in new.get_vocab().items():
        if token in old_ids:
            rows[i] = old_rows[old_ids[token]]
    embedding = torch.nn.Embedding(len(new), rows.shape[1])
    embedding.weight.data.copy_(rows)
    text_encoder.set_input_embeddings(embedding)
    text_encoder.config.update(dict(vocab_size=len(new), bos_token_id=new.bos_token_id,
                                    eos_token_id=new.eos_token_id, pad_token_id=new.pad_token_id))
    return new


class CaptionIds:
    """The tokenizer's padded ids for captions, looked up word by word where every word is one token of
    the vocabulary (the world's captions). Same ids as the tokenizer; far cheaper: its per-word BPE over a
    batch of 512 captions took longer than the training step. Other text goes through the tokenizer."""

    def __init__(self, tokenizer, words: list[str]):
        self.tokenizer = tokenizer
        pieces = {w: tokenizer(w, add_special_tokens=False).input_ids for w in words}
        self.word_ids = {w: ids[0] for w, ids in pieces.items() if len(ids) == 1}

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        tok, length = self.tokenizer, self.tokenizer.model_max_length
        out = torch.full((len(prompts), length), tok.pad_token_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = prompt.split()
            if len(words) + 2 <= length and all(w in self.word_ids for w in words):
                ids = [tok.bos_token_id, *(self.word_ids[w] for w in words), tok.eos_token_id]
            else:
                ids = tok(prompt, truncation=True, max_length=length).input_ids
            out[row, :len(ids)] = torch.tensor(ids)
        return out
