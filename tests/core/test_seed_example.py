"""A worked backpropagation example: "AI rocks <EOS>", targets [rocks, <EOS>, none], with the softmax
output P of a simplified GPT-2 from the online book chapter "How LLMs learn (3 of 4): Back propagation"."""

import torch

from lossaudit.core.tokens import IGNORE_INDEX, token_losses

P = torch.tensor(
    [[0.4114, 0.2532, 0.3354], [0.2524, 0.4323, 0.3153], [0.3280, 0.2986, 0.3734]], dtype=torch.float64
)
AI, ROCKS, EOS = 0, 1, 2


def test_reference_loss_of_the_worked_example_is_1_2639():
    logits = P.log()[None]  # softmax(log P) = P (rows sum to 1 to 4 places)
    # labels as a collator builds them, the ids: the first token is a label no position
    # predicts, and the shift drops it; with it ignored the loss is the same
    for first in (AI, IGNORE_INDEX):
        labels = torch.tensor([[first, ROCKS, EOS]])
        losses = token_losses(logits, labels, "causal-lm")
        assert losses.shape == (1, 2)
        assert round(float(losses.sum() / 2), 4) == 1.2639
