"""The `headstart` command line."""
