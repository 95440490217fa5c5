"""BatchAgent: run large batches of LLM agent work as fast as the inference backends allow."""

from ._core import (
    BackendTimeout,
    BackendUnavailable,
    InputError,
    JournalError,
    RunError,
    SchemaError,
    __version__,
)
from .batch import Batch, BatchAgent, ErrorInfo, Result, RunReport, Usage
from .mcp import McpError, McpTools, mcp_tools
from .population import Population, PopulationReport
from .tables import results_to_arrow, results_to_pandas, write_parquet
from .tools import Tool, tool

__all__ = [
    "BackendTimeout",
    "BackendUnavailable",
    "Batch",
    "BatchAgent",
    "ErrorInfo",
    "InputError",
    "JournalError",
    "McpError",
    "McpTools",
    "Population",
    "PopulationReport",
    "Result",
    "RunError",
    "RunReport",
    "SchemaError",
    "Tool",
    "Usage",
    "__version__",
    "mcp_tools",
    "results_to_arrow",
    "results_to_pandas",
    "tool",
    "write_parquet",
]
