"""What ``train.py`` prints: a project error as its own message alone, a misspelt setting named
with the closest accepted one, an unexpected exception with its traceback, and a run free of
the third-party chatter the console silences."""

from __future__ import annotations

import pytest

from support.launch import run_train_py
from support.shards import write_tiny_shards

RECIPE = ("-c", "configs/transparent_vae.yaml")
PARSER_DUMP = ("NoneType", "Given value", "Union subtypes", "usage:")


def test_a_missing_base_model_prints_our_two_way_fix_alone(tmp_path):
    result = run_train_py("fit", *RECIPE, f"--trainer.default_root_dir={tmp_path}", check=False, HF_HUB_OFFLINE="1")
    assert result.returncode == 1
    assert "error: Base model 'stabilityai/stable-diffusion-xl-base-1.0'" in result.stderr
    assert "Fix it in one of two ways" in result.stderr and "embedded:tiny-sdxl" in result.stderr
    for noise in (*PARSER_DUMP, "Traceback"):
        assert noise not in result.stderr, result.stderr


def test_a_misspelt_key_is_named_with_the_accepted_one():
    result = run_train_py("fit", *RECIPE, "--model.init_args.learnin_rate", "1", check=False)
    assert result.returncode == 2
    assert ("error: 'learnin_rate' is not an argument of layerdiff.modules.TransparentVAEModule (in 'model'); "
            "did you mean 'learning_rate'?") in result.stderr
    for noise in PARSER_DUMP:
        assert noise not in result.stderr, result.stderr


def test_a_misspelt_trainer_option_is_named_with_the_accepted_one():
    result = run_train_py("fit", *RECIPE, "--trainer.max_stepz", "1", check=False)
    assert result.returncode == 2
    assert "unrecognized arguments: --trainer.max_stepz 1; did you mean '--trainer.max_steps'?" in result.stderr
    assert "usage:" not in result.stderr


def test_an_unexpected_exception_while_building_keeps_its_traceback(tiny_sdxl, tmp_path):
    result = run_train_py("fit", *RECIPE, "-c", "configs/demo/transparent_vae.yaml", f"--trainer.default_root_dir={tmp_path}",
                          f"--model.init_args.base_model={tiny_sdxl}",
                          "--model.init_args.decoder_block_out_channels=[16, 16, 32, 32, 64, 64, 63]", check=False)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "num_channels (63) must be divisible" in result.stderr
    for noise in PARSER_DUMP:
        assert noise not in result.stderr, result.stderr


@pytest.mark.slow
def test_a_tiny_fit_prints_none_of_the_silenced_chatter(tiny_sdxl, tmp_path):
    write_tiny_shards(tmp_path / "shards/train", 4, per_shard=4, sizes=((64, 64),))
    write_tiny_shards(tmp_path / "shards/val", 2, per_shard=2, sizes=((64, 64),))
    result = run_train_py(
        "fit", *RECIPE, "-c", "configs/demo/transparent_vae.yaml", f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--trainer.max_steps=2", "--trainer.limit_val_batches=1", f"--model.init_args.base_model={tiny_sdxl}",
        "--model.init_args.decoder_block_out_channels=[8, 8, 16, 16, 16, 16, 16]",
        f"--data.init_args.train_shards={tmp_path / 'shards/train'}", f"--data.init_args.val_shards={tmp_path / 'shards/val'}",
        "--data.init_args.batch_size=2", "--data.init_args.num_workers=0", "--data.init_args.shuffle_buffer=4",
        WANDB_SILENT="",  # the console's own default, not the test launcher's
    )
    output = result.stdout + result.stderr
    assert "Modules in eval mode" in output and "eval mode is intended" in output  # said once, in the summary
    for noise in ("💡 Tip", "in eval mode at the start of training", "FLOPs", "Loading weights", "requires torchvision",
                  "gemm_4bit_forward", "LeafSpec", "wandb: "):
        assert noise not in output, output[-4000:]
