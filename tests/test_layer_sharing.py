"""Attention sharing between jointly denoised layers (layerdiff.models.layer_sharing): what each
mode computes, checked against the layers run one at a time on the tiny SDXL-shaped UNet."""

from __future__ import annotations

import pytest
import torch

from layerdiff.models.layer_sharing import LayerSharingUnit, add_layer_sharing, sharing_units
from layerdiff.models.tiny import make_unet

LAYERS, SAMPLES = 3, 2


@pytest.fixture(scope="module")
def base_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return make_unet().state_dict()


def unet_with_sharing(base_state, mode: str, layers: int = LAYERS, perturb_seed: int | None = 1):
    unet = make_unet().eval()
    unet.load_state_dict(base_state)
    units = add_layer_sharing(unet, layers, mode, rank=4)
    if perturb_seed is not None:  # trained-looking units: every LoRA and frame projection non-zero
        generator = torch.Generator().manual_seed(perturb_seed)
        with torch.no_grad():
            for unit in units.values():
                for parameter in unit.parameters():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return unet


def inputs(rows: int, seed: int = 2):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(rows, 4, 8, 8, generator=generator),
        torch.full((rows,), 500),
        torch.randn(rows, 7, make_unet().config.cross_attention_dim, generator=generator),
        {"text_embeds": torch.randn(rows, 32, generator=generator), "time_ids": torch.randn(rows, 6, generator=generator)},
    )


def run(unet, sample, timesteps, hidden, added):
    with torch.no_grad():
        return unet(sample, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added).sample


def take_rows(x, rows):
    return {key: value[rows] for key, value in x.items()} if isinstance(x, dict) else x[rows]


def layer_alone(unet, layer: int, mode: str, base_state):
    """A one-layer model holding ``layer``'s LoRAs of ``unet``."""
    single = unet_with_sharing(base_state, mode, layers=1, perturb_seed=None)
    shared_units, single_units = sharing_units(unet), sharing_units(single)
    with torch.no_grad():
        for name, unit in single_units.items():
            for projection in ("to_q", "to_k", "to_v", "to_out"):
                source = getattr(shared_units[name], f"{projection}_lora")[layer]
                getattr(unit, f"{projection}_lora")[0].load_state_dict(source.state_dict())
    return single


def test_new_units_leave_the_model_unchanged_without_concat(base_state):
    base = make_unet().eval()
    base.load_state_dict(base_state)
    batch = inputs(SAMPLES * LAYERS)
    expected = run(base, *batch)
    for mode in ("none", "frame"):
        assert torch.equal(run(unet_with_sharing(base_state, mode, perturb_seed=None), *batch), expected), mode


def test_sharing_off_is_exactly_the_layers_run_alone(base_state):
    unet = unet_with_sharing(base_state, "none")
    batch = inputs(SAMPLES * LAYERS)
    joint = run(unet, *batch)
    for layer in range(LAYERS):
        rows = torch.arange(SAMPLES) * LAYERS + layer  # layers are inner: (b l)
        alone = run(layer_alone(unet, layer, "none", base_state), *(take_rows(x, rows) for x in batch[:1]), batch[1][rows],
                    batch[2][rows], take_rows(batch[3], rows))
        torch.testing.assert_close(joint[rows], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["concat", "frame"])
def test_sharing_is_equivariant_to_permuting_the_layers(base_state, mode):
    unet = unet_with_sharing(base_state, mode)
    batch = inputs(SAMPLES * LAYERS)
    expected = run(unet, *batch)
    order = torch.tensor([2, 0, 1])
    rows = (torch.arange(SAMPLES)[:, None] * LAYERS + order).flatten()
    with torch.no_grad():  # each layer keeps its own LoRA: permute the LoRAs with the layers
        for unit in sharing_units(unet).values():
            for projection in ("to_q", "to_k", "to_v", "to_out"):
                deltas = getattr(unit, f"{projection}_lora")
                states = [{key: value.clone() for key, value in deltas[int(index)].state_dict().items()} for index in order]
                for delta, state in zip(deltas, states):
                    delta.load_state_dict(state)
    permuted = run(unet, batch[0][rows], batch[1][rows], batch[2][rows], take_rows(batch[3], rows))
    torch.testing.assert_close(permuted, expected[rows], rtol=1e-4, atol=1e-5)


def test_concat_mixes_the_layers_of_a_sample_and_only_those(base_state):
    unet = unet_with_sharing(base_state, "concat")
    batch = inputs(SAMPLES * LAYERS)
    expected = run(unet, *batch)
    changed = batch[0].clone()
    changed[LAYERS] += 1.0  # sample 1, layer 0
    out = run(unet, changed, *batch[1:])
    assert torch.equal(out[:LAYERS], expected[:LAYERS])  # sample 0 untouched
    assert not torch.allclose(out[LAYERS + 1:], expected[LAYERS + 1:])  # sample 1's other layers see it


def test_one_layer_concat_is_plain_attention(base_state):
    concat = unet_with_sharing(base_state, "concat", layers=1)
    none = unet_with_sharing(base_state, "none", layers=1)
    batch = inputs(SAMPLES)
    torch.testing.assert_close(run(concat, *batch), run(none, *batch))


def test_units_train_and_are_unet_parameters(base_state):
    unet = unet_with_sharing(base_state, "frame", perturb_seed=None)
    trainable = {name for name, parameter in unet.named_parameters() if parameter.requires_grad}
    assert trainable and all(".processor." in name for name in trainable)
    unit = next(iter(sharing_units(unet).values()))
    assert isinstance(unit, LayerSharingUnit)
    expected = {"temporal_n.weight", "temporal_o.bias", "to_q_lora.2.down.weight", "to_out_lora.0.up.weight"}
    assert expected <= set(unit.state_dict())


def test_bad_settings_are_named():
    attn = make_unet().get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn1")
    with pytest.raises(ValueError, match="attention sharing must be one of"):
        LayerSharingUnit(attn, 2, "sideways", 4)
    with pytest.raises(ValueError, match="attention projections"):
        LayerSharingUnit(attn, 2, "concat", 4, lora_projections=("ff",))
    unit = LayerSharingUnit(attn, 2, "concat", 4)
    with pytest.raises(ValueError, match="not whole samples of 2 layers"):
        unit(attn, torch.randn(3, 16, attn.to_q.in_features))
