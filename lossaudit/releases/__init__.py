"""Other transformers releases in isolated, cached environments: the upgrade and history commands'
machinery."""
