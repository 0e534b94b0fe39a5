"""Trainer subclasses as users write them, for tests/paths/test_trainer_class.py: no __init__ of
their own, one that passes everything on, one that takes no ``args``, and a planted bug."""

from transformers import Trainer


class PlainTrainer(Trainer):
    """A subclass that changes nothing."""


class PassThroughTrainer(Trainer):
    """An ``__init__`` of its own that passes ``*args``/``**kwargs`` on (a common extension)."""

    def __init__(self, *args, note: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.note = note


class NoArgsTrainer(Trainer):
    """Builds its own arguments from a dict: nothing says which class they are."""

    def __init__(self, model, settings: dict):
        raise AssertionError("never built: its arguments class cannot be told")


class NeedsMoreTrainer(Trainer):
    """Needs an argument of its own (as LlamaFactory's trainers need finetuning_args)."""

    def __init__(self, finetuning_args, *args, **kwargs):
        super().__init__(*args, **kwargs)


class TemplateMixin:
    """A mixin that is no Trainer, requiring what the audit cannot give (ms-swift's SwiftMixin: template)."""

    def __init__(self, model, args, template, train_dataset, **kwargs):
        super().__init__(model=model, args=args, train_dataset=train_dataset, **kwargs)


class MixinTrainer(TemplateMixin, Trainer):
    """ms-swift's trainers: an ``__init__(*args, **kwargs)`` passing everything to the mixin."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)


class OwnCountTrainer(Trainer):
    """Planted bug: each microbatch normalised by its own tokens, as if no count were given."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=None)
