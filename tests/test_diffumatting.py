"""DiffuMatting's parts: its two losses against hand-worked values, the keyword's tokens, the
attention capture against diffusers' own attention, the green-screen transform, and the
module's refusal of captions it cannot supervise."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from data.transforms import GreenScreen
from layerdiff.losses import green_background_loss, sobel_magnitude, transition_band, transition_boundary_loss
from layerdiff.models.attention import TokenAttention, capture_token_attention
from layerdiff.models.text import keyword_token_weights
from support.shards import tiny_sample

# -- the green-background control loss (DiffuMatting sec. 3.3) ------------------------------


def test_an_attention_map_equal_to_the_background_gives_zero_green_loss():
    background = torch.zeros(2, 1, 8, 8)
    background[:, :, :4] = 1.0  # top half background, in blocks of the 4 x 4 map's cells
    maps = [background[:, 0, ::2, ::2].clone(), background[:, 0, ::4, ::4].clone()]
    assert green_background_loss(maps, background) == 0.0


def test_the_green_loss_is_the_mean_squared_gap_over_kept_samples_and_maps():
    background = torch.ones(2, 1, 4, 4)
    maps = [torch.zeros(2, 4, 4), torch.full((2, 2, 2), 0.5)]
    assert green_background_loss(maps, background) == pytest.approx((1.0 + 0.25) / 2)
    maps[0][1] = 1.0  # sample 1 now matches at the first map; leaving it out changes nothing
    assert green_background_loss(maps, background, torch.tensor([1.0, 0.0])) == pytest.approx((1.0 + 0.25) / 2)
    assert green_background_loss(maps, background) == pytest.approx((0.5 + 0.25) / 2)


# -- the transition-boundary loss (sec. 3.4) -------------------------------------------------


def test_the_sobel_map_of_a_constant_is_zero_and_of_a_ramp_is_eight_times_its_slope():
    assert torch.equal(sobel_magnitude(torch.full((1, 2, 5, 5), 0.7)), torch.zeros(1, 2, 5, 5))
    ramp = torch.arange(5.0).repeat(5, 1)[None, None] * 0.5  # slope 0.5 along x
    magnitude = sobel_magnitude(ramp)[0, 0]
    # interior: (1 + 2 + 1) * (I(x+1) - I(x-1)) = 4 * 1.0; at a replicated edge half that
    torch.testing.assert_close(magnitude[:, 1:4], torch.full((5, 3), 4.0), atol=1e-3, rtol=0)
    torch.testing.assert_close(magnitude[:, 0], torch.full((5,), 2.0), atol=1e-3, rtol=0)


def test_the_transition_band_is_the_strip_around_a_change_in_alpha():
    alpha = torch.zeros(1, 1, 6, 8)
    alpha[..., 4:] = 1.0  # an edge between columns 3 and 4
    band = transition_band(alpha, width=1)[0, 0]
    assert band[:, 3:5].eq(1).all() and band[:, :3].eq(0).all() and band[:, 5:].eq(0).all()
    assert transition_band(alpha, width=2)[0, 0].sum() == 6 * 4
    assert transition_band(torch.ones(1, 1, 4, 4)).sum() == 0  # an opaque sample has no boundary


def test_the_boundary_loss_by_hand():
    target = torch.zeros(2, 1, 3, 3)
    prediction = target.clone()
    prediction[0, 0] = torch.tensor([0.0, 1.0, 2.0]).repeat(3, 1)  # a ramp of slope 1
    band = torch.ones(2, 1, 3, 3)
    band[1] = 0.0  # sample 1 has no boundary: left out of the mean, not counted as zero
    # Sobel x of [0, 1, 2] with replicated edges: 4 * [1, 2, 1] = [4, 8, 4] on each row;
    # squared and averaged over the 9 pixels: (16 + 64 + 16) / 3 = 32.
    assert transition_boundary_loss(prediction, target, band) == pytest.approx(32.0, rel=1e-3)
    assert transition_boundary_loss(prediction, target, band, torch.tensor([0.5, 1.0])) == pytest.approx(16.0, rel=1e-3)
    assert transition_boundary_loss(prediction + 3.0, prediction, band) == 0.0  # an offset has no edges


# -- which tokens are the keyword ------------------------------------------------------------


def test_keyword_weights_mark_the_first_occurrence_of_the_keywords_tokens():
    ids = torch.tensor([[49406, 7, 70, 81, 9, 70, 81, 49407], [49406, 5, 6, 49407, 49407, 49407, 49407, 49407]])
    weights = keyword_token_weights(ids, [70, 81])
    assert weights[0].tolist() == [0, 0, 0.5, 0.5, 0, 0, 0, 0] and weights[1].sum() == 0


# -- capturing the keyword's cross-attention -------------------------------------------------


@pytest.fixture(scope="module")
def unet(tiny_sdxl):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_sdxl / "unet").eval()


def unet_inputs(unet, batch=2):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator)
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(batch, pooled, generator=generator),
             "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64.0]] * batch)}
    return torch.randn(batch, 4, 8, 8, generator=generator), torch.tensor([10, 500]), hidden, added


def test_capturing_leaves_the_unets_output_unchanged_and_maps_only_the_sizes_asked_for(unet):
    latents, timesteps, hidden, added = unet_inputs(unet)
    with torch.no_grad():
        expected = unet(latents, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
        captures = capture_token_attention(unet)
        weights = torch.zeros(2, 77)
        weights[:, 5] = 1.0
        recording = captures.record(TokenAttention(weights, (8, 8), (2,)))
        actual = unet(latents, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
        captures.stop()
        assert torch.equal(actual, expected)
        cross_attentions = [name for name, _ in unet.named_modules() if name.endswith("attn2")]
        assert len(recording.maps) == len(cross_attentions) and all(m.shape == (2, 4, 4) for m in recording.maps)
        nothing = captures.record(TokenAttention(weights, (8, 8), (1, 8)))  # the tiny UNet attends at 4 x 4 only
        unet(latents, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added)
        captures.stop()
        assert nothing.maps == []


def test_the_captured_map_is_the_softmax_attention_diffusers_computes(unet):
    from layerdiff.models.attention import TokenAttentionCapture

    attn = next(module for name, module in unet.named_modules() if name.endswith("attn2"))
    generator = torch.Generator().manual_seed(1)
    hidden_states = torch.randn(2, 16, attn.to_q.in_features, generator=generator)
    context = torch.randn(2, 77, attn.to_k.in_features, generator=generator)
    weights = torch.zeros(2, 77)
    weights[0, 3], weights[1, 7:9] = 1.0, 0.5
    with torch.no_grad():
        captured = TokenAttentionCapture.token_map(attn, hidden_states, context, weights)
        query, key = attn.head_to_batch_dim(attn.to_q(hidden_states)), attn.head_to_batch_dim(attn.to_k(context))
        probabilities = attn.get_attention_scores(query, key).unflatten(0, (2, attn.heads))  # [B, heads, N, T]
    expected = (probabilities * weights[:, None, None]).sum(-1).mean(1)
    torch.testing.assert_close(captured, expected)


# -- the green-screen samples ------------------------------------------------------------------


def test_green_screen_composites_on_green_and_names_the_background_in_the_caption():
    sample = tiny_sample(0)
    screened = GreenScreen()(sample)
    alpha = sample.foreground[..., 3:] / 255.0
    expected = np.rint(sample.foreground[..., :3] * alpha + np.array([0, 255, 0]) * (1 - alpha))
    assert np.array_equal(screened.foreground[..., :3], expected.astype(np.uint8))
    assert np.array_equal(screened.foreground[..., 3], sample.foreground[..., 3])
    assert screened.caption == f"green background, {sample.caption}"
    assert GreenScreen()(screened).caption == screened.caption  # applied once
    with pytest.raises(ValueError, match=f"sample {sample.key}.*caption_template"):
        GreenScreen(caption_template=None)(sample)
    with pytest.raises(ValueError, match="must hold"):
        GreenScreen(caption_template="{caption} on blue")


def test_the_module_refuses_a_caption_without_the_keyword(tiny_sdxl):
    from layerdiff.batches import ImageBatch
    from layerdiff.modules import DiffuMattingModule

    module = DiffuMattingModule(base_model=str(tiny_sdxl), lora_rank=None, caption_dropout=0.0)
    batch = ImageBatch(rgb=torch.rand(2, 3, 64, 64), alpha=torch.rand(2, 1, 64, 64),
                       caption=["a cat, on a green background", "a dog"], key=["cat", "dog"],
                       original_size=torch.tensor([[64, 64]] * 2), crop_top_left=torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"sample dog: its caption 'a dog' has no 'green' token.*GreenScreen"):
        module.compute_loss(batch, torch.Generator().manual_seed(0))
    batch.caption[1] = "a dog on a green background"
    terms = module.compute_loss(batch, torch.Generator().manual_seed(0))
    assert set(terms) == {"noise", "green", "boundary", "matte", "matte_alpha", "matte_gradient", "matte_composition",
                          "alpha_mse_head", "alpha_mse_key", "loss"}
    assert all(term.isfinite() for term in terms.values())
    total = (terms["noise"] + module.green["weight"] * terms["green"] + module.boundary["weight"] * terms["boundary"]
             + module.head_settings["weight"] * terms["matte"])
    torch.testing.assert_close(terms["loss"], total)
    head = module.head_settings
    torch.testing.assert_close(terms["matte"], head["alpha"] * terms["matte_alpha"] + head["gradient"] * terms[
        "matte_gradient"] + head["composition"] * terms["matte_composition"])


def test_the_matting_head_trains_on_its_own_terms_at_its_own_learning_rate(tiny_sdxl):
    from layerdiff.batches import ImageBatch
    from layerdiff.modules import DiffuMattingModule

    module = DiffuMattingModule(base_model=str(tiny_sdxl), lora_rank=4, caption_dropout=0.0,
                                matting_head={"learning_rate": 5e-3, "width": 8})
    batch = ImageBatch(rgb=torch.rand(2, 3, 64, 64), alpha=torch.rand(2, 1, 64, 64), caption=["green background, a"] * 2,
                       key=["a", "b"], original_size=torch.tensor([[64, 64]] * 2),
                       crop_top_left=torch.zeros(2, 2, dtype=torch.int64))
    terms = module.compute_loss(batch, torch.Generator().manual_seed(0))
    terms["matte"].backward()
    unet_gradients = [p.grad for p in module.trained_parameters(("unet",)) if p.grad is not None]
    assert not unet_gradients and all(p.grad is not None for p in module.matting_head.parameters())
    groups = module.parameter_groups()
    assert [group.get("lr") for group in groups] == [None, 5e-3]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in module.matting_head.parameters()}
    assert module.matting_head.config.width == 8 and module.matting_head.config.key_colour == (0.0, 1.0, 0.0)

    without = DiffuMattingModule(base_model=str(tiny_sdxl), lora_rank=4, matting_head={"weight": 0.0})
    assert without.matting_head is None and len(without.parameter_groups()) == 1
    assert "matte" not in without.compute_loss(batch, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"matting_head has no setting \['lr'\]"):
        DiffuMattingModule(base_model=str(tiny_sdxl), matting_head={"lr": 1.0})


# -- keying the green screen -------------------------------------------------------------------


def test_the_chroma_key_unmixes_a_composite_over_green_exactly():
    from layerdiff.keying import backing_purity, chroma_key_alpha, unmix_foreground

    foreground = torch.tensor([0.9, 0.2, 0.4]).reshape(1, 3, 1, 1).expand(1, 3, 2, 3)  # green below red and blue
    alpha = torch.tensor([[0.0, 0.25, 0.5], [0.75, 1.0, 1.0]]).reshape(1, 1, 2, 3)
    green = torch.tensor([0.0, 1.0, 0.0]).reshape(1, 3, 1, 1)
    composite = alpha * foreground + (1 - alpha) * green
    # G - max(R, B) = 0.2 a + (1 - a) - 0.9 a = 1 - 1.7 a, so the key reads 1.7 a, clipped at 1:
    # the plain key is exact only for a foreground whose green equals its larger other channel.
    keyed = chroma_key_alpha(composite)
    torch.testing.assert_close(keyed, (1.7 * alpha).clamp(max=1.0))
    recovered = unmix_foreground(composite, alpha)
    torch.testing.assert_close(recovered[..., alpha[0, 0] > 0], foreground[..., alpha[0, 0] > 0])
    background = alpha < 0.3
    assert backing_purity(composite, background, tolerance=0.1).tolist() == [0.5]  # a = 0 is pure, 0.25 is not
    with pytest.raises(ValueError, match="dominant channel"):
        chroma_key_alpha(composite, key=(0.5, 0.5, 0.5))


# -- train.py fit, then predict: green screens and their cutouts ------------------------------


@pytest.mark.slow
def test_fit_then_predict_through_train_py_writes_green_screens_and_their_cutouts(tiny_sdxl, tmp_path):
    from PIL import Image

    from support.launch import run_train_py
    from support.shards import write_tiny_shards

    train = ",".join(write_tiny_shards(tmp_path / "shards" / "train", 4, sizes=((64, 64),)))
    val = ",".join(write_tiny_shards(tmp_path / "shards" / "val", 2, sizes=((64, 64),)))
    recipe = ["-c", "configs/diffumatting.yaml", "-c", "configs/demo/diffumatting.yaml",
              f"--model.init_args.base_model={tiny_sdxl}", f"--trainer.default_root_dir={tmp_path / 'run'}"]
    run_train_py("fit", *recipe, "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
                 f"--data.init_args.train_shards={train}", f"--data.init_args.val_shards={val}",
                 "--data.init_args.batch_size=2", "--data.init_args.num_workers=0")
    assert list((tmp_path / "run" / "samples").glob("step_*.png"))
    # the head exports on its own, with its shape in the file
    from diffusers import AutoencoderKL

    from layerdiff.formats.matting_head import load_matting_head

    export = subprocess.run([sys.executable, "-m", "layerdiff.export", "matting-head", "--checkpoint",
                             str(tmp_path / "run" / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "export")],
                            capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr
    head = load_matting_head(tmp_path / "export" / "matting_head.safetensors", AutoencoderKL.from_pretrained(tiny_sdxl / "vae"))
    assert head.config.feature_channels == (32, 32, 16, 8)
    run_train_py("predict", *recipe, "-c", "configs/predict_matting.yaml", "-c", "configs/demo/predict_matting.yaml",
                 f"--ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", "--data.init_args.prompts=[a cat]",
                 "--data.init_args.images_per_prompt=2", "--data.init_args.settings.steps=2")
    generated = tmp_path / "run" / "generated"
    cutouts = sorted(generated.glob("*.png"))
    cutouts = [path for path in cutouts if path.name != "contact_sheet.png"]
    assert len(cutouts) == 2 and (generated / "contact_sheet.png").is_file()
    for path in cutouts:
        with Image.open(path) as cutout, Image.open(generated / "screen" / path.name) as screen:
            assert cutout.mode == "RGBA" and screen.mode == "RGB" and cutout.size == screen.size == (64, 64)
            assert cutout.text["prompt"] == "green background, a cat" and cutout.text["matte"] == "matting head + GreenPost"
        assert (generated / "previews" / path.name).is_file() and (generated / "alpha_head" / path.name).is_file()
    # screen/ + alpha/ is a matting data set: the evaluation command reads it as it is
    from layerdiff.formats.matte import read_matte

    assert read_matte(generated / "alpha" / cutouts[0].name).shape == (64, 64)
    result = subprocess.run([sys.executable, "-m", "layerdiff.evaluate", "matting", "--pred", str(generated / "alpha"),
                             "--gt", str(generated / "alpha")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.splitlines()[-1].split()[1:] == ["0.00000"] * 4


def test_a_community_lora_stacks_on_the_green_screen_generator_and_comes_off_again(tiny_sdxl, tmp_path):
    from layerdiff.modules import DiffuMattingModule
    from layerdiff.pipelines import GenerationSettings
    from support.loras import write_community_lora

    lora = write_community_lora(tiny_sdxl, tmp_path)
    module = DiffuMattingModule(base_model=str(tiny_sdxl), lora_rank=4, community_loras=[{"path": str(lora), "weight": 1.0}])
    settings = GenerationSettings(steps=2, guidance_scale=2.0)
    plain = module.image_generator()(["a cat"], [0], settings)[0]
    module.on_predict_start()
    assert list(module.image_generator().community_loras) == ["community_0"]
    styled = module.image_generator()(["a cat"], [0], settings)[0]
    module.on_predict_end()
    again = module.image_generator()(["a cat"], [0], settings)[0]
    assert not torch.equal(styled.extras["screen"], plain.extras["screen"])
    assert torch.equal(again.extras["screen"], plain.extras["screen"])
    assert styled.parameters["loras"] == [{"path": str(lora), "weight": 1.0}] and styled.prompt == "green background, a cat"
