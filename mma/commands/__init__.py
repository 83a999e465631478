"""Subcommands beyond LightningCLI's own."""
