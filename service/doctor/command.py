"""`postcall doctor` behind the argument parsing: run every probe, print one line per check, choose the exit
status (0: nothing failed, warnings allowed; 1: something failed)."""

from __future__ import annotations

import sys
from typing import TextIO

import anyio

from service.config import Settings
from service.doctor import probes
from service.doctor.checks import Line, exit_status


def execute(settings: Settings, out: TextIO | None = None) -> int:
    lines: list[Line] = [probes.database(settings), probes.data_dir(settings.data_dir)]
    lines += anyio.run(probes.elevenlabs, settings)
    lines += anyio.run(probes.forwarding, settings)
    out = sys.stdout if out is None else out
    out.write("".join(f"{line}\n" for line in lines))
    return exit_status(lines)
