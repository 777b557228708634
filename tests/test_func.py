"""torch.func over fusedbn: vmap (a batch of B problems runs as one with B*C channels), grad, jacrev,
per-sample gradients through functional_call with replace_all_batch_norm_modules_, all against the same
transforms of torch's batch norm."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, replace_all_batch_norm_modules_, vmap

import fusedbn


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


def _data(device, batch=4, shape=(3, 5, 4, 4)):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=gen, dtype=torch.float64).to(device)
    w = (torch.rand(batch, shape[1], generator=gen, dtype=torch.float64) + 0.5).to(device)
    b = torch.randn(batch, shape[1], generator=gen, dtype=torch.float64).to(device)
    return x, w, b


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_vmap_training_over_inputs_and_weights(device, layout):
    x, w, b = _data(device)
    if layout == "channels_last":
        x = torch.stack([s.to(memory_format=torch.channels_last) for s in x])
    ours = vmap(lambda x, w, b: fusedbn.batch_norm(x, None, None, w, b, training=True))(x, w, b)
    theirs = vmap(lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True))(x, w, b)
    _close(ours, theirs)
    # Unbatched parameters and a residual, through the fused relu op.
    r = torch.randn_like(x)
    ours = vmap(lambda x, r: fusedbn.batch_norm_relu(x, None, None, w[0], b[0], training=True, residual=r))(x, r)
    theirs = vmap(lambda x, r: torch.relu(F.batch_norm(x, None, None, w[0], b[0], training=True) + r))(x, r)
    _close(ours, theirs)


def test_vmap_eval_with_running_statistics(device):
    x, w, b = _data(device)
    rm, rv = torch.randn_like(w), torch.rand_like(w) + 0.5
    ours = vmap(lambda x, rm, rv: fusedbn.batch_norm(x, rm, rv, w[0], b[0], training=False))(x, rm, rv)
    theirs = vmap(lambda x, rm, rv: F.batch_norm(x, rm, rv, w[0], b[0], training=False))(x, rm, rv)
    _close(ours, theirs)


def test_vmap_cannot_update_running_statistics(device):
    x, w, b = _data(device)
    rm, rv = torch.zeros(5, dtype=torch.float64, device=device), torch.ones(5, dtype=torch.float64, device=device)
    with pytest.raises(RuntimeError, match="replace_all_batch_norm_modules_"):
        vmap(lambda x: fusedbn.batch_norm(x, rm, rv, training=True))(x)


def test_grad_and_jacrev(device):
    x, w, b = _data(device)
    loss = {name: (lambda fn: lambda x, w, b: fn(x, None, None, w, b, training=True).square().sum())(fn)
            for name, fn in (("ours", fusedbn.batch_norm), ("torch", F.batch_norm))}
    for argnums in (0, 1, 2):
        _close(grad(loss["ours"], argnums)(x[0], w[0], b[0]), grad(loss["torch"], argnums)(x[0], w[0], b[0]))
    per_channel = {name: (lambda fn: lambda w: fn(x[0], None, None, w, b[0], training=True).sum((0, 2, 3)))(fn)
                   for name, fn in (("ours", fusedbn.batch_norm), ("torch", F.batch_norm))}
    _close(jacrev(per_channel["ours"])(w[0]), jacrev(per_channel["torch"])(w[0]))


@pytest.mark.filterwarnings("error::UserWarning")  # e.g. vmap's "performance drop": no per-sample fallback
def test_per_sample_gradients_with_functional_call(device):
    """The torch.func recipe: batch norm without running statistics, vmap(grad) over samples."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    model = model.to(device).double()
    ours = fusedbn.convert_model(copy.deepcopy(model))
    for m in (model, ours):
        replace_all_batch_norm_modules_(m)
    x = torch.randn(6, 2, 3, 6, 6, dtype=torch.float64, device=device)  # 6 samples, each a batch of 2
    target = torch.randn(6, 2, 2, dtype=torch.float64, device=device)
    grads = []
    for m in (model, ours):
        params = {k: v.detach() for k, v in m.named_parameters()}

        def loss(params, x, t, m=m):
            return F.mse_loss(functional_call(m, params, (x,)), t)

        grads.append(vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target))
    for name in grads[0]:
        _close(grads[1][name], grads[0][name])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_relu", [False, True], ids=["bn", "bn-add-relu"])
def test_forward_mode_ad_and_jacfwd(device, training, with_relu):
    x, w, b = _data(device)
    x, w, b = x[0], w[0], b[0]
    rm, rv = torch.randn_like(w), torch.rand_like(w) + 0.5
    r = torch.randn_like(x)

    def ours(x, w, b, r):
        stats = (None, None) if training else (rm, rv)
        if with_relu:
            return fusedbn.batch_norm_relu(x, *stats, w, b, training=training, residual=r)
        return fusedbn.batch_norm(x, *stats, w, b, training=training)

    def theirs(x, w, b, r):
        y = F.batch_norm(x, *((None, None) if training else (rm, rv)), w, b, training=training)
        return torch.relu(y + r) if with_relu else y

    tangents = tuple(torch.randn_like(t) for t in (x, w, b, r))
    out_ours, jvp_ours = torch.func.jvp(ours, (x, w, b, r), tangents)
    out_theirs, jvp_theirs = torch.func.jvp(theirs, (x, w, b, r), tangents)
    _close(out_ours, out_theirs)
    _close(jvp_ours, jvp_theirs)
    _close(torch.func.jacfwd(lambda w: ours(x, w, b, r).sum((0, 2, 3)))(w),
           torch.func.jacfwd(lambda w: theirs(x, w, b, r).sum((0, 2, 3)))(w))
    _, expected = torch.func.jvp(lambda x: theirs(x, w, b, r), (x,), (tangents[0],))
    with torch.autograd.forward_ad.dual_level():  # the torch.autograd.forward_ad API too
        dual = torch.autograd.forward_ad.make_dual(x, tangents[0])
        tangent = torch.autograd.forward_ad.unpack_dual(ours(dual, w, b, r)).tangent
    _close(tangent, expected)


@pytest.mark.parametrize("stat", ["running_mean", "running_var"])
def test_forward_mode_ad_rejects_running_statistic_tangents_in_eval(device, stat):
    """torch raises where a running statistic carries a tangent beside a differentiable input in eval (they
    are constants there), and accepts it in training (it only feeds the in-place update); through
    torch.autograd.forward_ad and torch.func.jvp."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import jvp

    x = torch.randn(4, 3, 2, 2, device=device)
    for fn in (F.batch_norm, fusedbn.batch_norm):
        for training in (False, True):
            stats = dict(running_mean=torch.zeros(3, device=device), running_var=torch.ones(3, device=device))
            with fwAD.dual_level():
                stats[stat] = fwAD.make_dual(stats[stat], torch.ones(3, device=device))
                dual_x = fwAD.make_dual(x, torch.ones_like(x))
                if training:
                    fn(dual_x, stats["running_mean"], stats["running_var"], training=True)
                else:
                    with pytest.raises(RuntimeError, match="not differentiable wrt running_mean and running_var"):
                        fn(dual_x, stats["running_mean"], stats["running_var"], training=False)
        rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
        with pytest.raises(RuntimeError, match="not differentiable wrt running_mean and running_var"):
            jvp(lambda x, m: fn(x, m, rv, training=False), (x, rm), (x, torch.ones(3, device=device)))
