"""The model under audit: loading by name, directory or hub cache, tiny configs, safe checkpoints,
and what differs between transformers releases."""
