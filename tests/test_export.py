"""Released LayerDiffuse file layout, export/import round trips and the export CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from layerdiff.export import main
from layerdiff.formats.layerdiffuse_vae import (
    DECODER_FILENAME,
    ENCODER_FILENAME,
    FLAVOURS,
    load_transparent_vae,
    save_transparent_vae,
)
from layerdiff.formats.provenance import read_metadata
from layerdiff.models.transparency import LatentTransparencyEncoder, TransparencyDecoder
from support.transparency import (
    TINY,
    assert_round_trip,
    fake_lightning_state,
    trained_tiny_modules,
)


@pytest.fixture(scope="module")
def full_size() -> tuple[LatentTransparencyEncoder, TransparencyDecoder]:
    torch.manual_seed(0)
    return LatentTransparencyEncoder(), TransparencyDecoder()


@pytest.fixture(scope="module")
def full_size_export(full_size, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    paths = save_transparent_vae(*full_size, out, metadata={"learning_rate": 1e-5, "nested": {"widths": (1, 2)}})
    return out, paths["layerdiffusion"]


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def test_default_modules_have_the_released_layout(full_size):
    encoder, decoder = full_size
    encoder_shapes, decoder_shapes = shapes(encoder), shapes(decoder)

    # lib_layerdiffuse/vae.py, LatentTransparencyOffsetEncoder: blocks.{0,2,...,16}
    assert sorted(encoder_shapes) == sorted(f"blocks.{i}.{p}" for i in range(0, 17, 2) for p in ("weight", "bias"))
    assert sum(encoder.state_dict()[key].numel() for key in encoder_shapes) == 1_181_764
    assert encoder_shapes["blocks.0.weight"] == (32, 4, 3, 3)
    assert encoder_shapes["blocks.16.weight"] == (4, 256, 3, 3)

    # lib_layerdiffuse/vae.py, UNet1024(in_channels=3, out_channels=4)
    assert len(decoder_shapes) == 538
    assert sum(tensor.numel() for tensor in decoder.state_dict().values()) == 104_104_804
    released = {
        "conv_in.weight": (32, 3, 3, 3),
        "latent_conv_in.weight": (64, 4, 1, 1),
        "down_blocks.3.resnets.0.conv1.weight": (128, 64, 3, 3),
        "down_blocks.4.attentions.0.group_norm.weight": (256,),
        "down_blocks.4.attentions.1.to_q.weight": (256, 256),
        "down_blocks.6.attentions.1.to_out.0.weight": (512, 512),
        "mid_block.attentions.0.to_v.weight": (512, 512),
        "up_blocks.0.attentions.2.to_k.weight": (512, 512),
        "up_blocks.2.upsamplers.0.conv.weight": (256, 256, 3, 3),
        "up_blocks.6.resnets.2.conv_shortcut.weight": (32, 64, 1, 1),
        "conv_norm_out.weight": (32,),
        "conv_out.weight": (4, 32, 3, 3),
    }
    assert {key: decoder_shapes.get(key) for key in released} == released
    assert "down_blocks.6.downsamplers.0.conv.weight" not in decoder_shapes
    assert "up_blocks.6.upsamplers.0.conv.weight" not in decoder_shapes


def test_full_size_export_loads_back_strictly(full_size, full_size_export):
    encoder, decoder = full_size
    out, (encoder_path, decoder_path) = full_size_export
    assert (encoder_path.name, decoder_path.name) == (ENCODER_FILENAME, DECODER_FILENAME)

    torch.manual_seed(1)
    fresh_encoder, fresh_decoder = LatentTransparencyEncoder(), TransparencyDecoder()
    load_transparent_vae(fresh_encoder, fresh_decoder, out)
    for original, loaded in ((encoder, fresh_encoder), (decoder, fresh_decoder)):
        for key, tensor in original.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], tensor), key

    metadata = read_metadata(decoder_path)
    assert metadata["format"] == "layerdiffuse"
    assert metadata["component"] == "transparent_decoder"
    assert json.loads(metadata["layerdiff_config"]) == {"learning_rate": 1e-5, "nested": {"widths": [1, 2]}}
    assert json.loads(metadata["decoder_config"])["block_out_channels"] == [32, 32, 64, 128, 256, 512, 512]
    assert read_metadata(encoder_path)["component"] == "transparent_encoder"


def test_files_are_plain_tensors_keyed_like_the_released_ones(full_size_export):
    _, (encoder_path, decoder_path) = full_size_export
    encoder_state = load_file(encoder_path)
    assert set(encoder_state) == set(LatentTransparencyEncoder().state_dict())
    assert all(tensor.dtype == torch.float32 and tensor.is_contiguous() for tensor in encoder_state.values())
    assert len(load_file(decoder_path)) == 538


def test_width_mismatch_names_the_key_both_shapes_and_the_setting(full_size_export):
    out, _ = full_size_export
    with pytest.raises(ValueError) as error:
        load_transparent_vae(None, TransparencyDecoder(**TINY), out)
    message = str(error.value)
    assert "conv_in.weight" in message and "[32, 3, 3, 3]" in message and "[8, 3, 3, 3]" in message
    assert "decoder_block_out_channels" in message and "[32, 32, 64, 128, 256, 512, 512]" in message


def test_training_checkpoint_given_as_a_file_gets_a_pointer_to_the_cli(tmp_path):
    from safetensors.torch import save_file

    state = {f"transparent_encoder.{k}": v for k, v in LatentTransparencyEncoder().state_dict().items()}
    save_file(state, tmp_path / ENCODER_FILENAME)
    with pytest.raises(ValueError, match="layerdiff.export transparent-vae"):
        load_transparent_vae(LatentTransparencyEncoder(), None, tmp_path)
    with pytest.raises(FileNotFoundError, match=DECODER_FILENAME):
        load_transparent_vae(None, TransparencyDecoder(**TINY), tmp_path)


def test_cli_exports_a_lightning_checkpoint(tmp_path, capsys):
    encoder, decoder = trained_tiny_modules()
    hyperparameters = {
        "base_model": "embedded:tiny-sdxl",
        "decoder_block_out_channels": list(TINY["block_out_channels"]),
        "decoder_layers_per_block": 1,
        "decoder_attention_head_dim": 4,
        "optimizer": {"name": "adamw", "betas": (0.9, 0.999)},
    }
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": fake_lightning_state(encoder, decoder), "hyper_parameters": hyperparameters}, checkpoint)

    assert main(["transparent-vae", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), "--dtype", "fp16"]) == 0
    assert "differs from the released" in capsys.readouterr().out

    assert load_file(tmp_path / "out" / DECODER_FILENAME)["conv_out.weight"].dtype == torch.float16
    for flavour in FLAVOURS.values():  # both released flavours by default
        assert float(read_metadata(tmp_path / "out" / flavour.encoder_file)["offset_scale"]) == flavour.offset_scale
        assert (tmp_path / "out" / flavour.decoder_file).is_file()
    one_flavour = ["--out", str(tmp_path / "one"), "--flavour", "layerdiffusion"]
    assert main(["transparent-vae", "--checkpoint", str(checkpoint), *one_flavour]) == 0
    assert sorted(path.name for path in (tmp_path / "one").iterdir()) == [DECODER_FILENAME, ENCODER_FILENAME]
    assert_round_trip(tmp_path / "out", encoder, decoder, dtype=torch.float16)
    metadata = read_metadata(tmp_path / "out" / DECODER_FILENAME)
    assert json.loads(metadata["layerdiff_config"])["optimizer"]["betas"] == [0.9, 0.999]
    expected = {**TINY, "block_out_channels": [8, 8, 16, 16, 32, 32, 32], "attention_head_dim": 4}
    assert json.loads(metadata["decoder_config"]) == expected


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_cli_reads_lightning_sharded_checkpoint_folders(tmp_path):
    import torch.distributed.checkpoint as dcp

    encoder, decoder = trained_tiny_modules()
    folder = tmp_path / "last.ckpt"
    dcp.save({"state_dict": fake_lightning_state(encoder, decoder)}, checkpoint_id=folder)
    torch.save({"hyper_parameters": {"decoder_attention_head_dim": 4}}, folder / "meta.pt")

    assert main(["transparent-vae", "--checkpoint", str(folder), "--out", str(tmp_path / "out")]) == 0
    assert_round_trip(tmp_path / "out", encoder, decoder)


def test_cli_rejects_checkpoints_without_transparent_vae_weights(tmp_path):
    checkpoint = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"unet.conv_in.weight": torch.zeros(1)}, "hyper_parameters": {}}, checkpoint)
    with pytest.raises(ValueError, match="transparent_encoder"):
        main(["transparent-vae", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")])
