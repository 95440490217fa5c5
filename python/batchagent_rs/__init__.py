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
from .fleet import FleetHandle, worker
from .mcp import McpError, McpTools, mcp_tools
from .population import Population, PopulationReport
from .tables import results_to_arrow, results_to_pandas, write_parquet
from .tools import Tool, tool
from .workflows import (
    Planner,
    Reducer,
    WorkflowResult,
    aplan_map_reduce,
    areduce,
    plan_map_reduce,
    reduce,
)

__all__ = [
    "BackendTimeout",
    "BackendUnavailable",
    "Batch",
    "BatchAgent",
    "ErrorInfo",
    "FleetHandle",
    "InputError",
    "JournalError",
    "McpError",
    "McpTools",
    "Planner",
    "Population",
    "PopulationReport",
    "Reducer",
    "Result",
    "RunError",
    "RunReport",
    "SchemaError",
    "Tool",
    "Usage",
    "WorkflowResult",
    "__version__",
    "aplan_map_reduce",
    "areduce",
    "mcp_tools",
    "plan_map_reduce",
    "reduce",
    "results_to_arrow",
    "results_to_pandas",
    "tool",
    "worker",
    "write_parquet",
]
