"""Weighted sampling: a sample's ``sampling_weight`` sets how often a training stream draws it,
and a stream stopped anywhere (between the copies of one sample too) resumes exactly."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from data import ShardDataModule
from data.schema import FOREGROUND, SchemaError
from data.stages import WeightedRepeats, unit_draw
from support.shards import truncated_foreground, write_tiny_shards
from support.streams import batches_from

WEIGHT_CYCLE = (1, 2, 0.5, 0)


def _weights(count: int, cycle=WEIGHT_CYCLE) -> dict[int, dict[str, float]]:
    return {index: {"sampling_weight": cycle[index % len(cycle)]} for index in range(count)}


def _key(index: int) -> str:
    return f"sample-{index:04d}"


@pytest.mark.parametrize("ignore", [False, True])
def test_drawn_frequencies_follow_the_weights(tmp_path, ignore):
    samples, epochs = 40, 40
    write_tiny_shards(tmp_path, samples, per_shard=10, sizes=((16, 16), (16, 24)), metadata=_weights(samples))
    module = ShardDataModule(str(tmp_path), val_shards=str(tmp_path), batch_size=4, num_workers=0, shuffle_buffer=8,
                             seed=7, ignore_sampling_weights=ignore)
    drawn: Counter = Counter()
    for _ in range(epochs):
        drawn.update(key for keys in batches_from(module) for key in keys)
    by_weight = {weight: [drawn[_key(index)] for index in range(samples) if WEIGHT_CYCLE[index % 4] == weight]
                 for weight in WEIGHT_CYCLE}
    if ignore:
        assert all(count == epochs for counts in by_weight.values() for count in counts)
        return
    # Whole weights are exact: floor(w) copies every epoch.
    assert by_weight[1] == [epochs] * 10 and by_weight[2] == [2 * epochs] * 10 and by_weight[0] == [0] * 10
    # Weight 0.5: each epoch an independent coin per sample, so a sample's count is Binomial(epochs, 0.5)
    # (sd sqrt(40 / 4) = 3.2) and the ten samples' total Binomial(400, 0.5) (sd 10); 4 sd either side
    # fails a correct stream with probability ~6e-5 (and the seed is fixed). A draw that ignored the
    # epoch would give each sample 0 or 40.
    half = by_weight[0.5]
    per_sample_sd, total_sd = math.sqrt(epochs * 0.25), math.sqrt(10 * epochs * 0.25)
    assert all(abs(count - epochs / 2) <= 4 * per_sample_sd for count in half), half
    assert abs(sum(half) - 10 * epochs / 2) <= 4 * total_sd, sum(half)
    validation = [key for batch in module.val_dataloader() for key in module.on_before_batch_transfer(batch, 0).key]
    assert sorted(validation) == [_key(index) for index in range(samples)]  # validation is never weighted


def test_the_extra_copy_is_a_function_of_seed_epoch_draw_shard_and_key():
    repeats = WeightedRepeats(lambda members: 0.5, seed=1, epoch=2)
    members = {"__url__": "/data/a/shard-000003.tar", "__key__": "k"}
    moved = {"__url__": "/elsewhere/shard-000003.tar", "__key__": "k"}
    draws = [repeats.copies(members, draw) for draw in range(200)]
    assert set(draws) == {0, 1} and abs(sum(draws) - 100) <= 4 * math.sqrt(50)  # Binomial(200, 0.5): sd 7.1
    assert [repeats.copies(moved, draw) for draw in range(200)] == draws  # the folder does not matter
    assert unit_draw(1, 2, 0, "shard-000003.tar", "k") != unit_draw(1, 3, 0, "shard-000003.tar", "k")
    assert WeightedRepeats(lambda members: 2.0, 0, 0).copies(members, 0) == 2


@pytest.mark.parametrize(
    "num_workers, shuffle_buffer, resample, stops",
    [(0, 5, False, "every"),  # every batch of the epoch, incl. before the first and after the last
     (0, 0, False, "every"),  # no shuffle buffer: the copies go straight into the buckets
     (2, 5, False, (1, 2, 5, 7)),  # the resumed round-robin continues with the worker that was next
     (2, 5, True, (3,))],  # endless draws with replacement
)
def test_a_weighted_stream_resumes_with_the_same_batches(tmp_path, num_workers, shuffle_buffer, resample, stops):
    damage = {7: {FOREGROUND: truncated_foreground()}}  # weight 2: skipped and counted per copy
    weights = _weights(24, cycle=(1, 2, 0.5, 0, 2.5, 1))
    write_tiny_shards(tmp_path, 24, per_shard=6, sizes=((16, 16), (16, 24)), damage=damage, metadata=weights)
    settings = dict(batch_size=3, num_workers=num_workers, shuffle_buffer=shuffle_buffer, seed=3, resample=resample,
                    max_corrupt_fraction=0.5)
    pending_at_stops = []

    def run(stop: int | None, epoch_length: int | None) -> list[list[str]]:
        module = ShardDataModule(str(tmp_path), **settings)
        if stop is None:
            return [batches_from(module, epoch_length), batches_from(module, epoch_length)]
        before = batches_from(module, stop) if stop else []
        state = module.state_dict()
        positions = state["per_rank"]["data"][0]["progress"]["positions"].values()
        pending_at_stops.append(any(position["repeats"]["left"] for position in positions))
        resumed = ShardDataModule(str(tmp_path), **settings)
        resumed.load_state_dict(state)
        rest = batches_from(resumed, epoch_length - stop if resample else None)  # the rest of the epoch...
        return [before + rest, batches_from(resumed, epoch_length)]  # ...and the next

    first, second = run(None, 10 if resample else None)
    epoch_length = len(first)
    if not resample:
        drawn = Counter(key for batch in first + second for key in batch)
        assert drawn[_key(1)] == 4 and drawn[_key(3)] == 0 and _key(7) not in drawn
        assert 4 <= drawn[_key(4)] <= 6  # weight 2.5: 2 or 3 per epoch
    for stop in range(epoch_length + 1) if stops == "every" else stops:
        assert run(stop, epoch_length if resample else None) == [first, second], f"resumed after {stop} batches"
    if stops == "every":
        assert any(pending_at_stops), "no stop fell between the copies of a sample: the test covers less than it says"


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("weight", ["heavy", -1, True, None])
def test_a_weight_that_is_no_number_stops_with_shard_and_key(tmp_path, num_workers, weight):
    shards = write_tiny_shards(tmp_path, 8, per_shard=4, metadata={6: {"sampling_weight": weight}})
    module = ShardDataModule(str(tmp_path), batch_size=2, num_workers=num_workers)
    message = rf"shard {shards[1]}, key sample-0006, field 'json': sampling_weight must be a finite number >= 0"
    with pytest.raises(SchemaError, match=message):
        batches_from(module)
    assert batches_from(ShardDataModule(str(tmp_path), batch_size=2, num_workers=0, ignore_sampling_weights=True))
