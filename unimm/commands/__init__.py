"""Implementations of the ``unimm`` CLI subcommands (see ``unimm.cli.COMMANDS``)."""
