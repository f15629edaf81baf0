//! TOML configuration files: read and parsed with errors that name the file (and, through
//! toml's messages, the line and key).

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Everything that can be wrong with a configuration file, naming the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{path}: key `{key}`: {reason}")]
    Invalid {
        path: PathBuf,
        key: String,
        reason: String,
    },
}

pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

/// A validation failure of `key` in the file at `path`.
pub fn invalid(path: &Path, key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_owned(),
        key: key.to_owned(),
        reason: reason.into(),
    }
}
