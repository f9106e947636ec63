"""LayerDiffusion's Fig. 4 variants: a layer generated from others fed through extra UNet input
channels (``concat_conditions``), as the released SDXL fg2ble / bgble2fg models: the grown
``conv_in`` starts as the base, learns, lives in lean checkpoints, is fed the same condition in
training and in every sampler, and exports to the released ``::diff::`` file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data import ShardDataModule
from layerdiff.models import codec
from layerdiff.modules import JointLayerLoRAModule
from layerdiff.pipelines import GenerationSettings, LayerPromptBatch
from layerdiff.pipelines.joint_layers import read_layer_image
from support.shards import write_tiny_shards
from support.trainers import quiet_trainer
from support.unets import sd15_shaped_model


@pytest.fixture(scope="module")
def parts(tiny_sdxl, tiny_transparent_vae):
    return tiny_sdxl, tiny_transparent_vae


def fg2ble(parts, **overrides) -> JointLayerLoRAModule:
    sdxl, transparent_vae = parts
    torch.manual_seed(0)
    return JointLayerLoRAModule(**{"base_model": str(sdxl), "transparent_vae": str(transparent_vae), "layers": ["blend"],
                                   "transparent_layers": [], "concat_conditions": ["foreground"],
                                   "attention_sharing": "none", "lora_rank": 4, **overrides})


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    shards = write_tiny_shards(tmp_path_factory.mktemp("layered") / "train", 2, sizes=((64, 64),), layers=True)
    data = ShardDataModule(",".join(shards), batch_size=2, num_workers=0, shuffle_buffer=0, require_layers=True)
    data.setup("fit")
    return data.on_before_batch_transfer(next(iter(data.train_dataloader())), 0)


def test_the_grown_input_starts_as_the_base_and_then_reads_the_condition(parts, batch):
    module = fg2ble(parts)
    assert module.unet.conv_in.in_channels == 8 and module.unet.conv_in.weight.requires_grad
    plain = fg2ble(parts, concat_conditions=[])
    same = [m.compute_loss(batch, torch.Generator().manual_seed(0))["loss"] for m in (module, plain)]
    torch.testing.assert_close(same[0], same[1])  # zero-initialised channels: the condition changes nothing yet
    with torch.no_grad():
        module.unet.conv_in.weight[:, 4:].normal_(std=0.1)
    before = module.compute_loss(batch, torch.Generator().manual_seed(0))["loss"]
    batch.layer("foreground").pixels = 1.0 - batch.layer("foreground").pixels
    after = module.compute_loss(batch, torch.Generator().manual_seed(0))["loss"]
    batch.layer("foreground").pixels = 1.0 - batch.layer("foreground").pixels
    assert not torch.equal(before, after)
    # the lean checkpoint keeps the grown conv_in (it trains) and loads into a fresh module
    state = module.state_dict()
    checkpoint = {"state_dict": state}
    module.on_save_checkpoint(checkpoint)
    assert "unet.conv_in.weight" in checkpoint["state_dict"]
    fresh = fg2ble(parts)
    fresh.load_state_dict(checkpoint["state_dict"])
    assert torch.equal(fresh.unet.conv_in.weight, module.unet.conv_in.weight)
    with pytest.raises(ValueError, match="not generated"):
        fg2ble(parts, concat_conditions=["blend"])


@pytest.mark.parametrize("scheduler", ["euler", "dpm++"])
def test_every_sampler_gets_the_condition_training_gets(parts, tmp_path, scheduler):
    module = fg2ble(parts).eval()
    with torch.no_grad():
        module.unet.conv_in.weight[:, 4:].normal_(std=0.1)
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[10:50, 12:52] = (30, 160, 220, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "fg.png")
    rgb, alpha = read_layer_image(str(tmp_path / "fg.png"), 64, 64, transparent=None)
    with torch.no_grad():
        expected = codec.condition_latent(module.vae, rgb[None], alpha[None])  # what the training step computes
    seen = []
    hook = module.unet.register_forward_pre_hook(lambda _unet, args: seen.append(args[0].clone()))
    try:
        settings = GenerationSettings(width=64, height=64, steps=2, guidance_scale=3.0, scheduler=scheduler)
        sets = module.layer_generator()(LayerPromptBatch([0], [{"blend": "a ball on a table"}], [0], settings,
                                                         given={"foreground": str(tmp_path / "fg.png")}))
    finally:
        hook.remove()
    assert seen and all(inputs.shape[1] == 8 for inputs in seen)
    for inputs in seen:  # both guidance halves carry the same condition channels
        for row in inputs[:, 4:]:
            torch.testing.assert_close(row, expected[0])
    assert set(sets[0].layers) == {"blend", "foreground"} and sets[0].layers["foreground"].shape[0] == 4
    with pytest.raises(ValueError, match=r"give \['foreground'\] as images"):
        module.layer_generator()(LayerPromptBatch([0], [{"blend": "x"}], [0], settings))


def test_the_export_is_the_released_fg2ble_file_and_loads_back_into_the_base(parts, batch, tmp_path):
    from layerdiff.export import main as export_main
    from layerdiff.formats.layer_sharing import layer_lora
    from layerdiff.formats.lora import fuse_lora
    from layerdiff.formats.unet_delta import apply_unet_delta, read_unet_delta
    from layerdiff.models.base import load_unet
    from layerdiff.models.conv_in import grow_conv_in

    module = fg2ble(parts)
    with torch.no_grad():
        module.unet.conv_in.weight[:, 4:].normal_(std=0.1)
        for parameter in module.unet.parameters():
            if parameter.requires_grad and parameter.ndim == 2:
                parameter.normal_(std=0.02)
    trainer = quiet_trainer(tmp_path)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    export_main(["conditional", "--checkpoint", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "export")])
    path = tmp_path / "export" / "layer_xl_fg2ble.safetensors"
    assert read_unet_delta(path)["input_blocks.0.0.weight"].shape == (32, 8, 3, 3)

    sdxl, _ = parts
    loaded = load_unet(str(sdxl))
    apply_unet_delta(loaded, path)
    expected = load_unet(str(sdxl))
    grow_conv_in(expected, 4)
    fuse_lora(expected, layer_lora(module.unet, 0))
    expected.conv_in.load_state_dict(module.unet.conv_in.state_dict())
    for key, tensor in expected.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], tensor, atol=1e-6, rtol=1e-5)
    # the released file starts a new model: its frozen base carries the delta
    restarted = fg2ble(parts, init_from=str(path))
    torch.testing.assert_close(restarted.unet.conv_in.weight, expected.conv_in.weight, atol=1e-6, rtol=1e-5)
    attention = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    torch.testing.assert_close(restarted.unet.state_dict()[attention], expected.state_dict()[attention], atol=1e-6, rtol=1e-5)


def test_an_sd15_control_model_trains_reads_its_condition_and_exports_the_released_fg2bg_file(tiny_sd15,
                                                                                             tiny_transparent_vae, tmp_path):
    """The released SD1.5 fg2bg design: frames [background, blend], the foreground read by every
    unit through the control encoder; the export loads back strictly."""
    from diffusers import UNet2DConditionModel

    from layerdiff.export import main as export_main
    from layerdiff.formats.layer_conditional import load_released_conditional
    from layerdiff.models.control_encoder import ControlEncoder
    from layerdiff.models.layer_sharing import add_layer_sharing

    sd15, transparent_vae = sd15_shaped_model(tiny_sd15, tmp_path / "sd15"), tiny_transparent_vae
    shards = write_tiny_shards(tmp_path / "train", 2, sizes=((64, 64),), layers=True)
    data = ShardDataModule(",".join(shards), batch_size=2, num_workers=0, shuffle_buffer=0, require_layers=True)
    data.setup("fit")
    batch = data.on_before_batch_transfer(next(iter(data.train_dataloader())), 0)
    torch.manual_seed(0)
    module = JointLayerLoRAModule(base_model=str(sd15), transparent_vae=str(transparent_vae),
                                  layers=["background", "blend"], transparent_layers=[], control_layer="foreground",
                                  attention_sharing="frame", lora_rank=4)
    assert module.control_encoder is not None
    with torch.no_grad():  # control projections away from their zero start
        for name, parameter in module.unet.named_parameters():
            if "control_convs" in name:  # large: the untrained encoder's features are ~0.005
                parameter.normal_(std=0.5)
    losses = module.compute_loss(batch, torch.Generator().manual_seed(0))
    losses["loss"].backward()
    first = module.control_encoder.blocks_0[0].weight.grad  # the levels the tiny UNet attends at learn
    assert first is not None and first.abs().sum() > 0
    batch.layer("foreground").pixels = 1.0 - batch.layer("foreground").pixels
    flipped = module.compute_loss(batch, torch.Generator().manual_seed(0))
    batch.layer("foreground").pixels = 1.0 - batch.layer("foreground").pixels
    assert not torch.equal(flipped["loss"], losses["loss"])

    trainer = quiet_trainer(tmp_path)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    export_main(["layer-sharing", "--checkpoint", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "export")])
    unet = UNet2DConditionModel.from_pretrained(sd15 / "unet")
    add_layer_sharing(unet, 2, "frame", 4, control_channels=ControlEncoder.channels)
    encoder = ControlEncoder()
    load_released_conditional(unet, encoder, tmp_path / "export" / "layer_sd15_fg2bg.safetensors", "fg2bg",
                              ["background", "blend"])
    for key, tensor in module.control_encoder.state_dict().items():
        assert torch.equal(encoder.state_dict()[key], tensor)
    restarted = JointLayerLoRAModule(base_model=str(sd15), transparent_vae=str(transparent_vae),
                                     layers=["background", "blend"], transparent_layers=[], control_layer="foreground",
                                     attention_sharing="frame", lora_rank=4,
                                     init_from=str(tmp_path / "export" / "layer_sd15_fg2bg.safetensors"))
    for key, tensor in module.control_encoder.state_dict().items():
        assert torch.equal(restarted.control_encoder.state_dict()[key], tensor)
    control = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.control_convs.1.2.weight"
    assert torch.equal(restarted.unet.state_dict()[control], module.unet.state_dict()[control])
