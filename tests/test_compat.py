"""Each private torch / Lightning / diffusers API in ``layerdiff.compat``, exercised against the
installed library: after an upgrade that removes or changes one, its test here fails and
names it (a :class:`~layerdiff.compat.PrivateAPIError` names the API and its use)."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader

from layerdiff import compat
from support.trainers import quiet_trainer

pytestmark = pytest.mark.filterwarnings("ignore:.*(num_workers|does not have many workers|GPU available):")


# -- the lookup itself ------------------------------------------------------------------------


def test_a_missing_private_api_is_named_with_its_use_and_the_wrapper_to_adapt():
    expected = r"torch\._no_such_kernel \(used for a test\).*torch 2\..*layerdiff\.compat"
    with pytest.raises(compat.PrivateAPIError, match=expected):
        compat._private("torch", "_no_such_kernel", "a test")
    with pytest.raises(compat.PrivateAPIError, match=r"torch\.nn\.modules\.linear\.Linear\._gone"):
        compat._attribute(nn.Linear(1, 1), "_gone", "a test")


# -- torch ----------------------------------------------------------------------------------


def test_foreach_norm_is_each_tensors_two_norm():
    tensors = [torch.randn(3, 4), torch.randn(7), torch.zeros(2)]
    norms = compat.foreach_norm(tensors)
    assert len(norms) == 3
    for norm, tensor in zip(norms, tensors):
        torch.testing.assert_close(norm, torch.linalg.vector_norm(tensor))


def test_foreach_lerp_moves_each_target_towards_its_end_in_place():
    targets, ends = [torch.zeros(3), torch.ones(2, 2)], [torch.full((3,), 2.0), torch.full((2, 2), 3.0)]
    expected = [target + 0.25 * (end - target) for target, end in zip(targets, ends)]
    compat.foreach_lerp_(targets, ends, 0.25)
    for target, value in zip(targets, expected):
        torch.testing.assert_close(target, value)


def test_checkpoint_activations_recomputes_in_backward_and_keeps_parameter_names():
    inner = nn.Linear(4, 4)
    module = nn.Sequential(inner, nn.Tanh())
    names = [name for name, _ in module.named_parameters()]
    calls = []
    inner.register_forward_hook(lambda *_: calls.append(1))
    assert compat.checkpoint_activations(module) is module
    module(torch.randn(2, 4, requires_grad=True)).sum().backward()
    assert len(calls) == 2  # the forward, then its recomputation in backward
    assert [name for name, _ in module.named_parameters()] == names
    assert inner.weight.grad is not None


def test_read_distributed_checkpoint_reads_every_entry_whole_without_a_process_group(tmp_path):
    import torch.distributed.checkpoint as dcp

    state = {"state_dict": {"weight": torch.randn(4, 3)}, "optimizer_0": {"step": torch.tensor(3.0)}, "note": "x"}
    dcp.save(state, checkpoint_id=tmp_path / "folder")
    stored = compat.read_distributed_checkpoint(tmp_path / "folder")
    assert torch.equal(stored["state_dict"]["weight"], state["state_dict"]["weight"])
    assert torch.equal(stored["optimizer_0"]["step"], state["optimizer_0"]["step"])
    assert stored["note"] == "x"


def test_a_dispatch_mode_sees_overload_packets_including_the_cpu_flash_attention_ops():
    seen = set()

    class Recording(compat.dispatch_mode_base()):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(compat.overload_packet(func))
            return func(*args, **(kwargs or {}))

    query = torch.rand(1, 2, 8, 4, requires_grad=True)
    with Recording():
        torch.mm(torch.rand(2, 3), torch.rand(3, 2))
        F.scaled_dot_product_attention(query, query, query).sum().backward()
    assert torch.ops.aten.mm in seen
    forward, backward = compat.cpu_flash_attention_ops()
    assert forward in seen, "CPU SDPA no longer runs the flash-attention op CountingFlops counts"
    assert backward in seen


def test_shutdown_loader_workers_stops_them_now():
    loader = DataLoader(list(range(8)), batch_size=2, num_workers=1)
    iterator = iter(loader)
    next(iterator)
    workers = list(iterator._workers)
    assert workers and all(worker.is_alive() for worker in workers)
    compat.shutdown_loader_workers(iterator)
    assert not any(worker.is_alive() for worker in workers)
    compat.shutdown_loader_workers(iter(DataLoader(list(range(4)))))  # no workers: nothing to do


# -- Lightning ------------------------------------------------------------------------------


def test_the_metadata_filename_is_the_file_lightning_reads_beside_a_distributed_checkpoint(tmp_path):
    import torch.distributed.checkpoint as dcp
    from lightning.fabric.utilities.load import (
        _load_distributed_checkpoint,  # consolidate_checkpoint's reader
    )

    folder = tmp_path / "checkpoint"
    dcp.save({"state_dict": {"weight": torch.ones(2)}}, checkpoint_id=folder)
    torch.save({"global_step": 7}, folder / compat.distributed_checkpoint_metadata_filename())
    assert _load_distributed_checkpoint(folder)["global_step"] == 7


def test_attached_trainer_is_none_until_a_trainer_attaches(tmp_path):
    module = LightningModule()
    assert compat.attached_trainer(module) is None
    with pytest.raises(RuntimeError):
        _ = module.trainer  # what attached_trainer avoids
    trainer = quiet_trainer(tmp_path)
    module.trainer = trainer
    assert compat.attached_trainer(module) is trainer


def test_the_data_parallel_size_is_what_model_parallel_strategy_builds_its_mesh_from():
    strategy = ModelParallelStrategy(data_parallel_size="auto", tensor_parallel_size=1)
    assert compat.data_parallel_size(strategy) == "auto"
    compat.set_data_parallel_size(strategy, 4)
    assert compat.data_parallel_size(strategy) == 4
    assert "self._data_parallel_size" in inspect.getsource(ModelParallelStrategy.setup_environment)


class _Tiny(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.validation_steps = 0

    def training_step(self, batch, batch_idx):
        return self.layer(batch).square().mean()

    def validation_step(self, batch, batch_idx):
        self.validation_steps += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, module: LightningModule, callbacks: list[Callback], **trainer_options) -> Trainer:
    data = DataLoader(torch.randn(8, 2), batch_size=2)
    trainer = quiet_trainer(tmp_path, max_steps=-1, enable_checkpointing=True, callbacks=callbacks, **trainer_options)
    trainer.fit(module, train_dataloaders=data, val_dataloaders=data)
    return trainer


def test_save_last_checkpoint_writes_last_now_and_records_the_step(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, save_top_k=0)
    recorded = []

    class SaveAtStepTwo(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                compat.save_last_checkpoint(checkpoint, trainer)
                recorded.append(compat.last_saved_step(checkpoint))
                trainer.should_stop = True

    _fit(tmp_path, _Tiny(), [checkpoint, SaveAtStepTwo()], max_epochs=1, limit_val_batches=0)
    assert recorded == [2]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2


def test_skip_next_validation_stops_without_the_validation_an_early_stop_runs(tmp_path):
    class StopAtStepOne(Callback):
        def __init__(self, skip: bool) -> None:
            self.skip = skip

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 1:
                trainer.should_stop = True
                if self.skip:
                    compat.skip_next_validation(trainer)

    for skip, expected in ((False, 1), (True, 0)):
        module = _Tiny()
        _fit(tmp_path, module, [StopAtStepOne(skip)], max_epochs=1, val_check_interval=3, limit_val_batches=1)
        assert module.validation_steps == expected, f"skip={skip}"


# -- diffusers ------------------------------------------------------------------------------


def test_set_gradient_checkpointing_makes_a_diffusers_block_call_the_given_function():
    from diffusers.models.unets.unet_2d_blocks import DownBlock2D

    block = DownBlock2D(in_channels=8, out_channels=8, temb_channels=None, num_layers=1, resnet_groups=4).train()
    calls = []

    def recompute(function, *args):
        calls.append(function)
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)

    compat.set_gradient_checkpointing(block, True, recompute)
    block(torch.randn(1, 8, 8, 8, requires_grad=True))[0].sum().backward()
    assert calls, "diffusers' DownBlock2D no longer calls _gradient_checkpointing_func"
    calls.clear()
    compat.set_gradient_checkpointing(block, False, recompute)
    block(torch.randn(1, 8, 8, 8))
    assert not calls
