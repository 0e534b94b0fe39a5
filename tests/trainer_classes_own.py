"""Trainer subclasses with arguments classes of their own, for tests/paths/test_trainer_class.py:
one named by a (string, postponed) annotation of ``args``, one only by being the module's."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import Trainer, TrainingArguments


@dataclass
class OwnArguments(TrainingArguments):
    temperature: float = 1.0


@dataclass
class OtherArguments(TrainingArguments):
    beta: float = 0.1


class AnnotatedTrainer(Trainer):
    def __init__(self, model=None, args: OwnArguments | TrainingArguments | None = None, **kwargs):
        super().__init__(model=model, args=args, **kwargs)
        self.temperature = args.temperature


class UnannotatedTrainer(Trainer):
    """Two arguments classes beside it and no annotation: which one it takes cannot be told."""

    def __init__(self, model=None, args=None, **kwargs):
        super().__init__(model=model, args=args, **kwargs)


class StatedTrainer(Trainer):
    """Says what ``self.args`` is by a class annotation (as ms-swift's trainers do: ``args:
    Seq2SeqTrainingArguments``), its ``__init__`` naming only the base class: the class's own wins."""

    args: OwnArguments

    def __init__(self, model=None, args: TrainingArguments | None = None, **kwargs):
        super().__init__(model=model, args=args, **kwargs)
