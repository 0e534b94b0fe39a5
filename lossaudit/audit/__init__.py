"""One audit: its options and config, the run (harness), the judging (targets, tolerances,
verdicts, causes), faults, data-parallel ranks, the memory model and the explain walkthrough."""
