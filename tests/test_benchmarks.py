"""The benchmark scripts: BENCHMARKS.md updates keep every other section intact, and the scripts
that need hardware this machine lacks (a GPU) still run, on a tiny shape, so they cannot rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import write_section

REPO = Path(__file__).resolve().parents[1]


def test_section_is_created_then_replaced_in_place(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    write_section(path, "## Data pipeline\n\nfirst\n")
    assert path.read_text().startswith("# Benchmarks\n") and "first" in path.read_text()
    path.write_text(path.read_text() + "\n## Models\n\nkeep me\n")
    write_section(path, "## Data pipeline\n\nsecond\n")
    text = path.read_text()
    assert "first" not in text and "second" in text and "## Models\n\nkeep me" in text
    assert text.index("## Data pipeline") < text.index("## Models")


def test_section_is_appended_after_other_sections(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Models\n\nkeep me\n")
    write_section(path, "## Data pipeline\n\nnew\n")
    assert path.read_text() == "# Benchmarks\n\n## Models\n\nkeep me\n\n## Data pipeline\n\nnew\n"


def test_the_unet_step_benchmark_runs_on_a_tiny_unet():
    command = [sys.executable, "-m", "benchmarks.unet_step", "--unet", "tiny", "--resolution", "64",
               "--batch-sizes", "1", "--fine-tunes", "lora", "full", "--optimizers", "adamw", "--checkpointing", "off",
               "--compile", "off", "--steps", "1", "--warmup", "0", "--matmul-size", "256", "--no-write"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| lora") or line.startswith("| full")]
    assert len(rows) == 4 and all(line.rstrip().endswith("% |") for line in rows)  # printed, then in the section


@pytest.mark.slow
def test_the_framework_overhead_benchmark_runs_both_sides_on_both_paths():
    command = [sys.executable, "-m", "benchmarks.framework_overhead", "--rounds", "1", "--steps", "4", "--warmup", "1",
               "--no-write"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| image shards", "| cached latents"))]
    assert len(rows) == 2 and all("x (" in line for line in rows)


@pytest.mark.slow
def test_the_joint_step_benchmark_times_every_variant_and_pairs_the_ratios():
    command = [sys.executable, "-m", "benchmarks.joint_step", "--rounds", "1", "--steps", "2", "--warmup", "1",
               "--batch-size", "2", "--lora-rank", "4", "--no-write"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| single layer", "| 2 layers"))]
    assert [row.split("|")[1].strip() for row in rows[1:]] == [f"2 layers, `{mode}` sharing" for mode in
                                                                ("concat", "frame", "none")]
    assert all("x (" in row and row.rstrip().endswith(("| yes |", "| **no** |")) for row in rows[1:])
    assert "`concat` adds" in result.stdout and "`frame` adds" in result.stdout


@pytest.mark.slow
def test_the_sharing_ablation_trains_every_mode_and_tabulates_them(tiny_sdxl, tiny_transparent_vae, tmp_path):
    command = [sys.executable, "-m", "benchmarks.sharing_ablation", "--steps", "1", "--sets", "1", "--sampling-steps", "1",
               "--transparent-vae", str(tiny_transparent_vae), "--base-unet", str(tiny_sdxl / "unet"),
               "--root", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| `")]
    assert [row.split("|")[1].strip() for row in rows] == ["`none`", "`concat`", "`frame`"]


@pytest.mark.slow
def test_the_premise_benchmark_fine_tunes_both_starts_and_compares_them(tiny_transparent_vae):
    command = [sys.executable, "-m", "benchmarks.premise", "--transparent-vae", str(tiny_transparent_vae), "--no-write",
               "--", "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
               "--data.init_args.batch_size=2"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| pretrained UNet", "| random UNet"))]
    assert [row.split("|")[1].strip() for row in rows] == ["pretrained UNet", "random UNet"]
    assert all(float(cell) > 0 for row in rows for cell in row.split("|")[2:6])
    assert "Reading it: before any fine-tuning" in result.stdout


@pytest.mark.slow
def test_the_diffumatting_ablation_trains_each_variant_and_scores_the_redrawn_composites():
    command = [sys.executable, "-m", "benchmarks.diffumatting_ablation", "--images", "4", "--steps", "4", "--no-write",
               "--", "--trainer.max_steps=1", "--trainer.val_check_interval=1", "--trainer.limit_val_batches=1",
               "--data.init_args.batch_size=4"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    tables = [[line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| ---")][1:]
              for block in result.stdout.split("\n\n") if block.startswith("| ")]
    models, mattes = tables
    assert [row.split("|")[1].strip() for row in models] == ["untrained base", "both losses",
                                                            "no green-background loss", "no boundary loss"]
    for row in models:
        purity, *errors = (float(cell) for cell in row.split("|")[2:7])
        assert 0.0 <= purity <= 1.0 and all(error >= 0.0 for error in errors)
    assert [row.split("|")[1].strip() for row in mattes] == ["chroma key", "chroma key + GreenPost", "matting head",
                                                            "matting head + GreenPost"]
    assert "Community LoRA" in result.stdout and "at weight 1.0" in result.stdout


@pytest.mark.slow
def test_the_conditional_layers_benchmark_compares_modes_samplers_and_composition(tiny_sdxl, tiny_transparent_vae):
    command = [sys.executable, "-m", "benchmarks.conditional_layers", "--steps", "1", "--triplets", "1", "--val-batches", "1",
               "--sample-steps", "2", "--transparent-vae", str(tiny_transparent_vae), "--base-unet", str(tiny_sdxl / "unet")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    modes = [line.split("|")[1:3] for line in result.stdout.splitlines() if line.startswith(("| mixed", "| joint only"))]
    assert [(model.strip(), mode.strip()) for model, mode in modes] == [
        ("mixed modes", "given_background"), ("mixed modes", "given_foreground"), ("mixed modes", "joint"),
        ("joint only", "joint")]
    samplers = [line.split("|")[1].strip() for line in result.stdout.splitlines()
                if line.startswith("| ") and line.split("|")[1].strip() in ("euler", "euler_a", "dpm++", "dpm++_karras", "ddim")]
    assert samplers == ["euler", "euler_a", "dpm++", "dpm++_karras", "ddim"]
    assert "changed by at most 0.0 8-bit levels" in result.stdout
