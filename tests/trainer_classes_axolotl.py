"""axolotl trainers with a planted bug, for tests/stacks/test_stacks_axolotl.py (imported only
where axolotl is installed)."""

from axolotl.core.trainers.base import AxolotlTrainer


class Reweighted1pctTrainer(AxolotlTrainer):
    """Planted bug, small: 1 % of the step's weight moved from its last microbatch to its first:
    what bf16 must still find."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        k = self.args.gradient_accumulation_steps
        index = getattr(self, "_planted_index", 0) % k
        self._planted_index = index + 1
        scale = 1.01 if (k > 1 and index == 0) else 0.99 if (k > 1 and index == k - 1) else 1.0
        if return_outputs:
            return out[0] * scale, out[1]
        return out * scale
