"""Multi-layer data by inpainting (``python -m data synthesize-layers``, LayerDiffusion sec. 3.4) on the
embedded tiny inpainting model: prompts, masks, the layered shards, drops, bad input, a kill and a resume,
two processes."""

from __future__ import annotations

import contextlib
import io
import json
import re
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from benchmarks import synthesis_throughput as throughput
from data.__main__ import main
from data.schema import decode_sample
from data.shards import iter_shard_samples
from data.spec import resolve_shards
from data.synthesis import NO_PROMPT_FOR_KEY, ForegroundRef, PromptFileError, plan_items, read_prompt_file
from layerdiff.models import base
from layerdiff.models.tiny import TINY_SDXL_VERSION
from layerdiff.models.tiny_inpaint import build_tiny_sdxl_inpaint
from layerdiff.pipelines.layer_synthesis import (
    LayerSynthesizer,
    NotAnInpaintingModelError,
    SynthesisSettings,
    background_masks,
    blend_masks,
    load_inpainting_pipeline,
)
from support.launch import start_data_cli
from support.shards import rgb_png, tiny_rgba, write_tiny_shards

TINY = ["--size", "64", "--steps", "2", "--erosion-radius", "3", "--accelerator", "cpu", "--devices", "1", "--workers", "0"]
PROMPTS = [
    {"foreground": "a red blob", "blend": "a red blob in a kitchen", "background": "nothing in a kitchen"},
    {"blend": "a blob in a garden", "background": "nothing in a garden"},
]


@pytest.fixture(scope="module")
def inpaint_model(tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded tiny SDXL inpainting model's folder, built from the session's tiny SDXL; do not modify."""
    return build_tiny_sdxl_inpaint(tmp_path_factory.mktemp("models") / "tiny-sdxl-inpaint", tiny_sdxl)


def _write_prompts(path: Path, lines: list[dict | str]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines), encoding="utf-8")
    return path


def _png(array: np.ndarray, info: PngInfo | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _samples(out_dir: Path) -> list:
    members = iter_shard_samples(resolve_shards(str(out_dir)), print)
    return [decode_sample(sample, require_layers=True) for sample in members]


@contextlib.contextmanager
def _one_thread():
    # As the subprocesses run (OMP_NUM_THREADS=1): kernels then give the same bits here and there.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_prompt_file_lines_are_parsed_cycled_or_matched_by_key_and_a_broken_line_is_named(tmp_path):
    path = _write_prompts(tmp_path / "prompts.jsonl", [PROMPTS[0], "", PROMPTS[1]])
    prompts = read_prompt_file(path)
    assert [(t.foreground, t.blend, t.line, t.key) for t in prompts.triples] == [
        ("a red blob", "a red blob in a kitchen", 1, None), ("", "a blob in a garden", 3, None)]
    references = [ForegroundRef("in.tar", f"k{index}") for index in range(5)]
    plan = plan_items(references, prompts, seed=10, samples_per_shard=2)
    assert [item.prompts.line for item in plan.items] == [1, 3, 1, 3, 1]  # cycled
    assert [item.seed for item in plan.items] == [10, 11, 12, 13, 14]
    assert [list(shard) for shard in plan.shards] == [[0, 1], [2, 3], [4]]

    keyed = _write_prompts(tmp_path / "keyed.jsonl", [{**PROMPTS[1], "key": "k3"}, {**PROMPTS[0], "key": "k0"},
                                                      {**PROMPTS[0], "key": "elsewhere"}])
    plan = plan_items(references, read_prompt_file(keyed), seed=0, samples_per_shard=2)
    assert [item.prompts.line if item.prompts else item.dropped for item in plan.items] == [
        2, NO_PROMPT_FOR_KEY, NO_PROMPT_FOR_KEY, 1, NO_PROMPT_FOR_KEY]
    assert plan.unmatched_lines == [3]

    broken_lines = {
        '{"blend": "a", "background" "b"}': "line 2: not JSON",
        '["a", "b"]': "line 2: a JSON list",
        '{"blend": "a"}': "line 2: missing 'background'",
        '{"blend": "a", "background": "b", "bg": "c"}': "line 2: unknown field(s) 'bg'",
        '{"blend": "a", "background": 3}': "line 2: field 'background' is a JSON int",
    }
    for line, problem in broken_lines.items():
        bad = _write_prompts(tmp_path / "bad.jsonl", [PROMPTS[0], line])
        with pytest.raises(PromptFileError, match=rf"prompt file {re.escape(f'{bad}, {problem}')}.*--skip-broken-prompts"):
            read_prompt_file(bad)
    skipped = read_prompt_file(bad, skip_broken=True)
    assert len(skipped.triples) == 1 and skipped.broken == [f"{bad}, line 2: field 'background' is a JSON int, expected a string"]
    mixed = _write_prompts(tmp_path / "mixed.jsonl", [{**PROMPTS[0], "key": "k0"}, PROMPTS[1]])
    with pytest.raises(PromptFileError, match=r"line 1 has a \"key\" but line 2 has none"):
        read_prompt_file(mixed)
    twice = _write_prompts(tmp_path / "twice.jsonl", [{**PROMPTS[0], "key": "k0"}, {**PROMPTS[1], "key": "k0"}])
    with pytest.raises(PromptFileError, match=r"line 2: key 'k0' again \(first on line 1\)"):
        read_prompt_file(twice)


def test_blend_mask_is_alpha_below_one_and_background_mask_the_visible_part_grown_by_the_radius():
    alpha = np.zeros((1, 1, 16, 16), np.float32)
    alpha[0, 0, 6:10, 6:10] = 1.0
    alpha[0, 0, 5, 6:10] = 0.5  # a soft edge
    np.testing.assert_array_equal(blend_masks(alpha), (alpha < 1.0).astype(np.float32))
    np.testing.assert_array_equal(background_masks(alpha, 0), (alpha > 0).astype(np.float32))
    grown = background_masks(alpha, 2)[0, 0]
    assert grown[alpha[0, 0] > 0].all()
    assert grown[3, 7] == 1 and grown[2, 7] == 0  # two pixels above the soft edge, not three
    # Euclidean: from the corner (9, 9), (11, 11) is 2.83 away (out, a square would take it), (10, 10) 1.41, (11, 9) 2
    assert grown[11, 11] == 0 and grown[10, 10] == 1 and grown[11, 9] == 1
    assert not background_masks(np.zeros_like(alpha), 5).any()


def test_the_embedded_inpainting_model_is_registered_and_loads_as_an_sdxl_inpainting_pipeline(
        tiny_sdxl, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"tiny-sdxl-v{TINY_SDXL_VERSION}").symlink_to(tiny_sdxl)  # not fitted again
    monkeypatch.setenv("LAYERDIFF_CACHE", str(cache))
    folder = Path(base.resolve_pretrained("embedded:tiny-sdxl-inpaint"))
    assert folder.parent == cache
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLInpaintPipeline" and index["requires_aesthetics_score"] is False
    pipeline = load_inpainting_pipeline("embedded:tiny-sdxl-inpaint")
    assert type(pipeline).__name__ == "StableDiffusionXLInpaintPipeline" and pipeline.unet.config.in_channels == 9
    sdxl = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    for part in ("vae", "text_encoder", "text_encoder_2"):  # the tiny SDXL's own parts
        for (name, mine), theirs in zip(getattr(pipeline, part).state_dict().items(), getattr(sdxl, part).state_dict().values()):
            assert torch.equal(mine, theirs), f"{part}.{name}"

    with pytest.raises(NotAnInpaintingModelError) as raised:
        load_inpainting_pipeline(str(tiny_sdxl))
    message = str(raised.value)
    assert f"its UNet ({tiny_sdxl}/unet/config.json) takes 4 input channels, an inpainting UNet takes 9" in message
    assert "diffusers/stable-diffusion-xl-1.0-inpainting-0.1" in message


def _foreground_shards(folder: Path) -> None:
    """Items 0, 1, 5 usable (1 and 5 at 80x48, scaled); 2 without alpha, 3 fully opaque, 4 empty."""
    opaque, empty = tiny_rgba(48, 80, seed=3), tiny_rgba(64, 64, seed=4)
    opaque[..., 3], empty[..., 3] = 255, 0
    write_tiny_shards(folder, 6, per_shard=4, sizes=((64, 64), (48, 80)),
                      damage={2: {"fg.png": rgb_png(64, 64)}, 3: {"fg.png": _png(opaque)}, 4: {"fg.png": _png(empty)}})


def test_layered_shards_keep_the_foreground_inpaint_around_it_and_count_what_was_dropped(
        inpaint_model, tmp_path, capsys):
    _foreground_shards(tmp_path / "fg")
    prompts = _write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    command = ["synthesize-layers", str(tmp_path / "fg"), str(tmp_path / "out"), "--prompts", str(prompts),
               "--model", str(inpaint_model), "--seed", "100", "--samples-per-shard", "2", "--batch-size", "2", *TINY]
    assert main(command) == 0
    summary = capsys.readouterr().out
    assert "3 layered samples from 6 foregrounds in 3 of 3 shard(s) (0 finished by an earlier run)" in summary
    assert "dropped 3:" in summary
    for reason in ("no alpha channel", "no transparent pixel", "no visible pixel"):
        assert f"1  {reason}, e.g. " in summary
    assert main(["validate", str(tmp_path / "out")]) == 0
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["num_samples"] == 3 and index["items"] == 6 and index["dropped"] == {
        "no alpha channel": 1, "no transparent pixel": 1, "no visible pixel": 1}

    samples = {sample.key: sample for sample in _samples(tmp_path / "out")}
    assert sorted(samples) == ["00000000_sample-0000", "00000001_sample-0001", "00000005_sample-0005"]
    first, scaled = samples["00000000_sample-0000"], samples["00000001_sample-0001"]
    assert (first.caption, first.blend_caption, first.background_caption) == (
        "a red blob", "a red blob in a kitchen", "nothing in a kitchen")
    assert (scaled.caption, scaled.blend_caption, scaled.background_caption) == (
        "caption 1", "a blob in a garden", "nothing in a garden")  # its own caption: the line has no foreground
    assert scaled.size == (64, 64) and scaled.original_size == (48, 80) and scaled.crop_top_left == (0, 21)
    synthesis = first.provenance["synthesis"]
    assert synthesis["model"] == str(inpaint_model) and synthesis["seed"] == 100 and synthesis["prompt_line"] == 1
    assert (synthesis["steps"], synthesis["size"], synthesis["erosion_radius"], synthesis["guidance_scale"]) == (2, 64, 3, 7.0)
    assert synthesis["pipeline"] == "StableDiffusionXLInpaintPipeline" and synthesis["input"]["key"] == "sample-0000"
    assert samples["00000005_sample-0005"].provenance["synthesis"]["seed"] == 105

    for sample in samples.values():
        alpha = sample.foreground[..., 3]
        opaque = alpha == 255
        assert opaque.any() and (alpha < 255).any()
        np.testing.assert_array_equal(sample.blend[opaque], sample.foreground[..., :3][opaque])  # the foreground is kept
        hole = background_masks(alpha[None, None] / 255.0, 3)[0, 0] > 0
        np.testing.assert_array_equal(sample.background[~hole], sample.blend[~hole])  # untouched away from the object
        assert (sample.background[hole] != sample.blend[hole]).any()  # the object was inpainted away

    shard_bytes = {path.name: path.read_bytes() for path in (tmp_path / "out").glob("*.tar")}
    assert main(command) == 0  # again: everything is finished, nothing is redone
    assert "(3 finished by an earlier run); this run: 0 samples" in capsys.readouterr().out
    assert {path.name: path.read_bytes() for path in (tmp_path / "out").glob("*.tar")} == shard_bytes
    assert main([*command[:-len(TINY)], *TINY[:2], "--steps", "3", *TINY[4:]]) == 2
    assert "made by a synthesis run with other settings or inputs (settings: steps: 2 there, 3 now)" in capsys.readouterr().err


def test_png_foregrounds_take_their_prompt_chunk_as_caption_keys_match_and_bad_input_is_reported(
        inpaint_model, tiny_sdxl, tmp_path, capsys):
    folder = tmp_path / "generated"
    (folder / "sub").mkdir(parents=True)
    info = PngInfo()
    info.add_text("prompt", "a generated cat")  # as RGBAPredictionWriter stores it
    (folder / "a.png").write_bytes(_png(tiny_rgba(64, 64, seed=1), info))
    (folder / "sub" / "b.png").write_bytes(_png(tiny_rgba(64, 64, seed=2)))
    (folder / "c.png").write_bytes(rgb_png(64, 64))
    (folder / "d.png").write_bytes(_png(tiny_rgba(64, 64, seed=3)))
    prompts = _write_prompts(tmp_path / "prompts.jsonl", [
        {**PROMPTS[1], "key": "a"}, {**PROMPTS[0], "foreground": "a bird", "key": "sub/b"}, {**PROMPTS[1], "key": "c"},
        '{"key": "e", "blend": "broken"', {**PROMPTS[1], "key": "nobody"}])
    command = ["synthesize-layers", str(folder), str(tmp_path / "out"), "--prompts", str(prompts),
               "--model", str(inpaint_model), *TINY]

    assert main(command) == 2  # a broken line stops the run before anything is loaded
    assert f"error: prompt file {prompts}, line 4: not JSON" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main([*command, "--skip-broken-prompts"]) == 0
    summary = capsys.readouterr().out
    assert "2 layered samples from 4 foregrounds" in summary
    assert f"1  broken prompt line, e.g. {prompts}, line 4: not JSON" in summary
    assert f"1  no alpha channel, e.g. {folder}/c.png:c" in summary
    assert f"1  {NO_PROMPT_FOR_KEY}, e.g. {folder}/d.png:d" in summary
    assert "1 prompt line(s) name a key no foreground has: line(s) 5" in summary
    samples = {sample.key: sample for sample in _samples(tmp_path / "out")}
    assert [(key, sample.caption, sample.source) for key, sample in sorted(samples.items())] == [
        ("00000000_a", "a generated cat", "a.png"), ("00000003_sub-b", "a bird", "sub/b.png")]

    assert main([*command[:2], str(tmp_path / "other"), *command[3:6], str(tiny_sdxl), *TINY, "--skip-broken-prompts"]) == 2
    error = capsys.readouterr().err
    assert f"is not an inpainting model: its UNet ({tiny_sdxl}/unet/config.json) takes 4 input channels" in error
    assert main([*command[:2], str(tmp_path / "other"), *command[3:6], str(tmp_path / "nowhere"), *TINY,
                 "--skip-broken-prompts"]) == 2
    error = capsys.readouterr().err
    assert f"inpainting model '{tmp_path / 'nowhere'}' not found: Base model" in error and "embedded:tiny-sdxl-inpaint" in error


@pytest.fixture(scope="module")
def uninterrupted(inpaint_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    """An 8-foreground run in one process, one thread: its command (less the output folder) and output."""
    root = tmp_path_factory.mktemp("uninterrupted")
    write_tiny_shards(root / "fg", 8, per_shard=8, sizes=((64, 64),))
    prompts = _write_prompts(root / "prompts.jsonl", PROMPTS)
    command = ["synthesize-layers", str(root / "fg"), "--prompts", str(prompts), "--model", str(inpaint_model),
               "--samples-per-shard", "2", "--batch-size", "1", *TINY]
    with _one_thread():
        assert main([*command[:2], str(root / "out"), *command[2:]]) == 0
    return command, root / "out"


def _files(out_dir: Path) -> dict[str, bytes]:
    return {path.relative_to(out_dir).as_posix(): path.read_bytes() for path in sorted(out_dir.rglob("*")) if path.is_file()}


def test_a_run_killed_midway_resumes_to_every_item_once_and_the_uninterrupted_output(uninterrupted, tmp_path):
    command, reference = uninterrupted
    out = tmp_path / "out"
    arguments = [*command[:2], str(out), *command[2:]]
    process = start_data_cli(*arguments, log=tmp_path / "killed.log")
    deadline = time.monotonic() + 240
    while not list((out / "records").glob("*.json")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    output = (tmp_path / "killed.log").read_text()
    assert process.returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{output[-3000:]}"
    finished = len(list((out / "records").glob("*.json")))
    assert 1 <= finished < 4 and not (out / "index.json").exists()

    with _one_thread():
        assert main(arguments) == 0
    keys = Counter(sample.key for sample in _samples(out))
    assert sorted(keys) == [f"{index:08d}_sample-{index:04d}" for index in range(8)] and set(keys.values()) == {1}
    assert _files(out) == _files(reference)  # shards, records, manifest: byte for byte


@pytest.mark.slow
def test_two_processes_share_the_shards_and_write_what_one_writes(uninterrupted, tmp_path):
    command, reference = uninterrupted
    devices = command.index("--devices") + 1
    arguments = [*command[:2], str(tmp_path / "out"), *command[2:devices], "2", *command[devices + 1:]]
    process = start_data_cli(*arguments, log=tmp_path / "two.log")
    process.wait(timeout=300)
    output = (tmp_path / "two.log").read_text()
    assert process.returncode == 0, output[-4000:]
    shares = {int(rank): json.loads(shards) for rank, shards in re.findall(r"rank (\d)/2: shards (\[[\d, ]*\])", output)}
    assert shares == {0: [0, 2], 1: [1, 3]}, output[-4000:]  # each shard made by one process
    assert _files(tmp_path / "out") == _files(reference)


def test_the_throughput_benchmark_times_the_passes_and_the_whole_command(inpaint_model, tmp_path, capsys):
    write_tiny_shards(tmp_path / "fg", 3, sizes=((64, 64),))
    throughput.main(["--model", str(inpaint_model), "--foregrounds", str(tmp_path / "fg"), "--samples", "2",
                     "--steps", "2", "--batch-sizes", "1,2", "--repeats", "1", "--no-write"])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isalpha()]
    assert [line.split(" | ")[:2] for line in table[1:]] == [
        ["| inpainting passes", "1"], ["| whole command", "1"], ["| inpainting passes", "2"], ["| whole command", "2"]]
    assert all(float(line.split(" | ")[2]) > 0 for line in table[1:])


def test_an_sd15_inpainting_model_synthesises_too(tiny_sd15, tmp_path):
    sd15 = StableDiffusionPipeline.from_pretrained(tiny_sd15)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**sd15.unet.config, "in_channels": 9})
    StableDiffusionInpaintPipeline(vae=sd15.vae, text_encoder=sd15.text_encoder, tokenizer=sd15.tokenizer, unet=unet,
                                   scheduler=sd15.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).save_pretrained(tmp_path / "sd15-inpaint")
    pipeline = load_inpainting_pipeline(str(tmp_path / "sd15-inpaint"))
    assert type(pipeline).__name__ == "StableDiffusionInpaintPipeline"
    foreground = torch.from_numpy(tiny_rgba(64, 64, seed=1) / 255.0).permute(2, 0, 1)[None].float()
    layers = LayerSynthesizer(pipeline, SynthesisSettings(size=64, steps=2, erosion_radius=3))(
        foreground, ["a blob in a garden"], ["nothing in a garden"], [0])
    opaque = foreground[:, 3:] == 1
    assert torch.equal(layers.blend[opaque.expand(-1, 3, -1, -1)], foreground[:, :3][opaque.expand(-1, 3, -1, -1)])
    hole = torch.from_numpy(background_masks(foreground[:, 3:].numpy(), 3)) > 0
    assert torch.equal(layers.background[~hole.expand(-1, 3, -1, -1)], layers.blend[~hole.expand(-1, 3, -1, -1)])
    assert not torch.equal(layers.background, layers.blend)
