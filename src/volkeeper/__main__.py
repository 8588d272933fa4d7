"""``python -m volkeeper`` is the ``volkeeper`` command."""

from volkeeper.cli.main import main

main()
