//! Saving and loading populations of persistent agents (see [`crate::scheduler::population`]).

use std::path::PathBuf;

use pyo3::prelude::*;

use crate::python::errors::{InputError, JournalError};
use crate::scheduler::agent::AgentState;
use crate::scheduler::population::{load, save};

/// Writes a population to `path` (SQLite, the journal's format): `settings_json` (a JSON object),
/// the number of steps taken, and each agent's state `(agent id, JSON)` as `Run.agent_states`
/// returns it. The file is replaced whole once written.
#[pyfunction]
#[allow(clippy::needless_pass_by_value)] // PyO3 extracts owned values.
pub fn save_population(
    py: Python<'_>,
    path: PathBuf,
    settings_json: &str,
    tick: u32,
    agents: Vec<(String, String)>,
) -> PyResult<()> {
    let settings: serde_json::Value =
        serde_json::from_str(settings_json).map_err(|e| InputError::new_err(format!("population settings: {e}")))?;
    let agents = agents
        .into_iter()
        .map(|(agent, json)| {
            serde_json::from_str::<AgentState>(&json)
                .map(|state| (agent.clone(), state))
                .map_err(|e| InputError::new_err(format!("agent {agent:?}: state cannot be read: {e}")))
        })
        .collect::<PyResult<Vec<_>>>()?;
    py.allow_threads(|| save(&path, &settings, tick, &agents)).map_err(|e| JournalError::new_err(e.to_string()))
}

/// `(settings JSON, steps taken, [(agent id, state JSON)])`.
type SavedJson = (String, u32, Vec<(String, String)>);

/// Reads a population written by `save_population`.
#[pyfunction]
#[allow(clippy::needless_pass_by_value)] // PyO3 extracts owned values.
pub fn load_population(py: Python<'_>, path: PathBuf) -> PyResult<SavedJson> {
    let (settings, tick, agents) =
        py.allow_threads(|| load(&path)).map_err(|e| JournalError::new_err(e.to_string()))?;
    let agents = agents
        .into_iter()
        .map(|(agent, state)| {
            serde_json::to_string(&state)
                .map(|json| (agent, json))
                .map_err(|e| JournalError::new_err(format!("agent state: {e}")))
        })
        .collect::<PyResult<Vec<_>>>()?;
    Ok((settings.to_string(), tick, agents))
}
