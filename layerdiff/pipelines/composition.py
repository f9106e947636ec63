"""Iterative composition of N layers (LayerDiffusion arXiv:2402.17113 sec. 4.3): start from a
background (an image file, or generated together with the first foreground), then, layer by
layer, blend everything so far and generate the next transparent foreground conditioned on that
blend, with its own prompt. Earlier layers are never generated again, so adding one leaves the
others untouched, and the final blend is exactly the layers composited.

It needs a joint-layer model with layers named ``foreground`` (transparent) and ``background``
trained with the mode that gives the background (``{given: [background]}``), and, without a
background image, the joint mode.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from layerdiff.pipelines.joint_layers import GeneratedLayers, JointLayerGenerator, LayerPromptBatch, read_layer_image
from layerdiff.pipelines.transparent import GenerationSettings
from layerdiff.rgba import composite

FOREGROUND, BACKGROUND, BLEND = "foreground", "background", "blend"


@dataclass
class CompositionBatch:
    """Compositions to build: per sample its run position, the background's prompt (and image
    file, or ``None`` to generate it), the foregrounds' prompts bottom to top, and a seed (layer
    ``k`` is drawn with ``seed + k``)."""

    indices: list[int]
    backgrounds: list[str]
    background_images: list[str | None]
    foregrounds: list[list[str]]
    seeds: list[int]
    settings: GenerationSettings

    def __len__(self) -> int:
        return len(self.indices)


def compose(generator: JointLayerGenerator, batch: CompositionBatch) -> list[GeneratedLayers]:
    """One layer stack per sample: ``layers`` top first (``foreground_N`` ... ``foreground_1``,
    ``background``) and ``blend``, all the generation size, foregrounds RGBA."""
    if FOREGROUND not in generator.layers or BACKGROUND not in generator.layers:
        raise ValueError(f"composition needs a model with layers 'foreground' and 'background'; this one has "
                         f"{list(generator.layers)}")
    native = generator.unet.config.sample_size * generator.vae_scale_factor
    settings = replace(batch.settings, width=batch.settings.width or native, height=batch.settings.height or native)
    return [_compose_one(generator, index, background, image, prompts, seed, settings)
            for index, background, image, prompts, seed in zip(batch.indices, batch.backgrounds, batch.background_images,
                                                                batch.foregrounds, batch.seeds)]


def _compose_one(generator: JointLayerGenerator, index: int, background_prompt: str, background_image: str | None,
                 prompts: list[str], seed: int, settings: GenerationSettings) -> GeneratedLayers:
    if not prompts:
        raise ValueError(f"composition {index}: no foreground prompts; give at least one")
    foregrounds: list[torch.Tensor] = []
    if background_image is not None:
        background = read_layer_image(background_image, settings.width, settings.height, transparent=False)[0]
        parameters = {"background_image": background_image}
    else:  # the background and the first foreground together (the joint mode)
        first = generator(LayerPromptBatch([index], [{FOREGROUND: prompts[0], BACKGROUND: background_prompt}], [seed],
                                           settings))[0]
        background, parameters = first.layers[BACKGROUND], first.parameters
        foregrounds.append(first.layers[FOREGROUND])
    blend = background
    for foreground in foregrounds:
        blend = composite(foreground[:3], foreground[3:], blend)
    for number in range(len(foregrounds), len(prompts)):
        made = generator(LayerPromptBatch([index], [{FOREGROUND: prompts[number], BACKGROUND: background_prompt}],
                                          [seed + number], settings), given_pixels={BACKGROUND: blend})[0]
        foregrounds.append(made.layers[FOREGROUND])
        blend = composite(foregrounds[-1][:3], foregrounds[-1][3:], blend)
        parameters = made.parameters
    layers = {f"{FOREGROUND}_{number}": foregrounds[number - 1] for number in range(len(foregrounds), 0, -1)}
    layers |= {BACKGROUND: background, BLEND: blend}
    prompt_of = {f"{FOREGROUND}_{number + 1}": prompt for number, prompt in enumerate(prompts)}
    prompt_of |= {BACKGROUND: background_prompt}
    parameters = {**parameters, "composition": {"background": background_prompt, "background_image": background_image,
                                                "foregrounds": list(prompts)}, "seed": int(seed)}
    parameters.pop("given", None)
    parameters.pop("prompts", None)
    return GeneratedLayers(index=index, seed=int(seed), prompts=prompt_of, layers=layers, parameters=parameters)
