"""The tasks lossaudit audits (torch-free: the option table and the pytest plugin read it)."""

TASKS = ("causal-lm", "seq2seq", "token-classification", "sequence-classification")
