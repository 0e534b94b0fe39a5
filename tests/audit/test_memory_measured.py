"""The memory model (lossaudit.audit.memory) against what the process holds: the peak resident
memory of a real audit on the CPU, in a fresh process with MALLOC_MMAP_THRESHOLD_ set (freed
blocks go back to the system), beside a plain training step's on the same model and batch. The
model's prediction (the training step's measured peak + ``audit_extra_bytes``) must be within
10 % of the audit's measured peak, on a shape whose parameters dominate and on one whose
activations do, and on the first in blocks of parameters under a --max-memory it must hold."""

import json
import os
import subprocess
import sys

import pytest

from lossaudit.audit.memory import GIB, reset_resident_peak

SHAPES = {  # LlamaConfig overrides, batch, length
    # 22.6 M parameters (90 MB in float32) beside a few MB of activations
    "parameters": (dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=2, vocab_size=16000,
                        num_attention_heads=8, num_key_value_heads=8), 4, 32),
    # 8.5 M parameters (34 MB) beside logits of 4 x 128 x 32000 (the float64 loss: 0.13 GB)
    "activations": (dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, vocab_size=32000,
                         num_attention_heads=4, num_key_value_heads=4), 4, 128),
}
SHAPES["parameters, in blocks"] = SHAPES["parameters"]  # under --max-memory 1.5 x the step: blocks of parameters
BUDGET = 1.5  # x the training step's measured peak, for the shapes "in blocks"


def measure(name: str) -> dict:
    """In this (fresh) process: a warm-up step, then a training step's and an audit's peaks."""
    import dataclasses

    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (the libraries, before the baseline)

    import lossaudit.audit.harness  # noqa: F401
    from lossaudit.audit.config import CheckConfig
    from lossaudit.audit.harness import audit, batch_for
    from lossaudit.audit.memory import GIB, ResidentMeter, keeps_correct, resident_bytes, shape_of, sums_held
    from lossaudit.core.forward import forward
    from lossaudit.core.layouts import full_batch
    from lossaudit.core.tokens import target_mask, token_losses
    from lossaudit.models.loading import load_model

    overrides, batch, length = SHAPES[name]
    torch.set_num_threads(1)
    start = resident_bytes()
    loaded = load_model("llama", seed=0, config_overrides=overrides)
    config = CheckConfig(model="llama", paths=("reduction",), reductions=("num_items",), microbatches=(1, 4),
                         paddings=("right",), groupings=("contiguous",), batch_size=batch, max_length=length)

    def step():
        mb = full_batch(batch_for(loaded, config.batch_spec))
        outputs, _ = forward(loaded.model, mb, torch.device("cpu"))
        losses = token_losses(outputs.logits, mb.labels, loaded.task)
        (losses.sum() / int(target_mask(mb.labels, loaded.task).sum())).backward()
        torch.optim.SGD(loaded.model.parameters(), lr=1e-6).step()
        loaded.model.zero_grad(set_to_none=True)

    step()  # the warm-up: what a first forward and backward leave for good is in both peaks
    meter = ResidentMeter(start)
    step()
    train = meter.peak()
    if name.endswith("in blocks"):
        config = dataclasses.replace(config, max_memory=BUDGET * train / GIB)
    said = []
    meter = ResidentMeter(start)
    audit(config, said.append, loaded=loaded)
    blocks = next((int(line.split(" blocks")[0].split()[-1]) for line in said if "blocks to fit" in line), 1)
    shape = shape_of(loaded.model, sums=sums_held(["reduction"], ["num_items"]),
                     keeps_correct=keeps_correct(["reduction"], ["num_items"]), blocks=blocks)
    return {"train": train, "audit": meter.peak(), "shape": shape.__dict__, "budget": config.max_memory}


def measured(name: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.heavy  # two fresh processes, each a model built and trained and audited: about a minute on a busy 2-core machine
@pytest.mark.skipif(not reset_resident_peak(), reason="the peak resident memory cannot be reset here (Linux clear_refs)")
@pytest.mark.parametrize("name", list(SHAPES))
def test_the_model_predicts_the_measured_peak_within_10_percent(name):
    from lossaudit.audit.memory import AuditShape, audit_peak_bytes

    m = measured(name)
    predicted = audit_peak_bytes(m["train"], AuditShape(**m["shape"]))
    assert abs(predicted - m["audit"]) <= 0.10 * m["audit"], (name, m["train"] / 2**20, m["audit"] / 2**20,
                                                              predicted / 2**20)
    if m["budget"] is not None:  # the cap holds: the parameters ran in blocks to fit it
        assert m["shape"]["blocks"] > 1 and m["audit"] <= m["budget"] * GIB, (m["shape"]["blocks"], m["audit"] / 2**20)


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1])))
