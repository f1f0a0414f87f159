"""A pipeline with one step in a container: `where` runs in the pool "containers", served by
`plait worker` in a Docker container (see run.sh); `report` runs in the control plane's own
local pool. The worker gets the step's code as the run's code archive and reads and writes
artifacts through the control plane: it shares no file with this machine.
"""

from __future__ import annotations

import os
import socket

import plait


@plait.step(pool="containers")
def where(greeting: str) -> dict[str, object]:
    """Says where it ran: Docker puts /.dockerenv in every container."""
    print(f"{greeting} from {socket.gethostname()}")
    return {"hostname": socket.gethostname(), "in_container": os.path.exists("/.dockerenv")}


@plait.step
def report(place: dict[str, object]) -> str:
    return f"the step ran on {place['hostname']} (in a container: {place['in_container']})"


@plait.pipeline
def container_demo(greeting: str = "hello") -> None:
    report(where(greeting))


if __name__ == "__main__":
    run = container_demo()
    line = run.steps["report"].output()
    print(line)
    assert run.status == "SUCCEEDED" and line.endswith("(in a container: True)"), run
