"""Placeholder tokens: construction, training isolation, the embedding splice, files in and out."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffusion.backbone import load_backbone
from diffusion.tokens import PlaceholderTokens, grow_embedding, load_embeddings, vector_names
from utils.errors import ArtifactError, ConfigError

PROMPT = "a photo of <t> on the beach"


# ----- helpers ------------------------------------------------------------------------------------
def table(backbone, i: int = 0) -> torch.Tensor:
    """The token embedding table of text encoder i."""
    return backbone.text_encoders[i].get_input_embeddings().weight


def word_ids(backbone, text: str, i: int = 0) -> list[int]:
    return backbone.tokenizers[i](text, add_special_tokens=False).input_ids


def token_position(backbone, prompt: str, token: str) -> int:
    """Index of `token` in the padded input ids of `prompt`."""
    tid = backbone.tokenizers[0].convert_tokens_to_ids(token)
    return backbone.tokenize([prompt])[0].tolist().index(tid)


def set_rows(tokens: PlaceholderTokens, seed: int) -> list[torch.Tensor]:
    """Give every encoder's rows seeded random values (stands in for training); returns them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in tokens.rows:
            r.rows.copy_(torch.randn(r.rows.shape, generator=g))
    return [r.rows.detach().clone() for r in tokens.rows]


def hidden(backbone, prompts) -> torch.Tensor:
    with torch.no_grad():
        return backbone.encode_prompt(prompts).hidden_states


# ----- construction -------------------------------------------------------------------------------
def test_adds_token_and_initialises_from_initializer_word(tiny):
    """A new token gets one new id and a row equal to the initializer word's row."""
    vocab_before = len(tiny.tokenizers[0])
    cat_row = table(tiny)[word_ids(tiny, "cat")[0]].detach().clone()
    tokens = PlaceholderTokens(tiny, "<t>", initializer="cat")
    tid = tiny.tokenizers[0].convert_tokens_to_ids("<t>")
    assert len(tiny.tokenizers[0]) == vocab_before + 1
    assert tid == vocab_before
    assert table(tiny).shape[0] == vocab_before + 1
    assert tiny.text_encoders[0].config.vocab_size == vocab_before + 1
    assert word_ids(tiny, "a <t>") == [word_ids(tiny, "a")[0], tid]
    assert tokens.names == ["<t>"]
    assert tokens.rows[0].token_ids.tolist() == [tid]
    assert tokens.rows[0].rows.dtype == torch.float32
    assert torch.equal(tokens.rows[0].rows[0], cat_row)
    assert torch.equal(table(tiny)[tid], cat_row)


def test_random_init_is_seeded(tiny_dir):
    """Without an initializer the start rows are the same on every build, scaled by init_std."""
    a = PlaceholderTokens(load_backbone(str(tiny_dir)), "<t>", init_std=0.5).rows[0].rows
    b = PlaceholderTokens(load_backbone(str(tiny_dir)), "<t>", init_std=0.5).rows[0].rows
    assert torch.equal(a, b)
    assert 0.3 < a.std().item() < 0.7


def test_multi_token_initializer_is_a_config_error(tiny):
    """A two-token initializer is refused by name, before any tokenizer is changed."""
    vocab_before = len(tiny.tokenizers[0])
    with pytest.raises(ConfigError, match=r"token\.initializer='red cat' is 2 tokens"):
        PlaceholderTokens(tiny, "<t>", initializer="red cat")
    assert len(tiny.tokenizers[0]) == vocab_before
    assert "<t>" not in tiny.tokenizers[0].get_vocab()
    PlaceholderTokens(tiny, "<t>", initializer="cat")  # a corrected retry works


def test_existing_word_is_a_config_error(tiny):
    """A placeholder named like a vocabulary word points at train_existing."""
    with pytest.raises(ConfigError, match=r"'cat' is already in the tokenizer's vocabulary.*train_existing"):
        PlaceholderTokens(tiny, "cat")


def test_empty_name_and_zero_vectors_are_config_errors(tiny):
    """An empty token name and num_vectors < 1 are refused."""
    with pytest.raises(ConfigError, match=r"token\.name is empty"):
        PlaceholderTokens(tiny, "  ")
    with pytest.raises(ConfigError, match=r"token\.num_vectors=0 must be at least 1"):
        PlaceholderTokens(tiny, "<t>", num_vectors=0)


def test_train_existing_trains_the_words_own_rows(tiny):
    """train_existing=True adds nothing and trains the rows of the word's own ids."""
    vocab_before = len(tiny.tokenizers[0])
    cat = word_ids(tiny, "cat")
    tokens = PlaceholderTokens(tiny, "cat", train_existing=True)
    assert len(tiny.tokenizers[0]) == vocab_before
    assert table(tiny).shape[0] == vocab_before
    assert tokens.rows[0].token_ids.tolist() == cat
    assert torch.equal(tokens.rows[0].rows, table(tiny)[cat])
    assert tokens.expand("a cat") == "a cat"


def test_train_existing_multi_token_word(tiny):
    """A word of several BPE pieces trains one row per piece."""
    ids = word_ids(tiny, "zebra")
    assert len(ids) > 1
    tokens = PlaceholderTokens(tiny, "zebra", train_existing=True)
    assert tokens.rows[0].token_ids.tolist() == ids
    assert tokens.rows[0].rows.shape == (len(ids), 32)


# ----- training -----------------------------------------------------------------------------------
def test_only_token_rows_train(tiny):
    """One AdamW step (weight decay on) moves the rows and leaves the whole table bit-identical."""
    tokens = PlaceholderTokens(tiny, "<t>", initializer="cat")
    table_before = table(tiny).detach().clone()
    rows_before = tokens.rows[0].rows.detach().clone()
    params = list(tokens.parameters())
    assert len(params) == 1 and params[0] is tokens.rows[0].rows
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)

    loss = tiny.encode_prompt([PROMPT, "a red car"]).hidden_states.pow(2).mean()
    loss.backward()
    assert all(p.grad is None for p in tiny.parameters())
    assert not any(p.requires_grad for p in tiny.parameters())
    assert tokens.rows[0].rows.grad is not None and tokens.rows[0].rows.grad.abs().sum() > 0
    opt.step()

    assert not torch.equal(tokens.rows[0].rows, rows_before)
    assert torch.equal(table(tiny), table_before)


def test_write_back_copies_rows_into_the_table(tiny):
    """write_back puts the trained rows into the table and touches no other row."""
    tokens = PlaceholderTokens(tiny, "<t>", initializer="cat")
    tid = tokens.rows[0].token_ids.item()
    before = table(tiny).detach().clone()
    trained = set_rows(tokens, 0)[0]
    tokens.write_back()
    after = table(tiny).detach()
    assert torch.equal(after[tid], trained[0])
    others = torch.arange(after.shape[0]) != tid
    assert torch.equal(after[others], before[others])


# ----- the splice ---------------------------------------------------------------------------------
def test_splice_uses_the_rows(tiny):
    """Changing the rows changes the hidden states at and after the token only; other prompts are unaffected."""
    tokens = PlaceholderTokens(tiny, "<t>", initializer="cat")
    pos = token_position(tiny, PROMPT, "<t>")
    before, plain_before = hidden(tiny, [PROMPT]), hidden(tiny, ["a photo of a cat on the beach"])
    set_rows(tokens, 1)
    after, plain_after = hidden(tiny, [PROMPT]), hidden(tiny, ["a photo of a cat on the beach"])

    change = (after - before).abs().amax(-1)[0]  # per position
    assert torch.allclose(after[0, :pos], before[0, :pos], atol=1e-6)  # causal: earlier positions don't see it
    assert (change[pos:] > 1e-4).all()
    assert torch.equal(plain_after, plain_before)


def test_splice_output_is_the_rows(tiny):
    """The embedding lookup returns the rows (times the scale) at the token's positions."""
    tokens = PlaceholderTokens(tiny, "<t>", initializer="cat")
    rows = set_rows(tokens, 2)[0]
    ids = tiny.tokenize([PROMPT])
    pos = token_position(tiny, PROMPT, "<t>")
    embedding = tiny.text_encoders[0].get_input_embeddings()
    with torch.no_grad():
        out = embedding(ids)
        tokens.set_scale(0.5)
        scaled = embedding(ids)
    assert torch.equal(out[0, pos], rows[0])
    assert torch.allclose(scaled[0, pos], 0.5 * rows[0])
    others = torch.arange(ids.shape[1]) != pos
    assert torch.equal(scaled[0, others], out[0, others])


def test_scale(tiny):
    """set_scale: 0 and 1 differ, 1 equals no scale, and a [B] tensor scales each sample's rows."""
    tokens = PlaceholderTokens(tiny, "<t>", initializer="cat")
    set_rows(tokens, 3)
    plain = hidden(tiny, [PROMPT])
    tokens.set_scale(1.0)
    one = hidden(tiny, [PROMPT])
    tokens.set_scale(0.0)
    zero = hidden(tiny, [PROMPT])
    tokens.set_scale(torch.tensor([0.0, 1.0]))
    both = hidden(tiny, [PROMPT, PROMPT])
    tokens.set_scale(None)

    assert torch.equal(one, plain)
    assert not torch.allclose(zero, one, atol=1e-3)
    assert torch.allclose(both[0], zero[0], atol=1e-6)
    assert torch.allclose(both[1], one[0], atol=1e-6)
    assert torch.equal(hidden(tiny, [PROMPT]), plain)


# ----- multi-vector tokens ------------------------------------------------------------------------
def test_multi_vector_token(tiny):
    """num_vectors=3 adds <t>, <t>_1, <t>_2, each starting from the initializer row."""
    vocab_before = len(tiny.tokenizers[0])
    tokens = PlaceholderTokens(tiny, "<t>", num_vectors=3, initializer="dog")
    names = ["<t>", "<t>_1", "<t>_2"]
    assert tokens.names == names == vector_names("<t>", 3)
    ids = tiny.tokenizers[0].convert_tokens_to_ids(names)
    assert ids == list(range(vocab_before, vocab_before + 3))
    assert word_ids(tiny, "<t> <t>_1 <t>_2") == ids
    assert tokens.rows[0].rows.shape == (3, 32)
    dog = table(tiny)[word_ids(tiny, "dog")[0]]
    assert all(torch.equal(row, dog) for row in tokens.rows[0].rows)


@pytest.mark.parametrize("prompt, expected", [
    ("a photo of <t>", "a photo of <t> <t>_1 <t>_2"),
    ("<t> and <t>", "<t> <t>_1 <t>_2 and <t> <t>_1 <t>_2"),
    ("a painting of <t>, at night", "a painting of <t> <t>_1 <t>_2, at night"),
    ("a photo of x<t>", "a photo of x<t>"),
    ("<t>s in a row", "<t>s in a row"),
    ("a <t>_1 alone", "a <t>_1 alone"),
    ("no token here", "no token here"),
])
def test_expand_whole_words_only(tiny, prompt, expected):
    """expand() spells a multi-vector token out at whole-word occurrences only."""
    tokens = PlaceholderTokens(tiny, "<t>", num_vectors=3, initializer="dog")
    assert tokens.expand(prompt) == expected


def test_expand_is_identity_for_one_vector(tiny):
    """A single-vector token leaves prompts as they are."""
    tokens = PlaceholderTokens(tiny, "<t>", initializer="dog")
    assert tokens.expand("a photo of <t>") == "a photo of <t>"


# ----- grow_embedding -----------------------------------------------------------------------------
def test_grow_embedding(tiny):
    """grow_embedding keeps the module and old rows, fills new rows with the mean, and never shrinks."""
    encoder = tiny.text_encoders[0]
    module = encoder.get_input_embeddings()
    old = module.weight.detach().clone()
    grow_embedding(encoder, old.shape[0] + 2)
    assert encoder.get_input_embeddings() is module
    assert module.weight.shape == (old.shape[0] + 2, old.shape[1])
    assert module.num_embeddings == encoder.config.vocab_size == old.shape[0] + 2
    assert torch.equal(module.weight[: old.shape[0]], old)
    assert torch.allclose(module.weight[old.shape[0]:], old.mean(0).expand(2, -1))
    assert not module.weight.requires_grad
    grow_embedding(encoder, 3)
    assert module.weight.shape[0] == old.shape[0] + 2


def test_two_tokens_both_splice(tiny):
    """A second token grows the table again and the first token's hook still splices."""
    a = PlaceholderTokens(tiny, "<a>", initializer="cat")
    b = PlaceholderTokens(tiny, "<b>", initializer="dog")
    with torch.no_grad():
        a.rows[0].rows.fill_(7.0)
        b.rows[0].rows.fill_(-3.0)
    ids = torch.tensor([tiny.tokenizers[0].convert_tokens_to_ids(["<a>", "<b>"]) + word_ids(tiny, "cat")])
    with torch.no_grad():
        out = tiny.text_encoders[0].get_input_embeddings()(ids)[0]
    assert torch.equal(out[0], torch.full((32,), 7.0))
    assert torch.equal(out[1], torch.full((32,), -3.0))
    assert torch.equal(out[2], table(tiny)[word_ids(tiny, "cat")[0]])

    before_a, before_b = hidden(tiny, ["a photo of <a>"]), hidden(tiny, ["a photo of <b>"])
    set_rows(a, 12)  # not a constant row: CLIP's layer norms cancel constant shifts
    assert not torch.allclose(hidden(tiny, ["a photo of <a>"]), before_a, atol=1e-3)
    assert torch.equal(hidden(tiny, ["a photo of <b>"]), before_b)


def test_remove_stops_the_splice(tiny):
    """After remove() the lookup falls back to the table row."""
    tokens = PlaceholderTokens(tiny, "<t>", initializer="cat")
    set_rows(tokens, 4)
    tid = tokens.rows[0].token_ids
    tokens.remove()
    with torch.no_grad():
        out = tiny.text_encoders[0].get_input_embeddings()(tid[None])
    assert torch.equal(out[0, 0], table(tiny)[tid[0]])


# ----- files --------------------------------------------------------------------------------------
def test_save_format(tiny, tmp_path):
    """save() writes {token: [n, d]} fp32 contiguous tensors with token metadata."""
    tokens = PlaceholderTokens(tiny, "<t>", num_vectors=2, initializer="cat")
    rows = set_rows(tokens, 5)[0]
    path = tokens.save(tmp_path / "learned_embeds.safetensors", metadata={"steps": 10})
    state = load_file(str(path))
    assert list(state) == ["<t>"]
    assert state["<t>"].shape == (2, 32)
    assert state["<t>"].dtype == torch.float32
    assert state["<t>"].is_contiguous()
    assert torch.equal(state["<t>"], rows)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"token": "<t>", "num_vectors": "2", "train_existing": "false", "steps": "10"}


def test_save_is_fp32_on_a_bf16_backbone(tiny_dir, tmp_path):
    """On a bf16 backbone the rows still train and save in fp32."""
    backbone = load_backbone(str(tiny_dir), dtype="bfloat16")
    tokens = PlaceholderTokens(backbone, "<t>", initializer="cat")
    assert tokens.rows[0].rows.dtype == torch.float32
    assert hidden(backbone, [PROMPT]).dtype == torch.bfloat16
    state = load_file(str(tokens.save(tmp_path / "e.safetensors")))
    assert state["<t>"].dtype == torch.float32


@pytest.mark.parametrize("num_vectors", [1, 3])
def test_diffusers_reads_the_file(tiny, tiny_dirs, tmp_path, num_vectors):
    """diffusers' load_textual_inversion adds tok, tok_1, ... with exactly the trained rows."""
    from diffusers import StableDiffusionPipeline

    tokens = PlaceholderTokens(tiny, "<t>", num_vectors=num_vectors, initializer="cat")
    rows = set_rows(tokens, 6)[0]
    path = tokens.save(tmp_path / "learned_embeds.safetensors")

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dirs["sd"]), safety_checker=None)
    pipe.load_textual_inversion(str(path))
    names = vector_names("<t>", num_vectors)
    ids = pipe.tokenizer.convert_tokens_to_ids(names)
    assert pipe.tokenizer.unk_token_id not in ids
    weight = pipe.text_encoder.get_input_embeddings().weight
    for i, tid in enumerate(ids):
        assert torch.equal(weight[tid], rows[i])


def test_load_embeddings_round_trip(tiny, tiny_dir, tmp_path):
    """load_embeddings puts the saved rows into a fresh backbone, which then encodes like the source."""
    tokens = PlaceholderTokens(tiny, "<t>", num_vectors=2, initializer="cat")
    rows = set_rows(tokens, 7)[0]
    path = tokens.save(tmp_path / "e.safetensors")
    fresh = load_backbone(str(tiny_dir))
    names = load_embeddings(fresh, path)
    assert names == ["<t>", "<t>_1"]
    ids = fresh.tokenizers[0].convert_tokens_to_ids(names)
    assert torch.equal(table(fresh)[ids], rows)
    prompt = tokens.expand(PROMPT)
    assert torch.allclose(hidden(fresh, [prompt]), hidden(tiny, [prompt]), atol=1e-6)


def test_load_embeddings_token_override(tiny, tiny_dir, tmp_path):
    """token=... renames the token on load."""
    tokens = PlaceholderTokens(tiny, "<t>", initializer="cat")
    rows = set_rows(tokens, 8)[0]
    fresh = load_backbone(str(tiny_dir))
    assert load_embeddings(fresh, tokens.save(tmp_path / "e.safetensors"), token="<mine>") == ["<mine>"]
    assert torch.equal(table(fresh)[fresh.tokenizers[0].convert_tokens_to_ids("<mine>")], rows[0])


@pytest.mark.parametrize("word", ["cat", "zebra", "van gogh"])
def test_erase_file_overwrites_existing_word(tiny, tiny_dir, tmp_path, word):
    """A train_existing file overwrites the word's own rows on load and adds no token."""
    tokens = PlaceholderTokens(tiny, word, train_existing=True)
    rows = set_rows(tokens, 9)[0]
    path = tokens.save(tmp_path / "erase.safetensors")
    fresh = load_backbone(str(tiny_dir))
    vocab_before = len(fresh.tokenizers[0])
    assert load_embeddings(fresh, path) == [word]
    assert len(fresh.tokenizers[0]) == vocab_before
    assert table(fresh).shape[0] == vocab_before
    assert torch.equal(table(fresh)[word_ids(fresh, word)], rows)


def test_existing_word_vector_count_mismatch(tiny, tmp_path):
    """A file with two vectors for the one-token word 'cat' is an ArtifactError."""
    path = tmp_path / "bad.safetensors"
    save_file({"cat": torch.zeros(2, 32)}, str(path))
    with pytest.raises(ArtifactError, match=r"2 vectors for the existing word 'cat' of 1 tokens"):
        load_embeddings(tiny, path)


def test_load_errors(tiny, tmp_path):
    """Missing, unreadable, multi-tensor and wrong-width files are one-line ArtifactErrors."""
    cases = {"missing.safetensors": r"does not exist",
             "garbage.safetensors": r"is not a readable safetensors file",
             "two.safetensors": r"holds 2 tensors; expected one \{token: \[n, d\]\} entry",
             "narrow.safetensors": r"vectors of size 16 do not fit text encoder 0 \(size 32\); "
                                   r"the file was trained on another model"}
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01 not safetensors")
    save_file({"<a>": torch.zeros(1, 32), "<b>": torch.zeros(1, 32)}, str(tmp_path / "two.safetensors"))
    save_file({"<t>": torch.zeros(1, 16)}, str(tmp_path / "narrow.safetensors"))
    vocab_before = len(tiny.tokenizers[0])
    for name, message in cases.items():
        with pytest.raises(ArtifactError, match=message) as info:
            load_embeddings(tiny, tmp_path / name)
        assert "\n" not in str(info.value)
        assert name in str(info.value)
    assert len(tiny.tokenizers[0]) == vocab_before


# ----- SDXL ---------------------------------------------------------------------------------------
def test_sdxl_token_in_both_encoders(tiny_sdxl):
    """On SDXL the token is added to both tokenizers, with rows per encoder, and both splice."""
    tokens = PlaceholderTokens(tiny_sdxl, "<t>", initializer="cat")
    assert len(tokens.rows) == 2
    for i in range(2):
        tid = tiny_sdxl.tokenizers[i].convert_tokens_to_ids("<t>")
        assert tokens.rows[i].token_ids.tolist() == [tid]
        assert torch.equal(tokens.rows[i].rows[0], table(tiny_sdxl, i)[word_ids(tiny_sdxl, "cat", i)[0]])
    before = tiny_sdxl.encode_prompt([PROMPT])
    with torch.no_grad():
        tokens.rows[1].rows.copy_(torch.randn(1, 32, generator=torch.Generator().manual_seed(0)))  # clip_g only
    after = tiny_sdxl.encode_prompt([PROMPT])
    width_l = table(tiny_sdxl, 0).shape[1]
    assert torch.equal(after.hidden_states[..., :width_l], before.hidden_states[..., :width_l])
    assert not torch.allclose(after.hidden_states[..., width_l:], before.hidden_states[..., width_l:], atol=1e-4)
    assert not torch.allclose(after.pooled, before.pooled, atol=1e-4)


def test_sdxl_file_and_diffusers(tiny_sdxl, tiny_dirs, tmp_path):
    """save(sdxl=True) writes clip_l/clip_g rows that diffusers' SDXL pipeline loads exactly."""
    from diffusers import StableDiffusionXLPipeline

    tokens = PlaceholderTokens(tiny_sdxl, "<t>", initializer="cat")
    row_l, row_g = set_rows(tokens, 10)
    state = load_file(str(tokens.save(tmp_path / "e.safetensors", sdxl=True)))
    assert set(state) == {"clip_l", "clip_g"}
    assert state["clip_l"].shape == (1, table(tiny_sdxl, 0).shape[1])
    assert state["clip_g"].shape == (1, table(tiny_sdxl, 1).shape[1])
    assert torch.equal(state["clip_l"], row_l) and torch.equal(state["clip_g"], row_g)

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_dirs["sdxl"]))
    pipe.load_textual_inversion(state["clip_g"], token="<t>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    pipe.load_textual_inversion(state["clip_l"], token="<t>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    for tokenizer, encoder, row in ((pipe.tokenizer, pipe.text_encoder, row_l),
                                    (pipe.tokenizer_2, pipe.text_encoder_2, row_g)):
        tid = tokenizer.convert_tokens_to_ids("<t>")
        assert torch.equal(encoder.get_input_embeddings().weight[tid], row[0])


def test_sdxl_load_embeddings_round_trip(tiny_sdxl, tiny_dirs, tmp_path):
    """An SDXL file loads back into a fresh SDXL backbone, each key into its own encoder."""
    tokens = PlaceholderTokens(tiny_sdxl, "<t>", initializer="cat")
    row_l, row_g = set_rows(tokens, 11)
    path = tokens.save(tmp_path / "e.safetensors", sdxl=True)
    fresh = load_backbone(str(tiny_dirs["sdxl"]))
    assert load_embeddings(fresh, path) == ["<t>"]
    for i, row in enumerate((row_l, row_g)):
        assert torch.equal(table(fresh, i)[fresh.tokenizers[i].convert_tokens_to_ids("<t>")], row[0])
