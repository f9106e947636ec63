"""``python -m data validate``: statistics, corrupt members with shard + key, exit status."""

from __future__ import annotations

from data.__main__ import main
from data.schema import FOREGROUND, METADATA
from data.validate import validate_shards
from support.shards import rgb_png, truncated_foreground, write_tiny_shards


def test_statistics_of_clean_shards(tmp_path, capsys):
    shards = write_tiny_shards(tmp_path, 10, per_shard=4, sizes=((32, 32), (32, 48)), layers=True)
    report = validate_shards(shards)
    assert report.ok and report.samples == 10 and len(report.shards) == 3
    assert dict(report.sizes) == {"32x32": 5, "48x32": 5}
    assert report.with_layers == 10 and report.caption_lengths == [len(f"caption {i}") for i in range(10)]
    assert all(0.0 < coverage < 1.0 for coverage in report.coverages)

    assert main(["validate", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "10 valid samples in 3 shard(s)" in printed
    assert "48x32" in printed and "#" * 40 in printed  # the histogram bars
    assert "alpha coverage" in printed and "caption length (characters): min 9" in printed
    assert printed.rstrip().endswith("OK")


def test_corrupt_members_are_listed_with_shard_and_key_and_fail(tmp_path, capsys):
    shards = write_tiny_shards(
        tmp_path, 8, per_shard=4,
        damage={1: {FOREGROUND: truncated_foreground()}, 6: {FOREGROUND: b"not a png at all"}, 7: {METADATA: b"{"}},
    )
    report = validate_shards(shards)
    assert not report.ok and report.samples == 5 and len(report.corrupt) == 3
    assert f"shard {shards[0]}, key sample-0001, field 'fg.png'" in report.corrupt[0]
    assert "sample-0006" in report.corrupt[1] and "sample-0007" in report.corrupt[2]

    assert main(["validate", *shards]) == 1
    printed = capsys.readouterr().out
    assert "corrupt members: 3" in printed and "sample-0006" in printed and "FAILED" in printed


def test_schema_errors_fail_and_are_reported(tmp_path, capsys):
    shards = write_tiny_shards(tmp_path, 4, damage={2: {FOREGROUND: rgb_png()}, 3: {FOREGROUND: None}})
    report = validate_shards(shards)
    assert report.samples == 2 and len(report.schema_errors) == 2
    assert "sample-0002" in report.schema_errors[0] and "no alpha channel" in report.schema_errors[0]
    assert main(["validate", f"{tmp_path}/shard-{{000000..000000}}.tar"]) == 1
    assert "schema errors: 2" in capsys.readouterr().out


def test_validate_reports_missing_shards_as_usage_error(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "missing")]) == 2
    assert "do not exist" in capsys.readouterr().err
