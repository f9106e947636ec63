"""``ShardDataModule``: batch contract, splitting by rank and worker, shuffling, buckets, errors."""

from __future__ import annotations

import logging
import multiprocessing
from collections import Counter
from dataclasses import fields

import lightning.pytorch as pl
import pytest
import torch

from data import ShardDataModule
from data.schema import FOREGROUND, SchemaError
from data.spec import ShardSpecError
from data.stages import ShardsChangedError, TooManyCorruptMembersError
from data.stream import ShardStream, Tagged
from layerdiff.batches import ImageBatch, LayeredBatch
from support.shards import rgb_png, truncated_foreground, write_tiny_shards
from support.trainers import quiet_trainer

BATCH_KEYS = {"rgb", "alpha", "caption", "key", "original_size", "crop_top_left", "token_ids"}
LAYERED_KEYS = {"layers", "caption", "key", "original_size", "crop_top_left"}


def _fields(batch) -> set[str]:
    return {field.name for field in fields(batch)}


def _epoch(module: ShardDataModule, loader=None) -> list[ImageBatch]:
    loader = loader if loader is not None else module.train_dataloader()
    return [module.on_before_batch_transfer(batch, 0) for batch in loader]


def _keys(batches: list) -> list[str]:
    return [key for batch in batches for key in batch.key]


@pytest.mark.parametrize("require_layers", [False, True])
def test_batches_follow_the_contract(tmp_path, require_layers):
    write_tiny_shards(tmp_path, 10, per_shard=5, sizes=((32, 48),), layers=True)
    module = ShardDataModule(str(tmp_path), batch_size=4, num_workers=0, require_layers=require_layers)
    raw = list(module.train_dataloader())
    assert all(isinstance(item, Tagged) and item.position.corrupt_members == [] for item in raw)
    batches = [module.on_before_batch_transfer(item, 0) for item in raw]
    assert [len(b.key) for b in batches] == [4, 4, 2]
    batch = batches[0]
    assert type(batch) is (LayeredBatch if require_layers else ImageBatch)
    assert _fields(batch) == (LAYERED_KEYS if require_layers else BATCH_KEYS)
    if require_layers:
        assert [layer.name for layer in batch.layers] == ["foreground", "background", "blend"]
        foreground, background, blend = batch.layers
        rgb, alpha = foreground.rgb, foreground.alpha
        assert foreground.pixels.is_contiguous() and background.alpha is None and blend.alpha is None
        images = [foreground.pixels, background.pixels, blend.pixels]
    else:
        rgb, alpha = batch.rgb, batch.alpha
        assert rgb.is_contiguous() and alpha.is_contiguous()
        images = [rgb, alpha]
    assert rgb.shape == (4, 3, 32, 48) and rgb.dtype == torch.float32
    assert alpha.shape == (4, 1, 32, 48) and alpha.dtype == torch.float32
    for image in images:
        assert 0.0 <= image.min() and image.max() <= 1.0 and image.max() > 0.5
    assert 0.0 in alpha and 1.0 in alpha
    assert batch.original_size.dtype == torch.int64 and batch.original_size.shape == (4, 2)
    assert batch.original_size[0].tolist() == [64, 96]
    assert batch.crop_top_left.dtype == torch.int64 and batch.crop_top_left.shape == (4, 2)
    index = int(batch.key[0].split("-")[1])
    assert batch.caption[0] == f"caption {index}" and batch.crop_top_left[0].tolist() == [index % 3, index % 5]
    if require_layers:
        assert background.pixels.shape == blend.pixels.shape == (4, 3, 32, 48)
        assert blend.caption[0] == f"blend {index}" and background.caption[0] == f"background {index}"
        assert batch.layer("blend") is blend and foreground.caption == batch.caption


@pytest.mark.parametrize("shards", [4, 1])  # whole shards per worker; fewer shards than workers: samples split
def test_two_workers_cover_every_sample_exactly_once_per_epoch(tmp_path, shards):
    write_tiny_shards(tmp_path, 20, per_shard=20 // shards)
    module = ShardDataModule(str(tmp_path), batch_size=3, num_workers=2, shuffle_buffer=8)
    loader = module.train_dataloader()
    first, second = _keys(_epoch(module, loader)), _keys(_epoch(module, loader))
    expected = [f"sample-{i:04d}" for i in range(20)]
    assert sorted(first) == expected and sorted(second) == expected
    assert first != second  # reshuffled per epoch


def test_ranks_partition_the_data(tmp_path):
    shards = write_tiny_shards(tmp_path, 24, per_shard=4)
    common = dict(batch_size=2, shuffle=True, shuffle_buffer=4, seed=5, resample=False, require_layers=False,
                  world_size=2, max_corrupt_fraction=0.0)
    per_rank = [_keys([item.batch for item in ShardStream(shards, rank=rank, **common)]) for rank in (0, 1)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == [f"sample-{i:04d}" for i in range(24)]


def test_shuffling_is_reproducible_and_validation_is_ordered(tmp_path):
    write_tiny_shards(tmp_path, 16, per_shard=4)

    def run(seed):
        return _keys(_epoch(ShardDataModule(str(tmp_path), batch_size=4, num_workers=0, seed=seed)))

    assert run(1) == run(1) and run(1) != run(2)
    module = ShardDataModule(str(tmp_path), val_shards=str(tmp_path), batch_size=4, val_batch_size=5, num_workers=0)
    validation = _epoch(module, module.val_dataloader())
    assert _keys(validation) == [f"sample-{i:04d}" for i in range(16)]
    assert [len(b.key) for b in validation] == [5, 5, 5, 1]


def test_batches_never_mix_sizes(tmp_path):
    write_tiny_shards(tmp_path, 21, per_shard=7, sizes=((32, 32), (32, 48), (48, 32)))
    batches = _epoch(ShardDataModule(str(tmp_path), batch_size=4, num_workers=0))
    assert sorted(_keys(batches)) == [f"sample-{i:04d}" for i in range(21)]
    assert Counter(tuple(b.rgb.shape[2:]) for b in batches) == {(32, 32): 2, (32, 48): 2, (48, 32): 2}
    assert sorted(len(b.key) for b in batches) == [3, 3, 3, 4, 4, 4]


def test_resampling_streams_without_end(tmp_path):
    write_tiny_shards(tmp_path, 6, per_shard=3)
    loader = ShardDataModule(str(tmp_path), batch_size=4, num_workers=0, resample=True).train_dataloader()
    batches = [item.batch for _, item in zip(range(10), loader)]
    assert len(batches) == 10 and all(len(b.key) == 4 for b in batches)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_members_are_skipped_counted_and_named(tmp_path, num_workers, caplog):
    damage = {3: {FOREGROUND: truncated_foreground()}, 12: {FOREGROUND: b"garbage bytes, not a PNG"}}
    shards = write_tiny_shards(tmp_path, 16, per_shard=8, damage=damage)
    module = ShardDataModule(str(tmp_path), batch_size=4, num_workers=num_workers, max_corrupt_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="data.datamodule"):
        raw = list(module.train_dataloader())
        batches = [module.on_before_batch_transfer(batch, 0) for batch in raw]
    assert sorted(_keys(batches)) == [f"sample-{i:04d}" for i in range(16) if i not in damage]
    assert sum(len(item.position.corrupt_members) for item in raw) == 2 and module.corrupt_skipped == 2
    assert all(isinstance(b, ImageBatch) for b in batches)  # the positions stay beside the batches
    assert f"shard {shards[0]}, key sample-0003, field 'fg.png'" in caplog.text
    assert f"shard {shards[1]}, key sample-0012" in caplog.text
    module.load_state_dict(module.state_dict())
    assert module.corrupt_skipped == 2


def test_too_many_corrupt_members_stop_training(tmp_path):
    write_tiny_shards(tmp_path, 8, damage={i: {FOREGROUND: b"junk"} for i in range(0, 8, 2)})
    module = ShardDataModule(str(tmp_path), batch_size=2, num_workers=0, max_corrupt_fraction=0.25)
    with pytest.raises(TooManyCorruptMembersError, match=r"4 of 8 samples.*python -m data validate"):
        list(module.train_dataloader())


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize(
    "damage, require_layers, message",
    [({5: {FOREGROUND: None}}, False, r"key sample-0005, field 'fg.png': required field missing.*python -m data write"),
     ({5: {FOREGROUND: rgb_png()}}, False, r"key sample-0005, field 'fg.png': foreground has no alpha"),
     ({}, True, r"key sample-000\d, field 'bg.png'.*require_layers: false")],
)
def test_schema_mismatch_stops_with_shard_key_and_fix(tmp_path, num_workers, damage, require_layers, message):
    shards = write_tiny_shards(tmp_path, 8, per_shard=8, damage=damage)
    module = ShardDataModule(str(tmp_path), batch_size=2, num_workers=num_workers, require_layers=require_layers)
    # Worker processes re-raise a SchemaError with the same message.
    with pytest.raises(SchemaError, match=message) as raised:
        list(module.train_dataloader())
    assert shards[0] in str(raised.value)
    assert not multiprocessing.active_children()  # workers stopped now, not at some later GC


def test_bad_specs_and_arguments_fail_early_and_clearly(tmp_path):
    with pytest.raises(ShardSpecError, match="train_shards is empty"):
        ShardDataModule("")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ShardDataModule(str(tmp_path), batch_size=0)
    module = ShardDataModule(str(tmp_path / "missing"), num_workers=0)
    with pytest.raises(ShardSpecError, match=r"missing.*do not exist.*python -m data write"):
        module.prepare_data()


def test_epoch_counter_is_saved_and_restored(tmp_path):
    write_tiny_shards(tmp_path, 12, per_shard=4)
    module = ShardDataModule(str(tmp_path), batch_size=4, num_workers=0)
    loader = module.train_dataloader()
    _epoch(module, loader)
    state = module.state_dict()
    second_epoch = _keys(_epoch(module, loader))
    restored = ShardDataModule(str(tmp_path), batch_size=4, num_workers=0)
    restored.load_state_dict(state)
    assert state["per_rank"]["data"][0]["progress"]["epoch"] == 0 and state["per_rank"]["data"][0]["progress"]["complete"]
    assert _keys(_epoch(restored)) == second_epoch


def _batches_from(module: ShardDataModule, count: int | None = None) -> list[list[str]]:
    """The keys of the next ``count`` batches training takes (all of the epoch when None)."""
    loader = module.train_dataloader()
    taken = []
    for batch in loader:
        taken.append(module.on_before_batch_transfer(batch, 0).key)
        if count is not None and len(taken) == count:
            break
    return taken


@pytest.mark.parametrize(
    "num_workers, shards, resample, stops",
    [(0, 4, False, range(0, 9)),  # every batch of an epoch, incl. before the first and after the last
     (2, 4, False, (1, 2, 5)),  # the resumed round-robin continues with the worker that was next
     (2, 1, False, (3,)),  # fewer shards than workers: both read the one shard, keeping every other sample
     (2, 4, True, (4,))],  # endless draws with replacement
)
def test_a_restored_stream_continues_with_the_same_batches(tmp_path, num_workers, shards, resample, stops):
    # Two sizes (two buckets), a shuffle buffer spanning shards, and corrupt members in the stream.
    damage = {5: {FOREGROUND: b"junk"}, 17: {FOREGROUND: truncated_foreground()}}
    write_tiny_shards(tmp_path, 24, per_shard=24 // shards, sizes=((32, 32), (32, 48)), damage=damage)
    settings = dict(batch_size=3, num_workers=num_workers, shuffle_buffer=5, seed=3, resample=resample,
                    max_corrupt_fraction=0.5)
    epoch_length = 8

    def run(stop: int | None) -> list[list[str]]:
        module = ShardDataModule(str(tmp_path), **settings)
        first = _batches_from(module, epoch_length if resample else None)
        assert len(first) == epoch_length
        if stop is None:
            return first + _batches_from(module, epoch_length if resample else None)
        module = ShardDataModule(str(tmp_path), **settings)
        before = _batches_from(module, stop) if stop else []
        state = module.state_dict()
        resumed = ShardDataModule(str(tmp_path), **settings)
        resumed.load_state_dict(state)
        rest = [] if resample else _batches_from(resumed)  # the rest of the epoch...
        if resample:
            rest = _batches_from(resumed, epoch_length - stop)
        return before + rest + _batches_from(resumed, epoch_length if resample else None)  # ...and the next

    uninterrupted = run(None)
    if not resample:
        expected = sorted(f"sample-{i:04d}" for i in range(24) if i not in damage)
        assert sorted(key for batch in uninterrupted[:epoch_length] for key in batch) == expected
    for stop in stops:
        assert run(stop) == uninterrupted, f"resumed after {stop} batches"


def test_a_restored_stream_reports_each_corrupt_member_once(tmp_path):
    write_tiny_shards(tmp_path, 12, per_shard=4, damage={1: {FOREGROUND: b"junk"}, 9: {FOREGROUND: b"junk"}})
    settings = dict(batch_size=2, num_workers=0, shuffle_buffer=3, max_corrupt_fraction=0.5)
    counted_before_the_stop = set()
    for stop in range(1, 5):
        module = ShardDataModule(str(tmp_path), **settings)
        _batches_from(module, stop)
        counted_before_the_stop.add(module.corrupt_skipped)
        resumed = ShardDataModule(str(tmp_path), **settings)
        resumed.load_state_dict(module.state_dict())
        _batches_from(resumed)
        assert resumed.corrupt_skipped == 2, f"resumed after {stop} batches"
    assert counted_before_the_stop >= {1, 2}  # stops before and after the corrupt members


def test_another_worker_count_restarts_the_epoch_with_a_warning(tmp_path):
    write_tiny_shards(tmp_path, 12, per_shard=4)
    module = ShardDataModule(str(tmp_path), batch_size=2, num_workers=0)
    _batches_from(module, 2)
    resumed = ShardDataModule(str(tmp_path), batch_size=2, num_workers=2)
    with pytest.warns(UserWarning, match=r"1 rank\(s\) x 0 worker\(s\).*1 x 2.*epoch 0 restarts"):
        resumed.load_state_dict(module.state_dict())
    assert len([key for batch in _batches_from(resumed) for key in batch]) == 12


def test_shards_that_changed_since_the_checkpoint_are_named(tmp_path):
    write_tiny_shards(tmp_path, 12, per_shard=4)
    module = ShardDataModule(str(tmp_path), batch_size=2, num_workers=0, shuffle_buffer=4)
    _batches_from(module, 2)
    state = module.state_dict()
    write_tiny_shards(tmp_path, 12, per_shard=6)  # re-written: other samples in the shards
    resumed = ShardDataModule(str(tmp_path), batch_size=2, num_workers=0, shuffle_buffer=4)
    resumed.load_state_dict(state)
    with pytest.raises(ShardsChangedError, match=r"sample 'sample-\d+' of shard .*shard-00000\d.tar.*is gone"):
        _batches_from(resumed)


class _BatchRecorder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[set[str]] = []

    def training_step(self, batch, batch_index):
        self.seen.append(_fields(batch))
        return (batch.rgb.mean() - self.weight) ** 2

    def validation_step(self, batch, batch_index):
        self.seen.append(_fields(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trains_under_lightning_with_the_exact_batch_keys(tmp_path):
    write_tiny_shards(tmp_path / "train", 8, per_shard=4, damage={2: {FOREGROUND: b"junk"}})
    write_tiny_shards(tmp_path / "val", 4, per_shard=4)
    module = ShardDataModule(str(tmp_path / "train"), str(tmp_path / "val"), batch_size=2, num_workers=0,
                             max_corrupt_fraction=0.5)
    model = _BatchRecorder()
    trainer = quiet_trainer(tmp_path, max_steps=-1, max_epochs=2, limit_val_batches=1.0)
    trainer.fit(model, datamodule=module)
    assert model.seen and all(keys == BATCH_KEYS for keys in model.seen)
    assert module.corrupt_skipped == 2  # one per epoch
    assert module.state_dict()["per_rank"]["data"][0]["progress"] == {
        "epoch": 1, "positions": module.state_dict()["per_rank"]["data"][0]["progress"]["positions"], "last_worker": 0,
        "complete": True,
    }


def test_constructor_signature_is_a_config_schema():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(ShardDataModule, "data")
    config = parser.parse_args(["--data.train_shards", "embedded:openmoji-demo-64/train", "--data.batch_size", "3"])
    assert config.data.train_shards == "embedded:openmoji-demo-64/train" and config.data.batch_size == 3
    assert config.data.val_shards is None and config.data.require_layers is False
