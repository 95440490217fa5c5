//! AWS credentials and region the way the AWS CLI finds them: the environment
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_PROFILE`, `AWS_REGION`,
//! `AWS_DEFAULT_REGION`), then the shared files `~/.aws/credentials` (`[name]` sections) and
//! `~/.aws/config` (`[default]` and `[profile name]` sections), relocatable with
//! `AWS_SHARED_CREDENTIALS_FILE` / `AWS_CONFIG_FILE`. Static keys only: profiles that need a
//! process, SSO or role assumption are reported as such rather than half-handled.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Clone, PartialEq, Eq)]
pub struct AwsCredentials {
    pub access_key_id: String,
    secret_access_key: String,
    pub session_token: Option<String>,
}

impl AwsCredentials {
    pub fn new(
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
        session_token: Option<String>,
    ) -> Self {
        Self {
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            session_token: session_token.filter(|t| !t.is_empty()),
        }
    }

    pub fn secret_access_key(&self) -> &str {
        &self.secret_access_key
    }
}

/// The secret and the session token never reach logs.
impl fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("session_token", &self.session_token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Credentials plus the region, if one was configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsProfile {
    pub credentials: AwsCredentials,
    pub region: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    #[error("no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or add profile {profile:?} to {credentials_file} or {config_file}")]
    NotFound { profile: String, credentials_file: String, config_file: String },
    #[error("AWS profile {profile:?} in {file} has aws_access_key_id but no aws_secret_access_key")]
    MissingSecret { profile: String, file: String },
    #[error("AWS profile {profile:?} in {file} uses {setting}, which is not supported: export static keys (e.g. `aws configure export-credentials --format env`)")]
    Unsupported { profile: String, file: String, setting: String },
    #[error("cannot read {file}: {message}")]
    Io { file: String, message: String },
    #[error("{file} line {line}: {message}")]
    Parse { file: String, line: usize, message: String },
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
            return Ok(AwsProfile { credentials: AwsCredentials::new(id, secret, env("AWS_SESSION_TOKEN")), region });
        }
    }
    let name = profile.map(str::to_owned).or_else(|| env("AWS_PROFILE")).unwrap_or_else(|| "default".to_owned());
    let (credentials_path, credentials_label) = shared_file(env, "AWS_SHARED_CREDENTIALS_FILE", "credentials");
    let (config_path, config_label) = shared_file(env, "AWS_CONFIG_FILE", "config");
    let credentials_file = read_optional(&credentials_path)?;
    let config_file = read_optional(&config_path)?;
    let from_credentials = credentials_file.as_ref().and_then(|s| s.get(&name));
    let from_config = config_file.as_ref().and_then(|s| config_section(s, &name));
    let region = env_region.or_else(|| from_config.and_then(|s| s.get("region").cloned()));

    for (section, label) in [(from_credentials, &credentials_label), (from_config, &config_label)] {
        let Some(section) = section else { continue };
        if let Some(id) = section.get("aws_access_key_id") {
            let Some(secret) = section.get("aws_secret_access_key") else {
                return Err(CredentialsError::MissingSecret { profile: name, file: label.clone() });
            };
            let token = section.get("aws_session_token").or_else(|| section.get("aws_security_token")).cloned();
            return Ok(AwsProfile { credentials: AwsCredentials::new(id.clone(), secret.clone(), token), region });
        }
    }
    for (section, label) in [(from_credentials, &credentials_label), (from_config, &config_label)] {
        let Some(section) = section else { continue };
        for setting in ["credential_process", "sso_session", "sso_start_url", "role_arn", "web_identity_token_file"] {
            if section.contains_key(setting) {
                return Err(CredentialsError::Unsupported {
                    profile: name,
                    file: label.clone(),
                    setting: setting.to_owned(),
                });
            }
        }
    }
    Err(CredentialsError::NotFound { profile: name, credentials_file: credentials_label, config_file: config_label })
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
