"""``python -m converter`` is the ``tiesafe`` command."""

from .cli import main

main()
