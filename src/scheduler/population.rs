//! Persistent agents stepped in ticks. Each agent's conversation lives here between steps; a step
//! starts one job per agent from its history plus the new observation, and the conversation the
//! job ends with replaces the history only when the step is accepted: a failed step, or one whose
//! answer came after the caller's deadline, leaves the history as it was (never half a turn).
//!
//! Saved populations are run journals (see [`crate::store::Journal`]): one job per agent whose
//! checkpoint is the agent's state, and the population's settings in the journal's key-value table.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::conversation::{Message, Role, ToolDef};
use crate::scheduler::agent::{AgentState, Job, JobResult};
use crate::scheduler::durable::fingerprint;
use crate::store::{Journal, JournalError};

/// Bytes per token when a conversation is sized without the model's tokenizer (English prose
/// runs about 4; JSON and code fewer, so this errs towards more tokens than a tokenizer counts).
const BYTES_PER_TOKEN: usize = 3;

/// The journal key under which a saved population keeps its settings.
const META_KEY: &str = "population";

#[derive(Debug, thiserror::Error)]
pub enum PopulationError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("{path} is not a saved population ({reason})")]
    NotAPopulation { path: PathBuf, reason: String },
    #[error("{path}: agent {agent:?}: the saved state cannot be read: {reason}")]
    Decode { path: PathBuf, agent: String, reason: String },
}

/// The conversations of a population's agents, and the steps in flight.
#[derive(Default)]
pub struct Population {
    /// Each agent's history (without the system message) and counters over every accepted step.
    agents: HashMap<String, AgentState>,
    /// Job id of each step in flight, with its agent.
    in_flight: HashMap<String, String>,
    /// Steps whose answer is no longer wanted (the caller's deadline passed): their conversation is
    /// dropped when they finish.
    expired: std::collections::HashSet<String>,
}

impl Population {
    /// The job for one agent's step: its history and `observation` after the `system` message.
    pub fn start(
        &mut self,
        agent: &str,
        job_id: String,
        index: u64,
        observation: String,
        system: Option<&Message>,
    ) -> Job {
        let history = self.agents.get(agent).map_or(&[][..], |s| s.messages.as_slice());
        let mut messages = Vec::with_capacity(history.len() + 2);
        messages.extend(system.cloned());
        messages.extend_from_slice(history);
        messages.push(Message::user(observation));
        self.in_flight.insert(job_id.clone(), agent.to_owned());
        Job {
            id: job_id,
            index,
            input: serde_json::Map::new(),
            resume: Some(AgentState { messages, ..AgentState::default() }),
            extra_body: None,
            keep_conversation: true,
        }
    }

    /// Tokens the next request of `agent` would hold with `observation` added, estimated from its
    /// size (no tokenizer is at hand here).
    pub fn estimated_tokens(
        &self,
        agent: &str,
        observation: &str,
        system: Option<&Message>,
        tools: &[ToolDef],
    ) -> usize {
        let history = self.agents.get(agent).map_or(&[][..], |s| s.messages.as_slice());
        let message_bytes = |m: &Message| {
            m.content.len() + m.tool_calls.iter().map(|c| c.name.len() + c.arguments.len()).sum::<usize>()
        };
        let tool_bytes: usize =
            tools.iter().map(|t| t.name.len() + t.description.len() + t.parameters.to_string().len()).sum();
        let bytes = system.map_or(0, message_bytes)
            + history.iter().map(message_bytes).sum::<usize>()
            + observation.len()
            + tool_bytes;
        bytes.div_ceil(BYTES_PER_TOKEN)
    }

    /// The caller stopped waiting for these steps: their answers will not enter the history.
    pub fn expire<'a>(&mut self, job_ids: impl IntoIterator<Item = &'a str>) {
        for id in job_ids {
            if self.in_flight.contains_key(id) {
                self.expired.insert(id.to_owned());
            }
        }
    }

    /// A step finished: a successful one that has not expired becomes its agent's history. Returns
    /// whether `result` was a step of this population.
    pub fn finish(&mut self, result: &mut JobResult) -> bool {
        let Some(agent) = self.in_flight.remove(&result.id) else { return false };
        let conversation = result.conversation.take();
        if self.expired.remove(&result.id) {
            return true;
        }
        let Some(mut messages) = conversation.filter(|_| result.ok) else { return true };
        if messages.first().is_some_and(|m| m.role == Role::System) {
            messages.remove(0);
        }
        let state = self.agents.entry(agent).or_default();
        state.messages = messages;
        state.turns += result.turns;
        state.tool_calls += result.tool_calls;
        state.usage += result.usage;
        state.retries += result.attempts.saturating_sub(1);
        true
    }

    /// Steps started and not finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub fn agent(&self, agent: &str) -> Option<&AgentState> {
        self.agents.get(agent)
    }

    pub fn set_agent(&mut self, agent: String, state: AgentState) {
        self.agents.insert(agent, state);
    }
}

/// Writes a population to `path` as a journal: `settings` (a JSON object) and each agent's state,
/// `tick` being the number of steps taken. The file is written beside `path` and renamed over it
/// once complete, so a crash while saving leaves the previous save intact.
pub fn save(path: &Path, settings: &Value, tick: u32, agents: &[(String, AgentState)]) -> Result<(), PopulationError> {
    let io = |e: std::io::Error| PopulationError::Io { path: path.to_path_buf(), reason: e.to_string() };
    let name = path
        .file_name()
        .ok_or_else(|| PopulationError::Io { path: path.to_path_buf(), reason: "not a file name".into() })?;
    let partial = path.with_file_name(format!(".{}.partial", name.to_string_lossy()));
    remove_database(&partial).map_err(io)?;
    {
        let journal = Journal::open(&partial, &population_fingerprint(), false)?;
        journal.record_meta(META_KEY, &settings.to_string());
        for (index, (agent, state)) in agents.iter().enumerate() {
            let state_json = serde_json::to_string(state)
                .map_err(|e| PopulationError::Io { path: path.to_path_buf(), reason: e.to_string() })?;
            journal.record_start(agent, index as u64, "{}");
            journal.record_turn(agent, tick, &state_json);
        }
        journal.flush()?;
        // Dropping the journal folds its WAL into the file: one self-contained file to rename.
    }
    // A WAL left by the previous save would be replayed onto the new file.
    for suffix in ["-wal", "-shm"] {
        remove_file(&sidecar(path, suffix)).map_err(io)?;
    }
    std::fs::rename(&partial, path).map_err(io)?;
    Ok(())
}

/// A saved population: its settings, the number of steps taken and each agent's state in order.
pub type Saved = (Value, u32, Vec<(String, AgentState)>);

/// Reads a population saved by [`save`].
pub fn load(path: &Path) -> Result<Saved, PopulationError> {
    if !path.is_file() {
        return Err(PopulationError::Io { path: path.to_path_buf(), reason: "no such file".into() });
    }
    let not_population = |reason: String| PopulationError::NotAPopulation { path: path.to_path_buf(), reason };
    let journal = match Journal::open(path, &population_fingerprint(), false) {
        Ok(journal) => journal,
        Err(JournalError::Mismatch { .. }) => return Err(not_population("it is the journal of a batch run".into())),
        Err(e) => return Err(e.into()),
    };
    let settings = journal.meta(META_KEY)?.ok_or_else(|| not_population("it holds no population settings".into()))?;
    let settings: Value = serde_json::from_str(&settings).map_err(|e| not_population(format!("settings: {e}")))?;
    let mut tick = 0;
    let mut agents = Vec::new();
    for (agent, _, checkpoint) in journal.checkpoints()? {
        let state: AgentState = serde_json::from_str(&checkpoint.state_json).map_err(|e| PopulationError::Decode {
            path: path.to_path_buf(),
            agent: agent.clone(),
            reason: e.to_string(),
        })?;
        tick = tick.max(checkpoint.turn);
        agents.push((agent, state));
    }
    Ok((settings, tick, agents))
}

fn population_fingerprint() -> String {
    fingerprint("batchagent population v1")
}

fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn remove_database(path: &Path) -> std::io::Result<()> {
    for suffix in ["", "-wal", "-shm"] {
        remove_file(&sidecar(path, suffix))?;
    }
    Ok(())
}

fn remove_file(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::conversation::Usage;
    use serde_json::json;

    fn finished(job: &Job, ok: bool, answer: &str) -> JobResult {
        let mut messages = job.resume.as_ref().unwrap().messages.clone();
        messages.push(Message::assistant(answer, Vec::new()));
        JobResult {
            id: job.id.clone(),
            index: job.index,
            ok,
            output: None,
            text: None,
            error: None,
            usage: Usage { prompt_tokens: 10, completion_tokens: 2, ..Usage::default() },
            turns: 1,
            tool_calls: 0,
            attempts: 1,
            repaired: false,
            finish_reason: None,
            truncated: false,
            ttft_s: None,
            total_s: 0.0,
            conversation: ok.then_some(messages),
            trace: None,
        }
    }

    fn contents(population: &Population, agent: &str) -> Vec<String> {
        population.agent(agent).map(|s| s.messages.iter().map(|m| m.content.clone()).collect()).unwrap_or_default()
    }

    #[test]
    fn accepted_steps_grow_the_history_and_others_leave_it_as_it_was() {
        let system = Message::system("rules");
        let mut population = Population::default();
        let job = population.start("a", "a#1".into(), 0, "tick 1".into(), Some(&system));
        let messages = &job.resume.as_ref().unwrap().messages;
        assert_eq!(messages.first().map(|m| m.role), Some(Role::System));
        assert!(population.finish(&mut finished(&job, true, "buy")));
        assert_eq!(contents(&population, "a"), ["tick 1", "buy"], "the system message is not history");

        // Failed: nothing recorded.
        let job = population.start("a", "a#2".into(), 0, "tick 2".into(), Some(&system));
        assert!(population.finish(&mut finished(&job, false, "?")));
        assert_eq!(contents(&population, "a"), ["tick 1", "buy"]);

        // Expired before it finished: its answer is dropped.
        let job = population.start("a", "a#3".into(), 0, "tick 3".into(), Some(&system));
        population.expire(["a#3"]);
        assert!(population.finish(&mut finished(&job, true, "late")));
        assert_eq!(contents(&population, "a"), ["tick 1", "buy"]);

        let job = population.start("a", "a#4".into(), 0, "tick 4".into(), Some(&system));
        assert_eq!(job.resume.as_ref().unwrap().messages.len(), 4);
        assert!(population.finish(&mut finished(&job, true, "sell")));
        assert_eq!(contents(&population, "a"), ["tick 1", "buy", "tick 4", "sell"]);
        let state = population.agent("a").unwrap();
        assert_eq!((state.turns, state.usage.prompt_tokens), (2, 20), "accepted steps only");
        assert_eq!(population.in_flight(), 0);
        assert!(!population.finish(&mut finished(&job, true, "again")), "a finished step is not finished twice");
    }

    #[test]
    fn estimates_grow_with_the_history() {
        let mut population = Population::default();
        let empty = population.estimated_tokens("a", "x".repeat(300).as_str(), None, &[]);
        assert_eq!(empty, 100);
        let job = population.start("a", "a#1".into(), 0, "y".repeat(300), None);
        population.finish(&mut finished(&job, true, &"z".repeat(30)));
        assert_eq!(population.estimated_tokens("a", "", None, &[]), 110);
    }

    #[test]
    fn save_and_load_round_trip_and_refuse_other_files() {
        let dir = std::env::temp_dir().join(format!("ba-population-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pop.sqlite");
        let state = |text: &str| AgentState { messages: vec![Message::user(text)], turns: 3, ..AgentState::default() };
        let agents = vec![("b".to_owned(), state("one")), ("a".to_owned(), state("two"))];
        save(&path, &json!({"system": "s"}), 3, &agents).unwrap();
        // Saving again replaces the file whole.
        save(&path, &json!({"system": "s2"}), 4, &agents[..1]).unwrap();
        let (settings, tick, loaded) = load(&path).unwrap();
        assert_eq!(settings, json!({"system": "s2"}));
        assert_eq!(tick, 4);
        assert_eq!(loaded, agents[..1].to_vec());

        let batch = dir.join("batch.sqlite");
        drop(Journal::open(&batch, "some batch", false).unwrap());
        let err = load(&batch).unwrap_err().to_string();
        assert!(err.contains("is not a saved population"), "{err}");
        let err = load(&dir.join("absent.sqlite")).unwrap_err().to_string();
        assert!(err.contains("no such file"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
