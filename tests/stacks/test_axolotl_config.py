"""--axolotl-config read and checked before any model is built (no axolotl needed): a missing
file, text that is not YAML or not a mapping, an objective that is not a token mean, an adapter
the audit's --peft does not match, and options that clash with it are one usage error each; the
settings the audit owns are named with the config's values."""

import pytest

from lossaudit.audit.config import CheckConfig
from lossaudit.core.errors import UsageError
from lossaudit.stacks.axolotl import OWNED, AxolotlConfig
from lossaudit.stacks import missing

from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.mark.parametrize("text, needle", [
    (None, "no such file"), ("a: [1, 2", "not YAML"), ("- just\n- a list\n", "expected a mapping"),
    ("rl: dpo\nbase_model: x\n", "rl: 'dpo' trains another objective"),
    ("adapter: lora\nlora_r: 8\n", "adapter: lora but --peft None"),
])
def test_a_config_lossaudit_cannot_audit_is_one_usage_error(tmp_path, text, needle):
    path = tmp_path / "config.yml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(UsageError, match="--axolotl-config") as caught:
        AxolotlConfig.read(str(path), peft=None)
    assert needle in str(caught.value)


def test_sample_packing_is_audited_not_refused():
    config = AxolotlConfig(DATA / "axolotl-packing.yml", {"sample_packing": True, "micro_batch_size": 2}, None)
    assert config.packing and not AxolotlConfig(DATA / "axolotl-full.yml", {}, None).packing
    assert config.owned_in() == ["micro_batch_size (2 -> 1: one pack, the microbatch's B/k rows)"]


@pytest.mark.skipif(not missing("flash_attn"), reason="flash_attn is installed")
@pytest.mark.parametrize("setting", ["flash_attention: true", "attn_implementation: flash_attention_2"])
def test_flash_attention_without_flash_attn_is_one_line(tmp_path, setting):
    """axolotl 0.21.0 raised transformers' ImportError on every case ("FlashAttention2 has been toggled on ...")."""
    from lossaudit.core.errors import EnvironmentProblem

    path = tmp_path / "flash.yml"
    path.write_text(f"sample_packing: true\n{setting}\n")
    with pytest.raises(EnvironmentProblem, match="flash attention needs the flash_attn package") as caught:
        AxolotlConfig.read(str(path), peft=None)
    assert "attn_implementation: sdpa" in str(caught.value) and "\n" not in str(caught.value)


def test_peft_without_an_adapter_in_the_config_is_refused():
    with pytest.raises(UsageError, match="--peft lora but the config trains no adapter"):
        AxolotlConfig.read(str(DATA / "axolotl-full.yml"), peft="lora")


def test_options_that_clash_with_the_config_are_refused_when_the_config_is_made():
    with pytest.raises(UsageError, match="--axolotl-config with --trainer-class, --trainer-arg"):
        CheckConfig(model="llama", axolotl_config=str(DATA / "axolotl-full.yml"), trainer_class="transformers:Trainer",
                    trainer_args=(("bf16", "true"),))


def test_a_config_without_the_trainer_path_or_on_several_ranks_is_refused_all_at_once(tmp_path):
    with pytest.raises(UsageError) as caught:
        CheckConfig(model="llama", axolotl_config=str(tmp_path / "nope.yml"), paths=("reduction",), world_size=2)
    assert any("nope.yml: no such file" in p for p in caught.value.problems)
    assert any("--axolotl-config: drives --path trainer" in p for p in caught.value.problems)
    assert any("--axolotl-config: runs in one process" in p for p in caught.value.problems)


@pytest.mark.skipif(not missing("axolotl"), reason="axolotl is installed")
def test_without_axolotl_the_pip_command_is_named():
    from lossaudit.core.errors import EnvironmentProblem

    with pytest.raises(EnvironmentProblem, match=r"pip install 'lossaudit\[axolotl\]'"):
        AxolotlConfig.read(str(DATA / "axolotl-full.yml"), peft=None)


def test_the_settings_the_audit_owns_are_named_with_the_configs_values():
    config = AxolotlConfig(DATA / "axolotl-lora.yml", {"micro_batch_size": 2, "learning_rate": 0.0002,
                                                         "lora_r": 8, "lora_dropout": 0.05}, "lora")
    owned = config.owned_in()
    assert owned == ["micro_batch_size (2 -> B/k)", "learning_rate (0.0002 -> 1 (SGD, the update is the gradient))",
                     "lora_dropout (0.05 -> 0 (dropout would make the step random))"]
    assert "lora_r" not in OWNED  # the adapter's shape is the config's (the audit's --peft must match it)


@pytest.mark.heavy  # ~60 s here: a CLI process importing transformers and building the model
def test_cli_a_missing_config_is_one_line_exit_2(tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-m", "lossaudit", "check", "llama", "--path", "trainer", "--axolotl-config",
                             str(tmp_path / "nope.yml"), "--microbatches", "2", "--out", str(tmp_path / "r")],
                            capture_output=True, text=True, cwd=root, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == 2, result.stderr
    # where axolotl is installed, torchao and torch print at import (before lossaudit runs): ours is one line, the last
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("lossaudit")]
    assert len(lines) == 1 and "--axolotl-config" in lines[0] and "no such file" in lines[0], result.stderr
    assert result.stderr.strip().splitlines()[-1] == lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()
