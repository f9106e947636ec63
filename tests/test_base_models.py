"""The embedded tiny SDXL model and the base-model loaders, including the offline errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from huggingface_hub import constants as hub_constants
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from layerdiff.models import base, tiny, tiny_vae
from layerdiff.models.tiny import (
    NUM_TIME_IDS,
    TINY_SDXL_VERSION,
    build_tiny_sdxl,
    byte_level_vocab,
    main,
)
from layerdiff.models.tiny_vae import VAE_SCALING_FACTOR

SDXL_HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"
CAPTION = "an emoji of a grinning face"
UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"
VAE_WEIGHTS = Path("vae") / "diffusion_pytorch_model.safetensors"
CACHE_FOLDER = f"tiny-sdxl-v{TINY_SDXL_VERSION}"


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty ``LAYERDIFF_CACHE`` for this test."""
    monkeypatch.setenv("LAYERDIFF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def quick_vae_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Builds in this test fit the VAE for 2 steps instead of the full recipe (~15 s)."""
    monkeypatch.setattr(tiny, "VAE_FIT_STEPS", 2)


def reconstruct(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)


def psnr(reconstruction: torch.Tensor, images: torch.Tensor) -> float:
    """Mean PSNR over the batch, in dB, of [-1, 1] images measured in the [0, 1] range."""
    mse = ((reconstruction - images) / 2).pow(2).flatten(1).mean(1)
    return (-10 * torch.log10(mse)).mean().item()


def test_sdxl_pipeline_loads_and_denoises(tiny_sdxl: Path) -> None:
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        CAPTION, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images
    assert images.shape == (1, 64, 64, 3)  # the pipeline's default size is unet sample_size * 8
    assert images.min() >= 0 and images.max() <= 1


@pytest.mark.usefixtures("quick_vae_fit")
def test_resolve_builds_the_embedded_model_once(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    builds = []

    def counting_build(out_dir: Path) -> Path:
        builds.append(out_dir)
        return build_tiny_sdxl(out_dir)

    monkeypatch.setitem(base.EMBEDDED_MODELS, "tiny-sdxl", counting_build)
    first = base.resolve_pretrained("embedded:tiny-sdxl")
    built_at = (Path(first) / UNET_WEIGHTS).stat().st_mtime_ns
    second = base.resolve_pretrained("embedded:tiny-sdxl")
    assert first == second == str(cache / CACHE_FOLDER)
    assert builds == [cache / CACHE_FOLDER]
    assert (Path(second) / UNET_WEIGHTS).stat().st_mtime_ns == built_at


def test_a_new_recipe_version_builds_a_new_folder(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    def fake_build(out_dir: Path) -> Path:
        out_dir.mkdir(parents=True)
        return out_dir

    monkeypatch.setitem(base.EMBEDDED_MODELS, "tiny-sdxl", fake_build)
    old = base.resolve_pretrained("embedded:tiny-sdxl")
    monkeypatch.setitem(base.EMBEDDED_MODEL_VERSIONS, "tiny-sdxl", TINY_SDXL_VERSION + 1)
    new = base.resolve_pretrained("embedded:tiny-sdxl")
    assert Path(new) == cache / f"tiny-sdxl-v{TINY_SDXL_VERSION + 1}" and Path(new).is_dir()
    assert sorted(path.name for path in cache.iterdir()) == sorted([Path(old).name, Path(new).name])


@pytest.mark.usefixtures("quick_vae_fit")
def test_resolve_uses_the_winners_folder_after_losing_a_build_race(
    monkeypatch: pytest.MonkeyPatch, cache: Path
) -> None:
    def build_after_another_rank(out_dir: Path) -> Path:
        build_tiny_sdxl(out_dir, seed=1)  # another process renames its build into place first
        return build_tiny_sdxl(out_dir)

    monkeypatch.setitem(base.EMBEDDED_MODELS, "tiny-sdxl", build_after_another_rank)
    folder = Path(base.resolve_pretrained("embedded:tiny-sdxl"))
    assert (folder / "model_index.json").is_file()
    assert [path.name for path in cache.iterdir()] == [CACHE_FOLDER]  # the loser's staging folder is gone


def test_build_refuses_an_existing_folder(tiny_sdxl: Path) -> None:
    with pytest.raises(FileExistsError):
        build_tiny_sdxl(tiny_sdxl)


def test_unknown_embedded_model_is_rejected(cache: Path) -> None:
    with pytest.raises(ValueError, match="embedded:tiny-sdxl"):
        base.resolve_pretrained("embedded:huge-sdxl")


def test_local_folders_and_hub_ids_resolve_to_themselves(tiny_sdxl: Path) -> None:
    assert base.resolve_pretrained(str(tiny_sdxl)) == str(tiny_sdxl)
    assert base.resolve_pretrained(SDXL_HUB_ID) == SDXL_HUB_ID


@pytest.mark.usefixtures("quick_vae_fit")
def test_build_is_deterministic_per_seed_and_keeps_the_global_rng(tiny_sdxl: Path, tmp_path: Path) -> None:
    rng_before = torch.get_rng_state()
    threads_before = torch.get_num_threads()
    first, again, other = (
        build_tiny_sdxl(tmp_path / name, seed=seed) for name, seed in (("a", 0), ("b", 0), ("c", 1))
    )
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.get_num_threads() == threads_before
    unet, vae = load_file(first / UNET_WEIGHTS), load_file(first / VAE_WEIGHTS)
    for weights, reference in ((UNET_WEIGHTS, unet), (VAE_WEIGHTS, vae)):  # the VAE fit included (2 steps)
        same_seed = load_file(again / weights)
        assert all(torch.equal(reference[key], same_seed[key]) for key in reference)
    # The UNet does not depend on the VAE recipe: the full build has the same one.
    full_build = load_file(tiny_sdxl / UNET_WEIGHTS)
    assert all(torch.equal(full_build[key], unet[key]) for key in full_build)
    assert not torch.equal(unet["conv_in.weight"], load_file(other / UNET_WEIGHTS)["conv_in.weight"])
    assert not torch.equal(vae["decoder.conv_out.weight"], load_file(other / VAE_WEIGHTS)["decoder.conv_out.weight"])


@pytest.mark.usefixtures("quick_vae_fit")
def test_command_line_entry_builds_the_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "argv", ["layerdiff.models.tiny", str(tmp_path / "cli"), "--seed", "3"])
    main()
    assert (tmp_path / "cli" / "model_index.json").is_file()


def test_loaders_return_the_sdxl_components(tiny_sdxl: Path) -> None:
    pretrained = str(tiny_sdxl)
    vae = base.load_vae(pretrained)
    unet = base.load_unet(pretrained)
    scheduler = base.load_scheduler(pretrained)
    text = base.load_text_encoders(pretrained)

    assert isinstance(vae, AutoencoderKL) and isinstance(unet, UNet2DConditionModel)
    assert isinstance(scheduler, DDPMScheduler)
    assert scheduler.config.beta_schedule == "scaled_linear" and not scheduler.config.clip_sample
    assert all(isinstance(tokenizer, CLIPTokenizer) for tokenizer in text.tokenizers)
    assert [type(encoder) for encoder in text.encoders] == [CLIPTextModel, CLIPTextModelWithProjection]
    assert base.detect_architecture(pretrained) == "sdxl"

    # SDXL's wiring: cross-attention sees both encoders' hidden states side by side, and the
    # added condition is the pooled projection plus the embedded size/crop ids.
    first, second = (encoder.config for encoder in text.encoders)
    assert unet.config.cross_attention_dim == first.hidden_size + second.hidden_size
    assert unet.config.projection_class_embeddings_input_dim == (
        NUM_TIME_IDS * unet.config.addition_time_embed_dim + second.projection_dim
    )


def test_loaders_apply_the_requested_dtype(tiny_sdxl: Path) -> None:
    assert base.load_unet(str(tiny_sdxl), torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    encoders = base.load_text_encoders(str(tiny_sdxl), torch_dtype=torch.bfloat16).encoders
    assert {encoder.dtype for encoder in encoders} == {torch.bfloat16}


def test_single_encoder_model_is_detected_as_sd15(tiny_sdxl: Path, tmp_path: Path) -> None:
    sd15 = tmp_path / "sd15-shaped"
    for component in ("tokenizer", "text_encoder", "unet"):
        shutil.copytree(tiny_sdxl / component, sd15 / component)
    model_index = json.loads((tiny_sdxl / "model_index.json").read_text())
    model_index.update(_class_name="StableDiffusionPipeline", tokenizer_2=[None, None], text_encoder_2=[None, None])
    (sd15 / "model_index.json").write_text(json.dumps(model_index))
    unet_config = json.loads((sd15 / "unet" / "config.json").read_text())
    unet_config["addition_embed_type"] = None
    (sd15 / "unet" / "config.json").write_text(json.dumps(unet_config))

    assert base.detect_architecture(str(sd15)) == "sd15"
    text = base.load_text_encoders(str(sd15))
    assert len(text.tokenizers) == len(text.encoders) == 1
    assert isinstance(text.encoders[0], CLIPTextModel)


def test_unet_attention_carries_the_lora_target_names(tiny_sdxl: Path) -> None:
    names = {name for name, _ in base.load_unet(str(tiny_sdxl)).named_modules()}
    for attention in ("attn1", "attn2"):
        for projection in ("to_q", "to_k", "to_v", "to_out.0"):
            assert any(name.endswith(f"{attention}.{projection}") for name in names)


def test_vae_downsamples_by_8_with_the_sdxl_scaling_factor(tiny_sdxl: Path) -> None:
    vae = base.load_vae(str(tiny_sdxl))
    assert vae.config.scaling_factor == VAE_SCALING_FACTOR == 0.13025
    with torch.no_grad():
        latents = vae.encode(torch.zeros(2, 3, 64, 64)).latent_dist.mode()
        decoded = vae.decode(latents).sample
    assert latents.shape == (2, 4, 8, 8) and decoded.shape == (2, 3, 64, 64)


def test_vae_reconstructs_crops_of_a_photo_it_was_not_fitted_on(tiny_sdxl: Path) -> None:
    vae = base.load_vae(str(tiny_sdxl))
    photo = tiny_vae.load_photo(tiny_vae.VAE_HELD_OUT_PHOTO)
    assert tiny_vae.VAE_HELD_OUT_PHOTO not in tiny_vae.VAE_FIT_PHOTOS
    generator = torch.Generator().manual_seed(0)
    crops = torch.stack([tiny_vae.random_crop(photo, generator) for _ in range(16)])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        start = tiny_vae.init_vae_as_area_codec(tiny_vae.make_vae())
    fitted = psnr(reconstruct(vae, crops), crops)
    # ~18.0 dB here; 8x area-average + bilinear upsampling: 17.5 dB; the random VAE: 10.8 dB.
    assert fitted >= 17.0
    assert fitted >= psnr(reconstruct(start, crops), crops) + 0.3  # the fit improved on its start
    with torch.no_grad():
        latents = vae.encode(crops).latent_dist.mode() * vae.config.scaling_factor
    assert 0.5 < latents.std().item() < 2.0  # SDXL's scaling factor makes the latents about unit-scale


@pytest.mark.parametrize("colour", [(1.0, 0.85, 0.1), (0.85, 0.15, 0.15), (0.2, 0.4, 0.9)])
def test_frozen_vae_decode_keeps_the_colour_of_a_premultiplied_emoji(
    tiny_sdxl: Path, colour: tuple[float, float, float]
) -> None:
    # A face emoji premultiplied onto 50 % grey, as LayerDiffusion's frozen decoder sees it.
    centre = torch.arange(64) + 0.5 - 32
    y, x = torch.meshgrid(centre, centre, indexing="ij")
    radius = torch.sqrt(x**2 + y**2)
    alpha = (22 - radius).clamp(0, 1)
    rgb = torch.tensor(colour).view(3, 1, 1).repeat(1, 64, 64)
    rgb[:, (torch.sqrt((x.abs() - 7) ** 2 + (y + 5) ** 2) < 3)] = 0.1  # eyes
    image = (rgb * 2 - 1) * alpha
    decoded = (reconstruct(base.load_vae(str(tiny_sdxl)), image[None])[0] + 1) / 2
    lower_face = (radius < 18) & (y > 2)
    assert torch.allclose(decoded[:, lower_face].mean(1), torch.tensor(colour), atol=0.08)
    assert torch.allclose(decoded[:, radius > 28].mean(1), torch.full((3,), 0.5), atol=0.04)


def test_tokenizers_use_the_generated_vocabulary(tiny_sdxl: Path) -> None:
    vocab = byte_level_vocab()
    tokenizers = base.load_text_encoders(str(tiny_sdxl)).tokenizers
    for folder, tokenizer in zip(("tokenizer", "tokenizer_2"), tokenizers):
        assert json.loads((tiny_sdxl / folder / "vocab.json").read_text(encoding="utf-8")) == vocab
        assert (tiny_sdxl / folder / "merges.txt").read_text().startswith("#version")
        ids = tokenizer(CAPTION, padding="max_length", max_length=tokenizer.model_max_length).input_ids
        assert len(ids) == 77
        # No merges: one id per character; spaces only mark the previous one as word-final.
        length = len(CAPTION.replace(" ", ""))
        assert ids[0] == vocab["<|startoftext|>"] and ids[length + 1] == vocab["<|endoftext|>"]
        assert len(set(ids[1 : length + 1])) > 10
        assert ids[length + 2 :] == [tokenizer.pad_token_id] * (76 - length - 1)
        assert tokenizer.decode(ids, skip_special_tokens=True) == CAPTION
    # SDXL pads the first tokenizer with end-of-text and the second with "!".
    assert [tokenizer.pad_token for tokenizer in tokenizers] == ["<|endoftext|>", "!"]


def test_freeze_turns_off_training_and_gradients() -> None:
    module = base.freeze(torch.nn.Linear(2, 2))
    assert not module.training
    assert not any(parameter.requires_grad for parameter in module.parameters())


def test_missing_local_component_names_the_folder_and_file(tiny_sdxl: Path, tmp_path: Path) -> None:
    without_vae = tmp_path / "no-vae"
    shutil.copytree(tiny_sdxl, without_vae, ignore=shutil.ignore_patterns("vae"))
    with pytest.raises(base.BaseModelNotFoundError, match=r"no 'vae/config\.json'") as raised:
        base.load_vae(str(without_vae))
    assert str(without_vae) in str(raised.value)


def test_missing_local_path_is_not_mistaken_for_a_hub_id(tmp_path: Path) -> None:
    with pytest.raises(base.BaseModelNotFoundError, match="neither an existing local folder nor"):
        base.load_unet(str(tmp_path / "does" / "not" / "exist"))


def test_hub_model_in_the_cache_loads_offline(
    tiny_sdxl: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Downloaded on a login node, trained on an offline compute node: the Hub cache layout.
    commit = "0" * 40
    repository = tmp_path / "hub-cache" / "models--layerdiff-tests--tiny-sdxl"
    shutil.copytree(tiny_sdxl, repository / "snapshots" / commit)
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    assert base.detect_architecture("layerdiff-tests/tiny-sdxl") == "sdxl"
    assert isinstance(base.load_vae("layerdiff-tests/tiny-sdxl"), AutoencoderKL)
    assert len(base.load_text_encoders("layerdiff-tests/tiny-sdxl").encoders) == 2


def test_missing_hub_model_fails_fast_when_the_hub_is_unreachable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # No HF_HUB_OFFLINE: the loader must notice by itself that there is no network here
    # instead of retrying for half a minute. The id does not exist, so a machine that does
    # have internet fails fast too, without downloading anything.
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    base.hub_reachable.cache_clear()
    start = time.perf_counter()
    with pytest.raises(base.BaseModelNotFoundError) as raised:
        base.load_vae("layerdiff-tests/no-such-model")
    assert time.perf_counter() - start < 10
    message = str(raised.value)
    assert "layerdiff-tests/no-such-model" in message and "subfolder 'vae'" in message
    assert "set `base_model: embedded:tiny-sdxl`" in message


def test_missing_hub_model_in_offline_mode(tmp_path: Path) -> None:
    # A fresh interpreter, because the Hub client reads HF_HUB_OFFLINE and its cache
    # location once at import, exactly as on an offline training node.
    probe = (
        "import time\n"
        "from layerdiff.models.base import BaseModelNotFoundError, load_vae\n"
        "start = time.perf_counter()\n"
        "try:\n"
        f"    load_vae({SDXL_HUB_ID!r})\n"
        "except BaseModelNotFoundError as error:\n"
        "    print(f'{time.perf_counter() - start:.3f}')\n"
        "    print(error)\n"
    )
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    result = subprocess.run(
        [sys.executable, "-c", probe], env=environment, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    seconds, message = result.stdout.split("\n", 1)
    assert float(seconds) < 10
    assert f"Base model '{SDXL_HUB_ID}' (subfolder 'vae')" in message
    assert "could not be found locally" in message and "or downloaded" in message
    assert "offline mode is on" in message
    assert "set `base_model: embedded:tiny-sdxl`" in message


def test_sd15_unet_config_has_sd15s_cross_attention_width():
    from diffusers import UNet2DConditionModel

    from layerdiff.models.base import SD15_UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SD15_UNET_CONFIG)
    weight = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight
    assert tuple(weight.shape) == (320, 768)
