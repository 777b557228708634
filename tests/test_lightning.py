"""fusedbn.lightning under a real PyTorch Lightning Trainer on the CPU, in float64: the FuseBatchNorm callback
and the SyncBatchNormPlugin, in one process against the same run with torch's modules, and in two DDP
processes over gloo with sync_batchnorm=True against torch's modules in one process over both ranks' batches
(what SyncBatchNorm computes; Lightning's TorchSyncBatchNorm makes torch's SyncBatchNorm, which refuses CPU
modules); checkpoints of a converted model."""
import os
import pickle
import signal
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("lightning", reason="the Lightning tests need lightning: pip install .[test]")

import fusedbn  # noqa: E402
from fusedbn.lightning import FuseBatchNorm, SyncBatchNormPlugin  # noqa: E402
from helpers import assert_same_state  # noqa: E402
from lightning_run import Classifier, Watch, loader, trainer  # noqa: E402

EXACT = dict(rtol=1e-10, atol=1e-12)
SCRIPT = os.path.join(os.path.dirname(__file__), "lightning_run.py")


def _batch_norm_classes(model):
    return sorted({type(m).__qualname__ for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)})


@pytest.mark.slow  # a Trainer's runs
@pytest.mark.parametrize("mode,fused", [("fuse", 3), ("convert", 0)])
def test_callback_one_process_trains_as_torch(mode, fused, tmp_path):
    reference = Classifier()
    trainer().fit(reference, loader())

    model, watch = Classifier(), Watch()
    callback = FuseBatchNorm(mode)
    from lightning.pytorch.loggers import CSVLogger
    run = trainer([callback, watch], logger=CSVLogger(tmp_path))
    run.fit(model, loader())
    assert callback.report.count("fused") == fused and callback.report.count("converted") == 4 - fused
    assert all(name.startswith("Fused") for name in watch.classes), watch.classes
    # Each training step: a forward_train and a backward per BatchNorm layer.
    assert watch.ops.counts["forward_train"] == 4 * 2 and watch.ops.counts["backward"] == 4 * 2
    assert_same_state(model, reference, **EXACT)
    model.eval(), reference.eval()
    x = loader().dataset.tensors[0][:6]
    torch.testing.assert_close(model(x), reference(x), **EXACT)
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "fusedbn/converted" in logged and (fused == 0 or "fusedbn/fused" in logged)


def test_callback_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="mode must be 'fuse' or 'convert'"):
        FuseBatchNorm("quantize")


def test_plugin_apply_and_revert_keep_state_and_fused_activations():
    model = Classifier().double()
    fusedbn.fuse_model(model)
    x = loader().dataset.tensors[0][:6]
    expected = model(x)
    before = {name: type(m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    plugin = SyncBatchNormPlugin()
    synced = plugin.apply(model)
    assert _batch_norm_classes(synced) == ["FusedSyncBatchNorm"] and plugin.report.count("synced") == 4
    torch.testing.assert_close(synced(x), expected, rtol=0, atol=0)  # outside a process group: single-device
    reverted = plugin.revert(synced)
    after = {name: type(m) for name, m in reverted.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert after == before  # the fused BatchNorm+ReLU layers come back fused
    torch.testing.assert_close(reverted(x), expected, rtol=0, atol=0)
    assert [p.data_ptr() for p in reverted.parameters()] == [p.data_ptr() for p in model.parameters()]


def test_plugin_turns_torch_batch_norm_into_fusedbn_on_revert():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4 * 9)))
    plugin = SyncBatchNormPlugin()
    reverted = plugin.revert(plugin.apply(net))
    assert [type(m) for m in reverted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == \
        [fusedbn.FusedBatchNorm2d, fusedbn.FusedBatchNorm1d]
    top = plugin.revert(plugin.apply(nn.BatchNorm3d(2)))
    assert type(top) is fusedbn.FusedBatchNorm3d
    assert type(plugin.revert(plugin.apply(nn.SyncBatchNorm(2)))) is fusedbn.FusedSyncBatchNorm


@pytest.mark.slow  # a Trainer's runs
def test_checkpoint_round_trip_of_a_converted_model(tmp_path):
    model = Classifier(float64=True)
    fusedbn.fuse_model(model)
    run = trainer()
    run.fit(model, loader())
    path = tmp_path / "converted.ckpt"
    run.save_checkpoint(path)
    loaded = Classifier.load_from_checkpoint(path)  # torch's modules, the fused model's state
    assert_same_state(loaded, model, rtol=0, atol=0)
    fusedbn.fuse_model(loaded)
    x = loader().dataset.tensors[0][:6]
    loaded.eval(), model.eval()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_run(variant, folder):
    """The script's run in two processes (Lightning starts the second); both are killed should it hang."""
    out = folder / f"{variant}.pt"
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), PYTHONPATH=os.pathsep.join(
        [os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.Popen([sys.executable, SCRIPT, variant, "2", str(out)], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None or run.returncode != 0:
            os.killpg(run.pid, signal.SIGKILL)  # the session: rank 0 and the rank Lightning launched
            run.wait()
    assert run.returncode == 0, output[-8000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _ddp_run("torch", tmp_path_factory.mktemp("torch"))


@pytest.mark.slow  # two processes
@pytest.mark.parametrize("variant", ["plugin", "callback"])
def test_two_process_ddp_sync_batchnorm_keeps_fusedbn(variant, reference, tmp_path):
    ours = _ddp_run(variant, tmp_path)
    assert reference["classes"] == ["BatchNorm1d", "BatchNorm2d"] and not reference["ops"]
    assert ours["classes"] == ["FusedSyncBatchNorm"]  # not torch's SyncBatchNorm
    assert ours["ops"].get("batch_stats", 0) >= 4 * 2 and ours["ops"].get("backward_elemt", 0) >= 4 * 2
    fused_after = {"plugin": ["FusedBatchNorm1d", "FusedBatchNorm2d"],
                   "callback": ["FusedBatchNorm1d", "FusedBatchNormReLU2d"]}[variant]
    assert ours["after"] == fused_after  # revert gives fusedbn's single-process modules back
    assert list(ours["state"]) == list(reference["state"])
    for (name, mine), theirs in zip(ours["state"].items(), reference["state"].values()):
        torch.testing.assert_close(mine, theirs, msg=lambda m, name=name: f"{name}: {m}", **EXACT)


def test_callback_transforms_a_module_once_and_pickles():
    callback, model = FuseBatchNorm("fuse"), Classifier()
    run = trainer([callback])
    for stage in ("fit", "validate"):
        callback.setup(run, model, stage)
    assert callback.report.count("fused") == 3  # the second stage found the module done
    # As ddp_spawn pickles them, with the module: the copy knows the copied module is done.
    callback_copy, model_copy = pickle.loads(pickle.dumps((callback, model)))
    callback_copy.setup(run, model_copy, "fit")
    assert callback_copy.mode == "fuse" and callback_copy.report.count("fused") == 3
    fresh = Classifier()
    callback_copy.setup(run, fresh, "fit")
    assert callback_copy.report.count("fused") == 3 and type(fresh.net.stem[1]) is fusedbn.FusedBatchNormReLU2d
