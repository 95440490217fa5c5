//! From the backend URLs a user gives to one connected [`Backend`]: `sim://` starts an embedded
//! simulator on a loopback port first; every other scheme connects through [`url::connect`].

use std::sync::Arc;

use super::url::{self, BackendOptions};
use super::{Backend, BackendError};
use crate::sim::{SimConfig, SimServer};

pub type ConnectOptions = BackendOptions;

/// A connected backend and the simulators started for it, which live as long as this value.
pub struct Connected {
    pub backend: Arc<dyn Backend>,
    pub sim: Option<SimServer>,
}

pub async fn connect(urls: &[String], options: &ConnectOptions) -> Result<Connected, BackendError> {
    match urls {
        [] => Err(BackendError::Config("no backend URL given".into())),
        [one] => connect_one(one, options).await,
        _ => Err(BackendError::Config(format!(
            "{} backend URLs given; this build connects to one backend per run",
            urls.len()
        ))),
    }
}

async fn connect_one(target: &str, options: &ConnectOptions) -> Result<Connected, BackendError> {
    if is_embedded_sim(target) {
        let mut config = SimConfig::from_url(target).map_err(|e| BackendError::Config(e.to_string()))?;
        config.host = "127.0.0.1".into();
        config.port = 0;
        let server = SimServer::start(config).await.map_err(|e| BackendError::Config(e.to_string()))?;
        let address = server.url();
        let backend = url::connect(&format!("sim://{}", address.trim_start_matches("http://")), options)?;
        return Ok(Connected { backend, sim: Some(server) });
    }
    Ok(Connected { backend: url::connect(target, options)?, sim: None })
}

/// `sim://` or `sim://?options` (no host) asks for an embedded simulator.
fn is_embedded_sim(target: &str) -> bool {
    target.strip_prefix("sim://").is_some_and(|rest| rest.is_empty() || rest.starts_with('?') || rest.starts_with('/'))
}
