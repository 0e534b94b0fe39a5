"""ms-swift (4.6.0 installs on this CPU with torch 2.13.0): its trainers take ``template`` through a
mixin that is no Trainer (``SwiftMixin``), which lossaudit cannot give: `--trainer-class
swift.trainers:Seq2SeqTrainer` is one usage line naming it, not an error per case (as it was).
Skipped without ms-swift (pip install ms-swift; it needs trl<1.0, transformers<5.20: an
environment of its own)."""

import importlib.util

import pytest

if importlib.util.find_spec("swift") is None:
    pytest.skip("ms-swift is not installed: pip install ms-swift (no lossaudit extra: it needs trl<1.0, "
                "transformers<5.20, an environment of its own)", allow_module_level=True)

from lossaudit.audit.config import CheckConfig  # noqa: E402
from lossaudit.core.errors import UsageError  # noqa: E402
from lossaudit.paths.trainer import TrainerPath  # noqa: E402


@pytest.mark.heavy  # importing swift.trainers takes ~20 s here
def test_swifts_trainer_is_one_line_naming_template():
    with pytest.raises(UsageError) as caught:
        TrainerPath.build(CheckConfig(model="llama", trainer_class="swift.trainers:Seq2SeqTrainer"))
    message = str(caught.value)
    assert "SwiftMixin.__init__ requires template, which lossaudit cannot give" in message and "\n" not in message
