"""``python -m layrot.cli``: the same as ``layrot-agent``."""

from layrot.cli import console_main

console_main()
