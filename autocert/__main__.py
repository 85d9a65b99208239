"""``python -m autocert`` is the same program as the ``autocert`` command."""

from ._signals import expect_stop_signals

expect_stop_signals()  # before the CLI's imports: see _signals

from ._cli import main  # noqa: E402

main()
