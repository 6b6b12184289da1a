"""The example programs in examples/ do what they claim, in a reduced mode (few epochs).

Each example has ``main(argv)`` returning what it measured; the tests call it in-process (one
example is also run as a program, the way a reader runs it). An example exits with an error of its
own when a claim fails; these tests also check the numbers it returns.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from helpers import ROOT

EXAMPLES = ROOT / "examples"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is fastest and does not suffer from a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def example(name: str):
    """Imports examples/<name>.py (the examples import their helper ``_common`` as a sibling)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


def test_airline_both_loss_curves_agree_and_plot(tmp_path):
    airline = example("airline_passengers")
    png = tmp_path / "forecast.png"
    result = airline.main(["--impl", "both", "--epochs", "300", "--plot", str(png)])

    torch_loss, fused_loss = result["losses"]["torch"], result["losses"]["fused"]
    assert len(torch_loss) == len(fused_loss) == 300
    assert result["max_rel_diff"] <= airline.TOLERANCE == 1e-4
    assert fused_loss[-1] < 0.2 * fused_loss[0]  # it does learn
    assert result["test_rmse"]["fused"] == pytest.approx(result["test_rmse"]["torch"], rel=1e-3)
    assert set(result["seconds"]) == {"torch", "fused"}
    if importlib.util.find_spec("matplotlib") is None:
        assert result["plot"] is None
    else:
        assert result["plot"] == png and png.read_bytes().startswith(PNG_SIGNATURE)


def test_airline_same_code_path_for_each_impl():
    """--impl fused alone trains exactly what --impl both trains (same seed, same weights), and
    a second run repeats it exactly."""
    airline = example("airline_passengers")
    both = airline.main(["--impl", "both", "--epochs", "20", "--no-plot"])
    for impl in ("fused", "torch"):
        alone = airline.main(["--impl", impl, "--epochs", "20", "--no-plot"])
        assert list(alone["losses"]) == [impl]
        assert alone["losses"][impl] == both["losses"][impl]


def test_airline_without_matplotlib(monkeypatch, tmp_path, capsys):
    airline = example("airline_passengers")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    png = tmp_path / "forecast.png"
    result = airline.main(["--epochs", "3", "--plot", str(png)])
    assert result["plot"] is None and not png.exists()
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_airline_data_ships_with_the_project():
    months, passengers = example("airline_passengers").load_series()
    assert len(months) == len(passengers) == 144
    assert (months[0], months[-1]) == ("1949-01", "1960-12")
    assert (passengers[0].item(), passengers[-1].item()) == (112.0, 432.0)


def test_classifier_both_loss_curves_agree():
    classifier = example("lstm_classifier")
    result = classifier.main(["--impl", "both", "--epochs", "3", "--train-size", "512"])
    assert len(result["losses"]["fused"]) == 3
    assert result["max_rel_diff"] <= classifier.TOLERANCE == 1e-4
    assert result["losses"]["fused"][-1] < result["losses"]["fused"][0]
    assert result["accuracy"]["fused"] == pytest.approx(result["accuracy"]["torch"], abs=2 / 512)


def test_classifier_initial_state_and_head_shapes():
    classifier = example("lstm_classifier")
    from fused_lstm import FusedLSTM

    model = classifier.WalkClassifier(FusedLSTM)
    x, y = classifier.make_walks(5, torch.Generator().manual_seed(0))
    assert x.shape == (5, classifier.SEQ_LEN, 1) and y.shape == (5,)
    assert model(x).shape == (5, classifier.NUM_CLASSES)


def test_stepwise_agrees_with_whole_sequence():
    stepwise = example("stepwise")
    result = stepwise.main(["--impl", "both"])
    for impl in ("torch", "fused"):
        assert result[impl]["max_diff"] <= stepwise.ATOL
        assert result[impl]["h_n"].shape == (stepwise.NUM_LAYERS, 1, stepwise.HIDDEN_SIZE)
        assert result[impl]["step_seconds"] > 0
    assert result["impl_max_diff"] <= stepwise.ATOL


def test_shapes_and_last_step_equals_h_n():
    shapes = example("shapes")
    result = shapes.main(["--impl", "both"])
    for impl in ("torch", "fused"):
        assert all(result[impl]["checks"].values()), result[impl]["checks"]
        assert len(result[impl]["checks"]) == 4
        one, bi = result[impl]["shapes"]["one direction"], result[impl]["shapes"]["bidirectional"]
        assert one["output"] == (4, 7, 6) and one["h_n"] == (2, 4, 6)
        assert one["many-to-one: head(h_n[-1])"] == (4, 1)
        assert one["many-to-many: head(output)"] == (4, 7, 1)
        assert bi["output"] == (4, 7, 12) and bi["h_n"] == (4, 4, 6)
        assert result[impl]["shapes"]["time-major"]["output"] == (7, 4, 6)


def test_example_runs_as_a_program():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    package = pathlib.Path(importlib.util.find_spec("fused_lstm").origin).resolve()
    if package == (ROOT / "fused_lstm" / "__init__.py").resolve():  # the checkout, not installed
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / "stepwise.py"), "--impl", "both"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.count("agree: True") == 2


def test_example_fails_loudly_when_a_claim_fails(monkeypatch):
    """A failed check ends the program with an error, not just a printed difference."""
    stepwise = example("stepwise")
    monkeypatch.setattr(stepwise, "ATOL", -1.0)
    with pytest.raises(SystemExit, match="disagree"):
        stepwise.main(["--impl", "fused"])
