"""``python -m data filter``: each filter on a hand-made case, scores recorded in the metadata, the
report naming shard, key and why, captions from a tiny local model, and clear errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPModel, CLIPProcessor, pipeline

from data.__main__ import main
from data.captions import Captioner
from data.filters import REPORT_NAME, build_steps, filter_shards, parse_thresholds
from data.schema import FOREGROUND, METADATA, SchemaError, decode_sample, encode_sample
from data.scorers import HashIndex, dhash, on_grey
from data.shards import INDEX_NAME, ShardWriter, iter_shard_samples
from support.scorers import aesthetic_head, build_tiny_clip, build_tiny_llava, save_aesthetic_head
from support.shards import tiny_sample


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scorers")
    return {
        "clip": build_tiny_clip(root / "clip"),
        "head": save_aesthetic_head(root / "head.pth", aesthetic_head()),
        "llava": build_tiny_llava(root / "llava"),
        "llava_plain": build_tiny_llava(root / "llava-plain", chat_template=False),
    }


def _write(folder: Path, samples, per_shard: int = 3) -> list[str]:
    with ShardWriter(folder, per_shard) as writer:
        for sample in samples:
            writer.write(sample if isinstance(sample, dict) else encode_sample(sample))
        writer.close()
    return sorted(str(path) for path in folder.glob("*.tar"))


def _read(folder: Path) -> dict[str, dict]:
    """Every written sample by key: its members and its JSON."""
    shards = sorted(str(path) for path in folder.glob("*.tar"))
    return {members["__key__"]: {**members, "metadata": json.loads(members[METADATA])}
            for members in iter_shard_samples(shards, lambda error: None)}


def _with_alpha(index: int, alpha: int):
    sample = tiny_sample(index)
    sample.foreground = sample.foreground.copy()
    sample.foreground[..., 3] = alpha
    return sample


def test_alpha_drops_opaque_and_invisible_samples_and_keeps_the_rest_byte_for_byte(tmp_path):
    samples = [tiny_sample(0), _with_alpha(1, 255), tiny_sample(2), _with_alpha(3, 0), tiny_sample(4)]
    shards = _write(tmp_path / "in", samples)
    report = filter_shards(shards, tmp_path / "out", build_steps(["alpha"], {}), batch_size=2)
    written = _read(tmp_path / "out")
    assert sorted(written) == ["sample-0000", "sample-0002", "sample-0004"]
    assert report.read == 5 and report.written == 3 and report.dropped == {"alpha": 2}
    saved = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert saved["dropped"] == {"alpha": 2} and saved["examples"]["alpha"] == [
        {"shard": shards[0], "key": "sample-0001", "why": "no transparent pixel"},
        {"shard": shards[1], "key": "sample-0003", "why": "no visible pixel"},
    ]
    for sample in samples:
        if sample.key in written:
            members = written[sample.key]
            assert members[FOREGROUND] == encode_sample(sample)[FOREGROUND]  # pixels copied, not re-encoded
            visible = np.count_nonzero(decode_sample(members).foreground[..., 3]) / 32**2
            assert members["metadata"]["scores"] == {"alpha": round(visible, 6)}
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    assert index["num_samples"] == 3 and index["steps"] == ["alpha"] and index["dropped"] == {"alpha": 2}


def test_near_duplicates_keep_the_first_and_name_it(tmp_path):
    original = tiny_sample(0)
    near = tiny_sample(5)
    noise = np.random.default_rng(0).integers(-6, 7, size=original.foreground[..., :3].shape)  # moves 1 hash bit
    near.foreground = original.foreground.copy()
    near.foreground[..., :3] = np.clip(original.foreground[..., :3] + noise, 0, 255)
    shifted = tiny_sample(6)  # the same object elsewhere: cropped to its visible pixels, it hashes alike
    shifted.foreground = np.roll(original.foreground, (3, -2), axis=(0, 1))
    shards = _write(tmp_path / "in", [original, tiny_sample(1), tiny_sample(2), near, tiny_sample(3), shifted])
    report = filter_shards(shards, tmp_path / "out", build_steps(["dedup"], {}))
    written = _read(tmp_path / "out")
    assert sorted(written) == ["sample-0000", "sample-0001", "sample-0002", "sample-0003"]
    assert report.dropped == {"dedup": 2}
    why = {example["key"]: example["why"] for example in report.examples["dedup"]}
    assert why["sample-0005"].startswith(f"near-duplicate of sample-0000 in {shards[0]} (1 of 64 dHash bits differ")
    assert why["sample-0006"].startswith(f"near-duplicate of sample-0000 in {shards[0]} (0 of 64")
    expected_hash = dhash(on_grey(original.foreground, crop=True))
    assert written["sample-0000"]["metadata"]["scores"] == {"dhash": f"{expected_hash:016x}"}
    assert f"dhash {dhash(on_grey(near.foreground, crop=True)):016x}" in why["sample-0005"]
    # With no differing bit allowed, only the exact copy goes.
    exact = filter_shards(shards, tmp_path / "exact", build_steps(["dedup"], {"dedup": 0}))
    assert [example["key"] for example in exact.examples["dedup"]] == ["sample-0006"]


def test_the_hash_index_finds_what_comparing_every_pair_finds():
    rng = np.random.default_rng(0)
    kept = [int(value) for value in rng.integers(0, 2**63, size=300, dtype=np.int64)]
    queries = [value ^ (1 << int(bit)) ^ (1 << int(rng.integers(64))) for value, bit in zip(kept[:50], rng.integers(64, size=50))]
    queries += [int(value) for value in rng.integers(0, 2**63, size=50, dtype=np.int64)]
    for max_distance in (0, 2, 4, 9):
        index = HashIndex(max_distance)
        for position, value in enumerate(kept):
            index.add(value, position)
        for query in queries:
            closest = min((bin(query ^ value).count("1"), position) for position, value in enumerate(kept))
            found = index.nearest(query)
            if closest[0] > max_distance:
                assert found is None
            else:
                assert found is not None and found[0] == closest[0]
    with pytest.raises(ValueError, match="0 to 63 differing bits"):
        HashIndex(64)


def test_clip_and_aesthetic_scores_are_recorded_and_thresholds_applied(tmp_path, models):
    samples = [tiny_sample(index) for index in range(6)]
    samples[4].caption = ""
    shards = _write(tmp_path / "in", samples)
    steps = build_steps(["clip", "aesthetic"], {}, clip_model=models["clip"], aesthetic_head=models["head"])
    filter_shards(shards, tmp_path / "scored", steps, batch_size=4)
    scored = _read(tmp_path / "scored")
    assert len(scored) == 6  # without thresholds, scores are only recorded

    # The same numbers another way: CLIPModel's own forward pass and the head as the test built it.
    model = CLIPModel.from_pretrained(models["clip"]).eval()
    processor = CLIPProcessor.from_pretrained(models["clip"])
    images = [on_grey(sample.foreground) for sample in samples]
    with torch.no_grad():
        outputs = model(**processor(text=[s.caption or "-" for s in samples], images=images, return_tensors="pt",
                                    padding=True))
        aesthetic = aesthetic_head()(outputs.image_embeds).squeeze(1)
    cosine = (outputs.image_embeds * outputs.text_embeds).sum(dim=1)
    for index, sample in enumerate(samples):
        scores = scored[sample.key]["metadata"]["scores"]
        assert scores["aesthetic"] == pytest.approx(float(aesthetic[index]), abs=1e-5)
        if index == 4:
            assert "clip" not in scores  # nothing to compare the image with
        else:
            assert scores["clip"] == pytest.approx(float(cosine[index]), abs=1e-5)

    clip_threshold = float(np.median([float(cosine[i]) for i in range(6) if i != 4]))
    aesthetic_threshold = float(aesthetic.min()) + 1e-4  # drops exactly the lowest
    thresholds = parse_thresholds([f"clip={clip_threshold}", f"aesthetic={aesthetic_threshold}"], ["clip", "aesthetic"])
    steps = build_steps(["aesthetic", "clip"], thresholds, clip_model=models["clip"], aesthetic_head=models["head"])
    report = filter_shards(shards, tmp_path / "kept", steps)
    lowest = int(aesthetic.argmin())
    to_clip = [i for i in range(6) if i != lowest]  # the clip step sees what the aesthetic step kept
    survivors = [i for i in to_clip if i != 4 and float(cosine[i]) >= clip_threshold]
    assert 0 < len(survivors) < len(to_clip)
    assert sorted(_read(tmp_path / "kept")) == [samples[i].key for i in survivors]
    assert report.dropped["aesthetic"] == 1 and report.examples["aesthetic"][0]["key"] == samples[lowest].key
    assert report.dropped["clip"] == len(to_clip) - len(survivors)
    why = {example["key"]: example["why"] for example in report.examples["clip"]}
    assert lowest == 4 or "empty caption" in why["sample-0004"]
    assert all(why[samples[i].key].startswith("clip score ") for i in to_clip if i not in survivors and i != 4)


@pytest.mark.parametrize("chat", [True, False])
def test_captions_come_from_the_local_model_and_existing_ones_can_stay(tmp_path, models, chat):
    samples = [tiny_sample(index) for index in range(4)]
    samples[1].caption = ""
    shards = _write(tmp_path / "in", samples)
    folder = models["llava" if chat else "llava_plain"]
    prompt = "Describe the object." if chat else "<image>Describe the object."
    captioner = Captioner(folder, prompt=prompt, max_new_tokens=6, batch_size=2)
    report = filter_shards(shards, tmp_path / "all", build_steps([], {}, captioner=captioner))
    written = _read(tmp_path / "all")

    direct = pipeline("image-text-to-text", model=str(folder))
    for sample in samples:
        picture = on_grey(sample.foreground)
        if chat:
            messages = [{"role": "user", "content": [{"type": "image", "image": _pil(picture)},
                                                     {"type": "text", "text": prompt}]}]
            expected = direct(text=messages, generate_kwargs={"max_new_tokens": 6, "do_sample": False},
                              return_full_text=False)
        else:
            expected = direct(images=_pil(picture), text=prompt,
                              generate_kwargs={"max_new_tokens": 6, "do_sample": False}, return_full_text=False)
        assert written[sample.key]["txt"].decode() == expected[0]["generated_text"].strip()
        assert written[sample.key]["metadata"]["captioned_by"] == folder.name
    assert any(written[sample.key]["txt"] for sample in samples), "the tiny model wrote only empty captions"
    assert report.captions["written"] == 4

    keep = Captioner(folder, prompt=prompt, max_new_tokens=6)
    report = filter_shards(shards, tmp_path / "kept", build_steps([], {}, captioner=keep, keep_captions=True))
    kept = _read(tmp_path / "kept")
    assert [kept[sample.key]["txt"].decode() for sample in samples] == [
        "caption 0", written["sample-0001"]["txt"].decode(), "caption 2", "caption 3"]
    assert "captioned_by" not in kept["sample-0000"]["metadata"] and report.captions["kept"] == 3


def _pil(rgb: np.ndarray):
    from PIL import Image

    return Image.fromarray(rgb)


def test_the_command_runs_every_step_and_reports(tmp_path, models, capsys):
    samples = [tiny_sample(0), _with_alpha(1, 255), tiny_sample(2), tiny_sample(3)]
    damaged = encode_sample(tiny_sample(4))
    damaged[FOREGROUND] = b"not a png"
    _write(tmp_path / "in", samples + [damaged, encode_sample(tiny_sample(0)) | {"__key__": "sample-0009"}])
    status = main(["filter", str(tmp_path / "in"), str(tmp_path / "out"), "--filter", "alpha,dedup",
                   "--filter", "aesthetic", "--filter", "clip", "--threshold", "dedup=3",
                   "--clip-model", str(models["clip"]), "--aesthetic-head", str(models["head"]),
                   "--caption-model", str(models["llava"]), "--keep-captions", "--max-new-tokens", "4"])
    printed = capsys.readouterr().out
    assert status == 0
    written = _read(tmp_path / "out")
    assert sorted(written) == ["sample-0000", "sample-0002", "sample-0003"]
    assert set(written["sample-0000"]["metadata"]["scores"]) == {"alpha", "aesthetic", "clip", "dhash"}
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert report["dropped"] == {"alpha": 1, "corrupt": 1, "dedup": 1}
    assert report["examples"]["dedup"][0]["key"] == "sample-0009" and "of sample-0000" in report["examples"]["dedup"][0]["why"]
    assert "key sample-0004, field 'fg.png'" in report["examples"]["corrupt"][0]["why"]
    assert "read 6 samples, wrote 3, dropped 3" in printed and "filter_report.json" in printed


def test_bad_input_fails_clearly(tmp_path, models, capsys):
    weighted = tiny_sample(1)
    weighted.provenance = {"sampling_weight": "twice"}
    shards = _write(tmp_path / "in", [tiny_sample(0), weighted])
    with pytest.raises(SchemaError, match=rf"shard {shards[0]}, key sample-0001, field 'json': sampling_weight must be"):
        filter_shards(shards, tmp_path / "out", build_steps(["alpha"], {}))

    missing = tmp_path / "nowhere" / "head.pth"
    with pytest.raises(FileNotFoundError, match=rf"aesthetic head weights {missing} does not exist.*nothing is downloaded"):
        build_steps(["aesthetic"], {}, clip_model=models["clip"], aesthetic_head=missing)
    assert main(["filter", str(tmp_path / "in"), str(tmp_path / "out"), "--filter", "clip",
                 "--clip-model", str(tmp_path / "no-clip")]) == 2
    assert f"CLIP model folder {tmp_path / 'no-clip'} does not exist" in capsys.readouterr().err
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match="cannot read aesthetic head weights"):
        build_steps(["aesthetic"], {}, clip_model=models["clip"], aesthetic_head=tmp_path / "junk.pth")
    wide = save_aesthetic_head(tmp_path / "wide.pth", aesthetic_head(width=12))
    with pytest.raises(ValueError, match="takes 12-wide embeddings, the CLIP model gives 8"):
        build_steps(["aesthetic"], {}, clip_model=models["clip"], aesthetic_head=wide)
    for items, message in (([], "nothing to do"), (["aesthetic"], "need a local CLIP model"), (["sharpness"], "unknown")):
        with pytest.raises(ValueError, match=message):
            build_steps(items, {})
    for item, message in (("alpha=1", "alpha has no threshold"), ("clip=high", "not a number"),
                          ("dedup=2.5", "counts differing bits"), ("aesthetic=5", "add --filter aesthetic")):
        with pytest.raises(ValueError, match=message):
            parse_thresholds([item], ["alpha", "clip", "dedup"])
    with pytest.raises(ValueError, match="holds input shards"):
        filter_shards(shards, tmp_path / "in", build_steps(["alpha"], {}))
