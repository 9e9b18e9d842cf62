"""ml_collections configs: each file's `get_config()` returns one experiment's ConfigDict."""
