//! AWS credentials and region the way the AWS CLI and SDKs find them, and a provider that
//! refreshes temporary credentials before they expire.
//!
//! The chain, first match wins: static keys in the environment (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`); web identity from the environment
//! (`AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN`, as EKS sets them); the profile (`AWS_PROFILE` or
//! `default`) in the shared files `~/.aws/credentials` and `~/.aws/config` (relocatable with
//! `AWS_SHARED_CREDENTIALS_FILE` / `AWS_CONFIG_FILE`): static keys with an optional session token,
//! `credential_process`, or `web_identity_token_file` + `role_arn`; the container credentials
//! endpoint (`AWS_CONTAINER_CREDENTIALS_FULL_URI` or `_RELATIVE_URI`, with
//! `AWS_CONTAINER_AUTHORIZATION_TOKEN[_FILE]`: ECS, EKS Pod Identity); the EC2 instance metadata
//! service, `IMDSv2` (`AWS_EC2_METADATA_SERVICE_ENDPOINT`, off with `AWS_EC2_METADATA_DISABLED=true`).
//! A named profile skips the environment's keys.
//!
//! A profile with `role_arn` and `source_profile` (or `credential_source`) assumes the role through
//! STS `AssumeRole`, signed with the source's credentials (`role_session_name`, `external_id`,
//! `duration_seconds` honoured; source profiles may themselves assume roles, a cycle is an error).
//! A profile with `sso_session` (or the legacy `sso_start_url`), `sso_account_id` and
//! `sso_role_name` reads the access token `aws sso login` cached in `~/.aws/sso/cache` and asks
//! the SSO portal for the role's credentials. STS and the portal are reached at
//! `AWS_ENDPOINT_URL_STS` / `AWS_ENDPOINT_URL_SSO` (else `AWS_ENDPOINT_URL`) when set, as the SDKs
//! do. Not supported, and reported as such: `mfa_serial` (it needs a code typed in) and refreshing
//! an expired SSO token (run `aws sso login` again).
//!
//! Every source but static keys returns an expiry; [`CredentialsProvider`] fetches again five
//! minutes before it, once for all the calls that need credentials at that moment.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use super::http::{error_chain, limited_body, BodyError};
use super::sigv4::{self, SignableRequest, SigningScope};
use crate::secret::Secret;

#[derive(Clone, PartialEq, Eq)]
pub struct AwsCredentials {
    pub access_key_id: String,
    secret_access_key: Secret,
    pub session_token: Option<Secret>,
    /// When temporary credentials stop working; `None` for long-term keys.
    pub expires_at: Option<SystemTime>,
}

impl AwsCredentials {
    pub fn new(
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
        session_token: Option<String>,
    ) -> Self {
        Self {
            access_key_id: access_key_id.into(),
            secret_access_key: Secret::new(secret_access_key),
            session_token: Secret::non_empty(session_token),
            expires_at: None,
        }
    }

    #[must_use]
    pub fn expiring_at(mut self, at: SystemTime) -> Self {
        self.expires_at = Some(at);
        self
    }

    pub fn secret_access_key(&self) -> &str {
        self.secret_access_key.expose()
    }
}

/// The secret and the session token never reach logs.
impl fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key)
            .field("session_token", &self.session_token)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Where credentials come from, and the region, if one was configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsProfile {
    pub source: CredentialSource,
    pub region: Option<String>,
}

/// One source of the chain, resolved (which variables and files named it is settled here; the
/// credentials themselves are fetched by a [`CredentialsProvider`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialSource {
    Static(AwsCredentials),
    /// `credential_process`: a command printing `{"Version": 1, "AccessKeyId", ...}`.
    Process {
        command: String,
    },
    /// The container credentials endpoint: GET `uri` with `Authorization: <token>`.
    Container {
        uri: String,
        token: Option<Secret>,
        token_file: Option<PathBuf>,
    },
    /// `IMDSv2` at `endpoint` (`http://169.254.169.254`).
    InstanceMetadata {
        endpoint: String,
    },
    /// STS `AssumeRoleWithWebIdentity` with the token read from `token_file` at each fetch.
    WebIdentity {
        role_arn: String,
        session_name: String,
        token_file: PathBuf,
        sts_endpoint: String,
    },
    /// STS `AssumeRole`, signed (`SigV4`, service `sts`, `sts_region`) with the credentials of `source`,
    /// fetched again at each refresh.
    AssumeRole {
        role_arn: String,
        session_name: String,
        external_id: Option<String>,
        duration_seconds: Option<u32>,
        sts_endpoint: String,
        sts_region: String,
        source: Box<CredentialSource>,
    },
    /// IAM Identity Center: the access token `aws sso login` cached in `token_file`, exchanged at the
    /// portal's `GetRoleCredentials` for the role's credentials.
    Sso {
        token_file: PathBuf,
        account_id: String,
        role_name: String,
        portal_endpoint: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    #[error("no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or add profile {profile:?} to {credentials_file} or {config_file}")]
    NotFound { profile: String, credentials_file: String, config_file: String },
    #[error("AWS profile {profile:?} in {file} has aws_access_key_id but no aws_secret_access_key")]
    MissingSecret { profile: String, file: String },
    #[error("AWS profile {profile:?} in {file} uses {setting}, which is not supported: export static keys (e.g. `aws configure export-credentials --format env`)")]
    Unsupported { profile: String, file: String, setting: String },
    /// A profile whose settings do not make a usable source (`role_arn` with nothing to assume it
    /// with, a `source_profile` that does not exist or loops back, an SSO profile missing a field).
    #[error("AWS profile {profile:?}: {message}")]
    Profile { profile: String, message: String },
    #[error("cannot read {file}: {message}")]
    Io { file: String, message: String },
    #[error("{file} line {line}: {message}")]
    Parse { file: String, line: usize, message: String },
    /// The chain ended at the instance metadata service, which never answered: off EC2, this
    /// means no credentials are configured anywhere (not worth retrying).
    #[error("no AWS credentials: none in the environment or the shared files, no container endpoint, and {message}")]
    NoneFound { message: String },
    /// A source that should have answered did not (a process failed, an endpoint is down).
    #[error("AWS credentials from {source_name}: {message}")]
    Fetch { source_name: String, message: String },
}

/// One INI file: section name -> (key -> value). Keys are lower-cased.
pub type IniSections = HashMap<String, HashMap<String, String>>;

/// Parse the AWS shared-file dialect: `[section]`, `key = value`, `#`/`;` comments, and indented
/// sub-properties (as used for `s3 =` blocks), which are skipped.
pub fn parse_ini(text: &str, file: &str) -> Result<IniSections, CredentialsError> {
    let mut sections: IniSections = HashMap::new();
    let mut current: Option<String> = None;
    let mut in_nested = false;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
            continue;
        }
        if raw.starts_with([' ', '\t']) && in_nested {
            continue;
        }
        if let Some(rest) = trimmed.strip_prefix('[') {
            let Some(name) = rest.strip_suffix(']') else {
                return Err(CredentialsError::Parse {
                    file: file.to_owned(),
                    line: line_no,
                    // The line is not quoted: a malformed line can hold a key.
                    message: "section header has no closing ']'".to_owned(),
                });
            };
            let name = name.trim().to_owned();
            sections.entry(name.clone()).or_default();
            current = Some(name);
            in_nested = false;
            continue;
        }
        let Some((key, value)) = trimmed.split_once('=') else {
            return Err(CredentialsError::Parse {
                file: file.to_owned(),
                line: line_no,
                message: "expected `key = value` or `[section]` (the line is not shown: it may hold a key)".to_owned(),
            });
        };
        let Some(section) = &current else {
            return Err(CredentialsError::Parse {
                file: file.to_owned(),
                line: line_no,
                message: "setting before any [section]".to_owned(),
            });
        };
        let value = value.trim();
        // `s3 =` followed by indented lines opens a nested block.
        in_nested = value.is_empty();
        if !in_nested {
            sections
                .entry(section.clone())
                .or_default()
                .insert(key.trim().to_ascii_lowercase(), strip_inline_comment(value).to_owned());
        }
    }
    Ok(sections)
}

/// botocore treats ` #` / ` ;` after a value as a comment; secrets never contain a space.
fn strip_inline_comment(v: &str) -> &str {
    [" #", " ;", "\t#", "\t;"].iter().filter_map(|m| v.find(m)).min().map_or(v, |i| v[..i].trim_end())
}

/// Resolve credentials and region from the process environment and the shared files.
/// `profile` overrides `AWS_PROFILE`; an explicit profile also wins over keys in the environment.
pub fn load(profile: Option<&str>) -> Result<AwsProfile, CredentialsError> {
    load_with(profile, &|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
}

/// [`load`] with the environment passed in (tests use a map instead of the process environment).
pub fn load_with(profile: Option<&str>, env: &dyn Fn(&str) -> Option<String>) -> Result<AwsProfile, CredentialsError> {
    let env_region = env("AWS_REGION").or_else(|| env("AWS_DEFAULT_REGION"));
    if profile.is_none() {
        if let (Some(id), Some(secret)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
            let mut region = env_region.clone();
            if region.is_none() {
                // Keys from the environment, region possibly from the config file.
                let name = env("AWS_PROFILE").unwrap_or_else(|| "default".to_owned());
                let (config_path, _) = shared_file(env, "AWS_CONFIG_FILE", "config");
                if let Some(sections) = read_optional(&config_path)? {
                    region = config_section(&sections, &name).and_then(|s| s.get("region").cloned());
                }
            }
            let credentials = AwsCredentials::new(id, secret, env("AWS_SESSION_TOKEN"));
            return Ok(AwsProfile { source: CredentialSource::Static(credentials), region });
        }
        if let (Some(token_file), Some(role_arn)) = (env("AWS_WEB_IDENTITY_TOKEN_FILE"), env("AWS_ROLE_ARN")) {
            let source = web_identity(env, role_arn, &token_file, env("AWS_ROLE_SESSION_NAME"), env_region.as_deref());
            return Ok(AwsProfile { source, region: env_region });
        }
    }
    let name = profile.map(str::to_owned).or_else(|| env("AWS_PROFILE")).unwrap_or_else(|| "default".to_owned());
    let files = SharedFiles::read(env)?;
    let region = env_region.or_else(|| files.config_value(&name, "region").cloned());
    if let Some(source) = files.profile_source(&name, env, region.as_deref(), &mut Vec::new())? {
        return Ok(AwsProfile { source, region });
    }
    if profile.is_none() {
        if let Some(source) = container_source(env) {
            return Ok(AwsProfile { source, region });
        }
        let disabled = env("AWS_EC2_METADATA_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        if !disabled {
            return Ok(AwsProfile {
                source: CredentialSource::InstanceMetadata { endpoint: imds_endpoint(env) },
                region,
            });
        }
    }
    Err(CredentialsError::NotFound {
        profile: name,
        credentials_file: files.credentials_label,
        config_file: files.config_label,
    })
}

/// The shared credentials and config files, read once.
struct SharedFiles {
    credentials: Option<IniSections>,
    config: Option<IniSections>,
    credentials_label: String,
    config_label: String,
}

impl SharedFiles {
    fn read(env: &dyn Fn(&str) -> Option<String>) -> Result<Self, CredentialsError> {
        let (credentials_path, credentials_label) = shared_file(env, "AWS_SHARED_CREDENTIALS_FILE", "credentials");
        let (config_path, config_label) = shared_file(env, "AWS_CONFIG_FILE", "config");
        Ok(Self {
            credentials: read_optional(&credentials_path)?,
            config: read_optional(&config_path)?,
            credentials_label,
            config_label,
        })
    }

    /// The profile's sections, the credentials file's first, each with the file it is in.
    fn sections(&self, name: &str) -> [(Option<&HashMap<String, String>>, &str); 2] {
        [
            (self.credentials.as_ref().and_then(|s| s.get(name)), self.credentials_label.as_str()),
            (self.config.as_ref().and_then(|s| config_section(s, name)), self.config_label.as_str()),
        ]
    }

    fn config_value(&self, name: &str, key: &str) -> Option<&String> {
        self.config.as_ref().and_then(|s| config_section(s, name)).and_then(|s| s.get(key))
    }

    /// A setting of the profile, from whichever file has it (the credentials file first).
    fn value(&self, name: &str, key: &str) -> Option<&String> {
        self.sections(name).into_iter().find_map(|(section, _)| section?.get(key))
    }

    /// The file that holds a setting of the profile.
    fn file_with(&self, name: &str, key: &str) -> Option<&str> {
        self.sections(name)
            .into_iter()
            .find(|(section, _)| section.is_some_and(|s| s.contains_key(key)))
            .map(|(_, f)| f)
    }

    /// The source profile `name` describes, `None` when it names none. `chain` holds the profiles
    /// whose roles are being resolved, to catch a `source_profile` loop.
    fn profile_source(
        &self,
        name: &str,
        env: &dyn Fn(&str) -> Option<String>,
        region: Option<&str>,
        chain: &mut Vec<String>,
    ) -> Result<Option<CredentialSource>, CredentialsError> {
        let profile_err = |message: String| CredentialsError::Profile { profile: name.to_owned(), message };
        let mut static_keys = None;
        for (section, label) in self.sections(name) {
            let Some(section) = section else { continue };
            if let Some(id) = section.get("aws_access_key_id") {
                let Some(secret) = section.get("aws_secret_access_key") else {
                    return Err(CredentialsError::MissingSecret { profile: name.to_owned(), file: label.to_owned() });
                };
                let token = section.get("aws_session_token").or_else(|| section.get("aws_security_token")).cloned();
                static_keys = Some(CredentialSource::Static(AwsCredentials::new(id.clone(), secret.clone(), token)));
                break;
            }
        }
        let role_arn = self.value(name, "role_arn");
        // As in the SDKs: a profile used as another's source, with keys of its own, is those keys.
        if !chain.is_empty() && static_keys.is_some() {
            return Ok(static_keys);
        }
        if let Some(role_arn) = role_arn {
            if let Some(token_file) = self.value(name, "web_identity_token_file") {
                let session = self.value(name, "role_session_name").cloned();
                return Ok(Some(web_identity(env, role_arn.clone(), token_file, session, region)));
            }
            if let Some(file) = self.file_with(name, "mfa_serial") {
                return Err(CredentialsError::Unsupported {
                    profile: name.to_owned(),
                    file: file.to_owned(),
                    setting: "mfa_serial".to_owned(),
                });
            }
            chain.push(name.to_owned());
            let source = match (self.value(name, "source_profile"), self.value(name, "credential_source")) {
                (Some(source), _) if source == name => static_keys
                    .ok_or_else(|| profile_err("source_profile names the profile itself, which has no keys".into()))?,
                (Some(source), _) if chain.iter().any(|seen| seen == source) => {
                    return Err(profile_err(format!(
                        "source_profile loops back to {source:?} ({})",
                        chain.join(" -> ")
                    )));
                }
                (Some(source), _) => self
                    .profile_source(source, env, region, chain)?
                    .ok_or_else(|| profile_err(format!("source_profile {source:?} has no credentials")))?,
                (None, Some(kind)) => named_credential_source(kind, env)
                    .ok_or_else(|| profile_err(format!("credential_source {kind:?} gave no credentials")))?,
                (None, None) => {
                    return Err(profile_err(
                        "role_arn needs source_profile, credential_source or web_identity_token_file".into(),
                    ));
                }
            };
            let duration_seconds = match self.value(name, "duration_seconds") {
                None => None,
                Some(text) => Some(
                    text.parse::<u32>()
                        .map_err(|_| profile_err(format!("duration_seconds {text:?} is not a number of seconds")))?,
                ),
            };
            let (sts_endpoint, sts_region) = sts_endpoint(env, region);
            return Ok(Some(CredentialSource::AssumeRole {
                role_arn: role_arn.clone(),
                session_name: self.value(name, "role_session_name").cloned().unwrap_or_else(default_session_name),
                external_id: self.value(name, "external_id").cloned(),
                duration_seconds,
                sts_endpoint,
                sts_region,
                source: Box::new(source),
            }));
        }
        if static_keys.is_some() {
            return Ok(static_keys);
        }
        if let Some(command) = self.value(name, "credential_process") {
            return Ok(Some(CredentialSource::Process { command: command.clone() }));
        }
        if self.value(name, "sso_session").is_some() || self.value(name, "sso_start_url").is_some() {
            return self.sso_source(name, env).map(Some);
        }
        Ok(None)
    }

    /// An SSO profile: `sso_session` naming an `[sso-session NAME]` section of the config file (the
    /// token is cached under the session's name), or the legacy `sso_start_url` and `sso_region` in
    /// the profile (cached under the start URL).
    fn sso_source(
        &self,
        name: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<CredentialSource, CredentialsError> {
        let profile_err = |message: String| CredentialsError::Profile { profile: name.to_owned(), message };
        let (cache_key, sso_region) = if let Some(session) = self.value(name, "sso_session") {
            let section =
                self.config.as_ref().and_then(|s| s.get(&format!("sso-session {session}"))).ok_or_else(|| {
                    profile_err(format!("sso_session {session:?} has no [sso-session {session}] section"))
                })?;
            let region = section
                .get("sso_region")
                .ok_or_else(|| profile_err(format!("[sso-session {session}] has no sso_region")))?;
            (session.clone(), region.clone())
        } else {
            let start_url = self.value(name, "sso_start_url").cloned().unwrap_or_default();
            let region =
                self.value(name, "sso_region").ok_or_else(|| profile_err("sso_start_url without sso_region".into()))?;
            (start_url, region.clone())
        };
        let field =
            |key: &str| self.value(name, key).cloned().ok_or_else(|| profile_err(format!("SSO profile without {key}")));
        let portal_endpoint = env("AWS_ENDPOINT_URL_SSO").or_else(|| env("AWS_ENDPOINT_URL")).map_or_else(
            || format!("https://portal.sso.{sso_region}.amazonaws.com"),
            |e| e.trim_end_matches('/').to_owned(),
        );
        Ok(CredentialSource::Sso {
            token_file: expand_home("~/.aws/sso/cache", env).join(format!("{}.json", sha1_hex(cache_key.as_bytes()))),
            account_id: field("sso_account_id")?,
            role_name: field("sso_role_name")?,
            portal_endpoint,
        })
    }
}

/// `credential_source` of a role profile: where the keys that assume the role come from.
fn named_credential_source(kind: &str, env: &dyn Fn(&str) -> Option<String>) -> Option<CredentialSource> {
    match kind {
        "Environment" => {
            let (id, secret) = (env("AWS_ACCESS_KEY_ID")?, env("AWS_SECRET_ACCESS_KEY")?);
            Some(CredentialSource::Static(AwsCredentials::new(id, secret, env("AWS_SESSION_TOKEN"))))
        }
        "EcsContainer" => container_source(env),
        "Ec2InstanceMetadata" => Some(CredentialSource::InstanceMetadata { endpoint: imds_endpoint(env) }),
        _ => None,
    }
}

fn imds_endpoint(env: &dyn Fn(&str) -> Option<String>) -> String {
    env("AWS_EC2_METADATA_SERVICE_ENDPOINT")
        .map_or_else(|| "http://169.254.169.254".to_owned(), |e| e.trim_end_matches('/').to_owned())
}

/// The SDKs' service-specific endpoint override, then the global one, then the regional STS (the
/// global endpoint without a region); and the region to sign for (`us-east-1` for the global one).
fn sts_endpoint(env: &dyn Fn(&str) -> Option<String>, region: Option<&str>) -> (String, String) {
    let endpoint = env("AWS_ENDPOINT_URL_STS").or_else(|| env("AWS_ENDPOINT_URL")).map_or_else(
        || region.map_or_else(|| "https://sts.amazonaws.com".to_owned(), |r| format!("https://sts.{r}.amazonaws.com")),
        |e| e.trim_end_matches('/').to_owned(),
    );
    (endpoint, region.unwrap_or("us-east-1").to_owned())
}

fn default_session_name() -> String {
    let secs = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    format!("batchagent-{secs}")
}

/// The SSO token cache names its files by the SHA-1 of the session name or start URL.
fn sha1_hex(bytes: &[u8]) -> String {
    use sha1::Digest as _;
    use std::fmt::Write as _;
    sha1::Sha1::digest(bytes).iter().fold(String::with_capacity(40), |mut hex, b| {
        let _ = write!(hex, "{b:02x}");
        hex
    })
}

fn web_identity(
    env: &dyn Fn(&str) -> Option<String>,
    role_arn: String,
    token_file: &str,
    session_name: Option<String>,
    region: Option<&str>,
) -> CredentialSource {
    let (sts_endpoint, _) = sts_endpoint(env, region);
    let session_name = session_name.unwrap_or_else(default_session_name);
    CredentialSource::WebIdentity { role_arn, session_name, token_file: expand_home(token_file, env), sts_endpoint }
}

/// ECS task roles and EKS Pod Identity: a full URI, or a path on the ECS agent's address.
fn container_source(env: &dyn Fn(&str) -> Option<String>) -> Option<CredentialSource> {
    let uri = env("AWS_CONTAINER_CREDENTIALS_FULL_URI")
        .or_else(|| env("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI").map(|p| format!("http://169.254.170.2{p}")))?;
    Some(CredentialSource::Container {
        uri,
        token: Secret::non_empty(env("AWS_CONTAINER_AUTHORIZATION_TOKEN")),
        token_file: env("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE").map(PathBuf::from),
    })
}

/// In the config file every profile but `default` is written `[profile name]`.
fn config_section<'a>(sections: &'a IniSections, name: &str) -> Option<&'a HashMap<String, String>> {
    if name == "default" {
        sections.get("default").or_else(|| sections.get("profile default"))
    } else {
        sections.get(&format!("profile {name}"))
    }
}

fn shared_file(env: &dyn Fn(&str) -> Option<String>, var: &str, default_name: &str) -> (PathBuf, String) {
    let path = env(var).map_or_else(
        || {
            let home = env("HOME").or_else(|| env("USERPROFILE")).unwrap_or_default();
            Path::new(&home).join(".aws").join(default_name)
        },
        |p| expand_home(&p, env),
    );
    let label = path.display().to_string();
    (path, label)
}

fn expand_home(p: &str, env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    match (p.strip_prefix("~/"), env("HOME")) {
        (Some(rest), Some(home)) => Path::new(&home).join(rest),
        _ => PathBuf::from(p),
    }
}

/// A missing file is normal (no profile there); an unreadable one is an error.
fn read_optional(path: &Path) -> Result<Option<IniSections>, CredentialsError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_ini(&text, &path.display().to_string()).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CredentialsError::Io { file: path.display().to_string(), message: e.to_string() }),
    }
}

/// Temporary credentials are fetched again this long before they expire.
pub const REFRESH_BEFORE: Duration = Duration::from_secs(5 * 60);
/// After a failed fetch with nothing usable cached, calls fail at once for this long instead of
/// each waiting on the source again.
const FAILURE_HOLD: Duration = Duration::from_secs(5);
/// Most bytes read from a credentials endpoint or process.
const MAX_CREDENTIALS_BYTES: usize = 64 * 1024;

pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// Credentials from one [`CredentialSource`], cached and fetched again [`REFRESH_BEFORE`] their
/// expiry; concurrent callers share one fetch. A failed refresh keeps using credentials that have
/// not expired yet.
pub struct CredentialsProvider {
    source: CredentialSource,
    http: reqwest::Client,
    clock: Clock,
    current: Mutex<Option<Arc<AwsCredentials>>>,
    failure: Mutex<Option<(Instant, CredentialsError)>>,
    refresh: tokio::sync::Mutex<()>,
    fetches: AtomicU64,
    ever_fetched: AtomicBool,
}

impl fmt::Debug for CredentialsProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialsProvider")
            .field("source", &self.source.name())
            .field("fetches", &self.fetches.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl CredentialsProvider {
    pub fn new(source: CredentialSource) -> Result<Self, CredentialsError> {
        Self::with_clock(source, Arc::new(SystemTime::now))
    }

    /// With the time read from `clock` (tests move it forward across expiries).
    pub fn with_clock(source: CredentialSource, clock: Clock) -> Result<Self, CredentialsError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none());
        if matches!(source, CredentialSource::Container { .. } | CredentialSource::InstanceMetadata { .. }) {
            // Link-local and loopback metadata endpoints are never reached through a proxy.
            builder = builder.no_proxy();
        }
        let http = builder.build().map_err(|e| CredentialsError::Fetch {
            source_name: source.name().to_owned(),
            message: format!("cannot build the HTTP client: {e}"),
        })?;
        let current = match &source {
            CredentialSource::Static(keys) => Some(Arc::new(keys.clone())),
            _ => None,
        };
        Ok(Self {
            source,
            http,
            clock,
            current: Mutex::new(current),
            failure: Mutex::new(None),
            refresh: tokio::sync::Mutex::new(()),
            fetches: AtomicU64::new(0),
            ever_fetched: AtomicBool::new(false),
        })
    }

    pub fn source(&self) -> &CredentialSource {
        &self.source
    }

    /// How many times the source was asked (not counting static keys).
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// Credentials valid for at least [`REFRESH_BEFORE`] more, or the reason there are none.
    pub async fn credentials(&self) -> Result<Arc<AwsCredentials>, CredentialsError> {
        if let Some(fresh) = self.cached(REFRESH_BEFORE) {
            return Ok(fresh);
        }
        let _one_fetch = self.refresh.lock().await;
        if let Some(fresh) = self.cached(REFRESH_BEFORE) {
            return Ok(fresh);
        }
        if let Some(error) = self.held_failure() {
            return self.cached(Duration::ZERO).ok_or(error);
        }
        self.fetches.fetch_add(1, Ordering::Relaxed);
        match self.source.fetch(&self.http, (self.clock)()).await {
            Ok(fetched) => {
                self.ever_fetched.store(true, Ordering::Relaxed);
                let fetched = Arc::new(fetched);
                if let Ok(mut current) = self.current.lock() {
                    *current = Some(fetched.clone());
                }
                if let Ok(mut failure) = self.failure.lock() {
                    *failure = None;
                }
                Ok(fetched)
            }
            Err(error) => {
                let error = match (&self.source, error) {
                    (CredentialSource::InstanceMetadata { .. }, CredentialsError::Fetch { message, .. })
                        if !self.ever_fetched.load(Ordering::Relaxed) =>
                    {
                        CredentialsError::NoneFound { message: format!("the EC2 instance metadata service: {message}") }
                    }
                    (_, error) => error,
                };
                if let Ok(mut failure) = self.failure.lock() {
                    *failure = Some((Instant::now(), error.clone()));
                }
                // Not expired yet: keep signing with them while the source recovers.
                self.cached(Duration::ZERO).ok_or(error)
            }
        }
    }

    /// Forget the cached credentials (the server said they expired or were revoked).
    pub fn invalidate(&self) {
        if matches!(self.source, CredentialSource::Static(_)) {
            return;
        }
        if let Ok(mut current) = self.current.lock() {
            *current = None;
        }
    }

    fn cached(&self, margin: Duration) -> Option<Arc<AwsCredentials>> {
        let current = self.current.lock().ok()?.clone()?;
        match current.expires_at {
            None => Some(current),
            Some(at) => at.checked_sub(margin).is_some_and(|deadline| (self.clock)() < deadline).then_some(current),
        }
    }

    fn held_failure(&self) -> Option<CredentialsError> {
        let failure = self.failure.lock().ok()?;
        let (at, error) = failure.as_ref()?;
        (at.elapsed() < FAILURE_HOLD).then(|| error.clone())
    }
}

impl CredentialSource {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Static(_) => "static keys",
            Self::Process { .. } => "credential_process",
            Self::Container { .. } => "the container credentials endpoint",
            Self::InstanceMetadata { .. } => "the EC2 instance metadata service",
            Self::WebIdentity { .. } => "web identity (STS AssumeRoleWithWebIdentity)",
            Self::AssumeRole { .. } => "the role's source profile (STS AssumeRole)",
            Self::Sso { .. } => "SSO (IAM Identity Center)",
        }
    }

    fn fail(&self, message: impl Into<String>) -> CredentialsError {
        CredentialsError::Fetch { source_name: self.name().to_owned(), message: message.into() }
    }

    /// Fetches from the source; `now` is the provider's clock (a cached SSO login is checked against it).
    async fn fetch(&self, http: &reqwest::Client, now: SystemTime) -> Result<AwsCredentials, CredentialsError> {
        match self {
            Self::Static(keys) => Ok(keys.clone()),
            Self::Process { command } => {
                let output = run_process(command).await.map_err(|m| self.fail(m))?;
                let body: serde_json::Value = serde_json::from_slice(&output)
                    .map_err(|e| self.fail(format!("output is not JSON ({})", e.classify_name())))?;
                if body.get("Version").and_then(serde_json::Value::as_u64) != Some(1) {
                    return Err(self.fail("output has no \"Version\": 1"));
                }
                keys_from_json(&body, "SessionToken").map_err(|m| self.fail(m))
            }
            Self::Container { uri, token, token_file } => {
                let token = match (token_file, token) {
                    (Some(path), _) => Some(Secret::new(
                        std::fs::read_to_string(path)
                            .map_err(|e| self.fail(format!("cannot read {}: {e}", path.display())))?
                            .trim(),
                    )),
                    (None, token) => token.clone(),
                };
                let mut request = http.get(uri);
                if let Some(token) = &token {
                    request = request.header(reqwest::header::AUTHORIZATION, token.expose());
                }
                let body = read_json(request, self).await?;
                keys_from_json(&body, "Token").map_err(|m| self.fail(m))
            }
            Self::InstanceMetadata { endpoint } => {
                let token_response = http
                    .put(format!("{endpoint}/latest/api/token"))
                    .header("x-aws-ec2-metadata-token-ttl-seconds", "21600")
                    .send()
                    .await
                    .map_err(|e| self.fail(error_chain(&e)))?;
                let token = Secret::new(read_text(token_response, self).await?.trim());
                let roles = http
                    .get(format!("{endpoint}/latest/meta-data/iam/security-credentials/"))
                    .header("x-aws-ec2-metadata-token", token.expose())
                    .send()
                    .await
                    .map_err(|e| self.fail(error_chain(&e)))?;
                let roles = read_text(roles, self).await?;
                let role = roles
                    .lines()
                    .map(str::trim)
                    .find(|l| !l.is_empty())
                    .ok_or_else(|| self.fail("the instance has no IAM role (no instance profile attached)"))?;
                let request = http
                    .get(format!("{endpoint}/latest/meta-data/iam/security-credentials/{role}"))
                    .header("x-aws-ec2-metadata-token", token.expose());
                let body = read_json(request, self).await?;
                keys_from_json(&body, "Token").map_err(|m| self.fail(m))
            }
            Self::WebIdentity { role_arn, session_name, token_file, sts_endpoint } => {
                let identity = std::fs::read_to_string(token_file)
                    .map_err(|e| self.fail(format!("cannot read {}: {e}", token_file.display())))?;
                let form = form_body(&[
                    ("Action", "AssumeRoleWithWebIdentity"),
                    ("Version", "2011-06-15"),
                    ("RoleArn", role_arn.as_str()),
                    ("RoleSessionName", session_name.as_str()),
                    ("WebIdentityToken", identity.trim()),
                ]);
                let response = http
                    .post(format!("{sts_endpoint}/"))
                    .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(form)
                    .send()
                    .await
                    .map_err(|e| self.fail(error_chain(&e)))?;
                sts_credentials(response, self).await
            }
            Self::AssumeRole {
                role_arn,
                session_name,
                external_id,
                duration_seconds,
                sts_endpoint,
                sts_region,
                source,
            } => {
                let keys = Box::pin(source.fetch(http, now)).await?;
                let duration = duration_seconds.map(|d| d.to_string());
                let mut form = vec![
                    ("Action", "AssumeRole"),
                    ("Version", "2011-06-15"),
                    ("RoleArn", role_arn.as_str()),
                    ("RoleSessionName", session_name.as_str()),
                ];
                if let Some(id) = external_id {
                    form.push(("ExternalId", id.as_str()));
                }
                if let Some(duration) = &duration {
                    form.push(("DurationSeconds", duration.as_str()));
                }
                let url = reqwest::Url::parse(&format!("{sts_endpoint}/"))
                    .map_err(|e| self.fail(format!("STS endpoint is not a URL: {e}")))?;
                let response = signed_post(http, &url, form_body(&form), &keys, sts_region, "sts", now)
                    .await
                    .map_err(|e| self.fail(e))?;
                sts_credentials(response, self).await
            }
            Self::Sso { token_file, account_id, role_name, portal_endpoint } => {
                let login = || format!("run `aws sso login` (the cached login is {})", token_file.display());
                let text = std::fs::read_to_string(token_file)
                    .map_err(|e| self.fail(format!("no cached SSO login ({e}): {}", login())))?;
                let cached: SsoToken = serde_json::from_str(&text).map_err(|e| {
                    self.fail(format!("the cached SSO login is not readable ({}): {}", e.classify_name(), login()))
                })?;
                let expires = parse_rfc3339(&cached.expires_at)
                    .ok_or_else(|| self.fail(format!("the cached SSO login has no valid expiresAt: {}", login())))?;
                if expires <= now {
                    return Err(self.fail(format!("the SSO login expired: {}", login())));
                }
                let mut url = reqwest::Url::parse(&format!("{portal_endpoint}/federation/credentials"))
                    .map_err(|e| self.fail(format!("SSO portal endpoint is not a URL: {e}")))?;
                url.query_pairs_mut().append_pair("account_id", account_id).append_pair("role_name", role_name);
                let mut token = reqwest::header::HeaderValue::from_str(cached.access_token.expose()).map_err(|_| {
                    self.fail(format!("the cached SSO access token is not a header value: {}", login()))
                })?;
                token.set_sensitive(true);
                let response = http
                    .get(url)
                    .header("x-amz-sso_bearer_token", token)
                    .send()
                    .await
                    .map_err(|e| self.fail(error_chain(&e)))?;
                if matches!(response.status().as_u16(), 401 | 403) {
                    return Err(self.fail(format!(
                        "the SSO portal refused the cached login (HTTP {}): {}",
                        response.status().as_u16(),
                        login()
                    )));
                }
                let answer: RoleCredentialsAnswer = serde_json::from_str(&read_text(response, self).await?)
                    .map_err(|e| self.fail(format!("answer is not GetRoleCredentials JSON ({})", e.classify_name())))?;
                let keys = answer.role_credentials;
                Ok(AwsCredentials::new(
                    keys.access_key_id,
                    keys.secret_access_key.expose(),
                    Some(keys.session_token.expose().to_owned()),
                )
                .expiring_at(SystemTime::UNIX_EPOCH + Duration::from_millis(keys.expiration)))
            }
        }
    }
}

/// What `aws sso login` caches (`~/.aws/sso/cache/*.json`); other fields (the refresh token, the
/// client registration) are not read.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct SsoToken {
    access_token: Secret,
    expires_at: String,
}

/// The SSO portal's `GetRoleCredentials` answer; `expiration` is in milliseconds since the epoch.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct RoleCredentialsAnswer {
    role_credentials: RoleCredentials,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct RoleCredentials {
    access_key_id: String,
    secret_access_key: Secret,
    session_token: Secret,
    expiration: u64,
}

/// `application/x-www-form-urlencoded` text of `pairs` (every byte but the unreserved ones
/// percent-encoded, as the AWS SDKs write query-protocol bodies).
fn form_body(pairs: &[(&str, &str)]) -> String {
    let encoded: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{}={}", sigv4::uri_encode(k.as_bytes()), sigv4::uri_encode(v.as_bytes())))
        .collect();
    encoded.join("&")
}

/// The `Credentials` of an STS answer (`AssumeRole` and `AssumeRoleWithWebIdentity` share them).
async fn sts_credentials(
    response: reqwest::Response,
    source: &CredentialSource,
) -> Result<AwsCredentials, CredentialsError> {
    let xml = read_text(response, source).await?;
    let field = |name: &str| xml_field(&xml, name).ok_or_else(|| source.fail(format!("answer has no {name}")));
    let expires =
        parse_rfc3339(&field("Expiration")?).ok_or_else(|| source.fail("Expiration is not an RFC 3339 time"))?;
    Ok(AwsCredentials::new(field("AccessKeyId")?, field("SecretAccessKey")?, Some(field("SessionToken")?))
        .expiring_at(expires))
}

/// A form `body` posted to `url`, signed with `SigV4` for `service` in `region` (the AWS query
/// protocol: STS).
async fn signed_post(
    http: &reqwest::Client,
    url: &reqwest::Url,
    body: String,
    keys: &AwsCredentials,
    region: &str,
    service: &str,
    now: SystemTime,
) -> Result<reqwest::Response, String> {
    let host = match (url.host_str(), url.port()) {
        (Some(host), Some(port)) => format!("{host}:{port}"),
        (Some(host), None) => host.to_owned(),
        (None, _) => return Err("the endpoint has no host".to_owned()),
    };
    let amz_date = sigv4::amz_date(now);
    let mut signed = vec![
        ("content-type".to_owned(), "application/x-www-form-urlencoded; charset=utf-8".to_owned()),
        ("host".to_owned(), host),
        ("x-amz-date".to_owned(), amz_date.clone()),
    ];
    if let Some(token) = &keys.session_token {
        signed.push(("x-amz-security-token".to_owned(), token.expose().to_owned()));
    }
    let signature = sigv4::sign(
        &SignableRequest { method: "POST", path: url.path(), query: "", headers: &signed, payload: body.as_bytes() },
        keys,
        &SigningScope { region, service, amz_date: &amz_date },
    );
    let mut headers = reqwest::header::HeaderMap::new();
    for (name, value) in signed.iter().chain(std::iter::once(&("authorization".to_owned(), signature.authorization))) {
        if name == "host" {
            continue;
        }
        let name = reqwest::header::HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?;
        let mut value = reqwest::header::HeaderValue::from_str(value)
            .map_err(|_| format!("header {name} has characters not allowed in HTTP"))?;
        value.set_sensitive(true);
        headers.insert(name, value);
    }
    http.post(url.clone()).headers(headers).body(body).send().await.map_err(|e| error_chain(&e))
}

/// Runs `credential_process` through the shell, as the AWS CLI does on Unix; its stderr goes to
/// ours (that is where it asks the user to log in), its stdout is read and never shown.
async fn run_process(command: &str) -> Result<Vec<u8>, String> {
    let command = command.to_owned();
    let output = tokio::task::spawn_blocking(move || {
        let mut shell = if cfg!(windows) {
            let mut c = std::process::Command::new("cmd");
            c.arg("/C");
            c
        } else {
            let mut c = std::process::Command::new("sh");
            c.arg("-c");
            c
        };
        shell.arg(&command).stdin(std::process::Stdio::null()).stderr(std::process::Stdio::inherit()).output()
    })
    .await
    .map_err(|e| format!("the process did not finish: {e}"))?
    .map_err(|e| format!("cannot start the process: {e}"))?;
    if !output.status.success() {
        return Err(format!("the process failed ({})", output.status));
    }
    if output.stdout.len() > MAX_CREDENTIALS_BYTES {
        return Err(format!("the process printed more than {MAX_CREDENTIALS_BYTES} bytes"));
    }
    Ok(output.stdout)
}

/// The body of a 2xx answer, bounded; any other status is a failure naming it (never the body,
/// which may hold a key).
async fn read_text(response: reqwest::Response, source: &CredentialSource) -> Result<String, CredentialsError> {
    let status = response.status();
    if !status.is_success() {
        return Err(source.fail(format!("HTTP {}", status.as_u16())));
    }
    let body = limited_body(response, MAX_CREDENTIALS_BYTES, None).await.map_err(|e| match e {
        BodyError::Transport(e) => source.fail(error_chain(&e)),
        other => source.fail(other.into_backend().to_string()),
    })?;
    String::from_utf8(body.into()).map_err(|_| source.fail("answer is not UTF-8"))
}

async fn read_json(
    request: reqwest::RequestBuilder,
    source: &CredentialSource,
) -> Result<serde_json::Value, CredentialsError> {
    let response = request.send().await.map_err(|e| source.fail(error_chain(&e)))?;
    let text = read_text(response, source).await?;
    serde_json::from_str(&text).map_err(|e| source.fail(format!("answer is not JSON ({})", e.classify_name())))
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    /// The kind of a JSON error without its position's context, which could quote the input.
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "read error",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "unexpected shape",
            serde_json::error::Category::Eof => "cut short",
        }
    }
}

/// `AccessKeyId`, `SecretAccessKey`, the session token under `token_field`, and `Expiration`
/// (absent for long-term keys) from a credentials JSON document.
fn keys_from_json(body: &serde_json::Value, token_field: &str) -> Result<AwsCredentials, String> {
    let text = |name: &str| body.get(name).and_then(serde_json::Value::as_str).filter(|v| !v.is_empty());
    let id = text("AccessKeyId").ok_or("answer has no AccessKeyId")?;
    let secret = text("SecretAccessKey").ok_or("answer has no SecretAccessKey")?;
    let keys = AwsCredentials::new(id, secret, text(token_field).map(str::to_owned));
    match text("Expiration") {
        None => Ok(keys),
        Some(at) => Ok(keys.expiring_at(parse_rfc3339(at).ok_or("Expiration is not an RFC 3339 time")?)),
    }
}

/// The text of the first `<name>...</name>` element (STS answers are flat and unescaped for these).
fn xml_field(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let start = xml.find(&open)? + open.len();
    let end = xml.get(start..)?.find(&format!("</{name}>"))? + start;
    Some(xml.get(start..end)?.trim().to_owned())
}

/// `2026-12-02T08:00:00Z`, with optional fractional seconds and a `Z` or `+hh:mm` offset.
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let text = text.trim();
    let (date, time) = text.split_once(['T', 't', ' '])?;
    let mut date_parts = date.splitn(3, '-');
    let year: i64 = date_parts.next()?.parse().ok()?;
    let month: u32 = date_parts.next()?.parse().ok()?;
    let day: u32 = date_parts.next()?.parse().ok()?;
    let (clock, offset_secs) = if let Some(clock) = time.strip_suffix(['Z', 'z']) {
        (clock, 0i64)
    } else {
        let split = time.rfind(['+', '-'])?;
        let (clock, offset) = time.split_at(split);
        let sign = if offset.starts_with('-') { -1 } else { 1 };
        let (h, m) = offset.get(1..)?.split_once(':')?;
        (clock, sign * (h.parse::<i64>().ok()? * 3600 + m.parse::<i64>().ok()? * 60))
    };
    let mut clock_parts = clock.splitn(3, ':');
    let hour: i64 = clock_parts.next()?.parse().ok()?;
    let minute: i64 = clock_parts.next()?.parse().ok()?;
    let seconds: f64 = clock_parts.next()?.parse().ok()?;
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || !(0.0..61.0).contains(&seconds)
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 - offset_secs;
    let whole = u64::try_from(secs).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(whole) + Duration::from_secs_f64(seconds))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::arithmetic_side_effects)]
    use super::*;

    #[test]
    fn debug_redacts_secrets() {
        let c = AwsCredentials::new("AKID", "s3cr3t-value", Some("tok3n-value".into()));
        let d = format!("{c:?}");
        assert!(d.contains("AKID"));
        assert!(!d.contains("s3cr3t-value") && !d.contains("tok3n-value"), "{d}");
    }

    #[test]
    fn ini_sections_comments_and_nested_blocks() {
        let text = "# top\n[default]\naws_access_key_id = AKID1\nAWS_Secret_Access_Key=sec1 ; note\n\n[profile dev]\nregion = eu-west-1\ns3 =\n  max_concurrent_requests = 20\nsignature_version = s3v4\n";
        let s = parse_ini(text, "cfg").unwrap();
        assert_eq!(s["default"]["aws_access_key_id"], "AKID1");
        assert_eq!(s["default"]["aws_secret_access_key"], "sec1");
        assert_eq!(s["profile dev"]["region"], "eu-west-1");
        assert_eq!(s["profile dev"]["signature_version"], "s3v4");
        assert!(!s["profile dev"].contains_key("max_concurrent_requests"));
    }

    #[test]
    fn ini_errors_name_file_and_line() {
        let err = parse_ini("[default]\naws_access_key_id AKID\n", "/x/credentials").unwrap_err();
        assert_eq!(err.to_string().split(':').next().unwrap(), "/x/credentials line 2");
        let err = parse_ini("[default]\naws_secret_access_key wJalrXUtnFEMI\n", "f").unwrap_err();
        assert!(!err.to_string().contains("wJalrXUtnFEMI"), "{err}");
        let err = parse_ini("[aws_secret_access_key=wJalrXUtnFEMI\n", "f").unwrap_err();
        assert!(!err.to_string().contains("wJalrXUtnFEMI"), "{err}");
        let err = parse_ini("key = v\n", "f").unwrap_err();
        assert!(matches!(err, CredentialsError::Parse { line: 1, .. }));
    }
}
