//! Temporary AWS credentials from each source of the chain, served on loopback, and refreshed
//! before they expire: a Bedrock run that spans several expiries signs every call with keys that
//! are still valid, and calls that need keys at the same moment share one fetch.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use batchagent::backends::aws_credentials::{
    self, parse_rfc3339, AwsCredentials, CredentialSource, CredentialsProvider, REFRESH_BEFORE,
};
use batchagent::backends::bedrock::{BedrockBackend, BedrockOptions};
use batchagent::backends::sigv4::{self, SignableRequest, SigningScope};
use batchagent::backends::{Backend, BackendError, ChatRequest};
use batchagent::conversation::Message;
use serde_json::json;

const HOUR: u64 = 3600;

/// A clock the test moves; the provider reads it to decide when keys are stale.
#[derive(Clone, Default)]
struct Clock(Arc<AtomicU64>);

impl Clock {
    fn starting_now() -> Self {
        let clock = Self::default();
        clock.0.store(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs(), Ordering::SeqCst);
        clock
    }
    fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.0.load(Ordering::SeqCst))
    }
    fn advance(&self, secs: u64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }
    fn as_fn(&self) -> aws_credentials::Clock {
        let clock = self.clone();
        Arc::new(move || clock.now())
    }
}

fn rfc3339(at: SystemTime) -> String {
    let secs = at.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since the epoch (Howard Hinnant's algorithm), for the test's own use.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rest / 3600, rest % 3600 / 60, rest % 60)
}

/// Hands out key set N on the N-th fetch, valid for one hour of the test's clock.
struct Issuer {
    clock: Clock,
    fetches: AtomicU64,
    failing: AtomicBool,
    /// Access key id -> secret, for the Bedrock server to verify signatures.
    issued: Mutex<HashMap<String, String>>,
}

impl Issuer {
    fn new(clock: Clock) -> Arc<Self> {
        Arc::new(Self { clock, fetches: AtomicU64::new(0), failing: AtomicBool::new(false), issued: Mutex::default() })
    }
    fn issue(&self) -> serde_json::Value {
        let n = self.fetches.fetch_add(1, Ordering::SeqCst) + 1;
        let (id, secret) = (format!("ASIATEST{n}"), format!("secret-{n}-wJalrXUtnFEMI"));
        self.issued.lock().unwrap().insert(id.clone(), secret.clone());
        json!({
            "AccessKeyId": id,
            "SecretAccessKey": secret,
            "Token": format!("token-{n}"),
            "SessionToken": format!("token-{n}"),
            "Expiration": rfc3339(self.clock.now() + Duration::from_secs(HOUR)),
        })
    }
}

fn json_response(value: &serde_json::Value) -> Response {
    ([("content-type", "application/json")], value.to_string()).into_response()
}

async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

/// The ECS / EKS Pod Identity container endpoint, which wants its authorization token.
async fn container_endpoint(issuer: Arc<Issuer>) -> String {
    serve(
        Router::new().route(
            "/creds",
            get(|State(issuer): State<Arc<Issuer>>, headers: HeaderMap| async move {
                if issuer.failing.load(Ordering::SeqCst) {
                    return StatusCode::SERVICE_UNAVAILABLE.into_response();
                }
                if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("container-auth-token") {
                    return StatusCode::UNAUTHORIZED.into_response();
                }
                json_response(&issuer.issue())
            })
            .with_state(issuer),
        ),
    )
    .await
}

/// A Bedrock `Converse` endpoint that verifies each signature against the secret it was issued
/// with, and records which key id and session token signed each call.
async fn bedrock(issuer: Arc<Issuer>, seen: Arc<Mutex<Vec<(String, String)>>>) -> String {
    serve(Router::new().route(
        "/model/{model}/{op}",
        post(move |uri: Uri, headers: HeaderMap, body: Bytes| {
            let (issuer, seen) = (issuer.clone(), seen.clone());
            async move { verify(&issuer, &seen, &uri, &headers, &body) }
        }),
    ))
    .await
}

fn verify(
    issuer: &Issuer,
    seen: &Mutex<Vec<(String, String)>>,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let auth = header("authorization");
    let id = auth.split("Credential=").nth(1).and_then(|s| s.split('/').next()).unwrap_or_default().to_owned();
    let token = header("x-amz-security-token");
    let Some(secret) = issuer.issued.lock().unwrap().get(&id).cloned() else {
        return (StatusCode::FORBIDDEN, "unknown key").into_response();
    };
    let signed = auth.split("SignedHeaders=").nth(1).and_then(|s| s.split(',').next()).unwrap_or_default();
    let signed_headers: Vec<(String, String)> = signed.split(';').map(|n| (n.to_owned(), header(n))).collect();
    let keys = AwsCredentials::new(id.clone(), secret, Some(token.clone()));
    let expected = sigv4::sign(
        &SignableRequest { method: "POST", path: uri.path(), query: "", headers: &signed_headers, payload: body },
        &keys,
        &SigningScope { region: "us-east-1", service: "bedrock", amz_date: &header("x-amz-date") },
    );
    if expected.authorization != auth || token != format!("token-{}", id.trim_start_matches("ASIATEST")) {
        return (StatusCode::FORBIDDEN, "signature does not match").into_response();
    }
    seen.lock().unwrap().push((id, token));
    json_response(&json!({
        "output": {"message": {"role": "assistant", "content": [{"text": "ok"}]}},
        "stopReason": "end_turn",
        "usage": {"inputTokens": 3, "outputTokens": 1, "totalTokens": 4}
    }))
}

fn request() -> ChatRequest {
    ChatRequest {
        model: "anthropic.claude-3-7-sonnet-20250219-v1:0".into(),
        messages: Arc::new(vec![Message::user("hello")]),
        tools: Arc::new(Vec::new()),
        tool_choice: None,
        response_schema: None,
        max_tokens: Some(16),
        temperature: None,
        request_id: "job-1".into(),
        stream: false,
        hints: None,
        text_deltas: false,
        extra_body: None,
    }
}

#[tokio::test]
async fn a_run_spanning_expiries_signs_with_fresh_keys_and_shares_each_refresh() {
    let clock = Clock::starting_now();
    let issuer = Issuer::new(clock.clone());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let creds_url = container_endpoint(issuer.clone()).await;
    let bedrock_url = bedrock(issuer.clone(), seen.clone()).await;
    let source = CredentialSource::Container {
        uri: format!("{creds_url}/creds"),
        token: Some("container-auth-token".into()),
        token_file: None,
    };
    let provider = Arc::new(CredentialsProvider::with_clock(source, clock.as_fn()).unwrap());
    let backend =
        BedrockBackend::with_provider("us-east-1", provider.clone(), Some(&bedrock_url), BedrockOptions::default())
            .unwrap();
    let last_key = || seen.lock().unwrap().last().unwrap().0.clone();

    backend.chat(request(), None).await.unwrap();
    backend.chat(request(), None).await.unwrap();
    assert_eq!((issuer.fetches.load(Ordering::SeqCst), last_key()), (1, "ASIATEST1".to_owned()));

    // Inside the refresh window of the first keys (they still work): new ones are fetched first.
    clock.advance(HOUR - REFRESH_BEFORE.as_secs() + 60);
    backend.chat(request(), None).await.unwrap();
    assert_eq!((issuer.fetches.load(Ordering::SeqCst), last_key()), (2, "ASIATEST2".to_owned()));

    // Past the second keys' expiry as well.
    clock.advance(HOUR + 60);
    backend.chat(request(), None).await.unwrap();
    assert_eq!((issuer.fetches.load(Ordering::SeqCst), last_key()), (3, "ASIATEST3".to_owned()));

    // Many calls that find the keys stale at once share one fetch.
    clock.advance(HOUR);
    let calls: Vec<_> = (0..24).map(|_| backend.chat(request(), None)).collect();
    for result in futures_util::future::join_all(calls).await {
        result.unwrap();
    }
    assert_eq!(issuer.fetches.load(Ordering::SeqCst), 4);
    assert!(seen.lock().unwrap().iter().rev().take(24).all(|(id, _)| id == "ASIATEST4"));

    // The endpoint goes down inside the refresh window: the keys that have not expired carry on.
    issuer.failing.store(true, Ordering::SeqCst);
    clock.advance(HOUR - REFRESH_BEFORE.as_secs() + 60);
    backend.chat(request(), None).await.unwrap();
    assert_eq!(last_key(), "ASIATEST4");
    // Once they have expired, calls fail as retryable connection errors naming the source.
    clock.advance(REFRESH_BEFORE.as_secs());
    let err = backend.chat(request(), None).await.unwrap_err();
    assert!(matches!(&err, BackendError::Connection(m) if m.contains("container credentials endpoint")), "{err:?}");
    assert!(err.retryable());
    assert!(!format!("{err} {backend:?} {provider:?}").contains("secret-"), "{err}");
    assert_eq!(seen.lock().unwrap().len(), 2 + 1 + 1 + 24 + 1);
}

#[tokio::test]
async fn instance_metadata_v2_needs_its_session_token() {
    let clock = Clock::starting_now();
    let issuer = Issuer::new(clock.clone());
    let url = serve(
        Router::new()
            .route(
                "/latest/api/token",
                put(|headers: HeaderMap| async move {
                    if headers.contains_key("x-aws-ec2-metadata-token-ttl-seconds") {
                        "imds-session".into_response()
                    } else {
                        StatusCode::BAD_REQUEST.into_response()
                    }
                }),
            )
            .route(
                "/latest/meta-data/iam/security-credentials/",
                get(|headers: HeaderMap| async move {
                    match headers.get("x-aws-ec2-metadata-token").and_then(|v| v.to_str().ok()) {
                        Some("imds-session") => "batch-role\n".into_response(),
                        _ => StatusCode::UNAUTHORIZED.into_response(),
                    }
                }),
            )
            .route(
                "/latest/meta-data/iam/security-credentials/batch-role",
                get(|State(issuer): State<Arc<Issuer>>, headers: HeaderMap| async move {
                    match headers.get("x-aws-ec2-metadata-token").and_then(|v| v.to_str().ok()) {
                        Some("imds-session") => json_response(&issuer.issue()),
                        _ => StatusCode::UNAUTHORIZED.into_response(),
                    }
                })
                .with_state(issuer.clone()),
            ),
    )
    .await;
    let env = |name: &str| match name {
        "AWS_EC2_METADATA_SERVICE_ENDPOINT" => Some(url.clone()),
        "HOME" => Some("/nonexistent".to_owned()),
        _ => None,
    };
    let profile = aws_credentials::load_with(None, &env).unwrap();
    assert!(matches!(profile.source, CredentialSource::InstanceMetadata { .. }), "{profile:?}");
    let provider = CredentialsProvider::with_clock(profile.source, clock.as_fn()).unwrap();
    let keys = provider.credentials().await.unwrap();
    assert_eq!(keys.access_key_id, "ASIATEST1");
    assert_eq!(keys.session_token.as_ref().unwrap().expose(), "token-1");
    assert_eq!(keys.expires_at, Some(clock.now() + Duration::from_secs(HOUR)));
}

#[tokio::test]
async fn no_credentials_anywhere_is_a_configuration_error_not_a_retry() {
    // The chain ends at the metadata service; here it does not answer (nothing listens).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let env = |name: &str| match name {
        "AWS_EC2_METADATA_SERVICE_ENDPOINT" => Some(url.clone()),
        "HOME" => Some("/nonexistent".to_owned()),
        _ => None,
    };
    let provider = Arc::new(CredentialsProvider::new(aws_credentials::load_with(None, &env).unwrap().source).unwrap());
    let backend =
        BedrockBackend::with_provider("us-east-1", provider, Some("http://127.0.0.1:9"), BedrockOptions::default())
            .unwrap();
    let err = backend.chat(request(), None).await.unwrap_err();
    assert!(matches!(&err, BackendError::Config(m) if m.starts_with("no AWS credentials")), "{err:?}");
    assert!(!err.retryable());
}

#[tokio::test]
async fn web_identity_assumes_the_role_through_sts() {
    let clock = Clock::starting_now();
    let issuer = Issuer::new(clock.clone());
    let url = serve(
        Router::new().route(
            "/",
            post(|State(issuer): State<Arc<Issuer>>, body: String| async move {
                let form: HashMap<String, String> =
                    reqwest::Url::parse(&format!("http://x/?{body}")).unwrap().query_pairs().into_owned().collect();
                if form.get("Action").map(String::as_str) != Some("AssumeRoleWithWebIdentity")
                    || form.get("WebIdentityToken").map(String::as_str) != Some("oidc-token-from-file")
                    || form.get("RoleArn").map(String::as_str) != Some("arn:aws:iam::123456789012:role/batch")
                {
                    return StatusCode::BAD_REQUEST.into_response();
                }
                let keys = issuer.issue();
                let field = |n: &str| keys[n].as_str().unwrap().to_owned();
                format!(
                    "<AssumeRoleWithWebIdentityResponse><AssumeRoleWithWebIdentityResult><Credentials>\
                 <AccessKeyId>{}</AccessKeyId><SecretAccessKey>{}</SecretAccessKey>\
                 <SessionToken>{}</SessionToken><Expiration>{}</Expiration></Credentials>\
                 </AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>",
                    field("AccessKeyId"),
                    field("SecretAccessKey"),
                    field("SessionToken"),
                    field("Expiration"),
                )
                .into_response()
            })
            .with_state(issuer.clone()),
        ),
    )
    .await;
    let dir = temp_dir("web-identity");
    let token_file = dir.join("token");
    std::fs::write(&token_file, "oidc-token-from-file\n").unwrap();
    let token_path = token_file.display().to_string();
    let env = |name: &str| match name {
        "AWS_WEB_IDENTITY_TOKEN_FILE" => Some(token_path.clone()),
        "AWS_ROLE_ARN" => Some("arn:aws:iam::123456789012:role/batch".to_owned()),
        "AWS_ENDPOINT_URL_STS" => Some(url.clone()),
        _ => None,
    };
    let profile = aws_credentials::load_with(None, &env).unwrap();
    let provider = CredentialsProvider::with_clock(profile.source, clock.as_fn()).unwrap();
    assert_eq!(provider.credentials().await.unwrap().access_key_id, "ASIATEST1");
    clock.advance(HOUR);
    assert_eq!(provider.credentials().await.unwrap().access_key_id, "ASIATEST2");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn credential_process_from_the_profile() {
    let dir = temp_dir("process");
    let config = dir.join("config");
    let expiry = "2099-01-01T00:00:00Z";
    let script = dir.join("creds.sh");
    std::fs::write(
        &script,
        format!(
            "printf '%s' '{{\"Version\": 1, \"AccessKeyId\": \"ASIAPROC\", \"SecretAccessKey\": \"proc-secret\", \
             \"SessionToken\": \"proc-token\", \"Expiration\": \"{expiry}\"}}'\n"
        ),
    )
    .unwrap();
    std::fs::write(&config, format!("[profile batch]\ncredential_process = sh {}\n", script.display())).unwrap();
    std::fs::write(dir.join("broken.sh"), "echo 'not json secret-in-stdout'\n").unwrap();
    std::fs::write(
        dir.join("config-broken"),
        format!("[profile broken]\ncredential_process = sh {}\n", dir.join("broken.sh").display()),
    )
    .unwrap();
    let config_path = config.display().to_string();
    let env = |name: &str| match name {
        "AWS_CONFIG_FILE" => Some(config_path.clone()),
        "AWS_SHARED_CREDENTIALS_FILE" => Some("/nonexistent/credentials".to_owned()),
        _ => None,
    };
    let profile = aws_credentials::load_with(Some("batch"), &env).unwrap();
    let provider = CredentialsProvider::new(profile.source).unwrap();
    let keys = provider.credentials().await.unwrap();
    assert_eq!((keys.access_key_id.as_str(), keys.secret_access_key()), ("ASIAPROC", "proc-secret"));
    assert_eq!(keys.expires_at, parse_rfc3339(expiry));

    let broken_path = dir.join("config-broken").display().to_string();
    let env = |name: &str| match name {
        "AWS_CONFIG_FILE" => Some(broken_path.clone()),
        "AWS_SHARED_CREDENTIALS_FILE" => Some("/nonexistent/credentials".to_owned()),
        _ => None,
    };
    let provider = CredentialsProvider::new(aws_credentials::load_with(Some("broken"), &env).unwrap().source).unwrap();
    let err = provider.credentials().await.unwrap_err().to_string();
    assert!(err.contains("credential_process") && !err.contains("secret-in-stdout"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// STS `AssumeRole` on loopback: checks each request's `SigV4` signature (service `sts`, region
/// `eu-west-1`) against the secret of the key that signed it (the base profile's, or one it issued)
/// and records (role, signing key, session name, external id, duration) per call.
async fn sts_assume_role(issuer: Arc<Issuer>, calls: Arc<Mutex<Vec<[String; 5]>>>) -> String {
    issuer.issued.lock().unwrap().insert("AKIABASE".into(), "base-secret-wJalrXUtnFEMI".into());
    serve(Router::new().route(
        "/",
        post(move |uri: Uri, headers: HeaderMap, body: String| {
            let (issuer, calls) = (issuer.clone(), calls.clone());
            async move {
                let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
                let auth = header("authorization");
                let id = auth.split("Credential=").nth(1).and_then(|s| s.split('/').next()).unwrap_or_default();
                let Some(secret) = issuer.issued.lock().unwrap().get(id).cloned() else {
                    return (StatusCode::FORBIDDEN, "unknown key").into_response();
                };
                let signed = auth.split("SignedHeaders=").nth(1).and_then(|s| s.split(',').next()).unwrap_or_default();
                let signed_headers: Vec<(String, String)> =
                    signed.split(';').map(|n| (n.to_owned(), header(n))).collect();
                let token = header("x-amz-security-token");
                let keys = AwsCredentials::new(id, secret, Some(token.clone()));
                let expected = sigv4::sign(
                    &SignableRequest {
                        method: "POST",
                        path: uri.path(),
                        query: "",
                        headers: &signed_headers,
                        payload: body.as_bytes(),
                    },
                    &keys,
                    &SigningScope { region: "eu-west-1", service: "sts", amz_date: &header("x-amz-date") },
                );
                let issued_token_ok =
                    id == "AKIABASE" || token == format!("token-{}", id.trim_start_matches("ASIATEST"));
                if expected.authorization != auth || !issued_token_ok {
                    return (StatusCode::FORBIDDEN, "signature does not match").into_response();
                }
                let form: HashMap<String, String> =
                    reqwest::Url::parse(&format!("http://x/?{body}")).unwrap().query_pairs().into_owned().collect();
                if form.get("Action").map(String::as_str) != Some("AssumeRole") {
                    return StatusCode::BAD_REQUEST.into_response();
                }
                let get = |n: &str| form.get(n).cloned().unwrap_or_default();
                calls.lock().unwrap().push([
                    get("RoleArn"),
                    id.to_owned(),
                    get("RoleSessionName"),
                    get("ExternalId"),
                    get("DurationSeconds"),
                ]);
                let keys = issuer.issue();
                let field = |n: &str| keys[n].as_str().unwrap().to_owned();
                format!(
                    "<AssumeRoleResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><AssumeRoleResult>\
                     <AssumedRoleUser><Arn>{}</Arn><AssumedRoleId>AROA:s</AssumedRoleId></AssumedRoleUser>\
                     <Credentials><AccessKeyId>{}</AccessKeyId><SecretAccessKey>{}</SecretAccessKey>\
                     <SessionToken>{}</SessionToken><Expiration>{}</Expiration></Credentials>\
                     </AssumeRoleResult><ResponseMetadata><RequestId>r</RequestId></ResponseMetadata>\
                     </AssumeRoleResponse>",
                    get("RoleArn"),
                    field("AccessKeyId"),
                    field("SecretAccessKey"),
                    field("SessionToken"),
                    field("Expiration"),
                )
                .into_response()
            }
        }),
    ))
    .await
}

fn files_env(dir: &std::path::Path, extra: Vec<(&'static str, String)>) -> impl Fn(&str) -> Option<String> {
    let mut vars: HashMap<&'static str, String> = extra.into_iter().collect();
    vars.insert("AWS_CONFIG_FILE", dir.join("config").display().to_string());
    vars.insert("AWS_SHARED_CREDENTIALS_FILE", dir.join("credentials").display().to_string());
    vars.insert("HOME", dir.display().to_string());
    move |name: &str| vars.get(name).cloned()
}

#[tokio::test]
async fn chained_source_profiles_assume_each_role_signed_by_the_one_before() {
    let clock = Clock::starting_now();
    let issuer = Issuer::new(clock.clone());
    let calls = Arc::new(Mutex::new(Vec::new()));
    let url = sts_assume_role(issuer.clone(), calls.clone()).await;
    let dir = temp_dir("assume-role");
    std::fs::write(
        dir.join("credentials"),
        "[base]\naws_access_key_id = AKIABASE\naws_secret_access_key = base-secret-wJalrXUtnFEMI\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("config"),
        "[profile middle]\nrole_arn = arn:aws:iam::111111111111:role/middle\nsource_profile = base\n\
         role_session_name = hop\n\n\
         [profile batch]\nrole_arn = arn:aws:iam::222222222222:role/batch\nsource_profile = middle\n\
         role_session_name = nightly\nexternal_id = ext-42\nduration_seconds = 1800\nregion = eu-west-1\n\n\
         [profile loop-a]\nrole_arn = arn:aws:iam::1:role/a\nsource_profile = loop-b\n\
         [profile loop-b]\nrole_arn = arn:aws:iam::1:role/b\nsource_profile = loop-a\n\
         [profile orphan]\nrole_arn = arn:aws:iam::1:role/o\n",
    )
    .unwrap();
    let env = files_env(&dir, vec![("AWS_ENDPOINT_URL_STS", url)]);
    let profile = aws_credentials::load_with(Some("batch"), &env).unwrap();
    assert_eq!(profile.region.as_deref(), Some("eu-west-1"));
    let provider = CredentialsProvider::with_clock(profile.source, clock.as_fn()).unwrap();
    let keys = provider.credentials().await.unwrap();
    assert_eq!(keys.access_key_id, "ASIATEST2");
    assert_eq!(keys.session_token.as_ref().map(|t| t.expose().to_owned()).as_deref(), Some("token-2"));
    assert_eq!(keys.expires_at, parse_rfc3339(&rfc3339(clock.now() + Duration::from_secs(HOUR))));
    let expected = |middle: &str| {
        vec![
            ["arn:aws:iam::111111111111:role/middle", "AKIABASE", "hop", "", ""].map(str::to_owned),
            ["arn:aws:iam::222222222222:role/batch", middle, "nightly", "ext-42", "1800"].map(str::to_owned),
        ]
    };
    assert_eq!(*calls.lock().unwrap(), expected("ASIATEST1"));
    // Cached until the refresh window: no call to STS.
    provider.credentials().await.unwrap();
    assert_eq!(calls.lock().unwrap().len(), 2);
    // Past the expiry the whole chain is walked again.
    clock.advance(HOUR);
    assert_eq!(provider.credentials().await.unwrap().access_key_id, "ASIATEST4");
    assert_eq!(calls.lock().unwrap()[2..], expected("ASIATEST3")[..]);

    let err = aws_credentials::load_with(Some("loop-a"), &env).unwrap_err().to_string();
    assert!(err.contains("loops back") && err.contains("loop-a"), "{err}");
    let err = aws_credentials::load_with(Some("orphan"), &env).unwrap_err().to_string();
    assert!(err.contains("source_profile"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The SSO portal's `GetRoleCredentials` on loopback: answers for the bearer tokens it knows.
async fn sso_portal(issuer: Arc<Issuer>, calls: Arc<Mutex<Vec<(String, String)>>>) -> String {
    serve(Router::new().route(
        "/federation/credentials",
        get(move |uri: Uri, headers: HeaderMap| {
            let (issuer, calls) = (issuer.clone(), calls.clone());
            async move {
                let query: HashMap<String, String> =
                    reqwest::Url::parse(&format!("http://x{uri}")).unwrap().query_pairs().into_owned().collect();
                let token = headers.get("x-amz-sso_bearer_token").and_then(|v| v.to_str().ok()).unwrap_or_default();
                if !token.starts_with("sso-access-token-") {
                    return (StatusCode::UNAUTHORIZED, "{\"message\":\"Session token not found or invalid\"}")
                        .into_response();
                }
                calls.lock().unwrap().push((query["account_id"].clone(), query["role_name"].clone()));
                let keys = issuer.issue();
                let expiration_ms = u64::try_from(
                    parse_rfc3339(keys["Expiration"].as_str().unwrap())
                        .unwrap()
                        .duration_since(UNIX_EPOCH)
                        .unwrap()
                        .as_millis(),
                )
                .unwrap();
                json_response(&json!({"roleCredentials": {
                    "accessKeyId": keys["AccessKeyId"],
                    "secretAccessKey": keys["SecretAccessKey"],
                    "sessionToken": keys["SessionToken"],
                    "expiration": expiration_ms,
                }}))
            }
        }),
    ))
    .await
}

#[tokio::test]
async fn sso_profiles_exchange_the_cached_login_at_the_portal() {
    let clock = Clock::starting_now();
    let issuer = Issuer::new(clock.clone());
    let calls = Arc::new(Mutex::new(Vec::new()));
    let url = sso_portal(issuer.clone(), calls.clone()).await;
    let dir = temp_dir("sso");
    std::fs::write(
        dir.join("config"),
        "[profile dev]\nsso_session = corp\nsso_account_id = 123456789012\nsso_role_name = Bedrock\n\
         region = us-west-2\n\n\
         [sso-session corp]\nsso_start_url = https://corp.awsapps.com/start\nsso_region = us-east-1\n\
         sso_registration_scopes = sso:account:access\n\n\
         [profile legacy]\nsso_start_url = https://legacy.awsapps.com/start\nsso_region = us-east-1\n\
         sso_account_id = 210987654321\nsso_role_name = Old\n\n\
         [profile revoked]\nsso_session = gone\nsso_account_id = 1\nsso_role_name = R\n\
         [sso-session gone]\nsso_start_url = https://gone.awsapps.com/start\nsso_region = us-east-1\n\n\
         [profile fresh]\nsso_session = fresh\nsso_account_id = 1\nsso_role_name = R\n\
         [sso-session fresh]\nsso_start_url = https://fresh.awsapps.com/start\nsso_region = us-east-1\n",
    )
    .unwrap();
    let cache = dir.join(".aws").join("sso").join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let valid_until = rfc3339(clock.now() + Duration::from_secs(8 * HOUR));
    // File names as the AWS CLI writes them: SHA-1 of the session name, or of the legacy start URL.
    let cached = |token: &str, expires: &str| {
        json!({"startUrl": "https://corp.awsapps.com/start", "region": "us-east-1", "accessToken": token,
               "expiresAt": expires, "refreshToken": "refresh-secret", "clientId": "c", "clientSecret": "s"})
        .to_string()
    };
    std::fs::write(
        cache.join("ee0bfd2552fbd840c02cc48b6e823320543c450f.json"),
        cached("sso-access-token-corp", &valid_until),
    )
    .unwrap();
    let legacy_expired = rfc3339(clock.now() - Duration::from_secs(60));
    std::fs::write(
        cache.join("79e435d7a515078e81c9dffc35f38d5687ebd3a7.json"),
        cached("sso-access-token-legacy-secret", &legacy_expired),
    )
    .unwrap();
    let env = files_env(&dir, vec![("AWS_ENDPOINT_URL_SSO", url)]);

    let profile = aws_credentials::load_with(Some("dev"), &env).unwrap();
    assert_eq!(profile.region.as_deref(), Some("us-west-2"));
    let provider = CredentialsProvider::with_clock(profile.source, clock.as_fn()).unwrap();
    let keys = provider.credentials().await.unwrap();
    assert_eq!((keys.access_key_id.as_str(), keys.secret_access_key()), ("ASIATEST1", "secret-1-wJalrXUtnFEMI"));
    assert_eq!(keys.expires_at, parse_rfc3339(&rfc3339(clock.now() + Duration::from_secs(HOUR))));
    assert_eq!(*calls.lock().unwrap(), vec![("123456789012".to_owned(), "Bedrock".to_owned())]);
    provider.credentials().await.unwrap();
    assert_eq!(calls.lock().unwrap().len(), 1, "cached until the refresh window");
    clock.advance(HOUR);
    assert_eq!(provider.credentials().await.unwrap().access_key_id, "ASIATEST2");

    // A login past its expiry is not sent anywhere; the error says what to do and shows no token.
    let provider = CredentialsProvider::with_clock(
        aws_credentials::load_with(Some("legacy"), &env).unwrap().source,
        clock.as_fn(),
    )
    .unwrap();
    let err = provider.credentials().await.unwrap_err().to_string();
    assert!(err.contains("expired") && err.contains("aws sso login"), "{err}");
    assert!(!err.contains("sso-access-token") && !err.contains("refresh-secret"), "{err}");
    assert_eq!(calls.lock().unwrap().len(), 2);

    // A token the portal does not accept, and a session that never logged in.
    std::fs::write(cache.join("a6dfdeaa3a44a4c52d44284847d7160892b4017e.json"), cached("revoked-secret", &valid_until))
        .unwrap();
    let fetch_err = |name: &str| {
        let source = aws_credentials::load_with(Some(name), &env).unwrap().source;
        let provider = CredentialsProvider::with_clock(source, clock.as_fn()).unwrap();
        async move { provider.credentials().await.unwrap_err().to_string() }
    };
    let err = fetch_err("revoked").await;
    assert!(err.contains("HTTP 401") && err.contains("aws sso login") && !err.contains("revoked-secret"), "{err}");
    let err = fetch_err("fresh").await;
    assert!(err.contains("no cached SSO login") && err.contains("aws sso login"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn rfc3339_times() {
    let at = |s: &str| parse_rfc3339(s).map(|t| t.duration_since(UNIX_EPOCH).unwrap().as_secs_f64());
    assert_eq!(at("1970-01-01T00:00:00Z"), Some(0.0));
    assert_eq!(at("2026-12-02T08:00:00Z"), Some(1_796_198_400.0));
    assert_eq!(at("2026-12-02T09:30:00+01:30"), Some(1_796_198_400.0));
    assert_eq!(at("2026-12-02T08:00:00.5Z"), Some(1_796_198_400.5));
    assert_eq!(at("2024-02-29T00:00:00Z"), Some(1_709_164_800.0));
    for bad in ["", "2026-13-01T00:00:00Z", "2026-12-02", "yesterday", "2026-12-02T25:00:00Z"] {
        assert_eq!(at(bad), None, "{bad}");
    }
    let now = SystemTime::now();
    let rounded = UNIX_EPOCH + Duration::from_secs(now.duration_since(UNIX_EPOCH).unwrap().as_secs());
    assert_eq!(parse_rfc3339(&rfc3339(now)), Some(rounded));
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("batchagent-aws-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
