"""Prompts for ``train.py predict``: the images to generate, as a DataModule.

Each image is one ``PromptRequest`` (its place in the run, prompt and seed; for a joint-layer
model a prompt per layer); batches carry the shared ``GenerationSettings`` along. In
``predict``, Lightning gives every device its own share of the requests (a distributed sampler
that repeats none), so a run's images are made once each however many devices there are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from layerdiff.pipelines import CompositionBatch, GenerationSettings, LayerPromptBatch, PromptBatch


class Composition(TypedDict, total=False):
    """One composition built layer by layer (LD sec. 4.3): ``background`` (its prompt),
    ``background_image`` (an image file to start from instead of generating it) and
    ``foregrounds`` (the prompts of the transparent layers, bottom to top)."""

    background: str
    background_image: str | None
    foregrounds: list[str]


@dataclass
class PromptRequest:
    """One image to generate: ``index`` is its position in the run (file names follow it)."""

    index: int
    prompt: str | dict[str, str] | Composition
    seed: int


class CollatePrompts:
    """DataLoader ``collate_fn``: requests -> ``PromptBatch`` (a class, so workers can pickle it)."""

    def __init__(self, settings: GenerationSettings, layer_guidance: dict[str, float] | None = None,
                 given_layers: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.layer_guidance = layer_guidance
        self.given_layers = given_layers

    def __call__(self, requests: list[PromptRequest]) -> PromptBatch | LayerPromptBatch | CompositionBatch:
        if isinstance(requests[0].prompt, dict) and "foregrounds" in requests[0].prompt:
            return CompositionBatch(
                indices=[request.index for request in requests],
                backgrounds=[request.prompt.get("background", "") for request in requests],
                background_images=[str(Path(image).expanduser()) if (image := request.prompt.get("background_image"))
                                   else None for request in requests],
                foregrounds=[list(request.prompt["foregrounds"]) for request in requests],
                seeds=[request.seed for request in requests],
                settings=self.settings,
            )
        if isinstance(requests[0].prompt, dict):
            return LayerPromptBatch(
                indices=[request.index for request in requests],
                prompts=[dict(request.prompt) for request in requests],
                seeds=[request.seed for request in requests],
                settings=self.settings,
                guidance=dict(self.layer_guidance or {}),
                given=dict(self.given_layers or {}),
            )
        return PromptBatch(
            indices=[request.index for request in requests],
            prompts=[request.prompt for request in requests],
            seeds=[request.seed for request in requests],
            settings=self.settings,
        )


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per line; blank lines are skipped, surrounding whitespace is dropped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Prompt file {path} does not exist (working directory {Path.cwd()}). Give a text file with one "
            "prompt per line in data.init_args.prompt_file, or list prompts in data.init_args.prompts."
        )
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class PromptDataModule(LightningDataModule):
    """The prompts, seeds and settings of a generation run.

    Every prompt is generated once per seed: with ``seeds`` given, with each of them (the
    same seeds for every prompt, so prompts compare at equal noise); otherwise
    ``images_per_prompt`` times with seeds counting up from ``seed``, every image its own.

    Args:
        prompts: prompts to generate.
        prompt_file: a text file with one prompt per line, used after ``prompts``.
        layer_prompts: for a joint-layer model instead: per layer set a prompt per layer name,
            e.g. ``{foreground: a cat, background: nothing in a garden, blend: a cat in a garden}``
            (a layer left out gets the empty prompt).
        layer_guidance: guidance scale per layer name, overriding ``settings.guidance_scale``.
        compositions: for a joint-layer model trained with the background given: layer stacks built
            one foreground at a time (:class:`Composition`), each written as one layered file.
        given_layers: for a joint-layer model trained with conditional modes: layers given as image
            files, e.g. ``{foreground: cat.png}`` (RGBA) to generate backgrounds around it, or
            ``{background: room.jpg}`` for foregrounds in a room; the same for every layer set.
        seeds: the seeds every prompt is generated with.
        seed: first seed when ``seeds`` is not given.
        images_per_prompt: images per prompt when ``seeds`` is not given.
        settings: size, steps, guidance scale, negative prompt and sampler of every image.
        batch_size: images generated together on one device.
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        prompt_file: str | None = None,
        layer_prompts: list[dict[str, str]] | None = None,
        compositions: list[Composition] | None = None,
        layer_guidance: dict[str, float] | None = None,
        given_layers: dict[str, str] | None = None,
        seeds: list[int] | None = None,
        seed: int = 0,
        images_per_prompt: int = 1,
        settings: GenerationSettings = GenerationSettings(),
        batch_size: int = 4,
    ) -> None:
        super().__init__()
        if seeds is not None and images_per_prompt != 1:
            raise ValueError(
                f"Give either seeds ({len(seeds)}: one image per prompt and seed) or images_per_prompt "
                f"({images_per_prompt}), not both."
            )
        if images_per_prompt < 1 or batch_size < 1:
            raise ValueError(f"images_per_prompt and batch_size must be >= 1; got {images_per_prompt}, {batch_size}")
        if sum(bool(kind) for kind in (layer_prompts, compositions, prompts or prompt_file)) > 1:
            raise ValueError("Give one of layer_prompts (a joint-layer model), compositions (layer by layer) or "
                             "prompts/prompt_file, not several.")
        for composition in compositions or []:
            image = composition.get("background_image")
            if not composition.get("foregrounds"):
                raise ValueError(f"composition {dict(composition)} has no foregrounds: list their prompts, bottom to top")
            if image is not None and not Path(image).expanduser().is_file():
                raise FileNotFoundError(f"background image {image} does not exist (working directory {Path.cwd()})")
        all_prompts = (list(layer_prompts or []) or list(compositions or [])
                       or list(prompts or []) + (read_prompt_file(prompt_file) if prompt_file else []))
        if not all_prompts:
            raise ValueError(
                "No prompts to generate: set data.init_args.prompts (e.g. '[a glass cup, a cat]') or "
                "data.init_args.prompt_file (a text file, one prompt per line; this one has none)."
            )
        if given_layers and not layer_prompts:
            raise ValueError("given_layers condition a joint-layer model: give layer_prompts too (a prompt per layer, "
                             "e.g. [{background: a sunny beach}])")
        missing = [path for path in (given_layers or {}).values() if not Path(path).expanduser().is_file()]
        if missing:
            raise FileNotFoundError(f"given layer image {missing[0]} does not exist (working directory {Path.cwd()})")
        self.settings = settings
        self.layer_guidance = layer_guidance
        self.given_layers = {name: str(Path(path).expanduser()) for name, path in (given_layers or {}).items()}
        self.batch_size = batch_size
        self.requests: list[PromptRequest] = []
        for prompt_number, prompt in enumerate(all_prompts):
            first_seed = seed + prompt_number * images_per_prompt
            for prompt_seed in seeds or range(first_seed, first_seed + images_per_prompt):
                self.requests.append(PromptRequest(len(self.requests), prompt, prompt_seed))

    def predict_dataloader(self) -> DataLoader:
        collate = CollatePrompts(self.settings, self.layer_guidance, self.given_layers)
        return DataLoader(self.requests, batch_size=self.batch_size, shuffle=False, collate_fn=collate)
