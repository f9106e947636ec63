"""The shard schema (encode / decode, error kinds), shards specs and the atomic shard writer."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from data.schema import (
    BACKGROUND,
    CAPTION,
    FOREGROUND,
    METADATA,
    CorruptMemberError,
    LayerSample,
    SchemaError,
    decode_sample,
    encode_sample,
)
from data.shards import INDEX_NAME, ShardWriter, iter_shard_samples
from data.spec import ShardSpecError, resolve_shards
from layerdiff.rgba import prepare_foreground
from support.shards import (
    rgb_png,
    tiny_rgba,
    tiny_sample,
    truncated_foreground,
    write_tiny_shards,
)


def _as_read(members: dict, url: str = "shards/shard-000007.tar") -> dict:
    return {**members, "__url__": url}


def test_round_trip_keeps_pixels_captions_and_metadata():
    sample = tiny_sample(3, 32, 48, layers=True)
    sample.license, sample.attribution = "CC0", "someone"
    decoded = decode_sample(_as_read(encode_sample(sample)), decode_layers=True)
    assert decoded.key == sample.key and decoded.url == "shards/shard-000007.tar"
    np.testing.assert_array_equal(decoded.foreground, sample.foreground)
    np.testing.assert_array_equal(decoded.background, sample.background)
    np.testing.assert_array_equal(decoded.blend, sample.blend)
    assert decoded.foreground.dtype == np.uint8 and decoded.size == (32, 48)
    assert (decoded.caption, decoded.background_caption, decoded.blend_caption) == (
        "caption 3", "background 3", "blend 3")
    assert decoded.original_size == (64, 96) and decoded.crop_top_left == (0, 3)
    assert (decoded.license, decoded.attribution, decoded.source) == ("CC0", "someone", "test/3.png")
    metadata = json.loads(encode_sample(sample)[METADATA])
    assert metadata["width"] == 48 and metadata["height"] == 32
    visible = np.count_nonzero(sample.foreground[..., 3]) / (32 * 48)
    assert metadata["alpha_coverage"] == pytest.approx(visible, abs=1e-6)


def test_layers_are_not_decoded_unless_asked():
    decoded = decode_sample(_as_read(encode_sample(tiny_sample(0, layers=True))))
    assert decoded.background is None and decoded.blend is None


def test_prepare_foreground_quantises_alpha_and_pads_colour_under_zero_alpha():
    rgba = tiny_rgba().astype(np.float32) / 255.0
    rgba[..., 3] = np.where(rgba[..., 3] > 0, rgba[..., 3], 1e-4)  # rounds to 0 in 8 bits
    rgba[..., :3] = np.where(rgba[..., 3:] > 0.01, 1.0, 0.0)  # white object, black junk elsewhere
    prepared = prepare_foreground(rgba)
    invisible = prepared[..., 3] == 0
    assert invisible.any()
    assert np.all(np.rint(prepared[..., 3] * 255) == prepared[..., 3] * 255)
    assert prepared[..., :3][invisible].min() > 0.9  # the white extends outward; no black junk left


@pytest.mark.parametrize("missing", [FOREGROUND, CAPTION, METADATA])
def test_missing_required_field_is_a_schema_error_naming_shard_key_field_and_fix(missing):
    members = _as_read(encode_sample(tiny_sample(5)))
    del members[missing]
    with pytest.raises(SchemaError) as raised:
        decode_sample(members)
    message = str(raised.value)
    assert "shards/shard-000007.tar" in message and "sample-0005" in message
    assert repr(missing) in message and "python -m data write" in message


def test_foreground_without_alpha_is_a_schema_error():
    members = _as_read({**encode_sample(tiny_sample(1)), FOREGROUND: rgb_png()})
    with pytest.raises(SchemaError, match=r"sample-0001.*no alpha channel.*Fix:"):
        decode_sample(members)


def test_required_layers_missing_is_a_schema_error_suggesting_require_layers_false():
    members = _as_read(encode_sample(tiny_sample(2)))
    with pytest.raises(SchemaError, match=r"shard-000007.tar.*sample-0002.*bg.png.*require_layers: false"):
        decode_sample(members, require_layers=True)


def test_metadata_disagreeing_with_the_image_is_a_schema_error():
    members = _as_read(encode_sample(tiny_sample(2)))
    metadata = json.loads(members[METADATA])
    metadata["width"] = 31
    members[METADATA] = json.dumps(metadata).encode()
    with pytest.raises(SchemaError, match="json says 31x32 but fg.png is 32x32"):
        decode_sample(members)


@pytest.mark.parametrize(
    "field_name, payload",
    [(FOREGROUND, truncated_foreground()), (FOREGROUND, b"\x89PNG garbage bytes"), (METADATA, b"{not json"),
     (CAPTION, b"\xff\xfe\xfa"), (BACKGROUND, b"garbage")],
)
def test_damaged_bytes_are_corrupt_members_not_schema_errors(field_name, payload):
    members = _as_read({**encode_sample(tiny_sample(4, layers=True)), field_name: payload})
    with pytest.raises(CorruptMemberError) as raised:
        decode_sample(members, decode_layers=True)
    assert not isinstance(raised.value, SchemaError)
    assert "sample-0004" in str(raised.value) and "shard-000007.tar" in str(raised.value)


def test_encode_rejects_keys_webdataset_would_split():
    sample = tiny_sample(0)
    sample.key = "photo.v2"
    with pytest.raises(ValueError, match="must match"):
        encode_sample(sample)


def test_shard_specs_directory_brace_glob_list_and_file(tmp_path):
    shards = write_tiny_shards(tmp_path / "a", 10, per_shard=4)
    assert [p.rsplit("/", 1)[1] for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    directory = str(tmp_path / "a")
    assert resolve_shards(directory) == shards
    assert resolve_shards(directory + "/shard-{000000..000002}.tar") == shards
    assert resolve_shards(directory + "/shard-00000[01].tar") == shards[:2]
    assert resolve_shards(f"{shards[2]}, {shards[0]}") == [shards[2], shards[0]]
    assert resolve_shards(shards[1]) == [shards[1]]


@pytest.mark.parametrize("spec", ["", "   ", "{tmp}/nowhere", "{tmp}/empty", "{tmp}/a/shard-{{000000..000009}}.tar",
                                  "embedded:something-else"])
def test_bad_shard_specs_name_the_spec_and_the_fix(tmp_path, spec):
    write_tiny_shards(tmp_path / "a", 4)
    (tmp_path / "empty").mkdir()
    spec = spec.format(tmp=tmp_path)
    with pytest.raises(ShardSpecError) as raised:
        resolve_shards(spec)
    assert repr(spec) in str(raised.value)
    assert "python -m data" in str(raised.value) or "embedded:openmoji-demo" in str(raised.value)


def test_shard_writer_output_is_byte_identical_for_the_same_samples(tmp_path):
    first = write_tiny_shards(tmp_path / "one", 6, layers=True)
    second = write_tiny_shards(tmp_path / "two", 6, layers=True)
    assert [open(path, "rb").read() for path in first] == [open(path, "rb").read() for path in second]
    with tarfile.open(first[0]) as archive:  # a plain tar that standard tools read
        assert archive.getnames()[:3] == ["sample-0000.fg.png", "sample-0000.txt", "sample-0000.json"]


def test_interrupted_write_leaves_no_partial_shard_and_no_index(tmp_path):
    samples = [encode_sample(tiny_sample(index)) for index in range(7)]
    with pytest.raises(RuntimeError, match="interrupted"):
        with ShardWriter(tmp_path, samples_per_shard=3) as writer:
            for index, members in enumerate(samples):
                if index == 5:
                    raise RuntimeError("interrupted")
                writer.write(members)
    # Shard 0 was complete and stays; shard 1 had 2 of 3 samples and must not appear as .tar.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["shard-000000.tar"]
    keys = [members["__key__"] for members in iter_shard_samples([str(tmp_path / "shard-000000.tar")], print)]
    assert keys == ["sample-0000", "sample-0001", "sample-0002"]


def test_rerun_replaces_output_and_removes_stale_shards(tmp_path):
    write_tiny_shards(tmp_path, 9, per_shard=3)
    (tmp_path / "shard-000001.tar.tmp").write_bytes(b"left over by a killed run")
    shards = write_tiny_shards(tmp_path, 4, per_shard=3)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["index.json", "shard-000000.tar", "shard-000001.tar"]
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["num_samples"] == 4 and [s["samples"] for s in index["shards"]] == [3, 1]
    assert index["sizes"] == {"32x32": 4}
    assert sum(1 for _ in iter_shard_samples(shards, print)) == 4


def test_truncated_tar_yields_the_samples_before_the_damage_and_reports_it(tmp_path):
    (shard,) = write_tiny_shards(tmp_path, 4, per_shard=4)
    data = open(shard, "rb").read()
    with open(shard, "wb") as handle:
        handle.write(data[: len(data) // 2])
    errors = []
    keys = [members["__key__"] for members in iter_shard_samples([shard], errors.append)]
    assert 0 < len(keys) < 4 and len(errors) == 1
    assert "unreadable tar data" in str(errors[0]) and shard in str(errors[0])


def test_layer_sample_without_blend_is_rejected_on_encode():
    sample = LayerSample("k", tiny_rgba(), "c", (32, 32), background=np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="come together"):
        encode_sample(sample)
