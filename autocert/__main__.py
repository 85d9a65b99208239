"""``python -m autocert`` is the same program as the ``autocert`` command."""

from ._cli import main

main()
