//! A connection to Redis that outlives Redis restarts: commands that fail because the server is
//! gone, still loading its AOF, or unreachable are sent again with exponential backoff until
//! `outage` has passed. Every command the fleet sends is safe to repeat (idempotent by design),
//! which is what makes resending after a lost reply correct.

use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, FromRedisValue, RedisError, ServerErrorKind};

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("redis {url}: {message}")]
    Connect { url: String, message: String },
    #[error("redis: no answer for {seconds:.0} s ({last})")]
    Unavailable { seconds: f64, last: String },
    #[error("redis: {0}")]
    Command(String),
    #[error("run {0} is not in this Redis")]
    NoSuchRun(String),
    #[error("{0}")]
    Protocol(String),
    #[error("{path}: {message}")]
    Output { path: String, message: String },
}

/// The first wait after a failed command; doubled up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct Connection {
    manager: ConnectionManager,
    /// How long a command keeps being retried while Redis is unreachable.
    outage: Duration,
}

impl Connection {
    /// Connects (retrying for `outage`). `response_timeout` bounds one reply; `None` for a
    /// connection that sends blocking reads.
    pub async fn open(url: &str, outage: Duration, response_timeout: Option<Duration>) -> Result<Self, FleetError> {
        let shown = crate::secret::display_url(url);
        let client =
            redis::Client::open(url).map_err(|e| FleetError::Connect { url: shown.clone(), message: e.to_string() })?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(response_timeout)
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(3)
            .set_max_delay(MAX_BACKOFF);
        let started = Instant::now();
        let mut backoff = MIN_BACKOFF;
        loop {
            match ConnectionManager::new_with_config(client.clone(), config.clone()).await {
                Ok(manager) => return Ok(Self { manager, outage }),
                Err(e) if transient(&e) && started.elapsed() < outage => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => return Err(FleetError::Connect { url: shown, message: e.to_string() }),
            }
        }
    }

    /// Sends `cmd`, again after a transient failure (see the module comment).
    pub async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, FleetError> {
        self.retrying(|mut manager| async move { cmd.query_async::<T>(&mut manager).await }).await
    }

    /// Sends a pipeline in one round trip, again after a transient failure.
    pub async fn pipe<T: FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T, FleetError> {
        self.retrying(|mut manager| async move { pipe.query_async::<T>(&mut manager).await }).await
    }

    /// Runs a Lua script (EVALSHA, loading it on first use), again after a transient failure.
    pub async fn script<T: FromRedisValue>(&self, invocation: &redis::ScriptInvocation<'_>) -> Result<T, FleetError> {
        self.retrying(|mut manager| async move { invocation.invoke_async::<T>(&mut manager).await }).await
    }

    async fn retrying<T, F, Fut>(&self, send: F) -> Result<T, FleetError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        let started = Instant::now();
        let mut backoff = MIN_BACKOFF;
        loop {
            match send(self.manager.clone()).await {
                Ok(value) => return Ok(value),
                Err(e) if transient(&e) => {
                    if started.elapsed() >= self.outage {
                        return Err(FleetError::Unavailable {
                            seconds: started.elapsed().as_secs_f64(),
                            last: e.to_string(),
                        });
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => return Err(FleetError::Command(e.to_string())),
            }
        }
    }
}

/// A failure that a later attempt may not meet: the server gone or restarting, not a bad command.
fn transient(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::ReadOnly
            )
        )
}
