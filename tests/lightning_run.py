"""A small LightningModule trained by a real Trainer on the CPU in float64, for tests/test_lightning.py.

Run as a script (``python tests/lightning_run.py VARIANT DEVICES OUT``) it trains with the DDP strategy over gloo
in DEVICES processes (Lightning relaunches this script for the other ranks), ``sync_batchnorm=True``, and rank 0
saves to OUT what the test compares: the final state_dict, the BatchNorm classes seen while training, and how
many fusedbn ops ran. VARIANT: "plugin" (the model converted, fusedbn.lightning.SyncBatchNormPlugin),
"callback" (fusedbn.lightning.FuseBatchNorm alone) or "torch": torch's modules in one process over the DEVICES
ranks' batches at once, which is what SyncBatchNorm computes (torch's own refuses CPU modules: "SyncBatchNorm
layers only work with GPU modules").
"""
import os
import sys

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # helpers, when run as a script
from helpers import FusedbnOps  # noqa: E402

STEPS = 2
BATCH = 4


class Block(nn.Module):
    """conv-BN-ReLU, conv-BN, add, ReLU: the patterns fuse_model fuses."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.block = Block(6)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 8 * 8, 5), nn.BatchNorm1d(5))

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


class Classifier(LightningModule):
    def __init__(self, lr: float = 0.1, float64: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = Net().to(torch.float64 if float64 else torch.float32)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, target = batch
        return nn.functional.cross_entropy(self(x), target)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def dataset(samples: int = 16) -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(samples, 3, 8, 8, generator=gen, dtype=torch.float64) * 2 + 0.5,
                         torch.randint(0, 5, (samples,), generator=gen))


class Watch(Callback):
    """Records the BatchNorm classes the training steps run through and counts fusedbn's ops in them."""

    def __init__(self) -> None:
        self.classes = set()
        self.ops = FusedbnOps()

    def on_train_start(self, trainer, pl_module):
        self.classes = {type(m).__qualname__ for m in pl_module.modules()
                        if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        self.ops.__enter__()

    def on_train_end(self, trainer, pl_module):
        self.ops.__exit__(None, None, None)


def trainer(callbacks=(), plugins=(), **kwargs) -> Trainer:
    options = dict(accelerator="cpu", max_steps=STEPS, precision="64-true", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False)
    return Trainer(callbacks=list(callbacks), plugins=list(plugins), **{**options, **kwargs})


def loader(batch: int = BATCH) -> DataLoader:
    return DataLoader(dataset(), batch_size=batch, shuffle=False)


class RankShards(LightningDataModule):
    """Rank r's batches hold samples r, r + world, ... in order (Lightning's own sampler would shuffle them)."""

    def train_dataloader(self) -> DataLoader:
        data = dataset()
        return DataLoader(data, batch_size=BATCH, sampler=DistributedSampler(data, shuffle=False))


def main(variant: str, devices: int, out: str) -> None:
    import fusedbn
    from fusedbn.lightning import FuseBatchNorm, SyncBatchNormPlugin
    model = Classifier()
    watch = Watch()
    callbacks, plugins = [watch], []
    if variant == "plugin":
        fusedbn.convert_model(model)
        plugins.append(SyncBatchNormPlugin())
    elif variant == "callback":
        callbacks.insert(0, FuseBatchNorm("fuse"))
    if variant == "torch":  # rank r's batch is samples r, r + devices, ...: the same batches, all at once
        run = trainer(callbacks, devices=1)
        run.fit(model, loader(BATCH * devices))
    else:
        run = trainer(callbacks, plugins, devices=devices, strategy="ddp", sync_batchnorm=True,
                      use_distributed_sampler=False)
        run.fit(model, datamodule=RankShards())
    if run.global_rank == 0:
        torch.save({"state": model.state_dict(), "classes": sorted(watch.classes), "ops": dict(watch.ops.counts),
                    "after": sorted({type(m).__qualname__ for m in model.modules()
                                     if isinstance(m, nn.modules.batchnorm._BatchNorm)})}, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
