"""Every option of `sdtune train` acts, and sd-scripts' documented command lines run:
an accepted option that does nothing would be a silent lie to the user.

Each TrainOptions field is listed below in exactly one place: a run of the real training command
whose output shows the option's effect (checked against an independent computation where one
exists), or a table naming the test elsewhere that covers it, or a table of options that cannot
act differently on this machine, with the reason. `test_every_option_is_covered` fails when a new
field is added without an entry, and when a cited test (with the fixtures and helpers of its module
that it uses) never sets the option: as a flag, a keyword, a dict key or a TOML key. Runs share one tiny workspace and take 1-5 steps.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdtune.errors import UserError
from sdtune.train.options import TrainOptions

pytestmark = pytest.mark.slow  # trains or runs subprocesses: left out of `make test-fast`

REPO = Path(__file__).resolve().parents[1]
UNET = "model.diffusion_model."
TE = "cond_stage_model.transformer."

# ------------------------------------------------------------------ coverage tables

# option -> the test in this module that shows its effect
HERE = {
    "pretrained_model_name_or_path": "test_documented_command_line_with_dataset_config",
    "output_dir": "test_documented_command_line_with_dataset_config",
    "output_name": "test_documented_command_line_with_dataset_config",
    "dataset_config": "test_documented_command_line_with_dataset_config",
    "save_model_as": "test_epochs_saves_states_and_formats",
    "use_safetensors": "test_epochs_saves_states_and_formats",
    "mixed_precision": "test_documented_command_line_with_dataset_config",
    "xformers": "test_documented_command_line_with_dataset_config",
    "diffusers_xformers": "test_attention_notes",
    "mem_eff_attn": "test_attention_notes",
    "use_8bit_adam": "test_use_8bit_adam_and_lion_reach_the_optimizer",
    "use_lion_optimizer": "test_use_8bit_adam_and_lion_reach_the_optimizer",
    "in_json": "test_documented_legacy_command_line_under_accelerate_launch",
    "train_data_dir": "test_documented_legacy_command_line_under_accelerate_launch",
    "shuffle_caption": "test_text_embedding_cache_and_gradient_checkpointing",
    "keep_tokens": "test_text_embedding_cache_and_gradient_checkpointing",
    "gradient_checkpointing": "test_text_embedding_cache_and_gradient_checkpointing",
    "learning_rate": "test_sgd_step_is_clipped_to_max_grad_norm",
    "optimizer_type": "test_sgd_step_is_clipped_to_max_grad_norm",
    "optimizer_args": "test_sgd_step_is_clipped_to_max_grad_norm",
    "max_grad_norm": "test_sgd_step_is_clipped_to_max_grad_norm",
    "train_text_encoder": "test_train_text_encoder_and_its_learning_rate",
    "learning_rate_te": "test_train_text_encoder_and_its_learning_rate",
    "gradient_accumulation_steps": "test_gradient_accumulation_averages_micro_batches",
    "max_train_steps": "test_gradient_accumulation_averages_micro_batches",
    "lr_scheduler": "test_lr_schedule_is_logged_as_computed",
    "lr_warmup_steps": "test_lr_schedule_is_logged_as_computed",
    "lr_scheduler_power": "test_lr_schedule_is_logged_as_computed",
    "lr_scheduler_num_cycles": "test_lr_schedule_is_logged_as_computed",
    "logging_dir": "test_steps_saves_ema_metadata_logs_and_samples",
    "log_with": "test_steps_saves_ema_metadata_logs_and_samples",
    "log_prefix": "test_steps_saves_ema_metadata_logs_and_samples",
    "log_tracker_name": "test_steps_saves_ema_metadata_logs_and_samples",
    "save_every_n_steps": "test_steps_saves_ema_metadata_logs_and_samples",
    "save_last_n_steps": "test_steps_saves_ema_metadata_logs_and_samples",
    "save_last_n_steps_state": "test_steps_saves_ema_metadata_logs_and_samples",
    "save_state": "test_steps_saves_ema_metadata_logs_and_samples",
    "ema": "test_steps_saves_ema_metadata_logs_and_samples",
    "ema_decay": "test_steps_saves_ema_metadata_logs_and_samples",
    "ema_update_every": "test_steps_saves_ema_metadata_logs_and_samples",
    "metadata_title": "test_steps_saves_ema_metadata_logs_and_samples",
    "metadata_author": "test_steps_saves_ema_metadata_logs_and_samples",
    "metadata_description": "test_steps_saves_ema_metadata_logs_and_samples",
    "metadata_license": "test_steps_saves_ema_metadata_logs_and_samples",
    "metadata_tags": "test_steps_saves_ema_metadata_logs_and_samples",
    "sample_prompts": "test_steps_saves_ema_metadata_logs_and_samples",
    "sample_every_n_steps": "test_steps_saves_ema_metadata_logs_and_samples",
    "sample_at_first": "test_steps_saves_ema_metadata_logs_and_samples",
    "sample_sampler": "test_steps_saves_ema_metadata_logs_and_samples",
    "resume": "test_resume_and_resume_allow_changes",
    "resume_allow_changes": "test_resume_and_resume_allow_changes",
    "seed": "test_epochs_saves_states_and_formats",
    "max_train_epochs": "test_epochs_saves_states_and_formats",
    "save_every_n_epochs": "test_epochs_saves_states_and_formats",
    "save_last_n_epochs": "test_epochs_saves_states_and_formats",
    "save_last_n_epochs_state": "test_epochs_saves_states_and_formats",
    "save_state_on_train_end": "test_epochs_saves_states_and_formats",
    "save_precision": "test_epochs_saves_states_and_formats",
    "sample_every_n_epochs": "test_epochs_saves_states_and_formats",
    "noise_offset": "test_noise_loss_and_text_options_reach_the_step",
    "clip_skip": "test_noise_loss_and_text_options_reach_the_step",
    "full_bf16": "test_full_bf16_trains_bf16_weights",
    "full_fp16": "test_full_fp16_is_refused_on_the_cpu",
    "dry_run": "test_dry_run_trains_nothing",
    "resolution": "test_dry_run_trains_nothing",
    "train_batch_size": "test_gradient_accumulation_averages_micro_batches",
    "weighted_captions": "test_weighted_captions_and_console_log_simple",
    "console_log_simple": "test_weighted_captions_and_console_log_simple",
    "lr_scheduler_timescale": "test_lr_scheduler_timescale_reaches_the_schedule",
}

# option -> "tests/<file>.py::<test>" that covers it (the loop hands these to the named component)
ELSEWHERE = {
    "vram": "tests/test_memory_plan.py::test_dry_run_vram_8_names_the_cheapest_change_that_fits",
    "fused_backward_pass": "tests/test_fused_backward.py::test_training_run_with_the_flag_matches_the_unfused_run",
    "torch_compile": "tests/test_compiled.py::test_compiled_run_has_the_uncompiled_losses_and_weights",
    "dynamo_backend": "tests/test_compiled.py::test_compiled_run_has_the_uncompiled_losses_and_weights",
    # noise and loss: the loop builds DiffusionObjective.from_options(opts) (noise_offset above shows it does)
    **{k: "tests/test_noise_loss.py::test_from_options_reads_every_field" for k in (
        "noise_offset_random_strength", "adaptive_noise_scale", "multires_noise_iterations", "multires_noise_discount",
        "ip_noise_gamma", "ip_noise_gamma_random_strength", "min_timestep", "max_timestep", "zero_terminal_snr",
        "loss_type", "huber_schedule", "huber_c", "huber_scale", "min_snr_gamma", "scale_v_pred_loss_like_noise_pred",
        "v_pred_like_loss", "debiased_estimation_loss")},
    **{k: "tests/test_world.py::test_a_locked_folder_stops_every_process_and_a_free_one_starts_locks_and_sets_the_ddp_options" for k in (
        "ddp_timeout", "ddp_gradient_as_bucket_view", "ddp_static_graph")},
    # dataset: the loop hands the options to build_plan (in_json / dataset_config / resolution above show it does)
    "face_crop_aug_range": "tests/test_data_config.py::test_options_from_the_command_line",  # refused
    **{k: "tests/test_data_config.py::test_precedence_subset_dataset_general_cli_default" for k in (
        "dataset_repeats", "caption_separator")},
    **{k: "tests/test_augment.py::test_bucket_limits_and_steps_choose_the_bucket" for k in (
        "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps")},
    "bucket_no_upscale": "tests/test_data_images.py::test_too_small_for_no_upscale_is_skipped",
    "flip_aug": "tests/test_augment.py::test_flip_aug_mirrors_some_samples_by_seed",
    "color_aug": "tests/test_augment.py::test_color_aug_changes_colours_reproducibly_by_seed",
    "random_crop": "tests/test_augment.py::test_random_crop_picks_windows_within_the_resize",
    "strict": "tests/test_data_images.py::test_plan_skips_bad_files_with_reasons_and_strict_fails",
    "cache_latents": "tests/test_data_cache.py::test_in_memory_cache_writes_nothing",
    "cache_latents_to_disk": "tests/test_data_cache.py::test_interrupted_run_resumes",
    "cache_dir": "tests/test_data_cache.py::test_cache_dir_option",
    "vae_batch_size": "tests/test_data_cache.py::test_entry_holds_the_vae_posterior_of_the_transformed_image",
    "skip_cache_check": "tests/test_data_cache.py::test_corrupt_entry_is_reencoded_and_skip_cache_check_trusts",
    "max_data_loader_n_workers": "tests/test_augment.py::test_loader_workers_follow_the_options",
    "persistent_data_loader_workers": "tests/test_augment.py::test_loader_workers_follow_the_options",
    # captions: per subset, resolved by the data config, applied by sdtune.text
    "keep_tokens_separator": "tests/test_text_captions.py::test_keep_tokens_separator_fixes_prefix_and_suffix",
    "secondary_separator": "tests/test_text_captions.py::test_secondary_separator_keeps_a_tag_together",
    "caption_prefix": "tests/test_text_captions.py::test_prefix_and_suffix_are_their_own_tags",
    "caption_suffix": "tests/test_text_captions.py::test_prefix_and_suffix_are_their_own_tags",
    "caption_dropout_rate": "tests/test_text_captions.py::test_caption_dropout_rate_and_every_n_epochs",
    "caption_dropout_every_n_epochs": "tests/test_text_captions.py::test_caption_dropout_rate_and_every_n_epochs",
    "caption_tag_dropout_rate": "tests/test_text_captions.py::test_tag_dropout_drops_only_flexible_tags",
    "enable_wildcard": "tests/test_text_captions.py::test_wildcards",
    "token_warmup_min": "tests/test_text_captions.py::test_token_warmup",
    "token_warmup_step": "tests/test_text_captions.py::test_token_warmup",
    "max_token_length": "tests/test_text_encode.py::test_chunks_and_embeddings_match_reference",
    # model loading: the loop hands these to checkpoint.load_model
    "v2": "tests/test_checkpoint_safety.py::test_detection_of_each_family_and_each_override",
    "v_parameterization": "tests/test_checkpoint_safety.py::test_detection_of_each_family_and_each_override",
    "use_ema_weights": "tests/test_checkpoint_roundtrip.py::test_use_ema_weights_takes_the_ema_unet_and_outputs_drop_ema",
    "vae": "tests/test_vae_flag.py::test_vae_caches_and_is_saved",
    "alpha_mask": "tests/test_alpha_mask.py::test_transparent_images_train_nothing_end_to_end",
    # logging, sampling details: the loop hands them to RunLogger / sampling
    "log_config": "tests/test_secrets.py::test_a_tiny_run_and_its_resume_write_and_print_no_secret",
    **{k: "tests/test_secrets.py::test_wandb_run_name_and_api_key_reach_wandb_init" for k in (
        "log_tracker_config", "wandb_run_name", "wandb_api_key")},
    "save_ema": "tests/test_train_outputs.py::test_ema_matches_an_independent_average",
    # validation
    **{k: "tests/test_train_outputs.py::test_validation_loss_is_reproducible_and_correct" for k in (
        "validation_split", "validation_seed", "validate_every_n_steps")},
    **{k: "tests/test_train_outputs.py::test_validate_every_n_epochs_and_max_validation_steps" for k in (
        "validate_every_n_epochs", "max_validation_steps")},
    # sd-scripts flags once refused or unrecognized (schedules, logging, counters, saves, ModelSpec, resize)
    **{k: "tests/test_lr_schedules.py::test_schedules_act_in_training" for k in (
        "lr_decay_steps", "lr_scheduler_min_lr_ratio", "lr_scheduler_type", "lr_scheduler_args")},
    **{k: "tests/test_console.py::test_training_run_writes_its_log_file" for k in (
        "console_log_file", "console_log_level")},
    **{k: "tests/test_sdscripts_run_flags.py::test_initial_step_starts_the_counters_and_a_fresh_schedule" for k in (
        "initial_step", "metadata_usage_hint", "metadata_thumbnail", "metadata_merged_from", "metadata_trigger_phrase",
        "metadata_preprocessor", "metadata_is_negative_embedding")},
    "initial_epoch": "tests/test_sdscripts_run_flags.py::test_initial_position_arithmetic",
    "save_n_epoch_ratio": "tests/test_sdscripts_run_flags.py::test_save_n_epoch_ratio",
    "resize_interpolation": "tests/test_sdscripts_run_flags.py::test_resize_interpolation_reaches_the_images",
    # hypernetwork training; the structure flags build the structure the target creates
    "hypernetwork_module": "tests/test_hypernetwork_training.py::test_training_lowers_the_loss_and_leaves_the_model_untouched",
    "hypernetwork_weights": "tests/test_hypernetwork_training.py::test_training_continues_a_web_ui_file",
    "hypernetwork_enable_sizes": "tests/test_hypernetwork_training.py::test_two_processes_train_one_hypernetwork",
    "hypernetwork_layer_structure": "tests/test_hypernetwork_training.py::test_dry_run_shows_the_hypernetwork",
    **{k: "tests/test_hypernetwork_options.py::test_structure_flags_build_the_web_uis_structure" for k in (
        "hypernetwork_activation_func", "hypernetwork_weight_init", "hypernetwork_add_layer_norm",
        "hypernetwork_dropout_structure", "hypernetwork_activate_output")},
    # DeepSpeed: trained under it with two processes; what needs a GPU or NVMe reaches its config
    **{k: "tests/test_deepspeed.py::test_zero2_trains_like_data_parallel_and_resumes" for k in (
        "deepspeed", "zero_stage")},
    **{k: "tests/test_deepspeed.py::test_zero3_offloaded_trains_validates_samples_saves_and_resumes" for k in (
        "offload_optimizer_device", "zero3_save_16bit_model")},
    **{k: "tests/test_zero.py::test_nvme_offload_and_fp16_master_weights_reach_deepspeeds_config" for k in (
        "offload_param_device", "offload_optimizer_nvme_path", "offload_param_nvme_path",
        "fp16_master_weights_and_gradients")},
    # refused with its reason (sdtune loads the model whole)
    "zero3_init_flag": "tests/test_zero.py::test_options_that_cannot_act_under_deepspeed_are_refused",
}

# options that cannot behave differently on a CPU-only machine, and why
SAME_ON_THIS_MACHINE = {
    "sdpa": "selects torch SDPA attention, which sdtune uses anyway (the flag exists for sd-scripts command lines)",
    "ema_cpu": "keeps the EMA on the CPU, where everything already is without a GPU",
    "no_half_vae": "the VAE runs in float32 on the CPU in any case",
}


def test_every_option_is_covered():
    fields = set(TrainOptions.model_fields)
    tables = [set(HERE), set(ELSEWHERE), set(SAME_ON_THIS_MACHINE)]
    listed = set().union(*tables)
    assert not fields - listed, f"options without a test that shows they act: {sorted(fields - listed)}"
    assert not listed - fields, f"listed but not options: {sorted(listed - fields)}"
    assert sum(len(t) for t in tables) == len(listed), "an option is listed twice"
    cited = {**{k: f"tests/{Path(__file__).name}::{v}" for k, v in HERE.items()}, **ELSEWHERE}
    unset = []
    for option, target in sorted(cited.items()):
        file, _, name = target.partition("::")
        functions = module_functions(REPO / file)
        assert name in functions, f"{option}: no test {target}"
        if not sets_option(option, reached_source(name, functions)):
            unset.append(f"{option} ({target})")
    assert not unset, f"the cited test never sets the option: {unset}"


def module_functions(path: Path) -> dict[str, ast.FunctionDef]:
    assert path.is_file(), path
    return {n.name: n for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}


def reached_source(name: str, functions: dict[str, ast.FunctionDef]) -> str:
    """The test's source with that of the module's fixtures and helpers it uses, directly or through others."""
    seen, todo = set(), [name]
    while todo:
        node = functions[todo.pop()]
        seen.add(node.name)
        used = {a.arg for a in node.args.args} | {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        todo += [u for u in used if u in functions and u not in seen]
    return "\n".join(ast.unparse(functions[n]) for n in sorted(seen))


def sets_option(option: str, source: str) -> bool:
    """The option appears as a flag (--name), a keyword or TOML key (name=, name = 1) or a dict key ("name")."""
    name = re.escape(option)
    return bool(re.search(rf"--{name}(?!\w)|(?:(?<![.\w])|(?<=\\n)){name}\s*=(?!=)|[\"']{name}[\"']", source))


def test_the_coverage_check_needs_the_option_set():
    source = '''def t(): run("--flip_aug", x, keep_tokens=2, d={"cache_dir": 1}, toml="[a]\\nbatch_size = 2") and opts.seed == 1'''
    assert all(sets_option(o, source) for o in ("flip_aug", "keep_tokens", "cache_dir", "batch_size"))
    assert not any(sets_option(o, source) for o in ("flip", "seed", "color_aug", "size"))


# ------------------------------------------------------------------ workspace and helpers


@pytest.fixture(scope="module")
def ws(tmp_path_factory, training_workspace):
    root = tmp_path_factory.mktemp("acts")
    training_workspace(root, n=4, safetensors=True)
    (root / "prompts.txt").write_text("a red circle --w 64 --h 64 --s 2 --d 7\n")
    return root


def base_args(ws: Path, out: Path) -> list[str]:
    return ["--pretrained_model_name_or_path", str(ws / "model"), "--in_json", str(ws / "meta.json"),
            "--train_data_dir", str(ws / "data"), "--output_dir", str(out), "--output_name", "N",
            "--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-3", "--seed", "1",
            "--max_data_loader_n_workers", "0", "--max_train_steps", "2"]


def run(ws: Path, out: Path, *extra: str):
    """The real `sdtune train` parser and option validation, then the loop; returns its TrainResult."""
    from sdtune.cli import build_parser
    from sdtune.train.command import options_from_args
    from sdtune.train.trainer import train

    args = build_parser("train").parse_args(["train", *base_args(ws, out), *extra])
    return train(options_from_args(args))


def unet_of(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if k.startswith(UNET)}


def te_of(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if k.startswith(TE)}


def delta_norm(a: dict, b: dict) -> float:
    return torch.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a)).item()


@pytest.fixture(scope="module")
def initial(ws):
    return unet_of(ws / "model.safetensors")


@pytest.fixture(scope="module")
def base(ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    return run(ws, out), unet_of(out / "N.safetensors")


# ------------------------------------------------------------------ sd-scripts' documented command lines


def test_documented_command_line_with_dataset_config(ws, tmp_path, capsys, initial):
    toml = tmp_path / "dataset.toml"
    toml.write_text(f'[general]\nresolution = 64\nbatch_size = 2\n\n[[datasets]]\n\n  [[datasets.subsets]]\n'
                    f'  image_dir = "{ws / "data"}"\n  metadata_file = "{ws / "meta.json"}"\n')
    from sdtune.cli import main

    code = main(["train", f"--pretrained_model_name_or_path={ws / 'model.safetensors'}", f"--output_dir={tmp_path / 'o'}",
                 "--output_name=mine", f"--dataset_config={toml}", "--save_model_as=safetensors",
                 "--learning_rate=5e-6", "--max_train_steps=2", "--use_8bit_adam", "--xformers",
                 "--gradient_checkpointing", "--mixed_precision=fp16"])
    printed = capsys.readouterr().out
    assert code == 0
    notes = [line for line in printed.splitlines() if line.startswith("note:")]
    assert any("--xformers" in n and "SDPA" in n for n in notes), printed
    assert any("fp16" in n and "float32" in n for n in notes), printed
    saved = unet_of(tmp_path / "o" / "mine.safetensors")
    assert delta_norm(saved, initial) > 0


def test_documented_legacy_command_line_under_accelerate_launch(ws, tmp_path, run_in_session):
    # the suite's one single-process `accelerate launch fine_tune.py`, as the documents show it:
    # verbatim but for paths and steps; --config_file supplies the resolution, since the sd-scripts
    # line relies on the model's 512 px default, which is far too slow for a test
    (tmp_path / "cfg.toml").write_text('[dataset]\nresolution = "64"\n')
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_cpu_threads_per_process", "1",
           str(REPO / "fine_tune.py"), f"--pretrained_model_name_or_path={ws / 'model.safetensors'}",
           "--in_json", str(ws / "meta.json"), f"--train_data_dir={ws / 'data'}", "--output_dir=fine_tuned",
           "--shuffle_caption", "--train_batch_size=1", "--learning_rate=5e-6", "--max_train_steps=2",
           "--use_8bit_adam", "--xformers", "--gradient_checkpointing", "--mixed_precision=bf16",
           "--save_every_n_epochs=4", f"--config_file={tmp_path / 'cfg.toml'}"]
    result = run_in_session(cmd, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "note: --xformers requested but unavailable" in result.stdout
    assert (tmp_path / "fine_tuned" / "last.safetensors").is_file()


# ------------------------------------------------------------------ optimizer, schedule, precision


def test_sgd_step_is_clipped_to_max_grad_norm(ws, tmp_path, initial):
    # plain SGD (momentum 0): one step moves the weights by exactly lr * the clipped gradient norm
    run(ws, tmp_path, "--optimizer_type", "SGDNesterov", "--optimizer_args", "momentum=0", "nesterov=False",
        "--learning_rate", "0.5", "--max_grad_norm", "1e-3", "--max_train_steps", "1")
    moved = delta_norm(unet_of(tmp_path / "N.safetensors"), initial)
    assert moved == pytest.approx(0.5 * 1e-3, rel=2e-3)


def test_use_8bit_adam_and_lion_reach_the_optimizer(ws, tmp_path, base, initial):
    result = run(ws, tmp_path / "a", "--use_8bit_adam")
    # the same first loss, a different update than torch's AdamW (8-bit state)
    assert result.losses[0] == pytest.approx(base[0].losses[0], rel=1e-5)
    assert delta_norm(unet_of(tmp_path / "a" / "N.safetensors"), base[1]) > 0
    # Lion's first step moves every weight by exactly lr (the sign of the gradient)
    run(ws, tmp_path / "b", "--use_lion_optimizer", "--max_train_steps", "1", "--learning_rate", "1e-3")
    unet = unet_of(tmp_path / "b" / "N.safetensors")
    moves = torch.cat([(unet[k] - initial[k]).abs().flatten() for k in unet])
    moved = moves[moves > 0]  # a weight with an exactly zero gradient stays
    assert len(moved) > 0.5 * len(moves)
    assert torch.allclose(moved, torch.full_like(moved, 1e-3), rtol=0, atol=1e-6)


def test_train_text_encoder_and_its_learning_rate(ws, tmp_path):
    common = ("--train_text_encoder", "--optimizer_type", "SGDNesterov", "--optimizer_args", "momentum=0",
              "nesterov=False", "--max_grad_norm", "0", "--max_train_steps", "1", "--learning_rate", "1e-2")
    run(ws, tmp_path / "a", *common, "--learning_rate_te", "1e-2")
    run(ws, tmp_path / "b", *common, "--learning_rate_te", "3e-2")
    te0 = te_of(ws / "model.safetensors")
    # SGD: the first update is lr * gradient, so the text encoder moves 3x as far, the U-Net the same
    move_a = delta_norm(te_of(tmp_path / "a" / "N.safetensors"), te0)
    move_b = delta_norm(te_of(tmp_path / "b" / "N.safetensors"), te0)
    assert move_a > 0 and move_b == pytest.approx(3 * move_a, rel=1e-3)
    u0 = unet_of(ws / "model.safetensors")
    assert delta_norm(unet_of(tmp_path / "a" / "N.safetensors"), u0) == pytest.approx(
        delta_norm(unet_of(tmp_path / "b" / "N.safetensors"), u0), rel=1e-4)


def test_gradient_accumulation_averages_micro_batches(ws, tmp_path):
    # with a negligible learning rate the weights stay put, so one accumulated step of two batches
    # reports the mean of the two single-batch losses at the same positions
    tiny = ("--optimizer_type", "SGDNesterov", "--optimizer_args", "momentum=0", "nesterov=False",
            "--learning_rate", "1e-12")
    single = run(ws, tmp_path / "a", *tiny, "--max_train_steps", "2")
    accumulated = run(ws, tmp_path / "b", *tiny, "--max_train_steps", "1", "--gradient_accumulation_steps", "2")
    assert single.steps == 2 and len(single.losses) == 2
    assert accumulated.steps == 1 and len(accumulated.losses) == 1
    assert accumulated.losses[0] == pytest.approx(sum(single.losses) / 2, rel=1e-5)
    assert single.losses[0] != pytest.approx(single.losses[1], rel=1e-3)  # else the check above proves nothing


def _logged(logging_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [p for p in logging_dir.rglob("events.out.tfevents.*")]
    assert events, f"no TensorBoard events under {logging_dir}"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    return [e.value for e in sorted(acc.Scalars(tag), key=lambda e: e.step)]


def test_lr_schedule_is_logged_as_computed(ws, tmp_path):
    import math

    lr, total, warm = 1e-3, 5, 1
    run(ws, tmp_path / "p", "--logging_dir", str(tmp_path / "p" / "logs"), "--lr_scheduler", "polynomial",
        "--lr_scheduler_power", "2", "--lr_warmup_steps", str(warm), "--max_train_steps", str(total),
        "--train_batch_size", "1")
    # diffusers' polynomial decay to 1e-7 after a linear warm-up, read after each optimizer step
    end = 1e-7
    poly = [lr * k / warm if k < warm else (lr - end) * (1 - (k - warm) / (total - warm)) ** 2 + end
            for k in range(1, total + 1)]
    assert _logged(tmp_path / "p" / "logs", "lr/unet") == pytest.approx(poly, rel=1e-5, abs=1e-12)

    run(ws, tmp_path / "c", "--logging_dir", str(tmp_path / "c" / "logs"), "--lr_scheduler", "cosine_with_restarts",
        "--lr_scheduler_num_cycles", "2", "--max_train_steps", "4", "--train_batch_size", "1")
    cos = [lr * 0.5 * (1 + math.cos(math.pi * ((2 * k / 4) % 1.0))) if k < 4 else 0.0 for k in range(1, 5)]
    assert _logged(tmp_path / "c" / "logs", "lr/unet") == pytest.approx(cos, rel=1e-5, abs=1e-12)


def test_full_bf16_trains_bf16_weights(ws, tmp_path, base):
    result = run(ws, tmp_path, "--mixed_precision", "bf16", "--full_bf16")
    unet = unet_of(tmp_path / "N.safetensors")
    # every weight is a bfloat16 value (saved as float32), and it moved
    assert all(torch.equal(v, v.to(torch.bfloat16).float()) for v in unet.values())
    assert delta_norm(unet, base[1]) > 0
    # bf16 autocast: the first loss is close to, not equal to, the float32 one
    assert result.losses[0] == pytest.approx(base[0].losses[0], rel=0.05)
    assert result.losses[0] != base[0].losses[0]


def test_full_bf16_needs_bf16_mixed_precision(ws, tmp_path):
    with pytest.raises(UserError, match="--full_bf16.*--mixed_precision bf16"):
        run(ws, tmp_path, "--full_bf16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused on CPU-only machines")
def test_full_fp16_is_refused_on_the_cpu(ws, tmp_path):
    with pytest.raises(UserError, match="--full_fp16.*CUDA"):
        run(ws, tmp_path, "--mixed_precision", "fp16", "--full_fp16")
    assert not (tmp_path / "N.safetensors").exists()


def test_stochastic_rounding_keeps_small_updates():
    from sdtune.train.optim import add_bf16_stochastic_rounding, round_stochastic_bf16

    gen = torch.Generator().manual_seed(0)
    x = torch.full((200_000,), 1.0 + 2**-9)  # a quarter of the way between two bf16 neighbours
    rounded = round_stochastic_bf16(x, gen).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert rounded.mean().item() == pytest.approx(1.0 + 2**-9, abs=2e-5)  # unbiased
    # an SGD update of 1e-4 on weights of 1.0 is lost with bf16 round-to-nearest, kept on average here
    plain = torch.nn.Parameter(torch.ones(100_000, dtype=torch.bfloat16))
    sr = torch.nn.Parameter(torch.ones(100_000, dtype=torch.bfloat16))
    opt_plain, opt_sr = torch.optim.SGD([plain], lr=1e-4), torch.optim.SGD([sr], lr=1e-4)
    add_bf16_stochastic_rounding(opt_sr, torch.Generator().manual_seed(1))
    for p, opt in ((plain, opt_plain), (sr, opt_sr)):
        for _ in range(10):
            p.grad = torch.ones_like(p)
            opt.step()
    assert torch.all(plain == 1.0)
    assert sr.dtype == torch.bfloat16
    assert sr.float().mean().item() == pytest.approx(1.0 - 10 * 1e-4, abs=3e-5)


# ------------------------------------------------------------------ text, attention, noise


def test_text_embedding_cache_and_gradient_checkpointing(ws, tmp_path, base):
    """The frozen encoder runs only to fill the cache, before the first U-Net call; captions that
    change every step (shuffling) are encoded per step; checkpointing recomputes U-Net blocks."""
    from torch.nn.modules.module import register_module_forward_hook

    events: list[str] = []

    def hook(module, args, output):
        name = type(module).__name__
        if name in ("CLIPTextModel", "UNet2DConditionModel"):
            events.append(name)

    def pack(tensor):  # activations autograd keeps for the backward pass (checkpointing keeps fewer)
        events.append("saved")
        return tensor

    def traced(out, *extra):
        events.clear()
        handle = register_module_forward_hook(hook)
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                result = run(ws, out, "--cache_dir", str(tmp_path / "cache"), *extra)
        finally:
            handle.remove()
        return result, list(events)

    cached, ev_cached = traced(tmp_path / "a")
    first_unet = ev_cached.index("UNet2DConditionModel")
    assert "CLIPTextModel" in ev_cached[:first_unet]
    assert "CLIPTextModel" not in ev_cached[first_unet:]
    assert any((tmp_path / "cache" / "text").rglob("*.safetensors"))
    # keep_tokens above the tag count makes shuffling a no-op: the same captions, encoded every step
    shuffled, ev_shuffled = traced(tmp_path / "b", "--shuffle_caption", "--keep_tokens", "99")
    assert ev_shuffled.count("CLIPTextModel") == 2
    assert shuffled.losses == pytest.approx(cached.losses, rel=1e-5)
    assert cached.losses == pytest.approx(base[0].losses, rel=1e-5)
    checkpointed, ev_ckpt = traced(tmp_path / "c", "--gradient_checkpointing")
    assert ev_ckpt.count("saved") < 0.5 * ev_cached.count("saved")  # the rest is recomputed in the backward pass
    assert checkpointed.losses == pytest.approx(cached.losses, rel=1e-5)


def test_attention_notes(ws, tmp_path, capsys):
    run(ws, tmp_path, "--diffusers_xformers", "--mem_eff_attn", "--max_train_steps", "1")
    printed = capsys.readouterr().out
    assert "--xformers requested but unavailable" in printed
    if not torch.cuda.is_available():
        assert "note: --mem_eff_attn" in printed


def test_noise_loss_and_text_options_reach_the_step(ws, tmp_path, base):
    noisy = run(ws, tmp_path / "a", "--noise_offset", "0.5", "--max_train_steps", "1")
    skipped = run(ws, tmp_path / "b", "--clip_skip", "2", "--max_train_steps", "1")
    ref = base[0].losses[0]
    assert noisy.losses[0] != pytest.approx(ref, rel=1e-4)
    assert skipped.losses[0] != pytest.approx(ref, rel=1e-4)


def test_weighted_captions_and_console_log_simple(ws, tmp_path, base, capsys):
    import json
    import logging

    from sdtune import console

    # every caption as "(caption:1.0)": read as weights, a weight of 1 changes nothing; read as text, it does
    meta = json.loads((ws / "meta.json").read_text())
    (tmp_path / "w.json").write_text(json.dumps({k: {**v, "caption": f"({v['caption']}:1.0)"} for k, v in meta.items()}))
    try:
        weighted = run(ws, tmp_path / "a", "--in_json", str(tmp_path / "w.json"), "--weighted_captions",
                       "--console_log_simple")
        logging.getLogger("some.library").warning("a library line")  # simple: on stdout, as print() would
        assert "a library line" in capsys.readouterr().out
    finally:
        console.reset()
    assert weighted.losses == pytest.approx(base[0].losses, rel=1e-5)
    as_text = run(ws, tmp_path / "b", "--in_json", str(tmp_path / "w.json"), "--max_train_steps", "1")
    assert as_text.losses[0] != pytest.approx(base[0].losses[0], rel=1e-4)


def test_lr_scheduler_timescale_reaches_the_schedule(ws, tmp_path):
    import math

    from sdtune.cli import build_parser
    from sdtune.train.command import options_from_args
    from sdtune.train.schedules import scheduler_from_options

    args = build_parser("train").parse_args(["train", *base_args(ws, tmp_path), "--lr_scheduler", "inverse_sqrt",
                                             "--lr_warmup_steps", "2", "--lr_scheduler_timescale", "6"])
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    schedule = scheduler_from_options(options_from_args(args), optimizer, total_steps=10, note=None)
    rates = []
    for _ in range(8):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    # transformers' inverse square root: a linear warm-up over W steps, then sqrt(T / (k - W + T))
    assert rates == pytest.approx([k / 2 if k < 2 else math.sqrt(6 / (k - 2 + 6)) for k in range(8)], rel=1e-9)


def test_dry_run_trains_nothing(ws, tmp_path, capsys):
    from sdtune.cli import main

    args = base_args(ws, tmp_path / "o")
    args[args.index("--resolution") + 1] = "128"
    assert main(["train", *args, "--dry_run"]) == 0
    printed = capsys.readouterr().out
    assert "128x128" in printed
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ saves, EMA, logs, samples, resume


@pytest.fixture(scope="module")
def steps_run(ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("steps")
    result = run(ws, out, "--max_train_steps", "5", "--train_batch_size", "1", "--save_every_n_steps", "1",
                 "--save_last_n_steps", "2", "--save_state", "--save_last_n_steps_state", "1",
                 "--ema", "--ema_decay", "0.5", "--ema_update_every", "2",
                 "--metadata_title", "T", "--metadata_author", "A", "--metadata_description", "D",
                 "--metadata_license", "L", "--metadata_tags", "x,y",
                 "--logging_dir", str(out / "logs"), "--log_with", "tensorboard", "--log_prefix", "pre",
                 "--log_tracker_name", "trk",
                 "--sample_prompts", str(ws / "prompts.txt"), "--sample_every_n_steps", "4", "--sample_at_first",
                 "--sample_sampler", "euler_a")
    return out, result


def test_steps_saves_ema_metadata_logs_and_samples(steps_run, initial):
    out, result = steps_run
    assert result.steps == 5
    names = {p.name for p in out.iterdir()}
    # models of the last 2 steps (and the current), states of the last 1
    assert {f"N-step{s:08d}.safetensors" for s in (2, 3, 4)} <= names and "N-step00000001.safetensors" not in names
    assert {"N-step00000003-state", "N-step00000004-state"} <= names
    assert not {"N-step00000001-state", "N-step00000002-state"} & names
    # EMA with decay 0.5 updated after steps 2 and 4: 0.25 W0 + 0.25 W2 + 0.5 W4
    w2, w4 = unet_of(out / "N-step00000002.safetensors"), unet_of(out / "N-step00000004.safetensors")
    ema = unet_of(out / "N-ema.safetensors")
    for k in ema:
        expected = 0.25 * initial[k] + 0.25 * w2[k] + 0.5 * w4[k]
        torch.testing.assert_close(ema[k], expected, rtol=1e-5, atol=1e-6)
    with safe_open(str(out / "N.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert (meta["modelspec.title"], meta["modelspec.author"], meta["modelspec.description"],
            meta["modelspec.license"], meta["modelspec.tags"]) == ("T", "A", "D", "L", "x,y")
    runs = list((out / "logs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("pre") and (runs[0] / "trk").is_dir()
    assert len(_logged(out / "logs", "loss/current")) == 5
    from PIL import Image

    samples = sorted(p.name for p in (out / "sample").glob("N_*_00_7.png"))
    assert samples == ["N_000000_00_7.png", "N_000004_00_7.png"]
    assert "Sampler: euler_a" in Image.open(out / "sample" / samples[0]).text["parameters"]


def test_resume_and_resume_allow_changes(ws, steps_run, tmp_path):
    out, _ = steps_run
    state = str(out / "N-step00000004-state")
    same = ("--max_train_steps", "5", "--train_batch_size", "1", "--ema", "--ema_decay", "0.5",
            "--ema_update_every", "2", "--resume", state)
    with pytest.raises(UserError, match="learning_rate"):
        run(ws, tmp_path / "a", *same, "--learning_rate", "2e-3")
    resumed = run(ws, tmp_path / "b", *same, "--learning_rate", "2e-3", "--resume_allow_changes")
    assert resumed.steps == 5 and len(resumed.losses) == 1  # continued at step 4


def test_epochs_saves_states_and_formats(ws, tmp_path, base):
    out = tmp_path
    result = run(ws, out, "--seed", "2", "--max_train_epochs", "3", "--max_train_steps", "99",
                 "--save_every_n_epochs", "1", "--save_last_n_epochs", "1", "--save_state",
                 "--save_last_n_epochs_state", "1", "--save_state_on_train_end", "--save_model_as", "diffusers",
                 "--use_safetensors", "--save_precision", "bf16",
                 "--sample_prompts", str(ws / "prompts.txt"), "--sample_every_n_epochs", "2")
    assert result.steps == 6 and result.epochs == 3  # 2 steps per epoch
    assert result.losses[0] != pytest.approx(base[0].losses[0], rel=1e-4)  # another seed, other noise
    names = {p.name for p in out.iterdir()}
    assert {"N", "N-000002", "N-000002-state", "N-state"} <= names
    assert not {"N-000001", "N-000001-state", "N-000003"} & names
    weights = out / "N" / "unet" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(weights), "pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"BF16"}
    assert sorted(p.name for p in (out / "sample").glob("*.png") if "grid" not in p.name) == ["N_e000002_00_7.png"]
