"""CLI commands, one module per area; importing this package registers them on `cli.app`."""
