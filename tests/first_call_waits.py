"""A tool for deadline tests: its first call waits until the test lets it go."""

from __future__ import annotations

import threading

from batchagent_rs import Tool, tool


class FirstCallWaits:
    """A `research` tool whose first call waits until `release` is set: the agent that makes it
    answers after its tick's deadline (which agent that is depends on which call runs first)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.topics: list[str] = []
        lock = threading.Lock()

        @tool
        def research(topic: str) -> str:
            """Research a topic."""
            with lock:
                first = not self.topics
                self.topics.append(topic)
            if first:
                self.release.wait(timeout=60)
            return "done"

        self.tool: Tool = research
