"""A build's child process (pip, venv), its output streamed line by line."""

from __future__ import annotations

import re
import subprocess
from collections import deque
from collections.abc import Callable, Mapping

import anyio


async def stream_process(
    args: list[str], *, log: Callable[[str], None], tail: deque[str], env: Mapping[str, str]
) -> int:
    """Runs ``args``, sends each non-empty line of its output (stdout and stderr together) to
    ``log`` as it comes, keeps the last ones in ``tail``; returns its exit code."""
    async with await anyio.open_process(
        args, stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=dict(env)
    ) as process:
        assert process.stdout is not None
        pending = b""
        async for chunk in process.stdout:
            pending += chunk
            *lines, pending = re.split(rb"\r?\n|\r", pending)
            for raw in lines:
                line = raw.decode(errors="replace").rstrip()
                if line:
                    tail.append(line)
                    log(line)
        if pending.strip():
            line = pending.decode(errors="replace").rstrip()
            tail.append(line)
            log(line)
        return await process.wait()
