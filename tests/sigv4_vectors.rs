//! The published AWS `SigV4` test-suite vectors: canonical request, string to sign and Authorization
//! header must equal the suite's files byte for byte.
#![allow(clippy::unwrap_used)]

use std::fmt::Write as _;
use std::path::Path;

use batchagent::backends::aws_credentials::{self, AwsCredentials, AwsProfile, CredentialSource};
use batchagent::backends::sigv4::{self, SignableRequest, SigningScope};

const VECTORS: &[&str] = &[
    "get-vanilla",
    "get-vanilla-query-order-key",
    "get-vanilla-query-order-key-case",
    "get-vanilla-utf8-query",
    "get-header-value-trim",
    "get-header-key-duplicate",
    "get-slashes",
    "get-space",
    "get-relative-relative",
    "post-vanilla",
    "post-vanilla-query",
    "post-header-key-sort",
    "post-x-www-form-urlencoded",
    "post-sts-header-before",
];

struct RawRequest {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// The suite's `.req` files: `METHOD target HTTP/1.1`, `Name:value` lines, a blank line, the body.
/// The target may contain spaces (`get-space`), so the protocol is split off from the right.
fn parse_req(text: &str) -> RawRequest {
    let (head, body) = text.split_once("\n\n").unwrap_or((text, ""));
    let mut lines = head.lines();
    let request_line = lines.next().unwrap();
    let (method, rest) = request_line.split_once(' ').unwrap();
    let (target, _protocol) = rest.rsplit_once(' ').unwrap();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let headers = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.to_owned(), v.to_owned())
        })
        .filter(|(n, _)| !n.eq_ignore_ascii_case("content-length"))
        .collect();
    RawRequest {
        method: method.to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
        headers,
        body: body.as_bytes().to_vec(),
    }
}

fn read(name: &str, ext: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sigv4").join(name).join(format!("{name}.{ext}"));
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn published_vectors() {
    let credentials = AwsCredentials::new("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", None);
    let scope = SigningScope { region: "us-east-1", service: "service", amz_date: "20150830T123600Z" };
    for name in VECTORS {
        let req = parse_req(&read(name, "req"));
        let signable = SignableRequest {
            method: &req.method,
            path: &req.path,
            query: &req.query,
            headers: &req.headers,
            payload: &req.body,
        };
        let sig = sigv4::sign(&signable, &credentials, &scope);
        assert_eq!(sig.canonical_request, read(name, "creq"), "{name}: canonical request");
        assert_eq!(sig.string_to_sign, read(name, "sts"), "{name}: string to sign");
        assert_eq!(sig.authorization, read(name, "authz"), "{name}: authorization");
    }
}

#[test]
fn signing_key_matches_the_documented_example() {
    // The derived-key example from the SigV4 documentation (secret wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY,
    // 20120215, us-east-1, iam).
    let key = sigv4::signing_key("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20120215", "us-east-1", "iam");
    let hex = key.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    });
    assert_eq!(hex, "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d");
}

fn env_of(pairs: &[(&str, String)]) -> impl Fn(&str) -> Option<String> {
    let pairs: Vec<(String, String)> = pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
    move |k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
}

fn keys(profile: &AwsProfile) -> &AwsCredentials {
    match &profile.source {
        CredentialSource::Static(keys) => keys,
        other => panic!("expected static keys, got {other:?}"),
    }
}

#[test]
fn credentials_from_shared_files() {
    let dir = std::env::temp_dir().join(format!("batchagent-aws-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let creds = dir.join("credentials");
    let config = dir.join("config");
    std::fs::write(
        &creds,
        "[default]\naws_access_key_id = AKIDDEFAULT\naws_secret_access_key = secretdefault\n\n\
         [dev]\naws_access_key_id=AKIDDEV\naws_secret_access_key=secretdev\naws_session_token=tokendev\n",
    )
    .unwrap();
    std::fs::write(
        &config,
        "[default]\nregion = us-west-2\n\n[profile dev]\nregion = eu-central-1\n\n\
         [profile cfgonly]\naws_access_key_id = AKIDCFG\naws_secret_access_key = secretcfg\n\n\
         [profile sso]\nsso_session = corp\nregion = us-east-1\n",
    )
    .unwrap();
    let files = [
        ("AWS_SHARED_CREDENTIALS_FILE", creds.display().to_string()),
        ("AWS_CONFIG_FILE", config.display().to_string()),
    ];

    let p = aws_credentials::load_with(None, &env_of(&files)).unwrap();
    assert_eq!(keys(&p).access_key_id, "AKIDDEFAULT");
    assert_eq!(keys(&p).secret_access_key(), "secretdefault");
    assert_eq!(p.region.as_deref(), Some("us-west-2"));

    // AWS_PROFILE selects `[dev]` in credentials and `[profile dev]` in config.
    let mut with_profile = files.to_vec();
    with_profile.push(("AWS_PROFILE", "dev".to_owned()));
    let p = aws_credentials::load_with(None, &env_of(&with_profile)).unwrap();
    assert_eq!(keys(&p).access_key_id, "AKIDDEV");
    assert_eq!(keys(&p).session_token.as_ref().map(batchagent::secret::Secret::expose), Some("tokendev"));
    assert_eq!(p.region.as_deref(), Some("eu-central-1"));

    // Keys may live in the config file alone; AWS_REGION wins over the file's region.
    let mut region_env = files.to_vec();
    region_env.push(("AWS_REGION", "ap-south-1".to_owned()));
    let p = aws_credentials::load_with(Some("cfgonly"), &env_of(&region_env)).unwrap();
    assert_eq!(keys(&p).access_key_id, "AKIDCFG");
    assert_eq!(p.region.as_deref(), Some("ap-south-1"));

    // Environment keys win over the files unless a profile is named explicitly.
    let mut env_keys = with_profile.clone();
    env_keys.push(("AWS_ACCESS_KEY_ID", "AKIDENV".to_owned()));
    env_keys.push(("AWS_SECRET_ACCESS_KEY", "secretenv".to_owned()));
    let p = aws_credentials::load_with(None, &env_of(&env_keys)).unwrap();
    assert_eq!(keys(&p).access_key_id, "AKIDENV");
    assert_eq!(keys(&p).session_token, None);
    assert_eq!(p.region.as_deref(), Some("eu-central-1"), "region from the AWS_PROFILE config section");
    let p = aws_credentials::load_with(Some("default"), &env_of(&env_keys)).unwrap();
    assert_eq!(keys(&p).access_key_id, "AKIDDEFAULT");

    let err = aws_credentials::load_with(Some("sso"), &env_of(&files)).unwrap_err();
    assert!(err.to_string().contains("sso_session"), "{err}");
    let err = aws_credentials::load_with(Some("missing"), &env_of(&files)).unwrap_err();
    assert!(err.to_string().contains("\"missing\""), "{err}");

    std::fs::remove_dir_all(&dir).unwrap();
}
