"""A log sidecar that waits on two channels at once with asyncio, and outlives the apps that feed it.

    python examples/log_sidecar.py --channel web=unix://@web-logs --channel jobs=mq:///job-logs

One task per channel, on one loop: each prints its channel's lines as they come, and when
an app ends its stream (it stopped or restarts), opens the channel again for the app's next
run. SIGTERM or Ctrl-C stops the sidecar: cancelling a task closes its consumer (no line is
lost by the cancel; the channel keeps it), and the last line on stderr gives every channel's
counts as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

import podipc
import podipc.aio


async def consume(name: str, url: str, counts: dict[str, dict[str, int]]) -> None:
    """Print every line of `url` as `name: line`, stream after stream, until cancelled."""
    while True:
        async with podipc.aio.consumer(url, wait="inf") as inbox:  # waits for the app, never blocking the loop
            async for line in inbox:
                print(f"{name}: {line.decode(errors='replace')}", flush=True)
                counts[name]["lines"] += 1
        counts[name]["streams"] += 1  # the app ended its stream; the next run of it opens a new one


async def serve(channels: dict[str, str]) -> dict[str, dict[str, int]]:
    """Consume every channel until SIGTERM/SIGINT; return the counts (a channel's error ends the sidecar)."""
    counts = {name: {"lines": 0, "streams": 0} for name in channels}
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    tasks = [asyncio.create_task(consume(name, url, counts), name=name) for name, url in channels.items()]
    stop = asyncio.create_task(stopping.wait())
    done, _ = await asyncio.wait([*tasks, stop], return_when=asyncio.FIRST_COMPLETED)
    for task in [*tasks, stop]:
        task.cancel()
    await asyncio.gather(*tasks, stop, return_exceptions=True)
    for task in done:
        if task is not stop:
            task.result()  # a consumer's error (a bad URL, a hostile queue): raise it
    return counts


def main() -> None:
    """Parse NAME=URL channels and serve them; exit 0 after a stop, 1 with the error otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channel", action="append", required=True, metavar="NAME=URL")
    arguments = parser.parse_args()
    channels = dict(channel.split("=", 1) for channel in arguments.channel)
    try:
        counts = asyncio.run(serve(channels))
    except podipc.PodIPCError as error:
        sys.exit(f"log sidecar: {error}")
    print(json.dumps(counts), file=sys.stderr)


if __name__ == "__main__":
    main()
