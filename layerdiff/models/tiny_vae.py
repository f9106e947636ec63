"""The embedded tiny model's VAE: SDXL's layout at CPU widths, started as an 8x area-average
codec and fitted for a few seconds on crops of the photos bundled with scikit-image (some
premultiplied onto grey by soft masks, as the foregrounds this project encodes).

LayerDiffusion trains its transparency decoder on top of the frozen VAE decoder, which is
only meaningful if that decoder turns latents back into images. This one is blurry (8x8x4
latents for 64 px images) but keeps colours.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

VAE_SCALING_FACTOR = 0.13025  # SDXL's; SD1.5 uses 0.18215
VAE_BLOCK_OUT_CHANNELS = (8, 16, 32, 32)
# One group, so the decoder's 8-wide output level normalises all its channels together,
# which the area-codec start needs (see init_vae_as_area_codec).
VAE_NORM_GROUPS = 1
VAE_IMAGE_SIZE = 64  # the tiny pipeline's default resolution: 8 x 8 latents

# The fit (fit_tiny_vae): ~17 s on one CPU core.
VAE_FIT_STEPS = 160
VAE_FIT_BATCH_SIZE = 16
VAE_FIT_LR = 1e-3
VAE_FIT_WARMUP_STEPS = 10
VAE_KL_WEIGHT = 1e-6  # SD's, relative to the summed (not averaged) reconstruction error
VAE_FIT_MASKED_FRACTION = 1 / 3
VAE_LATENT_SCALE_SAMPLES = 128  # crops that set the latent scale after the fit
# One thread: the fit is a long chain of small ops, which two threads do not speed up here,
# and a single thread keeps the weights identical on any machine with the same CPU.
VAE_FIT_THREADS = 1
# Photos bundled with scikit-image (no pooch download). ``cat`` is ``chelsea`` again.
VAE_FIT_PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
    "colorwheel", "camera", "coins", "moon", "brick", "grass", "gravel", "text", "page", "clock", "cell",
)  # fmt: skip
# Never fitted on: tests measure held-out reconstruction on its (left) view.
VAE_HELD_OUT_PHOTO = "stereo_motorcycle"
PHOTO_MAX_SHORT_SIDE = 512


def make_vae() -> AutoencoderKL:
    """Four encoder/decoder levels (three 2x resamplings: factor 8), narrow enough for CPU."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=VAE_BLOCK_OUT_CHANNELS,
        layers_per_block=1,
        norm_num_groups=VAE_NORM_GROUPS,
        latent_channels=4,
        sample_size=VAE_IMAGE_SIZE,
        scaling_factor=VAE_SCALING_FACTOR,
    )


# The area-codec start: channels 0-5 of every level carry (r, g, b, -r, -g, -b); channels 6
# and 7 carry a constant (+K, -K) into the two output GroupNorms.
_SIGNAL_CHANNELS = 6
_NORM_PIN = 20.0
_START_LOGVAR = -10.0


@torch.no_grad()
def init_vae_as_area_codec(vae: AutoencoderKL) -> AutoencoderKL:
    """Turn a freshly built VAE into an 8x area-average codec, so a brief fit only refines it.

    Fitted from random weights, the tiny VAE needs thousands of steps to keep colours; from
    this start, latents 0-2 are the 8x8 means of r, g, b and the decoder repeats them
    (smoothing the last 2x step), about as good as bilinear 8x resampling before any step.

    * Residual branches start at zero (each ``ResnetBlock2D``'s ``conv2``, each attention's
      output projection), so every block is an identity or its 1x1 shortcut, which copies the
      signal channels. The convs the branches start with stay random, so they learn at once.
    * The stride-2 downsampling convs average 2x2 pixels; the upsampling convs (after
      nearest-neighbour doubling) copy, the last one with a [1, 2, 1]/4 bilinear filter.
    * The encoder's and decoder's output ``GroupNorm`` + SiLU cannot be bypassed, so the signal
      crosses them as +/- pairs: the pairs make the group mean exactly 0; a constant (+K, -K)
      pair, the bias of the zero residual branch before the norm, pins the group's std to
      ~K sqrt(2 / group size) whatever the image (within 0.4 %); and the next conv reads
      silu(x) - silu(-x) = x. The fourth latent channel starts as a random projection.
    * The posterior starts nearly deterministic (log-variance ``_START_LOGVAR``).
    """
    group = vae.decoder.conv_norm_out.num_channels // vae.decoder.conv_norm_out.num_groups
    if group < _SIGNAL_CHANNELS + 2 or vae.config.latent_channels < 4:
        raise ValueError("the area-codec start needs >= 8 channels per norm group and >= 4 latent channels")
    for module in vae.modules():
        if isinstance(module, ResnetBlock2D):
            _zero_(module.conv2)
            if module.conv_shortcut is not None:
                _copy_signal_(module.conv_shortcut)
        elif isinstance(module, Attention):
            _zero_(module.to_out[0])
    encoder, decoder = vae.encoder, vae.decoder
    box = torch.zeros(3, 3)
    box[:2, :2] = 0.25  # Downsample2D pads right/bottom, so taps (0..1, 0..1) are the 2x2 block
    for block in encoder.down_blocks:
        for downsampler in block.downsamplers or ():
            _copy_signal_(downsampler.conv, taps=box)
    upsamplers = [upsampler for block in decoder.up_blocks for upsampler in block.upsamplers or ()]
    for upsampler in upsamplers[:-1]:
        _copy_signal_(upsampler.conv)
    _copy_signal_(upsamplers[-1].conv, taps=torch.outer(*[torch.tensor([0.25, 0.5, 0.25])] * 2))

    for conv_in in (encoder.conv_in, decoder.conv_in):  # rgb (or latents 0-2) -> +/- pairs
        _zero_(conv_in)
        for colour in range(3):
            conv_in.weight[colour, colour, 1, 1] = 1.0
            conv_in.weight[colour + 3, colour, 1, 1] = -1.0
    for last_branch, norm in (
        (encoder.mid_block.resnets[-1].conv2, encoder.conv_norm_out),
        (decoder.up_blocks[-1].resnets[-1].conv2, decoder.conv_norm_out),
    ):
        last_branch.bias[_SIGNAL_CHANNELS : _SIGNAL_CHANNELS + 2] = torch.tensor([_NORM_PIN, -_NORM_PIN])
        group = norm.num_channels // norm.num_groups
        norm.weight[:_SIGNAL_CHANNELS] = _NORM_PIN * math.sqrt(2 / group)
        norm.bias[:_SIGNAL_CHANNELS] = 0.0
    latent_channels = vae.config.latent_channels
    # The encoder's rows for latents 3.. keep their random weights; its log-variance rows start at 0.
    for rows in (slice(0, 3), slice(latent_channels, 2 * latent_channels)):
        encoder.conv_out.weight[rows] = 0.0
        encoder.conv_out.bias[rows] = 0.0
    _zero_(decoder.conv_out)
    for conv_out in (encoder.conv_out, decoder.conv_out):  # silu(x) - silu(-x) = x
        for colour in range(3):
            conv_out.weight[colour, colour, 1, 1] = 1.0
            conv_out.weight[colour, colour + 3, 1, 1] = -1.0
    _copy_signal_(vae.quant_conv, channels=2 * latent_channels)
    vae.quant_conv.bias[latent_channels:] = _START_LOGVAR
    _copy_signal_(vae.post_quant_conv, channels=latent_channels)
    return vae


def _zero_(conv: nn.Conv2d | nn.Linear) -> None:
    conv.weight.zero_()
    conv.bias.zero_()


def _copy_signal_(conv: nn.Conv2d, taps: torch.Tensor | None = None, channels: int = _SIGNAL_CHANNELS) -> None:
    """Make ``conv`` apply ``taps`` (default: identity) to each of its first ``channels`` channels."""
    _zero_(conv)
    if taps is None:
        taps = torch.zeros(conv.kernel_size)
        taps[conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = 1.0
    for channel in range(channels):
        conv.weight[channel, channel] = taps


def load_photo(name: str, max_short_side: int = PHOTO_MAX_SHORT_SIDE) -> torch.Tensor:
    """A ``skimage.data`` photo as a float ``(3, H, W)`` tensor in [-1, 1], area-shrunk if large.

    Grey photos are repeated into three channels; for stereo pairs the left view is used.
    """
    import skimage.data  # slow to import; only the build needs it

    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):
        image = image[0]
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    photo = torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1).float() / 127.5 - 1.0
    height, width = photo.shape[-2:]
    scale = max_short_side / min(height, width)
    if scale < 1:
        size = (round(height * scale), round(width * scale))
        photo = F.interpolate(photo[None], size=size, mode="area")[0]
    return photo


def load_photos(names: Sequence[str]) -> list[torch.Tensor]:
    """The photos of ``names`` that load offline; the others are skipped with a warning."""
    photos = []
    for name in names:
        try:
            photos.append(load_photo(name))
        except (ImportError, OSError, ValueError) as error:  # e.g. needs pooch to download
            warnings.warn(f"skimage.data.{name} is not available offline ({error}); the VAE fit skips it", stacklevel=2)
    if not photos:
        raise RuntimeError(f"none of the scikit-image photos {list(names)} could be loaded")
    return photos


def random_crop(photo: torch.Tensor, generator: torch.Generator, size: int = VAE_IMAGE_SIZE) -> torch.Tensor:
    """A random square crop of ``photo``, area-resized to ``size`` px and randomly flipped.

    The crop side is log-uniform from ``size`` px to the photo's short side, so fine detail
    and whole-photo views are equally likely.
    """
    height, width = photo.shape[-2:]
    short = min(height, width)
    low = math.log(min(size, short))
    side = round(math.exp(low + (math.log(short) - low) * _uniform(generator)))
    top = int(torch.randint(height - side + 1, (), generator=generator))
    left = int(torch.randint(width - side + 1, (), generator=generator))
    crop = photo[None, :, top : top + side, left : left + side]
    if side != size:
        crop = F.interpolate(crop, size=(size, size), mode="area")
    flips = [dim for dim in (-1, -2) if _uniform(generator) < 0.5]
    return crop[0].flip(flips) if flips else crop[0]


def soft_mask(generator: torch.Generator, size: int = VAE_IMAGE_SIZE) -> torch.Tensor:
    """A random ``(size, size)`` alpha in [0, 1], like that of a sticker, emoji or soft object.

    The union of one to three rotated ellipses with a soft edge of random width.
    """
    axis = torch.linspace(-1.0, 1.0, size)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    distance = torch.full((size, size), math.inf)
    for _ in range(int(torch.randint(1, 4, (), generator=generator))):
        centre_y, centre_x = (_uniform(generator) - 0.5 for _ in range(2))
        radius_y, radius_x = (0.15 + 0.55 * _uniform(generator) for _ in range(2))
        angle = math.pi * _uniform(generator)
        u = (x - centre_x) * math.cos(angle) + (y - centre_y) * math.sin(angle)
        v = (y - centre_y) * math.cos(angle) - (x - centre_x) * math.sin(angle)
        distance = torch.minimum(distance, torch.sqrt((u / radius_x) ** 2 + (v / radius_y) ** 2))
    softness = 0.02 + 0.38 * _uniform(generator)  # edge width, in ellipse radii
    return ((1.0 - distance) / softness + 0.5).clamp(0.0, 1.0)


def sample_vae_batch(
    photos: Sequence[torch.Tensor],
    batch_size: int,
    generator: torch.Generator,
    masked_fraction: float = VAE_FIT_MASKED_FRACTION,
    size: int = VAE_IMAGE_SIZE,
    extra_images: torch.Tensor | None = None,
    extra_fraction: float = 0.0,
) -> torch.Tensor:
    """A batch of random crops in [-1, 1] (:func:`random_crop` of a random photo).

    ``masked_fraction`` of them are premultiplied onto 50 % grey by a :func:`soft_mask`
    (``(rgb * 2 - 1) * alpha``), as the foregrounds LayerDiffusion encodes. With
    ``extra_images`` (``[N, 3, size, size]`` in [-1, 1]), ``extra_fraction`` of the batch are
    instead random ones of those, randomly flipped.
    """
    crops = []
    for _ in range(batch_size):
        if extra_images is not None and _uniform(generator) < extra_fraction:
            image = extra_images[int(torch.randint(len(extra_images), (), generator=generator))]
            crops.append(image.flip(-1) if _uniform(generator) < 0.5 else image)
            continue
        crop = random_crop(photos[int(torch.randint(len(photos), (), generator=generator))], generator, size)
        if _uniform(generator) < masked_fraction:
            crop = crop * soft_mask(generator, size)
        crops.append(crop)
    return torch.stack(crops)


def fit_tiny_vae(
    vae: AutoencoderKL,
    steps: int = VAE_FIT_STEPS,
    seed: int = 0,
    batch_size: int = VAE_FIT_BATCH_SIZE,
    lr: float = VAE_FIT_LR,
    extra_images: torch.Tensor | None = None,
    extra_fraction: float = 0.0,
) -> list[float]:
    """Fit ``vae`` in place as an autoencoder of 64 px photo crops; return the per-step losses.

    Start from :func:`init_vae_as_area_codec` (the build does); from random weights this
    budget is far too short. The loss is SD's VAE loss without its perceptual and adversarial
    terms: reconstruction MSE plus ``VAE_KL_WEIGHT`` times the KL to N(0, I), both summed
    over an image, on crops of :data:`VAE_FIT_PHOTOS` and ``extra_fraction`` of ``extra_images``
    (see :func:`sample_vae_batch`). Adam
    with warm-up and cosine decay, one CPU thread, channels-last. Afterwards the latent scale
    is normalised so that ``latents * scaling_factor`` has unit std, as SDXL's factor does.

    The weights depend only on ``seed`` and the starting weights (one fixed generator draws
    every crop and posterior sample); the global RNG and the thread count are left as found.
    """
    photos = load_photos(VAE_FIT_PHOTOS)
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(vae.parameters(), lr=lr, betas=(0.9, 0.99), fused=True)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to 0
        return min(1.0, (step + 1) / VAE_FIT_WARMUP_STEPS) * 0.5 * (1.0 + math.cos(math.pi * step / max(steps, 1)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_factor)
    losses = []
    with torch_threads(VAE_FIT_THREADS), torch.random.fork_rng(devices=[]):
        vae.train().to(memory_format=torch.channels_last)
        try:
            for _ in range(steps):
                images = sample_vae_batch(photos, batch_size, generator, extra_images=extra_images,
                                          extra_fraction=extra_fraction).contiguous(memory_format=torch.channels_last)
                posterior = vae.encode(images).latent_dist
                reconstruction = vae.decode(posterior.sample(generator=generator)).sample
                # Per pixel: MSE + KL weight * KL summed over the latent / pixels in the image.
                loss = F.mse_loss(reconstruction, images) + VAE_KL_WEIGHT * posterior.kl().mean() / images[0].numel()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                losses.append(loss.item())
        finally:
            vae.eval().to(memory_format=torch.contiguous_format)
            vae.zero_grad(set_to_none=True)
        normalise_latent_scale(vae, sample_vae_batch(photos, VAE_LATENT_SCALE_SAMPLES, generator,
                                                     extra_images=extra_images, extra_fraction=extra_fraction))
    return losses


@torch.no_grad()
def normalise_latent_scale(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """Rescale the latent space so ``latents * scaling_factor`` of ``images`` has unit std.

    Exact: the encoder's mean outputs are multiplied (and its log-variances shifted) by what
    the decoder's first conv divides back out. Returns the factor applied.
    """
    latent_channels = vae.config.latent_channels
    std = vae.encode(images).latent_dist.mode().std().item()
    factor = 1.0 / (vae.config.scaling_factor * std)
    vae.quant_conv.weight[:latent_channels] *= factor
    vae.quant_conv.bias[:latent_channels] *= factor
    vae.quant_conv.bias[latent_channels:] += 2.0 * math.log(factor)
    vae.post_quant_conv.weight /= factor
    return factor


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator))


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block on ``count`` torch threads (deterministic CPU fits), then restore the count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
