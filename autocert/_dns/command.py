"""``exec:COMMAND``: ``COMMAND set FQDN VALUE`` and ``COMMAND clear FQDN VALUE``, as Apache
mod_md's ``MDChallengeDns01`` runs its script; exit status 0 means done."""

from __future__ import annotations

import asyncio
import shlex

from .._errors import ConfigError
from .providers import DnsError

#: A command that has not finished by then is killed and the change counts as failed.
COMMAND_TIMEOUT = 60.0

#: How much of a failing command's stderr the error carries.
_STDERR_TAIL = 300


class CommandProvider:
    """Runs the command as a child process (no shell), off the event loop's hands."""

    def __init__(self, command: str, *, timeout: float = COMMAND_TIMEOUT) -> None:
        try:
            self.argv = shlex.split(command)
        except ValueError as exc:
            raise ConfigError(f"--dns exec:{command}: {exc}") from None
        self.command = command
        self.timeout = timeout

    async def set(self, fqdn: str, value: str) -> None:
        await self._run("set", fqdn, value)

    async def clear(self, fqdn: str, value: str) -> None:
        await self._run("clear", fqdn, value)

    async def _run(self, action: str, fqdn: str, value: str) -> None:
        shown = f"`{self.command} {action} {fqdn}`"
        try:
            process = await asyncio.create_subprocess_exec(
                *self.argv,
                action,
                fqdn,
                value,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise DnsError(f"{shown} could not start: {exc.strerror or exc}") from None
        try:
            _, stderr = await asyncio.wait_for(process.communicate(), self.timeout)
        except (
            BaseException
        ) as exc:  # the timeout, or the order being cancelled: leave no child behind
            if process.returncode is None:
                process.kill()
                await asyncio.shield(process.wait())
            if isinstance(exc, asyncio.TimeoutError):
                raise DnsError(
                    f"{shown} did not finish within {self.timeout:.0f} s; killed"
                ) from None
            raise
        if process.returncode != 0:
            lines = [
                line.strip()
                for line in stderr.decode(errors="replace").splitlines()
                if line.strip()
            ]
            tail = lines[-1][-_STDERR_TAIL:] if lines else "no output on stderr"
            raise DnsError(f"{shown} exited with status {process.returncode}: {tail}")
