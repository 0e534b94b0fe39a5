"""axolotl trainers with a planted bug, for tests/stacks/test_stacks_axolotl.py (imported only
where axolotl is installed)."""

from axolotl.core.trainers.base import AxolotlTrainer

from planted import Reweighted1pct


class Reweighted1pctTrainer(Reweighted1pct, AxolotlTrainer):
    """axolotl's trainer with 1 % of the step's weight moved between microbatches (planted.Reweighted1pct)."""
