"""Typed batches: collate, float conversion, Lightning's device transfer, and the per-sample transform."""

from __future__ import annotations

from dataclasses import fields

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities.data import extract_batch_size

from data import OverSolidColour, ShardDataModule
from data.batches import collate_cached, collate_images, collate_layers, to_unit_float, unit_float
from data.cached import CachedSample
from layerdiff.batches import CachedBatch, ImageBatch, LayeredBatch
from support.shards import tiny_sample, write_tiny_shards
from support.trainers import quiet_trainer


def _layered(count: int = 3) -> LayeredBatch:
    return collate_layers([tiny_sample(index, 16, 24, layers=True) for index in range(count)])


def test_layered_batches_hold_each_layer_with_its_captions():
    samples = [tiny_sample(index, 16, 24, layers=True) for index in range(3)]
    batch = to_unit_float(collate_layers(samples))
    assert [layer.name for layer in batch.layers] == ["foreground", "background", "blend"] and len(batch) == 3
    foreground, background, blend = batch.layers
    assert foreground.pixels.shape == (3, 4, 16, 24) and background.pixels.shape == blend.pixels.shape == (3, 3, 16, 24)
    assert all(layer.pixels.dtype == torch.float32 and layer.pixels.is_contiguous() for layer in batch.layers)
    expected = np.stack([sample.background for sample in samples]).transpose(0, 3, 1, 2) / 255.0
    torch.testing.assert_close(background.pixels, torch.from_numpy(expected).float(), rtol=0, atol=1e-7)
    assert torch.equal(foreground.alpha, foreground.pixels[:, 3:]) and background.alpha is None
    assert foreground.caption == batch.caption == [f"caption {index}" for index in range(3)]
    assert blend.caption == [f"blend {index}" for index in range(3)] and background.caption[2] == "background 2"
    assert batch.original_size.tolist() == [[32, 48]] * 3 and batch.crop_top_left[2].tolist() == [2, 2]
    assert batch.layer("blend") is blend
    with pytest.raises(KeyError, match=r"no layer 'shadow'.*\['foreground', 'background', 'blend'\]"):
        batch.layer("shadow")


def _cached(index: int, pooled: bool) -> CachedSample:
    rng = np.random.default_rng(index)
    return CachedSample(key=f"sample-{index}", latent=rng.standard_normal((4, 2, 3)).astype(np.float16),
                        caption=f"caption {index}", size=(16, 24), original_size=(16, 24), crop_top_left=(0, index),
                        prompt_hidden=rng.standard_normal((77, 8)).astype(np.float16),
                        prompt_pooled=rng.standard_normal(5).astype(np.float16) if pooled else None)


def test_cached_batches_are_float32_and_keep_absent_fields_absent():
    batch = collate_cached([_cached(0, pooled=False), _cached(1, pooled=False)])
    assert batch.latent.dtype == batch.prompt_hidden.dtype == torch.float32 and batch.prompt_pooled is None
    assert batch.latent.shape == (2, 4, 2, 3) and batch.prompt_hidden.shape == (2, 77, 8)
    assert batch.crop_top_left.tolist() == [[0, 0], [0, 1]]


@pytest.mark.parametrize("kind", ["image", "cached", "layered"])
def test_lightning_moves_typed_batches_field_by_field(kind):
    batch = {
        "image": lambda: to_unit_float(collate_images([tiny_sample(index) for index in range(2)])),
        "cached": lambda: collate_cached([_cached(0, pooled=False), _cached(1, pooled=False)]),
        "layered": lambda: to_unit_float(_layered(2)),
    }[kind]()
    moved = move_data_to_device(batch, torch.device("meta"))  # what the Trainer does with a batch
    assert type(moved) is type(batch) and extract_batch_size(batch) == 2
    tensors = [getattr(moved, f.name) for f in fields(moved)]
    if isinstance(moved, LayeredBatch):
        assert [layer.name for layer in moved.layers] == [layer.name for layer in batch.layers]
        tensors += [layer.pixels for layer in moved.layers]
        assert all(layer.pixels.device.type == "cpu" for layer in batch.layers)  # the original is left alone
    tensors = [value for value in tensors if isinstance(value, torch.Tensor)]
    assert tensors and all(tensor.device.type == "meta" for tensor in tensors)
    assert moved.key == batch.key and moved.caption == batch.caption
    if isinstance(moved, CachedBatch):
        assert moved.prompt_pooled is None
    if isinstance(moved, ImageBatch):
        assert batch.rgb.device.type == "cpu"


def test_a_sample_transform_composites_onto_green_in_the_workers(tmp_path):
    write_tiny_shards(tmp_path, 8, per_shard=4, sizes=((32, 32), (32, 48)))

    def batches(**options) -> dict[str, ImageBatch]:
        module = ShardDataModule(str(tmp_path), batch_size=2, num_workers=2, **options)
        return {batch.key[0]: batch for batch in map(lambda item: module.on_before_batch_transfer(item, 0),
                                                     module.train_dataloader())}

    plain, green = batches(), batches(sample_transform=OverSolidColour())
    assert plain.keys() == green.keys()
    for key, batch in green.items():
        original = plain[key]
        assert batch.key == original.key and torch.equal(batch.alpha, original.alpha)
        alpha = batch.alpha.expand_as(batch.rgb)
        green_screen = torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1).expand_as(batch.rgb)
        assert torch.equal(batch.rgb[alpha == 0], green_screen[alpha == 0])
        assert torch.equal(batch.rgb[alpha == 1], original.rgb[alpha == 1])
        over = original.rgb * alpha + green_screen * (1 - alpha)
        torch.testing.assert_close(batch.rgb, over, rtol=0, atol=0.5 / 255 + 1e-6)
        assert (alpha > 0).any() and (alpha == 0).any()


def test_a_transformed_stream_resumes_with_the_same_pixels(tmp_path):
    write_tiny_shards(tmp_path, 12, per_shard=4, sizes=((32, 32), (32, 48)))
    settings = dict(batch_size=3, num_workers=0, shuffle_buffer=4, sample_transform=OverSolidColour((255, 0, 255)))

    def take(module: ShardDataModule, count: int | None = None) -> list[ImageBatch]:
        taken = []
        for item in module.train_dataloader():
            taken.append(module.on_before_batch_transfer(item, 0))
            if len(taken) == count:
                break
        return taken

    uninterrupted = take(ShardDataModule(str(tmp_path), **settings))
    interrupted = ShardDataModule(str(tmp_path), **settings)
    before = take(interrupted, 2)
    resumed = ShardDataModule(str(tmp_path), **settings)
    resumed.load_state_dict(interrupted.state_dict())
    after = take(resumed)
    assert len(after) and len(before) + len(after) == len(uninterrupted)
    for expected, actual in zip(uninterrupted, before + after):
        assert expected.key == actual.key and torch.equal(expected.rgb, actual.rgb)


class _Mean(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_index):
        return (batch.rgb.mean() - self.weight) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_run_with_a_transform_checkpoints_and_resumes(tmp_path):
    write_tiny_shards(tmp_path / "shards", 8, per_shard=4)

    def fit(steps: int, checkpoint: str | None = None) -> pl.Trainer:
        # with ModelCheckpoint's state in the checkpoint, as a real run's has
        trainer = quiet_trainer(tmp_path, max_steps=steps, enable_checkpointing=True)
        data = ShardDataModule(str(tmp_path / "shards"), batch_size=2, num_workers=0,
                               sample_transform=OverSolidColour())
        trainer.fit(_Mean(), datamodule=data, ckpt_path=checkpoint)
        return trainer

    fit(2).save_checkpoint(tmp_path / "run.ckpt")
    torch.load(tmp_path / "run.ckpt", weights_only=True)  # how checkpoints are read back
    assert fit(3, str(tmp_path / "run.ckpt")).global_step == 3


def test_transforms_are_configured_by_class_path():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(ShardDataModule, "data")
    transform = '{"class_path": "data.transforms.OverSolidColour", "init_args": {"colour": [0, 0, 255]}}'
    config = parser.parse_args(["--data.train_shards", "shards", "--data.sample_transform", transform])
    data = parser.instantiate(config).data
    assert isinstance(data.sample_transform, OverSolidColour) and data.sample_transform.colour == (0, 0, 255)
    with pytest.raises(ValueError, match="three integers"):
        OverSolidColour((0, 256, 0))


def test_images_are_made_float_once():
    images = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    assert unit_float(images).max().item() == 1.0
    with pytest.raises(TypeError, match="already torch.float32"):
        unit_float(unit_float(images))
