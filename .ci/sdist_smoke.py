"""Smoke test of an installed fusedbn (`make sdist-check` runs it in a fresh venv holding the sdist's build).

Run it from outside the source tree, so that the installed package is the one imported:
    python .ci/sdist_smoke.py [EXPECTED_VERSION]
It checks the version (fusedbn.__version__, the installed metadata, and EXPECTED_VERSION when given), that
fusedbn came from site-packages, and FusedBatchNorm2d against nn.BatchNorm2d: train-mode forward and
backward (output, input/weight/bias gradients, running statistics), then eval mode.
"""
import importlib.metadata
import os
import sys

import torch
from torch import nn

import fusedbn

here = os.path.dirname(os.path.abspath(__file__))
tree = os.path.dirname(here)
location = os.path.dirname(os.path.abspath(fusedbn.__file__))
print(f"fusedbn {fusedbn.__version__} from {location} (CPU kernels: _cpu_{fusedbn.ops.cpu_build})")
if location == os.path.join(tree, "fusedbn") or os.path.basename(os.path.dirname(location)) != "site-packages":
    sys.exit(f"fusedbn was imported from {location}, not from an installed package: run this outside the tree")
assert fusedbn.__version__ == importlib.metadata.version("fusedbn"), (fusedbn.__version__,
                                                                       importlib.metadata.version("fusedbn"))
if len(sys.argv) > 1:
    assert fusedbn.__version__ == sys.argv[1], (fusedbn.__version__, sys.argv[1])

torch.manual_seed(0)
C = 6
ref = nn.BatchNorm2d(C)
ours = fusedbn.FusedBatchNorm2d(C)
with torch.no_grad():
    ref.weight.uniform_(0.5, 1.5)
    ref.bias.uniform_(-0.5, 0.5)
ours.load_state_dict(ref.state_dict())

x = torch.randn(4, C, 7, 5) * 3 + 1
grad = torch.randn_like(x)
xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
ref.train(), ours.train()
yr, yo = ref(xr), ours(xo)
torch.testing.assert_close(yo, yr)
yr.backward(grad)
yo.backward(grad)
torch.testing.assert_close(xo.grad, xr.grad)
torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
torch.testing.assert_close(ours.bias.grad, ref.bias.grad)
torch.testing.assert_close(ours.running_mean, ref.running_mean)
torch.testing.assert_close(ours.running_var, ref.running_var)
assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 1

ref.eval(), ours.eval()
with torch.no_grad():
    torch.testing.assert_close(ours(x), ref(x))
print("sdist smoke test: FusedBatchNorm2d matches nn.BatchNorm2d (train forward + backward, eval)")
