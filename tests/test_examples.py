"""The example scripts (examples/) end to end on tiny budgets: they run, write their JSON and PNG, learn
(the loss decreases), and fusedbn's runs follow torch's from the same seed (in float64, to rounding)."""
import json
import pathlib
import sys

import pytest
import torch

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import common  # noqa: E402
import landscape  # noqa: E402
import lr_sweep  # noqa: E402
import train  # noqa: E402

pytestmark = pytest.mark.slow  # trains whole models

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device on this machine"))]


def _needs_example_dependencies():
    """The examples' own dependencies (figures, the digits), or the calling test skipped without them."""
    for name in ("matplotlib", "sklearn"):
        pytest.importorskip(name, reason="pip install .[test] installs matplotlib and scikit-learn")


def _run(script, stem, argv, tmp_path, capsys):
    _needs_example_dependencies()
    threads = torch.get_num_threads()  # the scripts set it (--threads)
    try:
        assert script.main([*argv, "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / f"{stem}.png").stat().st_size > 0
    return json.loads((tmp_path / f"{stem}.json").read_text()), capsys.readouterr().out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model,data", [("cnn", "digits"), ("mlp", "gratings")])
def test_train(device, model, data, tmp_path, capsys):
    record, out = _run(train, f"train-{model}-{data}-float64", ["--model", model, "--data", data, "--epochs", "1",
                                                         "--dtype", "float64", "--device", device, "--lr", "0.1"],
                       tmp_path, capsys)
    runs = record["runs"]
    assert set(runs) == {"fusedbn", "torch", "none"}
    assert "epoch   1/1" in out and "largest |fusedbn - torch|" in out
    for run in runs.values():
        assert len(run["test_accuracy"]) == 1 and not run["diverged"]
    losses = runs["fusedbn"]["loss"]
    assert sum(losses[-5:]) < sum(losses[:5])  # it learns
    assert record["largest_loss_difference"] < 1e-9
    assert record["torch_rounding_floor"] is not None


@pytest.mark.parametrize("script,option", [(train, "--norm"), (lr_sweep, "--norm"), (landscape, "--variants")])
def test_unknown_names_are_refused(script, option, capsys):
    with pytest.raises(SystemExit):
        script.main([option, "fusedbn,layer"])
    assert f"argument {option}: unknown layer" in capsys.readouterr().err


def test_lr_sweep(tmp_path, capsys):
    record, out = _run(lr_sweep, "lr_sweep-mlp-digits",
                       ["--model", "mlp", "--lrs", "0.03:3:3", "--epochs", "2", "--threshold", "0.3",
                        "--dtype", "float64"], tmp_path, capsys)
    assert record["learning_rates"] == pytest.approx([0.03, 0.3, 3.0])
    for name, result in record["results"].items():
        assert len(result["test_accuracy"]) == 3
        assert f"{name:8} trains" in out
    assert max(record["loss_difference_by_lr"]) < 1e-9
    assert record["results"]["fusedbn"]["test_accuracy"] == record["results"]["torch"]["test_accuracy"]


def test_trained_range():
    lrs = [0.01, 0.1, 1.0, 10.0]
    assert lr_sweep.trained_range([0.2, 0.95, 0.97, 0.1], lrs, 0.9) == (0.1, 1.0)
    assert lr_sweep.trained_range([0.2, 0.5, 0.5, 0.1], lrs, 0.9) is None


def test_landscape(tmp_path, capsys):
    record, out = _run(landscape, "landscape", ["--steps", "6", "--every", "2", "--step-sizes", "0.05", "0.2",
                                                "--dtype", "float64"], tmp_path, capsys)
    runs = record["runs"]
    assert set(runs) == set(landscape.VARIANTS)
    for series in runs.values():
        assert series["probe_step"] == [0, 2, 4]
        assert all(lo <= hi for lo, hi in zip(series["loss_min"], series["loss_max"]))
        assert all(beta > 0 for beta in series["beta"])
    assert runs["fusedbn"]["loss"][-1] < runs["fusedbn"]["loss"][0]  # it learns
    assert record["largest_loss_difference"] < 1e-9
    assert "effective beta" in out


def test_step_noise_is_fixed_within_a_step_and_new_at_the_next():
    noise = landscape.StepNoise(1.0, seed=0, layer=2)
    x = torch.randn(4, 3, 5, 5)
    first = noise(x)
    torch.testing.assert_close(noise(x), first, rtol=0, atol=0)
    noise.step = 1
    assert not torch.equal(noise(x), first)
    assert torch.equal(noise.eval()(x), x)


def test_digits_and_gratings_are_deterministic():
    _needs_example_dependencies()
    for load in (common.digits, common.gratings):
        first, second = load(seed=3), load(seed=3)
        torch.testing.assert_close(first.train, second.train, rtol=0, atol=0)
        assert abs(first.train[0].mean().item()) < 1e-5  # standardised with the training images' statistics
