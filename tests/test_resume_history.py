"""A stopped and resumed run is one run: its loss history, plot and summary cover every step from 1
with the global step numbers, and every save made before and after the interruption.

The first part's losses are the ones its own loop returned (TrainResult), the saves are derived by
hand from the save options, and a state saved before the history existed, or --initial_step, gives
one note line naming the steps nobody recorded.
"""

import json
import shutil
from pathlib import Path

import pytest

from sdtune.testing import write_training_workspace
from sdtune.train import history as run_history
from sdtune.train.logs import write_summary

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # see conftest


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("history")
    write_training_workspace(root, n=4)  # 4 images, batch 1: 4 optimizer steps per epoch
    return root


def _argv(ws: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(ws / "model"), "--in_json", str(ws / "meta.json"),
            "--train_data_dir", str(ws / "data"), "--output_dir", str(out), "--output_name", "N", "--resolution", "64",
            "--learning_rate", "1e-3", "--seed", "3", "--max_data_loader_n_workers", "0",
            "--max_train_steps", str(steps), *extra]


def _train(argv: list[str]):
    """The real command-line parsing, then the loop, for its TrainResult."""
    from sdtune.cli import build_parser
    from sdtune.train.command import options_from_args
    from sdtune.train.trainer import train

    return train(options_from_args(build_parser("train").parse_args(["train", *argv])))


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def first(ws):
    """Part one: 3 steps, a model and a state saved at step 2 — the state a run killed at step 3
    would be resumed from."""
    out = ws / "out"
    result = _train(_argv(ws, out, 3, "--save_every_n_steps", "2", "--save_state"))
    assert result.steps == 3 and len(result.losses) == 3
    return out, result


def test_a_resumed_run_covers_the_whole_run(ws, first):
    out, part1 = first
    # resumed at step 2 into the same folder, to 5 steps: part two trains steps 3..5 and saves at step 4
    part2 = _train(_argv(ws, out, 5, "--save_every_n_steps", "2", "--save_state", "--resume",
                         str(out / "N-step00000002-state")))
    assert part2.steps == 5 and len(part2.losses) == 3

    summary = _json(out / "N-train_summary.json")
    record = _json(Path(summary["history"]))
    assert record["steps"] == [1, 2, 3, 4, 5]  # global step numbers, not 1..3
    assert record["losses"] == part1.losses[:2] + part2.losses  # part one's own losses, then part two's
    assert record["gaps"] == []
    saves = [str(out / "N-step00000002.safetensors"), str(out / "N-step00000004.safetensors"), str(out / "N.safetensors")]
    assert summary["outputs"] == saves and all(Path(p).is_file() for p in saves)
    assert summary["steps"] == 5 and summary["epochs"] == 2  # step 5 is in the second epoch of 4 steps
    assert summary["unrecorded"] is None
    assert summary["final_loss"] == pytest.approx(sum(record["losses"]) / 5)  # the last 20 steps: all five
    assert summary["steps_per_second"] == pytest.approx(3 / summary["seconds"], rel=1e-3)  # this part's 3 steps
    assert Path(summary["loss_plot"]).stat().st_size > 1000
    # the state saved at the end carries the record on, for a further resume
    assert _json(out / "N-state" / "history.json")["steps"] == [1, 2, 3, 4, 5]


def test_a_state_without_a_history_resumes_with_one_note(ws, first, tmp_path, capsys):
    out, part1 = first
    old = tmp_path / "old-state"
    shutil.copytree(out / "N-step00000002-state", old)
    (old / "history.json").unlink()  # as an earlier sdtune saved it
    capsys.readouterr()
    part2 = _train(_argv(ws, tmp_path / "out", 3, "--resume", str(old)))
    printed = capsys.readouterr()
    notes = [line for line in printed.out.splitlines() if "not in the loss plot" in line]
    assert len(notes) == 1 and notes[0].startswith("note: ") and "steps 1-2: the resumed state has no" in notes[0]
    assert "Traceback" not in printed.err
    summary = _json(tmp_path / "out" / "N-train_summary.json")
    assert summary["unrecorded"] == notes[0].removeprefix("note: ")
    record = _json(Path(summary["history"]))
    assert record["steps"] == [3] and record["losses"] == part2.losses
    assert record["gaps"] == [{"from": 1, "to": 2, "why": record["gaps"][0]["why"]}]
    assert summary["outputs"] == [str(tmp_path / "out" / "N.safetensors")]
    assert summary["seconds_whole_run"] is None  # the first part's time is not known either


def test_initial_step_counts_global_steps_and_names_the_untrained_ones(ws, tmp_path):
    result = _train(_argv(ws, tmp_path, 4, "--initial_step", "2"))
    summary = _json(tmp_path / "N-train_summary.json")
    record = _json(Path(summary["history"]))
    assert record["steps"] == [3, 4] and record["losses"] == result.losses
    assert [(g["from"], g["to"]) for g in record["gaps"]] == [(1, 2)]
    assert "--initial_step counts from step 2" in summary["unrecorded"]


# ------------------------------------------------------------------------ the record alone (no training)


def _state(tmp_path: Path, record) -> Path:
    folder = tmp_path / "state"
    folder.mkdir()
    (folder / "train_state.json").write_text("{}")
    (folder / "history.json").write_text(record if isinstance(record, str) else json.dumps(record))
    return folder


def test_initial_step_before_the_states_step_drops_the_steps_counted_again(tmp_path):
    saved = {"format": 1, "steps": [1, 2, 3, 4], "losses": [0.4, 0.3, 0.2, 0.1], "outputs": ["a"], "gaps": [],
             "seconds": 10.0}
    history = run_history.RunHistory.begin(2, _state(tmp_path, saved), "--initial_step")
    record = history.record([0.5], ["b"], 5.0)
    assert record["steps"] == [1, 2, 3] and record["losses"] == [0.4, 0.3, 0.5]
    assert record["outputs"] == ["a", "b"] and record["seconds"] == 15.0 and history.note() is None


@pytest.mark.parametrize("damage", ["{not json", json.dumps({"format": 1, "steps": [1, 2], "losses": [0.1],
                                                              "outputs": [], "gaps": []})])
def test_a_damaged_history_is_a_note_not_a_failure(tmp_path, damage):
    history = run_history.RunHistory.begin(2, _state(tmp_path, damage))
    assert history.record([0.5], [], 1.0)["steps"] == [3]
    assert "steps 1-2: the resumed state's history.json cannot be read" in history.note()


def test_the_speed_is_this_parts_steps_over_its_seconds(tmp_path):
    path = write_summary(tmp_path / "s.json", {}, 40, 10.0, 0.1, [], steps_this_run=23)
    assert _json(path)["steps_per_second"] == 2.3 and _json(path)["steps"] == 40
