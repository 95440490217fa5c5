"""Tools for the workers of deploy/compose.yaml (`--tools-from tools`): replace with your own."""

from batchagent_rs import tool


@tool(cache=True)
def word_count(text: str) -> int:
    """Count the words of a text."""
    return len(text.split())
