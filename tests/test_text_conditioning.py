"""Prompt conditioning: caption dropout takes the empty caption's rows, SDXL's added condition."""

from __future__ import annotations

import torch

from layerdiff.models.base import load_text_encoders
from layerdiff.models.text import PromptConditioning


def test_dropped_rows_take_the_empty_captions_embedding_and_the_others_stay(tiny_sdxl):
    conditioning = PromptConditioning(load_text_encoders(str(tiny_sdxl)))
    prompts = conditioning.encode(["a red apple", "a cat", "a candle"])
    dropped = conditioning.drop(prompts, torch.tensor([False, True, False]))
    empty = conditioning.encode([""])
    assert torch.equal(dropped.hidden[1], empty.hidden[0]) and torch.equal(dropped.pooled[1], empty.pooled[0])
    for row in (0, 2):
        assert torch.equal(dropped.hidden[row], prompts.hidden[row]) and torch.equal(dropped.pooled[row], prompts.pooled[row])
    assert not torch.equal(prompts.hidden[1], empty.hidden[0])  # the replacement is visible
    assert conditioning.drop(prompts, torch.tensor([False, False, False])) is prompts


def test_sdxl_gets_pooled_text_and_size_ids_and_sd15_nothing(tiny_sdxl, tiny_sd15):
    sdxl = PromptConditioning(load_text_encoders(str(tiny_sdxl)))
    prompts = sdxl.encode(["a", "b"])
    added = sdxl.added_conditions(prompts, torch.tensor([[64, 64], [128, 192]]), torch.tensor([[0, 0], [4, 8]]), (64, 64))
    assert torch.equal(added["time_ids"], torch.tensor([[64.0, 64, 0, 0, 64, 64], [128, 192, 4, 8, 64, 64]]))
    assert added["text_embeds"] is prompts.pooled
    sd15 = PromptConditioning(load_text_encoders(str(tiny_sd15)))
    assert sd15.added_conditions(sd15.encode(["a"]), torch.tensor([[64, 64]]), torch.tensor([[0, 0]]), (64, 64)) is None


def test_the_loaders_token_ids_encode_as_the_captions_do(tiny_sdxl):
    from layerdiff.batches import Layer, LayeredBatch
    from layerdiff.models.text import CaptionTokenizer

    conditioning = PromptConditioning(load_text_encoders(str(tiny_sdxl)))
    layers = [Layer(name, torch.zeros(2, 3, 8, 8), [f"{name} one", f"{name} two"]) for name in ("foreground", "background")]
    batch = CaptionTokenizer(conditioning.text_encoders.tokenizers)(
        LayeredBatch(layers, ["a", "b"], ["k0", "k1"], torch.zeros(2, 2), torch.zeros(2, 2)))
    for layer in batch.layers:
        from_ids, from_text = conditioning.encode(layer.caption, token_ids=layer.token_ids), conditioning.encode(layer.caption)
        assert torch.equal(from_ids.hidden, from_text.hidden) and torch.equal(from_ids.pooled, from_text.pooled)
    assert not torch.equal(batch.layers[0].token_ids[0], batch.layers[1].token_ids[0])
