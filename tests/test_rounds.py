"""Human-in-the-loop rounds (``python -m data round``): prompt files, round folders, ``generate`` through
``train.py predict`` on the embedded tiny model, and ``add``, whose shards ``python -m data validate``
accepts with each pick's sampling weight and round in its metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.__main__ import main
from data.review_journal import JOURNAL_NAME, DecisionJournal
from data.rounds import MANIFEST_NAME, draw_prompts, load_round, read_prompts
from data.schema import decode_sample
from data.shards import INDEX_NAME, iter_shard_samples
from data.spec import resolve_shards
from layerdiff.rgba import load_rgba, prepare_foreground
from support.review import ReviewServer, write_fake_round

REPO = Path(__file__).resolve().parents[1]
PREDICT_RECIPE = ["configs/latent_diffusion.yaml", "configs/demo/latent_diffusion.yaml", "configs/predict.yaml",
                  "configs/demo/predict.yaml"]


def run_cli(capsys, *arguments: str) -> tuple[int, str, str]:
    status = main([str(argument) for argument in arguments])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def shard_samples(out_dir: Path) -> list:
    def fail(error: Exception) -> None:
        raise error

    return [decode_sample(members) for members in iter_shard_samples(resolve_shards(str(out_dir)), fail)]


# -- prompt files ------------------------------------------------------------------------------


def test_prompt_files_are_read_line_by_line_and_a_broken_line_is_named(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_bytes("\ufeffa red apple\r\n\n  a glass cup \t\nun café\n".encode())
    assert read_prompts(good) == ["a red apple", "a glass cup", "un café"]

    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes("a cat\na dog\nun caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{not_utf8}:3: not UTF-8 text \(byte 0xe9 at column 7\)"):
        read_prompts(not_utf8)
    escape = tmp_path / "escape.txt"
    escape.write_text("a cat\na \x1b[31mred\x1b[0m dog\n")
    with pytest.raises(ValueError, match=rf"{escape}:2: control character U\+001B at column 3"):
        read_prompts(escape)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompts(blank)
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        read_prompts(tmp_path / "missing.txt")


def test_prompts_are_drawn_with_replacement_by_seed() -> None:
    prompts = ["a", "b", "c"]
    drawn = draw_prompts(prompts, 30, seed=4)
    assert drawn == draw_prompts(prompts, 30, seed=4) and drawn != draw_prompts(prompts, 30, seed=5)
    assert len(drawn) == 30 and set(drawn) == set(prompts)


def test_generate_refuses_bad_input_before_running_anything(tmp_path: Path, capsys) -> None:
    checkpoint = tmp_path / "last.ckpt"
    checkpoint.write_bytes(b"not read before the inputs are checked")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\x00\n")
    recipe = [argument for config in PREDICT_RECIPE for argument in ("-c", REPO / config)]
    arguments = ["round", "generate", tmp_path / "round", "--checkpoint", checkpoint, "--prompt-file", prompts,
                 "--count", "3", *recipe]
    status, _, error = run_cli(capsys, *arguments)
    assert status == 2 and f"{prompts}:2: control character U+0000 at column 1" in error
    assert not (tmp_path / "round").exists()

    status, _, error = run_cli(capsys, *[tmp_path / "gone.ckpt" if item == checkpoint else item for item in arguments])
    assert status == 2 and "gone.ckpt does not exist" in error
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / MANIFEST_NAME).write_text("{}")
    status, _, error = run_cli(capsys, *[tmp_path / "old" if item == tmp_path / "round" else item for item in arguments])
    assert status == 2 and "already holds a round" in error
    with pytest.raises(SystemExit):  # argparse: the recipe is required
        main([str(item) for item in arguments[:9]])
    assert "-c/--config" in capsys.readouterr().err


# -- round folders ---------------------------------------------------------------------------


def test_a_round_folder_must_hold_a_sound_round_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"has no round.json, so it is not a round folder: make a round with"):
        load_round(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_round(tmp_path / "nowhere")
    folder = tmp_path / "round"
    manifest = write_fake_round(folder, 3)
    assert [sample.prompt for sample in load_round(folder).samples] == [f"prompt number {i}" for i in range(3)]

    payload = json.loads((folder / MANIFEST_NAME).read_text())
    for file, message in (("../secret.png", "outside the round folder"), (str(tmp_path / "x.png"), "outside the round"),
                          ("generated/gone.png", "is missing")):  # fmt: skip
        broken = {**payload, "samples": [{**payload["samples"][0], "file": file}]}
        (folder / MANIFEST_NAME).write_text(json.dumps(broken))
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            load_round(folder)
    (folder / MANIFEST_NAME).write_text(json.dumps({**payload, "samples": payload["samples"][:1] * 2}))
    with pytest.raises(ValueError, match="repeated or not of"):
        load_round(folder)
    (folder / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_round(folder)
    manifest.save(folder)
    assert load_round(folder).samples == manifest.samples


# -- add ---------------------------------------------------------------------------------------


def decide(folder: Path, decisions: dict[int, str]) -> None:
    """Decisions as the review server records them."""
    samples = load_round(folder).samples
    journal = DecisionJournal(folder / JOURNAL_NAME, [sample.id for sample in samples])
    for index, decision in decisions.items():
        journal.record(samples[index].id, decision)
    journal.close()


def test_add_writes_the_picks_with_their_weight_into_shards_validate_accepts(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "round-3"
    write_fake_round(folder, 6, opaque=(4,))
    decide(folder, {0: "picked", 1: "rejected", 2: "picked", 3: "picked", 4: "picked", 5: "picked"})
    decide(folder, {3: "rejected", 5: "undecided"})  # changed minds: the last decision stands
    out = tmp_path / "shards" / "round-3"
    status, output, _ = run_cli(capsys, "round", "add", folder, out, "--weight", "2.0", "--workers", "1")
    assert status == 0, output
    assert "5 of 6 samples reviewed, 3 picked, 2 rejected" in output
    assert "dropped 00004_seed104_prompt-4: no transparent pixel" in output  # the writer's rule, as for any image
    assert "1 sample(s) are still undecided" in output

    assert run_cli(capsys, "validate", out)[0] == 0
    samples = shard_samples(out)
    assert [sample.key for sample in samples] == ["round-3_00000_seed100_prompt-0", "round-3_00002_seed102_prompt-2"]
    for sample, index in zip(samples, (0, 2)):
        name = sample.key.removeprefix("round-3_")
        assert sample.caption == f"prompt number {index}" and sample.source == f"round-3/generated/{name}.png"
        assert sample.provenance["sampling_weight"] == 2.0
        assert sample.provenance["round"] == {"name": "round-3", "sample": name, "status": "picked",
                                              "prompt": f"prompt number {index}", "seed": 100 + index,
                                              "checkpoint": "/models/fake.ckpt"}
        # stored as the shard writer stores any cut-out: colour padded under zero alpha (and only there)
        padded = np.rint(prepare_foreground(load_rgba(folder / "generated" / f"{name}.png")) * 255)
        assert sample.size == (16, 16) and np.abs(sample.foreground.astype(float) - padded).max() <= 1
    index = json.loads((out / INDEX_NAME).read_text())
    assert (index["round"], index["sampling_weight"], index["num_samples"]) == ("round-3", 2.0, 2)

    # adding again after more review rewrites this round's shards (here resized); another set's are never replaced
    decide(folder, {5: "picked"})
    assert run_cli(capsys, "round", "add", folder, out, "--size", "32", "--weight", "3", "--workers", "1")[0] == 0
    assert [(sample.size, sample.provenance["sampling_weight"]) for sample in shard_samples(out)] == [((32, 32), 3.0)] * 3
    other = tmp_path / "base"
    other.mkdir()
    (other / "shard-000000.tar").write_bytes(b"")
    status, _, error = run_cli(capsys, "round", "add", folder, other)
    assert status == 2 and "already holds shards" in error and (other / "shard-000000.tar").exists()


def test_add_refuses_a_round_nobody_reviewed_or_picked_from(tmp_path: Path, capsys) -> None:
    status, _, error = run_cli(capsys, "round", "add", tmp_path, tmp_path / "out")
    assert status == 2 and "has no round.json" in error
    folder = tmp_path / "round-1"
    write_fake_round(folder, 3)
    status, _, error = run_cli(capsys, "round", "add", folder, tmp_path / "out")
    assert status == 2 and "has no review.jsonl: nobody has reviewed round round-1 yet" in error
    decide(folder, {0: "rejected", 1: "picked"})
    decide(folder, {1: "rejected"})
    status, _, error = run_cli(capsys, "round", "add", folder, tmp_path / "out")
    assert status == 2 and "nothing to add: no sample of round round-1 is picked" in error
    assert "2 of 3 samples reviewed, 0 picked, 2 rejected" in error
    status, _, error = run_cli(capsys, "round", "add", folder, tmp_path / "out", "--weight", "0")
    assert status == 2 and "--weight must be a positive number" in error
    assert not (tmp_path / "out").exists()


# -- generate, for real --------------------------------------------------------------------------


@pytest.fixture
def checkpoint(tiny_sdxl: Path, tiny_transparent_vae: Path, tmp_path: Path) -> Path:
    """The demo recipe's model on the test models, built by train.py's CLI and saved as its trainer saves."""
    from train import LayerdiffCLI

    overrides = ["--model.init_args.base_model", str(tiny_sdxl), "--model.init_args.transparent_vae",
                 str(tiny_transparent_vae), "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "fit")]
    cli = LayerdiffCLI(args=[item for config in PREDICT_RECIPE[:2] for item in ("-c", str(REPO / config))] + overrides,
                       run=False)
    cli.trainer.strategy.connect(cli.model)
    cli.trainer.save_checkpoint(tmp_path / "last.ckpt")
    return tmp_path / "last.ckpt"


@pytest.mark.slow
def test_generate_review_add_on_the_tiny_model(checkpoint: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("an emoji of a cat\n\nan emoji of a red apple\nan emoji of a rocket\n")
    folder = tmp_path / "rounds" / "round-1"
    status, output, error = run_cli(
        capsys, "round", "generate", folder, "--checkpoint", checkpoint, "--prompt-file", prompts, "--count", "3",
        "--seed", "7", *[item for config in PREDICT_RECIPE for item in ("-c", REPO / config)],
        "--", "--data.init_args.settings.steps", "2", "--trainer.enable_progress_bar", "false",
    )  # fmt: skip
    assert status == 0, error[-3000:]
    assert "3 images and round.json" in output

    manifest = load_round(folder)
    drawn = draw_prompts(read_prompts(prompts), 3, seed=7)
    assert [(sample.prompt, sample.seed) for sample in manifest.samples] == list(zip(drawn, (7, 8, 9)))
    assert (folder / "prompts.txt").read_text().splitlines() == drawn
    assert manifest.model["checkpoint"] == str(checkpoint)
    assert manifest.settings["steps"] == 2 and manifest.settings["width"] == 64
    assert "--ckpt_path" in manifest.model["train_arguments"]
    for sample in manifest.samples:
        with Image.open(folder / sample.file) as image:
            assert image.mode == "RGBA" and image.size == (64, 64)
            assert (image.text["prompt"], image.text["seed"]) == (sample.prompt, str(sample.seed))

    with ReviewServer(folder) as server:  # two picks and a reject through the real server
        for sample, decision in zip(manifest.samples, ("picked", "rejected", "picked")):
            body = json.dumps({"sample": sample.id, "decision": decision}).encode()
            assert server.request("POST", f"/api/decisions?token={server.token}", body)[0] == 200
    out = tmp_path / "shards" / "round-1"
    status, output, error = run_cli(capsys, "round", "add", folder, out, "--workers", "1")
    assert status == 0, output + error
    assert run_cli(capsys, "validate", out)[0] == 0
    written = shard_samples(out)
    picked = [manifest.samples[0], manifest.samples[2]]
    dropped = [line for line in output.splitlines() if line.strip().startswith("dropped")]
    assert len(written) + len(dropped) == 2  # an untrained decoder's image may lack a transparent pixel
    for sample in written:
        assert sample.provenance["sampling_weight"] == 2.0 and sample.provenance["round"]["name"] == "round-1"
        assert sample.provenance["round"]["sample"] in {pick.id for pick in picked}
