import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/toy.py, tests/planted.py
# a test module imports another's helpers by its name (from test_cli import run), whatever its folder
FOLDERS = ("audit", "benchmarks", "cli", "core", "gate", "models", "paths", "releases", "report", "stacks", "sweep")
sys.path[1:1] = [os.path.join(os.path.dirname(__file__), folder) for folder in FOLDERS]

import signal  # noqa: E402

import pytest  # noqa: E402

# Tests send Ctrl-C (SIGINT) to the CLI processes they start. A suite run as a background job (a
# non-interactive shell's `cmd &`, some CI runners) inherits SIGINT ignored, and so would every
# child: the interrupt would be lost and the child run on. Take it as a terminal gives it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Cases of a parametrized matrix that belong to the heavy tier (`-m heavy`; deselected by default):
# the default tier keeps one or two cases of each matrix, so every feature still runs there. Whole
# tests are marked where they stand, with @pytest.mark.heavy.
HEAVY_CASES = {
    # each a `python -m lossaudit` process importing torch and transformers
    *(f"tests/cli/test_contract.py::test_a_broken_safetensors_file_is_refused_by_name[{variant}]"
      for variant in ("short_header", "truncated", "header_longer_than_file", "shape_does_not_fit_offsets",
                      "data_cut_short")),
    *(f"tests/cli/test_contract.py::test_bad_input_is_exit_2_before_the_model_is_built[{args}]"
      for args in ("--trainer-arg dataloader_num_workers=2", "--trainer-arg save_strategy=steps",
                   "--trainer-arg eval_strategy=steps", "--trainer-arg label_smoothing_factor=high",
                   "--seed -1", "--groupings ,", "--paddings ")),
    "tests/cli/test_contract.py::test_user_code_calling_sys_exit_never_passes_for_a_clean_run[--loss-fn]",
    "tests/cli/test_contract.py::test_user_code_calling_sys_exit_ends_the_run_naming_it_and_keeps_the_old_report[--loss-fn]",
    "tests/cli/test_contract.py::test_a_signal_before_the_swap_leaves_the_old_report_whole_and_nothing_staged[2-interrupted]",
    *(f"tests/cli/test_contract.py::test_stack_options_are_refused_before_the_model_is_built[{args}]"
      for args in ("--peft lora --peft-arg inference_mode=true", "--peft lora --peft-arg lora_alpha=nan",
                   "--peft xlora", "--trainer-class hostile:ExitingTrainer --world-size 2",
                   "--step hostile:sgd --path reduction", "--trainer-class hostile:ExitingTrainer --path reduction",
                   "--lightning-module hostile:factory --path reduction", "--step no_such_module:f",
                   "--step hostile:nothing", "--trainer-class hostile:sgd",
                   "--path trainer --trainer-class trl:SFTTrainer --trainer-arg packing=banana")),
    *(f"tests/cli/test_contract.py::test_a_broken_adapter_is_refused_in_one_line[{variant}]"
      for variant in ("cut", "garbled", "no_tensors", "half_the_tensors", "config_not_json", "config_not_an_object")),
    *(f"tests/cli/test_contract.py::test_user_code_that_hard_exits_is_exit_3_and_keeps_the_old_report[{args}]"
      for args in ("--path step --step hostile:exit0", "--path step --step exits_on_import:step",
                   "--path step --step hostile:sys_exit", "--path lightning --lightning-module hostile:factory")),
    *(f"tests/cli/test_contract.py::test_a_launcher_environment_that_is_no_group_is_refused[{env}]"
      for env in ("RANK=-1", "MASTER_PORT='abc'", "WORLD_SIZE=0", "MASTER_PORT=70000")),
    # the memory model on whole audits: reduction-1 and reduction-3 stay in the default tier
    "tests/audit/test_memory_model.py::test_audit_stays_within_the_formula_of_a_training_step[accelerate]",
    "tests/audit/test_memory_model.py::test_audit_stays_within_the_formula_of_a_training_step[default]",
    "tests/sweep/test_sweep.py::test_bad_sweep_input_is_one_line_and_exit_2[args1---jobs]",
    "tests/sweep/test_sweep.py::test_bad_sweep_input_is_one_line_and_exit_2[args2-did you mean 'model']",
    # the default tier finds the 1 % rescale in bfloat16, where it is hardest
    "tests/stacks/test_stacks_paths.py::test_step_path_finds_a_one_percent_rescale_in_either_dtype[float32]",
}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
@pytest.fixture(scope="session")
def env_cache(request, tmp_path_factory):
    """Isolated environments kept between runs of the suite (upgrade, GRPO's old trl, axolotl's lean
    one): LOSSAUDIT_TEST_ENV_CACHE, else pytest's cache, else a temporary folder."""
    from pathlib import Path

    if os.environ.get("LOSSAUDIT_TEST_ENV_CACHE"):
        return Path(os.environ["LOSSAUDIT_TEST_ENV_CACHE"])
    cache = getattr(request.config, "cache", None)
    return cache.mkdir("lossaudit-envs") if cache is not None else tmp_path_factory.mktemp("envs")


def pytest_collection_modifyitems(items):
    for item in items:
        if item.nodeid in HEAVY_CASES:
            item.add_marker(pytest.mark.heavy)
