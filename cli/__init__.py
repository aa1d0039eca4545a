"""layrot.cli: the ``layrot-agent`` command line (operators), on top of client and controllers."""
