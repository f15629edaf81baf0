//! How spoke reaches a secured Kafka cluster (the edge's or the hub's): `[*.tls]` and
//! `[*.sasl]` tables for the common cases, beside the `[*.kafka]` pass-through, turned into
//! librdkafka properties. Secrets need not sit in the TOML: any of them may be read from a
//! file (`password_file`, ...) and any value may name environment variables (`${NAME}`).
//! Resolved properties print secrets as `***` ([`KafkaProperties`]'s `Debug`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// `[source.tls]` / `[hub.tls]`: TLS to the brokers (`security.protocol` SSL, or SASL_SSL
/// with a `sasl` table).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaTls {
    /// PEM file of the CAs that sign the brokers' certificates; unset: the system's CAs.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for clusters that want mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The key's passphrase, if it is encrypted.
    pub key_password: Option<Secret>,
    pub key_password_file: Option<PathBuf>,
    /// Whether the broker's certificate must name the host connected to. Turning it off
    /// lets anyone with a certificate from the CA pose as the broker.
    #[serde(default = "default_true")]
    pub verify_hostname: bool,
}

fn default_true() -> bool {
    true
}

impl Default for KafkaTls {
    /// TLS with the system's CAs and the host name checked, as an empty `[*.tls]` says.
    fn default() -> Self {
        KafkaTls {
            ca_file: None,
            cert_file: None,
            key_file: None,
            key_password: None,
            key_password_file: None,
            verify_hostname: true,
        }
    }
}

/// `[source.sasl]` / `[hub.sasl]`: who spoke is to the brokers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSasl {
    pub mechanism: SaslMechanism,
    /// PLAIN and SCRAM.
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    /// OAUTHBEARER with OIDC client credentials: librdkafka fetches and refreshes tokens.
    pub token_endpoint: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    pub client_secret_file: Option<PathBuf>,
    pub scope: Option<String>,
}

/// A secret written into the configuration itself: it never prints.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
    #[serde(rename = "OAUTHBEARER")]
    OauthBearer,
}

impl SaslMechanism {
    fn name(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            SaslMechanism::OauthBearer => "OAUTHBEARER",
        }
    }
}

/// librdkafka properties, resolved: environment references expanded and secret files read.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KafkaProperties(BTreeMap<String, String>);

impl KafkaProperties {
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
}

/// librdkafka's version and the features it was built with (`builtin.features`: ssl,
/// sasl_scram, sasl_oauthbearer, http, oidc, ...), for the line each binary logs at start.
pub fn librdkafka_build() -> (String, String) {
    let (_, version) = rdkafka::util::get_rdkafka_version();
    let features = rdkafka::ClientConfig::new()
        .create_native_config()
        .and_then(|config| config.get("builtin.features"))
        .unwrap_or_else(|error| format!("unknown ({error})"));
    (version, features)
}

/// Whether a librdkafka property holds a secret, so that nothing prints it.
pub fn is_secret(key: &str) -> bool {
    key.contains("password") || key.contains("secret") || key.ends_with(".pem")
}

impl std::fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(
                self.0
                    .iter()
                    .map(|(k, v)| (k, if is_secret(k) { "***" } else { v.as_str() })),
            )
            .finish()
    }
}

/// What is wrong, and under which key (relative to the table, e.g. `sasl.password_file`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct SecurityError {
    pub key: String,
    pub reason: String,
}

fn error(key: &str, reason: impl Into<String>) -> SecurityError {
    SecurityError {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

/// The properties for a cluster: the pass-through `kafka` table with `${NAME}` expanded,
/// and what `tls` and `sasl` say. A pass-through key those tables set is refused rather than
/// silently overridden. `env` looks up environment variables (`std::env::var` in the binaries).
pub fn resolve(
    kafka: &BTreeMap<String, String>,
    tls: Option<&KafkaTls>,
    sasl: Option<&KafkaSasl>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<KafkaProperties, SecurityError> {
    let mut properties = BTreeMap::new();
    for (key, value) in kafka {
        let value = expand(value, env).map_err(|reason| error(&format!("kafka.{key}"), reason))?;
        properties.insert(key.clone(), value);
    }
    let mut set = BTreeMap::new();
    if let Some(protocol) = match (tls.is_some(), sasl.is_some()) {
        (true, true) => Some("SASL_SSL"),
        (true, false) => Some("SSL"),
        (false, true) => Some("SASL_PLAINTEXT"),
        (false, false) => None,
    } {
        set.insert("security.protocol", protocol.to_owned());
    }
    if let Some(tls) = tls {
        tls_properties(tls, env, &mut set)?;
    }
    if let Some(sasl) = sasl {
        sasl_properties(sasl, env, &mut set)?;
    }
    for (key, value) in set {
        if properties.contains_key(key) {
            return Err(error(
                &format!("kafka.{key}"),
                "also set by the tls or sasl table; keep one of them",
            ));
        }
        properties.insert(key.to_owned(), value);
    }
    Ok(KafkaProperties(properties))
}

fn tls_properties(
    tls: &KafkaTls,
    env: &dyn Fn(&str) -> Option<String>,
    set: &mut BTreeMap<&'static str, String>,
) -> Result<(), SecurityError> {
    let path = |key: &str, path: &Path| -> Result<String, SecurityError> {
        readable(path).map_err(|reason| error(&format!("tls.{key}"), reason))?;
        Ok(path.display().to_string())
    };
    if let Some(ca) = &tls.ca_file {
        set.insert("ssl.ca.location", path("ca_file", ca)?);
    }
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            set.insert("ssl.certificate.location", path("cert_file", cert)?);
            set.insert("ssl.key.location", path("key_file", key)?);
        }
        (None, None) => {}
        (Some(_), None) => return Err(error("tls.key_file", "cert_file needs its key_file")),
        (None, Some(_)) => return Err(error("tls.cert_file", "key_file needs its cert_file")),
    }
    if let Some(password) = secret(
        "tls.key_password",
        tls.key_password.as_ref().map(Secret::expose),
        tls.key_password_file.as_deref(),
        env,
    )? {
        set.insert("ssl.key.password", password);
    }
    let check = if tls.verify_hostname { "https" } else { "none" };
    set.insert("ssl.endpoint.identification.algorithm", check.to_owned());
    Ok(())
}

fn sasl_properties(
    sasl: &KafkaSasl,
    env: &dyn Fn(&str) -> Option<String>,
    set: &mut BTreeMap<&'static str, String>,
) -> Result<(), SecurityError> {
    set.insert("sasl.mechanism", sasl.mechanism.name().to_owned());
    let unused = |key: &str, present: bool| -> Result<(), SecurityError> {
        if present {
            return Err(error(
                &format!("sasl.{key}"),
                format!("not used with mechanism {}", sasl.mechanism.name()),
            ));
        }
        Ok(())
    };
    let password = secret(
        "sasl.password",
        sasl.password.as_ref().map(Secret::expose),
        sasl.password_file.as_deref(),
        env,
    )?;
    let client_secret = secret(
        "sasl.client_secret",
        sasl.client_secret.as_ref().map(Secret::expose),
        sasl.client_secret_file.as_deref(),
        env,
    )?;
    if sasl.mechanism == SaslMechanism::OauthBearer {
        unused("username", sasl.username.is_some())?;
        unused("password", password.is_some())?;
        let endpoint = sasl.token_endpoint.as_deref().ok_or_else(|| {
            error(
                "sasl.token_endpoint",
                "OAUTHBEARER needs the OIDC token endpoint (client credentials)",
            )
        })?;
        let client_id = sasl
            .client_id
            .as_deref()
            .ok_or_else(|| error("sasl.client_id", "OAUTHBEARER needs a client_id"))?;
        let client_secret = client_secret.ok_or_else(|| {
            error(
                "sasl.client_secret",
                "OAUTHBEARER needs client_secret or client_secret_file",
            )
        })?;
        set.insert("sasl.oauthbearer.method", "oidc".to_owned());
        set.insert("sasl.oauthbearer.token.endpoint.url", endpoint.to_owned());
        set.insert("sasl.oauthbearer.client.id", client_id.to_owned());
        set.insert("sasl.oauthbearer.client.secret", client_secret);
        if let Some(scope) = &sasl.scope {
            set.insert("sasl.oauthbearer.scope", scope.clone());
        }
        return Ok(());
    }
    unused("token_endpoint", sasl.token_endpoint.is_some())?;
    unused("client_id", sasl.client_id.is_some())?;
    unused("client_secret", client_secret.is_some())?;
    unused("scope", sasl.scope.is_some())?;
    let username = sasl
        .username
        .as_deref()
        .ok_or_else(|| error("sasl.username", "missing"))?;
    let password =
        password.ok_or_else(|| error("sasl.password", "set password or password_file"))?;
    set.insert(
        "sasl.username",
        expand(username, env).map_err(|r| error("sasl.username", r))?,
    );
    set.insert("sasl.password", password);
    Ok(())
}

/// A secret given inline (with `${NAME}` expanded) or as a file (its first line).
fn secret(
    key: &str,
    inline: Option<&str>,
    file: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<String>, SecurityError> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(error(
            &format!("{key}_file"),
            format!("give {key} or {key}_file, not both"),
        )),
        (Some(value), None) => expand(value, env).map(Some).map_err(|r| error(key, r)),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                error(
                    &format!("{key}_file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            // A trailing newline is an editor's, not the secret's.
            let value = text.lines().next().unwrap_or_default().to_owned();
            if value.is_empty() {
                return Err(error(
                    &format!("{key}_file"),
                    format!("{} is empty", path.display()),
                ));
            }
            Ok(Some(value))
        }
        (None, None) => Ok(None),
    }
}

fn readable(path: &Path) -> Result<(), String> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Replaces each `${NAME}` by the environment variable NAME; `$$` is a lone `$`.
pub fn expand(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(reference) = after.strip_prefix('{') {
            let end = reference
                .find('}')
                .ok_or_else(|| "`${` without its closing `}`".to_owned())?;
            let name = &reference[..end];
            let valid = name
                .chars()
                .next()
                .is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
                && name.chars().all(|c| c == '_' || c.is_ascii_alphanumeric());
            if !valid {
                return Err(format!("`${{{name}}}` is not an environment variable name"));
            }
            let value =
                env(name).ok_or_else(|| format!("environment variable {name} is not set"))?;
            out.push_str(&value);
            rest = &reference[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HUB_PASSWORD" => Some("s3cret".into()),
            "USER" => Some("spoke".into()),
            _ => None,
        }
    }

    fn sasl(mechanism: SaslMechanism) -> KafkaSasl {
        KafkaSasl {
            mechanism,
            username: None,
            password: None,
            password_file: None,
            token_endpoint: None,
            client_id: None,
            client_secret: None,
            client_secret_file: None,
            scope: None,
        }
    }

    #[test]
    fn environment_references_expand_and_missing_ones_are_errors() {
        assert_eq!(expand("a${USER}b$$c$d", &env).as_deref(), Ok("aspokeb$c$d"));
        assert!(expand("${NOPE}", &env)
            .expect_err("unset")
            .contains("NOPE is not set"));
        assert!(expand("${USER", &env).is_err());
        assert!(expand("${1X}", &env).is_err());
    }

    #[test]
    fn tls_and_scram_make_sasl_ssl_with_the_password_from_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        let password = dir.path().join("password");
        std::fs::write(&ca, "pem").expect("write");
        std::fs::write(&password, "from-file\n").expect("write");
        let tls = KafkaTls {
            ca_file: Some(ca.clone()),
            verify_hostname: true,
            ..KafkaTls::default()
        };
        let sasl = KafkaSasl {
            username: Some("${USER}".into()),
            password_file: Some(password),
            ..sasl(SaslMechanism::ScramSha512)
        };
        let kafka = BTreeMap::from([("client.rack".to_owned(), "r1".to_owned())]);
        let resolved = resolve(&kafka, Some(&tls), Some(&sasl), &env).expect("valid");
        assert_eq!(resolved.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(resolved.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(resolved.get("sasl.username"), Some("spoke"));
        assert_eq!(resolved.get("sasl.password"), Some("from-file"));
        assert_eq!(resolved.get("ssl.ca.location"), ca.to_str());
        assert_eq!(
            resolved.get("ssl.endpoint.identification.algorithm"),
            Some("https")
        );
        assert_eq!(resolved.get("client.rack"), Some("r1"));
        let printed = format!("{resolved:?}");
        assert!(
            !printed.contains("from-file") && printed.contains("***"),
            "{printed}"
        );
        let inline = KafkaSasl {
            password: Some(Secret::new("inline-secret")),
            ..sasl
        };
        assert!(!format!("{inline:?}").contains("inline-secret"));
    }

    #[test]
    fn mistakes_name_their_key() {
        let inline_and_file = KafkaSasl {
            username: Some("u".into()),
            password: Some(Secret::new("${HUB_PASSWORD}")),
            password_file: Some("/nonexistent".into()),
            ..sasl(SaslMechanism::Plain)
        };
        let none = BTreeMap::new();
        let key = |result: Result<KafkaProperties, SecurityError>| result.expect_err("refused").key;
        assert_eq!(
            key(resolve(&none, None, Some(&inline_and_file), &env)),
            "sasl.password_file"
        );
        let missing_file = KafkaSasl {
            password: None,
            ..inline_and_file.clone()
        };
        assert_eq!(
            key(resolve(&none, None, Some(&missing_file), &env)),
            "sasl.password_file"
        );
        let oidc_without_secret = KafkaSasl {
            token_endpoint: Some("https://idp/token".into()),
            client_id: Some("spoke".into()),
            ..sasl(SaslMechanism::OauthBearer)
        };
        assert_eq!(
            key(resolve(&none, None, Some(&oidc_without_secret), &env)),
            "sasl.client_secret"
        );
        let clash = BTreeMap::from([("security.protocol".to_owned(), "ssl".to_owned())]);
        let tls = KafkaTls::default();
        assert_eq!(
            key(resolve(&clash, Some(&tls), None, &env)),
            "kafka.security.protocol"
        );
        let unreadable_ca = KafkaTls {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..KafkaTls::default()
        };
        assert_eq!(
            key(resolve(&none, Some(&unreadable_ca), None, &env)),
            "tls.ca_file"
        );
        let missing_env = BTreeMap::from([("sasl.password".to_owned(), "${NOPE}".to_owned())]);
        assert_eq!(
            key(resolve(&missing_env, None, None, &env)),
            "kafka.sasl.password"
        );
    }

    #[test]
    fn oidc_client_credentials_and_plain_sasl() {
        let oidc = KafkaSasl {
            token_endpoint: Some("https://idp/token".into()),
            client_id: Some("spoke".into()),
            client_secret: Some(Secret::new("${HUB_PASSWORD}")),
            scope: Some("kafka".into()),
            ..sasl(SaslMechanism::OauthBearer)
        };
        let resolved = resolve(&BTreeMap::new(), None, Some(&oidc), &env).expect("valid");
        assert_eq!(resolved.get("security.protocol"), Some("SASL_PLAINTEXT"));
        assert_eq!(resolved.get("sasl.oauthbearer.method"), Some("oidc"));
        assert_eq!(
            resolved.get("sasl.oauthbearer.client.secret"),
            Some("s3cret")
        );
        let tls_off = KafkaTls {
            verify_hostname: false,
            ..KafkaTls::default()
        };
        let resolved = resolve(&BTreeMap::new(), Some(&tls_off), None, &env).expect("valid");
        assert_eq!(resolved.get("security.protocol"), Some("SSL"));
        assert_eq!(
            resolved.get("ssl.endpoint.identification.algorithm"),
            Some("none")
        );
    }
}
