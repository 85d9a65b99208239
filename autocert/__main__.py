"""``python -m autocert`` is the same program as the ``autocert`` command."""

from .cli import main

main()
