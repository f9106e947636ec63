"""The one place pretrained base models (SDXL, SD1.5, the embedded tiny model) are loaded.

A base model is named by a Hugging Face Hub id, a local folder in the diffusers
``save_pretrained`` layout, or ``embedded:tiny-sdxl`` / ``embedded:tiny-sdxl-pretrained`` /
``embedded:tiny-sdxl-inpaint`` (built on first use).
Every loader goes through ``locate_component`` first, which settles where the files come
from without waiting on a network that is not there: a local folder is checked on disk;
a Hub id is looked up in the Hugging Face cache when offline (``HF_HUB_OFFLINE``) or when
the Hub does not answer a short probe, and downloaded otherwise. Anything that cannot be
found raises ``BaseModelNotFoundError`` saying how to fix it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import transformers
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, SchedulerMixin, UNet2DConditionModel
from huggingface_hub import constants as hub_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.utils import EntryNotFoundError, get_session, validate_repo_id
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from layerdiff.models.tiny import TINY_SDXL_VERSION, build_pretrained_tiny_sdxl, build_tiny_sdxl, pretrained_weights_version
from layerdiff.models.tiny_inpaint import TINY_INPAINT_VERSION, build_tiny_sdxl_inpaint
from layerdiff.paths import EMBEDDED_PREFIX, cache_dir, is_embedded

Architecture = Literal["sdxl", "sd15"]
ModuleT = TypeVar("ModuleT", bound=nn.Module)
Loaded = TypeVar("Loaded")


def _build_tiny_sdxl_inpaint(out_dir: Path) -> Path:
    # The inpainting model copies the parts of the embedded tiny SDXL, built first if need be.
    return build_tiny_sdxl_inpaint(out_dir, ensure_embedded_model("tiny-sdxl"))


# Builders for ``embedded:<name>``; each writes a complete model folder atomically.
EMBEDDED_MODELS: dict[str, Callable[[Path], Path]] = {
    "tiny-sdxl": build_tiny_sdxl,
    "tiny-sdxl-pretrained": build_pretrained_tiny_sdxl,
    "tiny-sdxl-inpaint": _build_tiny_sdxl_inpaint,
}
# Recipe version of each builder (or what computes it), part of its cache folder name: a
# changed recipe or weights file builds a new folder instead of silently reusing the stale one.
EMBEDDED_MODEL_VERSIONS: dict[str, int | str | Callable[[], str]] = {
    "tiny-sdxl": TINY_SDXL_VERSION,
    "tiny-sdxl-pretrained": pretrained_weights_version,
    "tiny-sdxl-inpaint": f"{TINY_SDXL_VERSION}.{TINY_INPAINT_VERSION}",
}
HUB_PROBE_TIMEOUT_S = 3.0

# The file each component folder must hold; its absence means the component is missing.
MODEL_INDEX_FILE = "model_index.json"
MODEL_CONFIG_FILE = "config.json"
SCHEDULER_CONFIG_FILE = "scheduler_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# The released UNets' architectures (diffusers ``UNet2DConditionModel`` arguments beyond the
# defaults), for random-init models of the real shape: key-layout tests and benchmarks.
SDXL_UNET_CONFIG = {
    "sample_size": 128,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),  # read by diffusers as heads per level (64 channels each)
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
SD15_UNET_CONFIG = {
    "sample_size": 64,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "layers_per_block": 2,
    "cross_attention_dim": 768,  # CLIP ViT-L/14's width; diffusers' default 1280 is not SD1.5's
}

# (tokenizer, text encoder) subfolder pairs in pipeline order: SD1.5 has the first, SDXL both.
TEXT_ENCODER_SUBFOLDERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))


class BaseModelNotFoundError(FileNotFoundError):
    """A base model (or one of its components) is neither on disk nor downloadable."""


def resolve_pretrained(name_or_path: str) -> str:
    """Map a base-model name to what ``from_pretrained`` should receive.

    ``embedded:<name>`` becomes its folder in ``cache_dir()``, built on first use; an
    existing local folder stays a folder; anything else is returned unchanged (a Hub id).
    """
    if is_embedded(name_or_path):
        return str(ensure_embedded_model(name_or_path.removeprefix(EMBEDDED_PREFIX)))
    local = Path(name_or_path).expanduser()
    return str(local) if local.is_dir() else name_or_path


def ensure_embedded_model(name: str) -> Path:
    """Return ``cache_dir() / "<name>-v<version>"``, building it if missing.

    Several processes (DDP ranks, SLURM tasks) may race here. Each builds into its own
    staging folder and renames it into place; the losers' renames fail with
    ``FileExistsError`` and they use the winner's folder, which is complete because a
    rename is atomic.
    """
    if name not in EMBEDDED_MODELS:
        known = ", ".join(EMBEDDED_PREFIX + known_name for known_name in EMBEDDED_MODELS)
        raise ValueError(f"Unknown embedded model '{EMBEDDED_PREFIX}{name}'; known: {known}.")
    version = EMBEDDED_MODEL_VERSIONS[name]
    folder = cache_dir() / f"{name}-v{version() if callable(version) else version}"
    if not folder.exists():
        try:
            EMBEDDED_MODELS[name](folder)
        except FileExistsError:
            pass  # lost the race; the winner's folder is complete
    return folder


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hub repository id (``namespace/name``)."""
    try:
        validate_repo_id(name)
    except ValueError:
        return False
    return True


@functools.cache
def hub_reachable(endpoint: str) -> bool:
    """Whether ``endpoint`` answers within ``HUB_PROBE_TIMEOUT_S``, asked once per process.

    Without this, a download attempt with no network retries with back-off for ~30 s per
    file before failing. The probe uses the Hub client's own session, so proxies apply.
    """
    try:
        get_session().head(endpoint, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception:  # any transport failure (DNS, refused, timeout, proxy) means: unreachable
        return False
    return True


def hub_unavailable_reason() -> str | None:
    """Why the Hub cannot be used right now, or ``None`` if downloads may be attempted."""
    if hub_constants.HF_HUB_OFFLINE:
        return "offline mode is on (HF_HUB_OFFLINE)"
    if not hub_reachable(hub_constants.ENDPOINT):
        return f"{hub_constants.ENDPOINT} is unreachable"
    return None


def base_model_not_found(name: str, subfolder: str | None, problem: str) -> BaseModelNotFoundError:
    """The error for ``name``/``subfolder``: what went wrong, then the two ways to fix it."""
    part = f" (subfolder '{subfolder}')" if subfolder else ""
    hub_id = name if is_hub_id(name) else "<hub id>"
    return BaseModelNotFoundError(
        f"Base model '{name}'{part}: {problem}\n"
        "Fix it in one of two ways:\n"
        f"  * download it on a machine with internet, e.g. `hf download {hub_id} --local-dir "
        "/path/to/model`, copy that folder here and point the `base_model` setting at it; or\n"
        f"  * set `base_model: {EMBEDDED_PREFIX}tiny-sdxl` (the embedded tiny model, built locally) to try a "
        "recipe without downloads; every recipe has a demo overlay that does this."
    )


def locate_component(
    pretrained: str,
    subfolder: str | None,
    required_file: str,
    revision: str | None = None,
) -> tuple[str, bool]:
    """Check that ``subfolder/required_file`` of a base model can be had, without hanging.

    Returns ``(source, local_files_only)`` to pass to ``from_pretrained``. Checking a file we
    know must exist also catches loaders that would otherwise silently build an empty
    object (transformers' CLIP tokenizer does, given a folder without vocabulary files).
    """
    source = resolve_pretrained(pretrained)
    relative = f"{subfolder}/{required_file}" if subfolder else required_file
    if Path(source).is_dir():
        if not (Path(source) / relative).is_file():
            present = sorted(child.name for child in Path(source).iterdir() if child.is_dir())
            raise base_model_not_found(
                pretrained,
                subfolder,
                f"the local folder {source} has no '{relative}' (its subfolders: {', '.join(present) or 'none'}); "
                "a diffusers model folder holds one subfolder per component, as written by `save_pretrained`.",
            )
        return source, False
    if not is_hub_id(source):
        raise base_model_not_found(
            pretrained, subfolder, "it is neither an existing local folder nor a Hugging Face Hub id."
        )
    unavailable = hub_unavailable_reason()
    try:
        hf_hub_download(
            source, required_file, subfolder=subfolder, revision=revision, local_files_only=unavailable is not None
        )
    except (OSError, EntryNotFoundError) as error:
        where = f"not in the Hugging Face cache {hub_constants.HF_HUB_CACHE}"
        why = unavailable or str(error).splitlines()[0]
        raise base_model_not_found(
            pretrained,
            subfolder,
            f"could not be found locally (no such folder, {where}) or downloaded ({why}).",
        ) from error
    return source, unavailable is not None


def load_component(
    load: Callable[..., Loaded],
    pretrained: str,
    subfolder: str | None,
    required_file: str,
    revision: str | None = None,
    **kwargs: Any,
) -> Loaded:
    """Call a ``from_pretrained``-style ``load`` on a located component.

    Files other than ``required_file`` (weights, a ``variant``) can still be missing from
    the cache or the Hub; that is reported as ``BaseModelNotFoundError`` too.
    """
    source, local_files_only = locate_component(pretrained, subfolder, required_file, revision)
    try:
        return load(source, subfolder=subfolder, revision=revision, local_files_only=local_files_only, **kwargs)
    except OSError as error:
        if Path(source).is_dir():
            raise
        raise base_model_not_found(
            pretrained, subfolder, f"some files could not be found or downloaded: {error}"
        ) from error


def load_vae(
    pretrained: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: torch.dtype | None = None,
) -> AutoencoderKL:
    """The base model's ``vae`` (the frozen ``E*``/``D*`` of LayerDiffusion sec. 3.1)."""
    return load_component(
        AutoencoderKL.from_pretrained,
        pretrained,
        "vae",
        MODEL_CONFIG_FILE,
        revision,
        variant=variant,
        torch_dtype=torch_dtype,
    )


def load_unet(
    pretrained: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: torch.dtype | None = None,
    subfolder: str | None = "unet",
) -> UNet2DConditionModel:
    """The base model's denoising ``unet`` (``subfolder=None``: ``pretrained`` is a UNet folder)."""
    return load_component(
        UNet2DConditionModel.from_pretrained,
        pretrained,
        subfolder,
        MODEL_CONFIG_FILE,
        revision,
        variant=variant,
        torch_dtype=torch_dtype,
    )


def load_scheduler(
    pretrained: str,
    *,
    revision: str | None = None,
    scheduler_class: type[SchedulerMixin] = DDPMScheduler,
) -> SchedulerMixin:
    """The training noise scheduler, built from the base model's ``scheduler`` config.

    ``DDPMScheduler`` by default, as diffusers' SD/SDXL training scripts do: it keeps the
    beta schedule and prediction type of whatever sampler the checkpoint ships with.
    """
    return load_component(
        scheduler_class.from_pretrained, pretrained, "scheduler", SCHEDULER_CONFIG_FILE, revision
    )


@dataclass(frozen=True)
class TextEncoders:
    """The tokenizers and text encoders of a base model, in pipeline order.

    One pair for SD1.5; two for SDXL (``CLIPTextModel`` then ``CLIPTextModelWithProjection``,
    whose penultimate hidden states are concatenated and whose projection is pooled).
    """

    tokenizers: tuple[PreTrainedTokenizerBase, ...]
    encoders: tuple[PreTrainedModel, ...]


def load_text_encoders(
    pretrained: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: torch.dtype | None = None,
) -> TextEncoders:
    """Every (tokenizer, text encoder) pair that ``model_index.json`` lists, with its classes."""
    model_index = load_component(
        DiffusionPipeline.load_config, pretrained, None, MODEL_INDEX_FILE, revision
    )
    tokenizers, encoders = [], []
    for tokenizer_folder, encoder_folder in TEXT_ENCODER_SUBFOLDERS:
        encoder_entry = model_index.get(encoder_folder) or (None, None)
        if encoder_entry[1] is None:
            continue
        tokenizer_class = getattr(transformers, model_index[tokenizer_folder][1])
        encoder_class = getattr(transformers, encoder_entry[1])
        tokenizers.append(
            load_component(
                tokenizer_class.from_pretrained,
                pretrained,
                tokenizer_folder,
                TOKENIZER_CONFIG_FILE,
                revision,
            )
        )
        encoders.append(
            load_component(
                encoder_class.from_pretrained,
                pretrained,
                encoder_folder,
                MODEL_CONFIG_FILE,
                revision,
                variant=variant,
                dtype=torch_dtype,
            )
        )
    return TextEncoders(tuple(tokenizers), tuple(encoders))


def detect_architecture(
    pretrained: str, *, revision: str | None = None
) -> Architecture:
    """``"sdxl"`` when the UNet takes SDXL's pooled-text + size/crop condition, else ``"sd15"``.

    Reads only the UNet config, so it is cheap. SD2.x also reports ``"sd15"``: it has the
    same single-encoder conditioning interface.
    """
    unet_config = load_component(
        UNet2DConditionModel.load_config, pretrained, "unet", MODEL_CONFIG_FILE, revision
    )
    return unet_architecture(unet_config)


def unet_architecture(unet_config: Mapping[str, Any]) -> Architecture:
    """``"sdxl"`` for a UNet config with SDXL's pooled-text + size/crop condition, else ``"sd15"``."""
    return "sdxl" if unet_config.get("addition_embed_type") == "text_time" else "sd15"


def freeze(module: ModuleT) -> ModuleT:
    """Put a pretrained part in eval mode with gradients off (the frozen VAE, text encoders)."""
    module.eval()
    module.requires_grad_(False)
    return module
