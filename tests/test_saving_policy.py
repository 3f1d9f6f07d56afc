"""Save names, cadence and retention (sd-scripts' names; retention computed from the disk)."""

from pathlib import Path

from sdtune.train.saving import SavePolicy, default_names, epoch_stem, step_stem


def _touch(directory: Path, *names):
    for n in names:
        p = directory / n
        if n.endswith("-state"):
            p.mkdir()
            (p / "x").write_text("x")
        else:
            p.write_text("x")


def test_names_match_sd_scripts():
    policy = SavePolicy("m", Path("out"), "safetensors")
    assert policy.model_path(epoch_stem("m", 4)) == Path("out/m-000004.safetensors")
    assert policy.model_path(step_stem("m", 1000)) == Path("out/m-step00001000.safetensors")
    assert policy.state_path(epoch_stem("m", 4)) == Path("out/m-000004-state")
    assert SavePolicy("m", Path("o"), "diffusers").model_path("m") == Path("o/m")


def test_cadence():
    policy = SavePolicy("m", Path("o"), "safetensors", every_n_epochs=2, every_n_steps=3)
    assert [e for e in range(1, 7) if policy.due_after_epoch(e, 6)] == [2, 4]  # 6 is the final save
    assert [s for s in range(1, 11) if policy.due_after_step(s, 9)] == [3, 6]
    assert not SavePolicy("m", Path("o"), "safetensors").due_after_step(5, 10)


def test_keep_last_n_epochs(tmp_path):
    _touch(tmp_path, "m-000002.safetensors", "m-000004.safetensors", "m-000006.safetensors",
           "m-000002-state", "m-000004-state", "m-000006-state", "m.safetensors", "other-000002.safetensors")
    policy = SavePolicy("m", tmp_path, "safetensors", every_n_epochs=2, last_n_epochs=2, last_n_epochs_state=1)
    policy.prune_epochs(6)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["m-000004.safetensors", "m-000006-state", "m-000006.safetensors", "m.safetensors",
                    "other-000002.safetensors"]


def test_keep_last_n_steps_counts_steps(tmp_path):
    _touch(tmp_path, "m-step00000100.safetensors", "m-step00000200.safetensors", "m-step00000300.safetensors")
    SavePolicy("m", tmp_path, "safetensors", every_n_steps=100, last_n_steps=150).prune_steps(300)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-step00000200.safetensors", "m-step00000300.safetensors"]


def test_default_names_are_sd_scripts_and_pruning_follows_them(tmp_path):
    # sd-scripts' train_util: DEFAULT_LAST_OUTPUT_NAME "last", DEFAULT_EPOCH_NAME "epoch", DEFAULT_STEP_NAME "at"
    assert default_names(None) == ("last", "epoch", "at")
    assert default_names("m") == ("m", "m", "m")
    _touch(tmp_path, "epoch-000001.safetensors", "epoch-000002.safetensors", "epoch-000001-state",
           "at-step00000100.safetensors", "at-step00000200.safetensors", "at-step00000100-state", "last.safetensors")
    policy = SavePolicy("last", tmp_path, "safetensors", every_n_epochs=1, every_n_steps=100, last_n_epochs=1,
                        last_n_steps=50, epoch_name="epoch", step_name="at")
    policy.prune_epochs(2)
    policy.prune_steps(200)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["at-step00000200.safetensors", "epoch-000002.safetensors",
                                                          "last.safetensors"]
