"""Conditional layers (LD sec. 3.3): modes mixed per sample, a given layer clean at t = 0 with no
loss, and generation around a given image prepared exactly as training prepared it, with every
sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data import ShardDataModule
from layerdiff import diffusion
from layerdiff.models.layer_sharing import sharing_units
from layerdiff.modules import JointLayerLoRAModule
from layerdiff.pipelines import GenerationSettings, LayerPromptBatch
from layerdiff.pipelines.joint_layers import read_layer_image
from support.shards import write_tiny_shards

LAYERS = ("foreground", "background")
MIXTURE = [{"given": [], "probability": 0.5}, {"given": ["foreground"], "probability": 0.25},
           {"given": ["background"], "probability": 0.25}]


@pytest.fixture(scope="module")
def parts(tiny_sdxl, tiny_transparent_vae):
    return tiny_sdxl, tiny_transparent_vae


def make_module(parts, **overrides) -> JointLayerLoRAModule:
    sdxl, transparent_vae = parts
    torch.manual_seed(0)
    module = JointLayerLoRAModule(**{"base_model": str(sdxl), "transparent_vae": str(transparent_vae), "layers": LAYERS,
                                     "lora_rank": 4, "modes": MIXTURE, **overrides})
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained-looking model: every unit's parameters non-zero
        for unit in sharing_units(module.unet).values():
            for parameter in unit.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return module.eval()


@pytest.fixture(scope="module")
def mixture(parts) -> JointLayerLoRAModule:
    return make_module(parts)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    shards = write_tiny_shards(tmp_path_factory.mktemp("layered") / "train", 4, sizes=((64, 64),), layers=True)
    data = ShardDataModule(",".join(shards), batch_size=4, num_workers=0, shuffle_buffer=0, require_layers=True)
    data.setup("fit")
    return data.on_before_batch_transfer(next(iter(data.train_dataloader())), 0)


def test_a_given_layer_enters_clean_at_t_0_and_only_generated_layers_count():
    latents = torch.randn(2, 3, 4, 2, 2)
    noisy = torch.randn(2, 3, 4, 2, 2)
    given = torch.tensor([[True, False, False], [False, False, False]])
    prepared, timesteps = diffusion.given_layers(latents, noisy, torch.tensor([500, 700]), given)
    assert torch.equal(prepared[0, 0], latents[0, 0]) and torch.equal(prepared[0, 1:], noisy[0, 1:])
    assert torch.equal(prepared[1], noisy[1]) and timesteps.tolist() == [[0, 500, 500], [700, 700, 700]]
    target = torch.zeros(2, 3, 1)
    prediction = torch.tensor([[[9.0], [1.0], [2.0]], [[3.0], [4.0], [5.0]]])  # 9: a given layer's, never counted
    total, per_layer = diffusion.layer_losses(prediction, target, ~given)
    assert total == pytest.approx((1 + 4 + 9 + 16 + 25) / 5)
    assert per_layer.tolist() == [9.0, 8.5, 14.5]  # the first layer only from the sample that generated it


def test_modes_are_checked_when_the_module_is_built(parts):
    for modes, message in (([{"given": ["shadow"], "probability": 1.0}], "distinct layers"),
                           ([{"given": list(LAYERS), "probability": 1.0}], "generates nothing"),
                           ([{"given": [], "probability": 0.5}], "add up to 0.5"),
                           ([{"given": [], "probability": 0.5}, {"given": [], "probability": 0.5}], "each mode once")):
        with pytest.raises(ValueError, match=message):
            make_module(parts, modes=modes)


def test_a_joint_only_model_draws_and_scores_as_before_modes_existed(parts, batch):
    joint = make_module(parts, modes=None)
    losses = joint.compute_loss(batch, torch.Generator().manual_seed(0))
    torch.testing.assert_close(losses["loss"], torch.stack([losses[f"loss_{name}"] for name in LAYERS]).mean())
    assert list(joint.mode_losses(batch, torch.Generator().manual_seed(0))) == ["joint"]


def test_each_mode_scores_only_the_layers_it_generates_on_the_same_draws(mixture, batch):
    module = mixture
    per_mode = module.mode_losses(batch, torch.Generator().manual_seed(0))
    assert list(per_mode) == ["joint", "given_foreground", "given_background"]
    assert per_mode["given_foreground"]["loss_foreground"].isnan()
    torch.testing.assert_close(per_mode["given_foreground"]["loss"], per_mode["given_foreground"]["loss_background"])
    # the foreground is given: its pixels change the background's loss (through shared attention)...
    batch.layer("foreground").pixels = 1.0 - batch.layer("foreground").pixels
    flipped = module.mode_losses(batch, torch.Generator().manual_seed(0))
    batch.layer("foreground").pixels = 1.0 - batch.layer("foreground").pixels
    assert not torch.equal(flipped["given_foreground"]["loss"], per_mode["given_foreground"]["loss"])
    # ...and training draws a mode per sample: with four samples and this seed, not all in one mode
    drawn = diffusion.draw_modes(torch.Generator().manual_seed(0), [0.5, 0.25, 0.25], 64)
    assert set(drawn.tolist()) == {0, 1, 2} and abs((drawn == 0).float().mean() - 0.5) < 0.2
    trained = module.compute_loss(batch, torch.Generator().manual_seed(0))
    assert trained["loss"].isfinite()


def write_foreground(path, size=48) -> None:
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[8:40, 10:38] = (220, 40, 60, 255)
    rgba[8:40, 10:12, 3] = 128  # a soft edge
    Image.fromarray(rgba, "RGBA").save(path)


def test_a_given_image_is_prepared_as_the_shards_prepare_a_layer(tmp_path):
    write_foreground(tmp_path / "fg.png")
    rgb, alpha = read_layer_image(str(tmp_path / "fg.png"), 32, 32, transparent=True)
    assert rgb.shape == (3, 32, 32) and alpha.shape == (1, 32, 32)
    assert torch.equal(rgb, torch.round(rgb * 255) / 255) and alpha.max() == 1.0 and alpha.min() == 0.0
    assert (rgb[:, alpha[0] == 0] != 0).any()  # colour padded under zero alpha, as in the shards
    with pytest.raises(ValueError, match="transparent pixels.*opaque layer"):
        read_layer_image(str(tmp_path / "fg.png"), 32, 32, transparent=False)
    Image.new("RGB", (40, 30), (10, 200, 30)).save(tmp_path / "bg.jpg")
    rgb, alpha = read_layer_image(str(tmp_path / "bg.jpg"), 32, 32, transparent=False)
    assert alpha is None and rgb.shape == (3, 32, 32)
    with pytest.raises(ValueError, match="bg.jpg.*no alpha channel"):
        read_layer_image(str(tmp_path / "bg.jpg"), 32, 32, transparent=True)


@pytest.mark.parametrize("scheduler", ["euler", "euler_a", "dpm++", "ddim"])
def test_every_sampler_feeds_a_given_layer_exactly_as_training_did(parts, mixture, tmp_path, scheduler):
    module = mixture
    write_foreground(tmp_path / "fg.png")
    expected = codec_latent(module, read_layer_image(str(tmp_path / "fg.png"), 64, 64, transparent=True))
    seen = []
    hook = module.unet.register_forward_pre_hook(lambda _unet, args, kwargs: seen.append((args[0].clone(), args[1].clone())),
                                                 with_kwargs=True)
    try:
        batch = LayerPromptBatch([0, 1], [{"background": "a room"}] * 2, [0, 1],
                                 GenerationSettings(width=64, height=64, steps=3, guidance_scale=3.0, scheduler=scheduler),
                                 given={"foreground": str(tmp_path / "fg.png")})
        sets = module.layer_generator()(batch)
    finally:
        hook.remove()
    assert len(seen) == 3
    for model_input, timesteps in seen:  # rows (guidance half, sample, layer): foreground rows are 0, 2, 4, 6
        for row in (0, 2, 4, 6):
            assert torch.equal(model_input[row], expected[0]) and timesteps[row] == 0
        assert (timesteps[1::2] > 0).all()
    assert sets[0].parameters["given"] == {"foreground": str(tmp_path / "fg.png")}
    torch.testing.assert_close(sets[0].layers["foreground"], sets[1].layers["foreground"])
    assert not torch.equal(sets[0].layers["background"], sets[1].layers["background"])  # their own seeds
    with pytest.raises(ValueError, match=r"trained with given layers.*model.init_args.modes"):
        make_module(parts, modes=None).layer_generator()(batch)


def codec_latent(module, layer) -> torch.Tensor:
    from layerdiff.models import codec

    rgb, alpha = layer
    with torch.no_grad():
        return codec.layer_latent(module.vae, module.transparent_encoder, rgb[None], alpha[None])


def test_composing_three_layers_leaves_each_earlier_layer_untouched_and_blends_exactly(parts, mixture, tmp_path):
    from psd_tools import PSDImage

    from callbacks.layer_writer import LayerSetWriter
    from data.prompts import PromptDataModule
    from layerdiff.pipelines.composition import compose

    Image.new("RGB", (64, 64), (40, 90, 200)).save(tmp_path / "sky.png")
    data = PromptDataModule(compositions=[{"background": "a sky", "background_image": str(tmp_path / "sky.png"),
                                           "foregrounds": ["a sun", "a bird", "a cloud"]},
                                          {"background": "a beach", "foregrounds": ["a ball", "a crab"]}],
                            settings=GenerationSettings(width=64, height=64, steps=2, guidance_scale=2.0), seed=7)
    batches = list(data.predict_dataloader())
    stacks = [stack for batch in batches for stack in compose(mixture.layer_generator(), batch)]
    first, second = stacks
    assert list(first.layers) == ["foreground_3", "foreground_2", "foreground_1", "background", "blend"]
    assert list(second.layers) == ["foreground_2", "foreground_1", "background", "blend"]
    # the background image is kept as given; composing the stack bottom to top gives the blend
    torch.testing.assert_close(first.layers["background"], read_layer_image(str(tmp_path / "sky.png"), 64, 64, False)[0])
    for stack in stacks:
        blend = stack.layers["background"]
        for name in [name for name in stack.layers if name.startswith("foreground")][::-1]:
            blend = stack.layers[name][:3] * stack.layers[name][3:] + blend * (1 - stack.layers[name][3:])
        torch.testing.assert_close(stack.layers["blend"], blend)
    # a composition with one layer fewer is the same up to that layer: adding one changes none before it
    shorter = PromptDataModule(compositions=[{"background": "a sky", "background_image": str(tmp_path / "sky.png"),
                                              "foregrounds": ["a sun", "a bird"]}],
                               settings=GenerationSettings(width=64, height=64, steps=2, guidance_scale=2.0), seed=7)
    prefix = compose(mixture.layer_generator(), next(iter(shorter.predict_dataloader())))[0]
    for name in ("foreground_1", "foreground_2"):
        torch.testing.assert_close(prefix.layers[name], first.layers[name])
    # written as one layered file with every layer, the blend hidden on top
    writer = LayerSetWriter(str(tmp_path / "out"))
    writer.on_predict_start(None, None)
    writer.write_on_batch_end(type("T", (), {"ckpt_path": None})(), None, [first], None, None, 0, 0)
    psd = PSDImage.open(next((tmp_path / "out").glob("*.psd")))
    names = [layer.name for layer in psd]
    assert names[::-1] == ["blend (generated)", "foreground_3", "foreground_2", "foreground_1", "background"]
    merged = np.asarray(psd.composite().convert("RGB"), np.float32) / 255.0
    assert np.abs(merged - first.layers["blend"].permute(1, 2, 0).numpy()).max() <= 2.5 / 255


@pytest.mark.parametrize("scheduler", ["euler", "dpm++", "ddim"])
def test_redrawing_from_a_start_image_stays_near_it_at_low_strength(mixture, batch, scheduler):
    """SDEdit on layers: at a small strength the result is close to the start, at 1 it is not."""
    from layerdiff.models import codec

    settings = GenerationSettings(width=64, height=64, steps=10, guidance_scale=1.0, scheduler=scheduler)
    background = batch.layer("background").pixels[:1]
    prompts = [{"background": batch.layer("background").caption[0]}]
    given = {"foreground": batch.layer("foreground").pixels[0]}
    with torch.no_grad():
        truth = codec.layer_latent(mixture.vae, None, background, None)

    def distance(strength: float) -> float:
        made = mixture.layer_generator()(LayerPromptBatch([0], prompts, [0], settings), given_pixels=given,
                                         start_pixels={"background": background}, strength=strength)[0]
        with torch.no_grad():
            latent = codec.layer_latent(mixture.vae, None, made.layers["background"][None], None)
        return float((latent - truth).square().mean())

    assert distance(0.1) < 0.5 * distance(1.0)
    with pytest.raises(ValueError, match="start image"):
        mixture.layer_generator()(LayerPromptBatch([0], prompts, [0], settings), given_pixels=given, strength=0.5)
