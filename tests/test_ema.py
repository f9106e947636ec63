"""The EMA callback: its average against the recurrence, update timing, validation swap,
exact resume, and the checkpoint state that exports read."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from safetensors.torch import load_file

from callbacks import EMA, averaged_weights_of
from layerdiff.export import main
from layerdiff.formats.checkpoints import EMA_AVERAGES_KEY, trained_state_dict
from layerdiff.formats.layerdiffuse_vae import (
    UNFOLDED_ENCODER_FILENAME as ENCODER_FILENAME,
)
from support.shards import write_tiny_shards
from support.toys import Regression, loader
from support.trainers import quiet_trainer
from support.transparency import (
    assert_round_trip,
    fake_lightning_state,
    make_data,
    make_module,
    make_trainer,
    trained_tiny_modules,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*(num_workers|does not have many workers|LightningModule.lr_scheduler):")

TRAINED = ("layer.weight", "layer.bias")


class WeightRecorder(Callback):
    """The trained weights after every optimizer step, keyed by global step."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        parameters = dict(pl_module.named_parameters())
        self.weights[trainer.global_step] = {name: parameters[name].detach().clone() for name in TRAINED}


def fit(module, callbacks, tmp_path, ckpt_path=None, batches=2, **trainer_args) -> Trainer:
    trainer = quiet_trainer(tmp_path, callbacks=callbacks, **trainer_args)
    trainer.fit(module, train_dataloaders=loader(batches), val_dataloaders=loader(batches), ckpt_path=ckpt_path)
    return trainer


def expected_average(initial, weights_by_step, steps, decay, warmup=True):
    average = {name: initial[name].clone() for name in TRAINED}
    for update, step in enumerate(steps):
        step_decay = min(decay, (1 + update) / (10 + update)) if warmup else decay
        for name in TRAINED:
            average[name] = step_decay * average[name] + (1 - step_decay) * weights_by_step[step][name]
    return average


def assert_averages(ema: EMA, expected) -> None:
    assert set(ema.averages) == set(TRAINED)  # frozen and discriminator weights are not averaged
    for name in TRAINED:
        torch.testing.assert_close(ema.averages[name], expected[name], rtol=1e-6, atol=1e-7)


def test_average_follows_the_recurrence_with_warmup(tmp_path):
    module, ema, recorder = Regression(), EMA(decay=0.8), WeightRecorder()
    initial = {name: tensor.detach().clone() for name, tensor in module.named_parameters()}
    fit(module, [ema, recorder], tmp_path, max_steps=6)

    assert ema.num_updates == 6
    # Warm-up decays 0.1, 0.18, 0.25, ... are capped at 0.8.
    assert_averages(ema, expected_average(initial, recorder.weights, range(1, 7), decay=0.8))
    assert all(average.dtype == torch.float32 for average in ema.averages.values())


def test_updates_count_optimizer_steps_not_batches(tmp_path):
    module, ema, recorder = Regression(), EMA(decay=0.5, warmup=False, update_every=2), WeightRecorder()
    initial = {name: tensor.detach().clone() for name, tensor in module.named_parameters()}
    fit(module, [ema, recorder], tmp_path, max_steps=4, accumulate_grad_batches=2)

    assert ema.num_updates == 2  # 8 batches, 4 optimizer steps, every second one updates
    assert_averages(ema, expected_average(initial, recorder.weights, (2, 4), decay=0.5, warmup=False))


def test_validation_runs_on_the_averages_and_the_raw_weights_come_back(tmp_path):
    module, ema, recorder = Regression(), EMA(decay=0.5, warmup=False), WeightRecorder()
    initial = {name: tensor.detach().clone() for name, tensor in module.named_parameters()}
    trainer = fit(module, [ema, recorder], tmp_path, max_steps=4, limit_val_batches=1, val_check_interval=2)

    assert len(module.validation_weights) == 2  # after steps 2 and 4
    for validation_weight, step in zip(module.validation_weights, (2, 4)):
        expected = expected_average(initial, recorder.weights, range(1, step + 1), decay=0.5, warmup=False)
        torch.testing.assert_close(validation_weight, expected["layer.weight"])
    assert torch.equal(module.layer.weight, recorder.weights[4]["layer.weight"])

    with averaged_weights_of(trainer):
        assert torch.equal(module.layer.weight, ema.averages["layer.weight"])
    assert torch.equal(module.layer.weight, recorder.weights[4]["layer.weight"])


def test_resume_continues_the_average_exactly(tmp_path):
    # One batch per epoch, so the data order cannot differ between the runs.
    continuous = EMA(decay=0.9)
    fit(Regression(), [continuous], tmp_path / "continuous", max_steps=4, batches=1)

    trainer = fit(Regression(), [EMA(decay=0.9)], tmp_path / "first", max_steps=2, batches=1)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed = EMA(decay=0.9)
    fit(Regression(), [resumed], tmp_path / "resumed", ckpt_path=tmp_path / "half.ckpt", max_steps=4, batches=1)

    assert resumed.num_updates == continuous.num_updates == 4
    for name in TRAINED:
        assert torch.equal(resumed.averages[name], continuous.averages[name]), name


def test_checkpoints_hold_raw_weights_and_the_averages_for_export(tmp_path):
    module, ema = Regression(), EMA(decay=0.5)
    trainer = fit(module, [ema], tmp_path, max_steps=3)
    raw = module.layer.weight.detach().clone()
    with ema.averaged_weights():  # e.g. a checkpoint written while sampling with the averages
        trainer.save_checkpoint(tmp_path / "last.ckpt")
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)

    assert torch.equal(checkpoint["state_dict"]["layer.weight"], raw)
    assert torch.equal(trained_state_dict(checkpoint)["layer.weight"], ema.averages["layer.weight"])
    assert torch.equal(trained_state_dict(checkpoint, use_ema=False)["layer.weight"], raw)
    assert not torch.equal(raw, ema.averages["layer.weight"])


def test_transparent_vae_module_averages_encoder_and_decoder_once_per_batch(tiny_sdxl, tmp_path):
    shards = {"train": ",".join(write_tiny_shards(tmp_path / "train", 4, sizes=((64, 64),))), "val": None}
    module, ema = make_module(tiny_sdxl, discriminator_start_step=0), EMA()
    make_trainer(tmp_path, callbacks=[ema]).fit(module, datamodule=make_data(shards))

    # Generator and discriminator steps make one training step; the discriminator is not averaged.
    assert ema.num_updates == 2
    trained = {name for name, parameter in module.named_parameters() if parameter.requires_grad}
    assert set(ema.averages) == {name for name in trained if name.startswith(("transparent_encoder.", "transparent_decoder."))}


def test_transparent_vae_export_writes_the_averages_unless_told_not_to(tmp_path):
    encoder, decoder = trained_tiny_modules()
    state = fake_lightning_state(encoder, decoder)
    averages = {key: torch.randn_like(tensor) for key, tensor in state.items() if key.startswith("transparent_encoder.")}
    checkpoint = tmp_path / "last.ckpt"
    callbacks = {"EMA": {EMA_AVERAGES_KEY: averages}}
    torch.save({"state_dict": state, "hyper_parameters": {"decoder_attention_head_dim": 4}, "callbacks": callbacks}, checkpoint)

    assert main(["transparent-vae", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "ema")]) == 0
    exported = load_file(tmp_path / "ema" / ENCODER_FILENAME)
    for key, average in averages.items():
        assert torch.equal(exported[key.removeprefix("transparent_encoder.")], average), key

    assert main(["transparent-vae", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "raw"), "--no-ema"]) == 0
    assert_round_trip(tmp_path / "raw", encoder, decoder)


def test_misconfigurations_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="decay"):
        EMA(decay=1.0)
    # Two EMAs would swap each other's weights in validation; Lightning refuses them (one state key).
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `EMA`"):
        fit(Regression(), [EMA(), EMA(decay=0.9)], tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit(Regression(), [EMA(exclude=("layer.",))], tmp_path, max_steps=1)
