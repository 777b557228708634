"""The "Using fusedbn with ..." snippets of fusedbn/README.md, each run against the real library (skipped only
where the library is not installed): run as written and again with fusedbn's transforms made no-ops (the
library's own model), both in float64 from the same seed; the trained models' state and eval outputs must
agree, and fusedbn's ops must have run in the first and not in the second."""
import pathlib
import re

import pytest
import torch

import fusedbn
from helpers import FusedbnOps, assert_same_state

pytestmark = pytest.mark.slow  # whole models

README = pathlib.Path(__file__).resolve().parents[1] / "fusedbn" / "README.md"
SNIPPETS = dict(re.findall(r"<!-- snippet: (\w+) -->\n```python\n(.*?)```", README.read_text(), re.S))
LIBRARY = {"torchvision": "torchvision", "timm": "timm", "lightning": "lightning", "monai": "monai"}


def test_every_library_has_a_snippet():
    assert sorted(SNIPPETS) == sorted(LIBRARY)


def _run(code: str):
    """Runs `code` in float64 from seed 0; its namespace and the fusedbn ops that ran."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        namespace = {"__name__": "snippet"}
        with FusedbnOps() as ops:
            exec(compile(code, str(README), "exec"), namespace)
    finally:
        torch.set_default_dtype(default)
    return namespace, ops.counts


def _without_fusedbn(monkeypatch):
    """fusedbn's model transforms (and the Lightning callback) as no-ops: the snippet runs the library's model."""
    monkeypatch.setattr(fusedbn, "fuse_model", lambda model, **_: model)
    monkeypatch.setattr(fusedbn, "convert_model", lambda model, **_: model)
    try:
        import lightning.pytorch as pl
        from fusedbn import lightning as fusedbn_lightning
    except ImportError:
        return
    monkeypatch.setattr(fusedbn_lightning, "FuseBatchNorm", lambda *_, **__: pl.Callback())


@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_snippet_keeps_the_model_and_runs_fusedbn(name, monkeypatch):
    pytest.importorskip(LIBRARY[name], reason=f"the {name} snippet needs {LIBRARY[name]}: pip install .[test]")
    ours, ops = _run(SNIPPETS[name])
    with monkeypatch.context() as patch:
        _without_fusedbn(patch)
        theirs, their_ops = _run(SNIPPETS[name])
    assert ops["forward_train"] > 0 and ops["backward"] > 0 and not their_ops, (ops, their_ops)
    model, reference = ours["model"], theirs["model"]
    assert any(type(m).__module__.startswith("fusedbn.") for m in model.modules())
    assert_same_state(model, reference, rtol=1e-9, atol=1e-9)
    x = ours["x"] if "x" in ours else ours["data"].tensors[0][:4]
    model.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-9, atol=1e-9)
