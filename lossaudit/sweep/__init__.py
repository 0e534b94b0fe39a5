"""The sweep: every model type of the installed transformers, audited in worker processes, its
files and the comparison of two sweeps."""
