"""Build a CLIP-format BPE tokenizer (vocab.json + merges.txt) from a word list.

Small models (the tiny test model, the shapes world) need a tokenizer that `CLIPTokenizer`
loads exactly like the real one, without downloading anything. The vocabulary follows CLIP's
layout: the 256 byte symbols, the same with the end-of-word marker `</w>`, one entry per merge,
then the two special tokens. Merges are learnt with the `tokenizers` BPE trainer on the given
words, so every listed word encodes to a single token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

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
    """BPE merges that turn each (lower-cased) word into one token."""
    corpus = sorted({w.lower() for w in words})
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = list(bytes_to_unicode().values())
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000, initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False
    )
    bpe.train_from_iterator([" ".join(corpus)], trainer)
    merges = json.loads(bpe.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


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
