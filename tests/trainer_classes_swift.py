"""ms-swift trainers with a planted bug, for tests/stacks/test_frameworks_swift.py (imported only
where ms-swift is installed)."""

from swift.trainers import Seq2SeqTrainer

from planted import Reweighted1pct


class MeanOfMeansTrainer(Seq2SeqTrainer):
    """Planted bug: ms-swift's loss computed as if the Trainer gave no num_items_in_batch (the
    template's ``compute_sft_loss`` then keeps each microbatch's own token mean), the step still
    counted as one that normalises itself (``model_accepts_loss_kwargs`` True: no division by k)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=None)



class Reweighted1pctTrainer(Reweighted1pct, Seq2SeqTrainer):
    """ms-swift's trainer with 1 % of the step's weight moved between microbatches (planted.Reweighted1pct)."""
