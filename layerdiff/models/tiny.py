"""The embedded tiny SDXL-shaped model: real SDXL layout, built offline, VAE fitted briefly.

Tests and the demo run without a model hub, yet every code path must be exercised the way
it runs on ``stabilityai/stable-diffusion-xl-base-1.0``. So we build a model with SDXL's
*structure* (two CLIP text encoders whose hidden states are concatenated for cross-attention,
a pooled projection plus six size/crop ids as the ``text_time`` added condition, a VAE that
downsamples by 8 with SDXL's scaling factor, SDXL's Euler scheduler config) but tiny widths,
and save it in the exact ``save_pretrained`` layout so it loads through the same
``from_pretrained`` calls as the real checkpoint.

Two variants. ``embedded:tiny-sdxl`` (tests): the UNet and the text encoders keep random
weights; the VAE is fitted for a few seconds so that its decoder turns latents back into images
(``layerdiff.models.tiny_vae``). ``embedded:tiny-sdxl-pretrained`` (the demo): the same build
with a VAE and UNet pretrained on RGB images, from the weights file committed beside this
module (``data.pretrain_base`` writes it), so the demo fine-tunes a model that already
generates images, as the method fine-tunes SDXL.

The tokenizer files are generated here, not downloaded: a byte-level CLIP BPE vocabulary
(the 256 byte-unicode symbols, each also as a word-final ``</w>`` symbol, then the two
special tokens) with no merges, so any caption tokenizes to one id per character.
"""

from __future__ import annotations

import argparse
import errno
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from layerdiff.models.tiny_vae import VAE_FIT_STEPS, VAE_IMAGE_SIZE, fit_tiny_vae, init_vae_as_area_codec, make_vae

# Part of the cache folder name (``cache_dir()/tiny-sdxl-v<N>``): bump it whenever the recipe
# below changes what gets built, so existing caches are rebuilt instead of silently reused.
TINY_SDXL_VERSION = 2

# The pretrained variant (``embedded:tiny-sdxl-pretrained``): this build with the VAE and UNet
# weights of ``python -m data pretrain-base`` (committed beside this file; recipe in its metadata).
PRETRAINED_WEIGHTS = Path(__file__).with_name("tiny_sdxl_pretrained.safetensors")
PRETRAINED_FORMAT = "layerdiff.tiny-sdxl-pretrained/1"
PRETRAINED_PARTS = ("vae", "unet")

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MAX_TOKENS = 77

# SDXL pads its second tokenizer with "!" and its first with the end-of-text token.
TOKENIZER_PAD_TOKENS = {"tokenizer": EOS_TOKEN, "tokenizer_2": "!"}

TEXT_ENCODER_HIDDEN_SIZE = 32
TEXT_ENCODER_2_HIDDEN_SIZE = 64
POOLED_PROJECTION_DIM = 32
TIME_ID_EMBED_DIM = 8
# The pipeline's add_time_ids: original size (h, w), crop top-left (y, x), target size (h, w).
NUM_TIME_IDS = 6
UNET_SAMPLE_SIZE = VAE_IMAGE_SIZE // 8  # latent side at the pipeline's default resolution



def byte_level_vocab() -> dict[str, int]:
    """CLIP's vocabulary order without merges: bytes, word-final bytes, then specials."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [symbol + END_OF_WORD for symbol in symbols] + [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def write_tokenizer_files(folder: Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` in CLIP's format (merges keep only the header)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(byte_level_vocab(), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def make_tokenizer(folder: Path, pad_token: str) -> CLIPTokenizer:
    """Generate the vocabulary files into ``folder`` and load a ``CLIPTokenizer`` from them."""
    write_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(folder, pad_token=pad_token, model_max_length=MAX_TOKENS)


def text_encoder_config(hidden_size: int, hidden_act: str, pad_token_id: int) -> CLIPTextConfig:
    """A two-layer CLIP text transformer over the byte-level vocabulary.

    Two layers because SDXL conditions on the penultimate hidden state.
    """
    vocab = byte_level_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=hidden_size // 16,
        max_position_embeddings=MAX_TOKENS,
        hidden_act=hidden_act,
        projection_dim=POOLED_PROJECTION_DIM,
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=pad_token_id,
    )


def make_unet() -> UNet2DConditionModel:
    """SDXL's UNet structure with two levels instead of three and tiny widths."""
    return UNet2DConditionModel(
        sample_size=UNET_SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        norm_num_groups=8,
        # diffusers reads this as the number of heads (SDXL: [5, 10, 20]).
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        cross_attention_dim=TEXT_ENCODER_HIDDEN_SIZE + TEXT_ENCODER_2_HIDDEN_SIZE,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_ID_EMBED_DIM,
        projection_class_embeddings_input_dim=NUM_TIME_IDS * TIME_ID_EMBED_DIM + POOLED_PROJECTION_DIM,
    )


def make_scheduler() -> EulerDiscreteScheduler:
    """SDXL base's scheduler config, including the keys Euler ignores.

    SDXL's ``scheduler_config.json`` also carries DDPM/DDIM/PNDM settings; training builds a
    ``DDPMScheduler`` from this file, which must then not clip samples, as with real SDXL.
    """
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
    )
    scheduler.register_to_config(clip_sample=False, sample_max_value=1.0, set_alpha_to_one=False, skip_prk_steps=True)
    return scheduler


def assemble_tiny_sdxl(tokenizer_root: Path, seed: int) -> StableDiffusionXLPipeline:
    """Build every component; weights depend only on ``seed`` and each component's shape.

    Each random component restarts the generator from ``seed`` so resizing one of them does
    not change the others' weights; the caller's global RNG state is left untouched. The VAE
    then starts as an area codec and is fitted (:func:`fit_tiny_vae`, a few seconds).
    """
    tokenizers = {name: make_tokenizer(tokenizer_root / name, pad) for name, pad in TOKENIZER_PAD_TOKENS.items()}
    pad_ids = {name: tokenizer.pad_token_id for name, tokenizer in tokenizers.items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            text_encoder_config(TEXT_ENCODER_HIDDEN_SIZE, "quick_gelu", pad_ids["tokenizer"])
        )
        torch.manual_seed(seed)
        text_encoder_2 = CLIPTextModelWithProjection(
            text_encoder_config(TEXT_ENCODER_2_HIDDEN_SIZE, "gelu", pad_ids["tokenizer_2"])
        )
        torch.manual_seed(seed)
        unet = make_unet()
        torch.manual_seed(seed)
        vae = make_vae()
    fit_tiny_vae(init_vae_as_area_codec(vae), steps=VAE_FIT_STEPS, seed=seed)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizers["tokenizer"],
        tokenizer_2=tokenizers["tokenizer_2"],
        unet=unet,
        scheduler=make_scheduler(),
        add_watermarker=False,
    )


def pretrained_weights_version(path: Path = PRETRAINED_WEIGHTS) -> str:
    """The build version and a digest of the weights file: the cache folder of the pretrained
    model changes whenever either does."""
    if not path.is_file():
        return f"{TINY_SDXL_VERSION}-missing"
    stat = path.stat()
    return f"{TINY_SDXL_VERSION}-{_file_digest(path, stat.st_size, stat.st_mtime_ns)}"


@functools.cache
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:
    # Keyed by size and modification time too, so a file rewritten in this process is hashed again.
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def load_pretrained_weights(pipeline: StableDiffusionXLPipeline, path: Path = PRETRAINED_WEIGHTS) -> None:
    """Load the pretrained VAE and UNet (fp16 in the file) into ``pipeline``, strictly."""
    if not path.is_file():
        raise FileNotFoundError(
            f"the pretrained tiny model's weights {path} are missing: they are part of the repository "
            "(restore them with `git checkout -- layerdiff/models/tiny_sdxl_pretrained.safetensors`), or "
            f"rebuild them with `python -m data pretrain-base {path}`"
        )
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != PRETRAINED_FORMAT:
            raise ValueError(f"{path} is not a {PRETRAINED_FORMAT} file (its format is {metadata.get('format')!r}); "
                             f"rebuild it with `python -m data pretrain-base {path}`")
        state = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (safe_open has no iterator)
    for part in PRETRAINED_PARTS:
        module = getattr(pipeline, part)
        prefix = f"{part}."
        weights = {name[len(prefix):]: value.float() for name, value in state.items() if name.startswith(prefix)}
        module.load_state_dict(weights, strict=True)


def build_tiny_sdxl(out_dir: Path, seed: int = 0, pretrained: bool = False) -> Path:
    """Write the tiny SDXL model to ``out_dir`` atomically and return ``out_dir``; ``pretrained``
    loads the committed pretrained VAE and UNet (``load_pretrained_weights``, seed 0 only: the
    UNet was trained against seed 0's text encoders).

    The model is saved into a hidden staging folder beside ``out_dir`` and renamed into
    place, so ``out_dir`` either does not exist or is complete, even if the build is killed.
    Raises ``FileExistsError`` if ``out_dir`` already exists, including when another
    process renamed its own build into place first; that folder is then complete.
    """
    out_dir = Path(out_dir)
    if pretrained and seed != 0:
        raise ValueError(f"the pretrained tiny model is built with seed 0 (its text encoders'), not {seed}")
    if out_dir.exists():
        raise FileExistsError(errno.EEXIST, "model folder already exists", str(out_dir))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        # The tokenizers load from the vocabulary files we generate into the staging
        # folder; saving the pipeline then adds their configs beside those files.
        pipeline = assemble_tiny_sdxl(tokenizer_root=staging, seed=seed)
        if pretrained:
            load_pretrained_weights(pipeline)
        pipeline.save_pretrained(staging)
        try:
            os.rename(staging, out_dir)
        except OSError as error:
            if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise FileExistsError(errno.EEXIST, "model folder appeared during the build", str(out_dir)) from error
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def build_pretrained_tiny_sdxl(out_dir: Path) -> Path:
    """``embedded:tiny-sdxl-pretrained``: ``build_tiny_sdxl`` with the committed pretrained weights."""
    return build_tiny_sdxl(out_dir, pretrained=True)


def main() -> None:
    """``python -m layerdiff.models.tiny OUT_DIR [--seed N]``."""
    parser = argparse.ArgumentParser(description=build_tiny_sdxl.__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to create (must not exist)")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    args = parser.parse_args()
    start = time.perf_counter()
    build_tiny_sdxl(args.out_dir, seed=args.seed)
    print(f"tiny SDXL model written to {args.out_dir} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
