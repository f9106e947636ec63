"""Fuzzing the reader: damaged members among intact samples, read by several workers.

Every kind of damage a shard can carry (truncated and bit-flipped PNGs, members holding
another type's bytes, empty members, JSON values of impossible types and sizes, PNG
decompression bombs) must be skipped, counted and named; nothing may crash or hang, and
every intact sample still arrives exactly once. Schema mismatches (a required field
missing, a foreground without alpha) stop training by design and are tested in
``test_data_datamodule``.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections import Counter

import numpy as np
import pytest

from data import ShardDataModule
from data.schema import CAPTION, FOREGROUND, MAX_PIXELS, METADATA, encode_sample
from data.shards import ShardWriter
from data.validate import validate_shards
from support.shards import tiny_sample

INTACT, MUTATED = 400, 1000
SIZES = ((16, 16), (16, 24))
NAMED = re.compile(r"^shard (?P<url>\S+), key (?P<key>[\w-]+), field '(?P<field>[^']+)': .+")


def _png_bomb(side: int) -> bytes:
    """A valid RGBA PNG of ``side`` x ``side`` zero pixels: a few hundred KiB that decode to
    4 * side**2 bytes. Written row by row, so the test never holds the pixels."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    compressor, row, parts = zlib.compressobj(9), bytes(1 + 4 * side), []
    for _ in range(side):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def _flip_bits(data: bytes, rng: np.random.Generator) -> bytes:
    flipped = bytearray(data)
    for position in rng.integers(0, len(data) * 8, size=rng.integers(1, 9)):
        flipped[position // 8] ^= 1 << (position % 8)
    return bytes(flipped)


def _with_metadata(members: dict, **changes) -> bytes:
    return json.dumps({**json.loads(members[METADATA]), **changes}).encode()


# Damage that must be skipped (field named in the report), and damage that may decode to
# a valid sample (a bit flip in pixel data, an empty or still-UTF-8 caption).
ALWAYS_SKIPPED = {
    "truncated png": (FOREGROUND, lambda m, rng, bomb: m[FOREGROUND][: rng.integers(0, len(m[FOREGROUND]))]),
    "png holds json": (FOREGROUND, lambda m, rng, bomb: m[METADATA]),
    "png holds a caption": (FOREGROUND, lambda m, rng, bomb: m[CAPTION]),
    "empty png": (FOREGROUND, lambda m, rng, bomb: b""),
    "json holds a png": (METADATA, lambda m, rng, bomb: m[FOREGROUND]),
    "empty json": (METADATA, lambda m, rng, bomb: b""),
    "json is a list": (METADATA, lambda m, rng, bomb: b"[16, 16]"),
    "width is a string": (METADATA, lambda m, rng, bomb: _with_metadata(m, width="16")),
    "height is null": (METADATA, lambda m, rng, bomb: _with_metadata(m, height=None)),
    "width is true": (METADATA, lambda m, rng, bomb: _with_metadata(m, width=True)),
    "absurd width": (METADATA, lambda m, rng, bomb: _with_metadata(m, width=10**12)),
    "negative height": (METADATA, lambda m, rng, bomb: _with_metadata(m, height=-16)),
    "absurd area": (METADATA, lambda m, rng, bomb: _with_metadata(m, width=2**20, height=2**20)),
    "original size is text": (METADATA, lambda m, rng, bomb: _with_metadata(m, original_size="big")),
    "crop has floats": (METADATA, lambda m, rng, bomb: _with_metadata(m, crop_top_left=[0.5, 1])),
    "crop has three values": (METADATA, lambda m, rng, bomb: _with_metadata(m, crop_top_left=[0, 1, 2])),
    "caption holds a png": (CAPTION, lambda m, rng, bomb: m[FOREGROUND]),
    "png bomb": (FOREGROUND, lambda m, rng, bomb: bomb),
}
MAYBE_DELIVERED = {
    "bit-flipped png": (FOREGROUND, lambda m, rng, bomb: _flip_bits(m[FOREGROUND], rng)),
    "bit-flipped caption": (CAPTION, lambda m, rng, bomb: _flip_bits(m[CAPTION], rng)),
    "empty caption": (CAPTION, lambda m, rng, bomb: b""),
}
MUTATIONS = {**ALWAYS_SKIPPED, **MAYBE_DELIVERED}


@pytest.fixture(scope="module")
def fuzzed_shards(tmp_path_factory):
    """Shards of intact and mutated samples in a seeded random order; returns the folder, the
    intact keys and the mutation (name, field) of every mutated key."""
    folder = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    bases = [encode_sample(tiny_sample(index, *size)) for index, size in enumerate(SIZES)]
    # Over MAX_PIXELS but under Pillow's own bomb limit, which would decode it (324 MB).
    bomb = _png_bomb(int(MAX_PIXELS**0.5) + 808)
    names = list(MUTATIONS)
    order = rng.permutation(INTACT + MUTATED)
    intact, mutated = {}, {}
    with ShardWriter(folder, samples_per_shard=100) as writer:
        for index in order:
            key = f"fuzz-{index:05d}"
            members = {**bases[index % len(bases)], "__key__": key, CAPTION: f"caption {index}".encode()}
            if index < INTACT:
                intact[key] = f"caption {index}"
            else:
                name = names[index % len(names)]
                field_name, mutate = MUTATIONS[name]
                members[field_name] = mutate(members, rng, bomb)
                mutated[key] = (name, field_name)
            writer.write(members)
        writer.close()
    return folder, intact, mutated


@pytest.mark.timeout(120)  # a hang fails here instead of blocking the suite
def test_damaged_members_are_skipped_counted_and_named_and_intact_samples_arrive_once(fuzzed_shards):
    folder, intact, mutated = fuzzed_shards
    assert len(mutated) >= 1000 and Counter(name for name, _ in mutated.values())["png bomb"] >= 40
    module = ShardDataModule(str(folder), batch_size=8, num_workers=2, shuffle_buffer=64, max_corrupt_fraction=1.0)
    items = list(module.train_dataloader())
    batches = [module.on_before_batch_transfer(item, 0) for item in items]
    skipped = [description for item in items for description in item.position.corrupt_members]

    delivered = Counter(key for batch in batches for key in batch.key)
    assert all(count == 1 for count in delivered.values()), "a sample arrived twice"
    assert set(intact) <= set(delivered), f"intact samples lost: {sorted(set(intact) - set(delivered))[:5]}"
    captions = {key: caption for batch in batches for key, caption in zip(batch.key, batch.caption)}
    assert all(captions[key] == caption for key, caption in intact.items())

    assert module.corrupt_skipped == len(skipped)  # what callbacks.DataHealth logs
    named = [NAMED.match(description) for description in skipped]
    assert all(named), f"not named: {[d for d, m in zip(skipped, named) if not m][:3]}"
    skipped_keys = Counter(match["key"] for match in named)
    assert all(count == 1 for count in skipped_keys.values()), "a member was reported twice"
    assert all(match["url"].startswith(str(folder)) for match in named)
    assert not set(skipped_keys) & set(delivered)
    assert set(skipped_keys) | set(delivered) == set(intact) | set(mutated), "a sample vanished without a report"
    for match in named:
        name, field_name = mutated[match["key"]]
        assert match["field"] == field_name, f"{name}: reported as field {match['field']!r}"
    must_skip = {key for key, (name, _) in mutated.items() if name in ALWAYS_SKIPPED}
    undetected = [mutated[key] for key in must_skip - set(skipped_keys)]
    assert not undetected, f"delivered despite damage: {undetected[:3]}"
    bombs = [description for description, match in zip(skipped, named) if mutated[match["key"]][0] == "png bomb"]
    assert bombs and all("MAX_PIXELS" in description for description in bombs)

    # The validator finds exactly the members the loader skipped.
    report = validate_shards(sorted(str(path) for path in folder.glob("*.tar")))
    assert Counter(NAMED.match(description)["key"] for description in report.corrupt) == skipped_keys
