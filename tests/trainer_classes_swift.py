"""ms-swift trainers with a planted bug, for tests/stacks/test_frameworks_swift.py (imported only
where ms-swift is installed)."""

from swift.trainers import Seq2SeqTrainer


class MeanOfMeansTrainer(Seq2SeqTrainer):
    """Planted bug: ms-swift's loss computed as if the Trainer gave no num_items_in_batch (the
    template's ``compute_sft_loss`` then keeps each microbatch's own token mean), the step still
    counted as one that normalises itself (``model_accepts_loss_kwargs`` True: no division by k)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=None)


class Reweighted1pctTrainer(Seq2SeqTrainer):
    """Planted bug, small: 1 % of the step's weight moved from its last microbatch to its first
    (the step's total unchanged where the two hold as many targets): what bf16 must still find."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        k = self.args.gradient_accumulation_steps
        index = getattr(self, "_planted_index", 0) % k
        self._planted_index = index + 1
        scale = 1.01 if (k > 1 and index == 0) else 0.99 if (k > 1 and index == k - 1) else 1.0
        if return_outputs:
            return out[0] * scale, out[1]
        return out * scale
