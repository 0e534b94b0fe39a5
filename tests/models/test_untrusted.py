"""Untrusted models: a planted pickle payload and planted remote code must not run; hub ids
resolve from the local cache only (no network) unless --allow-download."""

import json
import pickle

import pytest
import torch

import lossaudit

from lossaudit.core.errors import UsageError
from lossaudit.models.loading import load_model

from test_cli import assert_usage_error, run

TINY = ("--microbatches", "2", "--path", "model", "--batch-size", "2", "--max-length", "8")


class Payload:
    """Unpickling this creates ``marker``: what a malicious checkpoint would do, harmlessly."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def gpt2():
    return load_model("gpt2", seed=3).model  # tied input and output embeddings


def pickle_dir(path, model):
    """A directory with config.json and a pickle checkpoint, as save_pretrained wrote before safetensors."""
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


@pytest.fixture
def malicious(tmp_path, gpt2):
    """A valid config.json beside a pytorch_model.bin whose unpickling creates ``marker``."""
    directory = pickle_dir(tmp_path / "evil", gpt2)
    marker = tmp_path / "pwned"
    torch.save({"transformer.wte.weight": Payload(marker)}, directory / "pytorch_model.bin")
    canary = tmp_path / "canary"  # the payload is live: an unsafe load would run it
    pickle.loads(pickle.dumps(Payload(canary)))
    assert canary.exists()
    return directory, marker


def test_a_pickle_checkpoint_is_refused_without_allow_pickle_and_not_run(malicious):
    directory, marker = malicious
    assert_usage_error(run("check", str(directory), *TINY), "pickle checkpoint", "--allow-pickle")
    assert not marker.exists()


def test_allow_pickle_still_refuses_a_pickle_that_is_more_than_tensors(malicious):
    directory, marker = malicious
    assert_usage_error(run("check", str(directory), "--allow-pickle", *TINY), "weights_only=True", "pytorch_model.bin")
    assert not marker.exists()


def test_a_genuine_pickle_checkpoint_audits_with_allow_pickle(tmp_path, gpt2):
    directory = pickle_dir(tmp_path / "m", gpt2)
    report = lossaudit.check(str(directory), allow_pickle=True, path=["model"], microbatches=[2], batch_size=2,
                             max_length=8)
    assert report.model["parameters"] == sum(p.numel() for p in gpt2.parameters())
    report.assert_clean()


def test_allow_pickle_loads_every_weight_and_keeps_them_tied(tmp_path, gpt2):
    loaded = load_model(str(pickle_dir(tmp_path / "m", gpt2)), allow_pickle=True).model
    for (name, want), got in zip(gpt2.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(want, got), name
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def test_a_sharded_pickle_checkpoint_loads_every_shard_and_nothing_else(tmp_path, gpt2):
    directory = pickle_dir(tmp_path / "m", gpt2)
    (directory / "pytorch_model.bin").unlink()
    state = gpt2.state_dict()
    names = list(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[:5], "pytorch_model-00002-of-00002.bin": names[5:]}
    for file, keys in shards.items():
        torch.save({k: state[k] for k in keys}, directory / file)
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    torch.save({"x": Payload(tmp_path / "pwned")}, directory / "training_args.bin")  # not weights: never read
    loaded = load_model(str(directory), allow_pickle=True).model
    assert all(torch.equal(state[k], v) for k, v in loaded.state_dict().items())
    assert not (tmp_path / "pwned").exists()


def test_a_pickle_checkpoint_missing_weights_is_refused(tmp_path, gpt2):
    directory = pickle_dir(tmp_path / "m", gpt2)
    state = {k: v for k, v in gpt2.state_dict().items() if not k.startswith("transformer.h.0.")}
    torch.save(state, directory / "pytorch_model.bin")
    with pytest.raises(UsageError, match=r"does not fit config.json: \d+ missing keys \(transformer\.h\.0\."):
        load_model(str(directory), allow_pickle=True)


CODE = "open({marker!r}, 'w').close()\n"


def remote_code_dir(tmp_path, model_type):
    """config.json's auto_map names configuration_evil.py and modeling_evil.py; importing
    either creates the marker."""
    directory, marker = tmp_path / "remote", tmp_path / "ran"
    load_model("llama").model.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                   "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (directory / "config.json").write_text(json.dumps(config))
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (directory / name).write_text(CODE.format(marker=str(marker)))
    return directory, marker


def test_remote_code_is_refused_without_trust_remote_code_and_not_run(tmp_path):
    directory, marker = remote_code_dir(tmp_path, "evil_lm")
    assert_usage_error(run("check", str(directory), *TINY), "auto_map", "configuration_evil.py", "--trust-remote-code")
    assert not marker.exists()
    run("check", str(directory), "--trust-remote-code", *TINY)  # the planted code is live: the flag runs it
    assert marker.exists()


def test_a_builtin_model_type_with_auto_map_loads_transformers_own_class_not_the_shipped_code(tmp_path):
    directory, marker = remote_code_dir(tmp_path, "llama")
    assert type(load_model(str(directory)).model).__module__.startswith("transformers.models.llama")
    assert not marker.exists()


SOCKET_GUARD = """
import os, socket
def _refuse(self, address, *args):
    open(os.environ["LOSSAUDIT_TEST_NETWORK_MARKER"], "a").write(repr(address) + "\\n")
    raise OSError("network access in a test")
socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
"""


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty HF_HOME and a sitecustomize that records (and refuses) any socket connect."""
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(SOCKET_GUARD)
    attempts = tmp_path / "connects"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("LOSSAUDIT_TEST_NETWORK_MARKER", str(attempts))
    monkeypatch.setenv("PYTHONPATH", str(guard))  # run() puts the repository and tests/ after it
    return tmp_path / "hf", attempts


def test_an_uncached_hub_id_is_refused_without_a_network_call(offline):
    _, attempts = offline
    assert_usage_error(run("check", "someone/not-cached", *TINY), "not in the local Hugging Face cache", "--allow-download")
    assert not attempts.exists(), attempts.read_text()


def test_a_hub_id_in_the_local_cache_is_audited_offline(offline, tmp_path, gpt2):
    hf_home, attempts = offline
    repo = hf_home / "hub" / "models--someone--tiny-gpt2"
    gpt2.save_pretrained(repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    result = run("check", "someone/tiny-gpt2", *TINY, "--out", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "r" / "report.json").read_text())["model"]["name"] == "someone/tiny-gpt2"
    assert not attempts.exists()


def test_allow_download_asks_the_hub_for_configs_and_safetensors_only(tmp_path, monkeypatch, gpt2):
    import huggingface_hub

    gpt2.save_pretrained(tmp_path / "fetched")
    asked = {}

    def snapshot_download(repo_id, **kwargs):
        asked.update(kwargs, repo_id=repo_id)
        return str(tmp_path / "fetched")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    loaded = load_model("someone/tiny-gpt2", allow_download=True)
    assert loaded.source == "cache" and loaded.task == "causal-lm"
    assert asked == {"repo_id": "someone/tiny-gpt2", "local_files_only": False,
                     "allow_patterns": ["*.json", "*.safetensors"]}
