//! Logs on stderr: human-readable by default (colour only on a terminal), JSON for log
//! shippers; `SPOKE_LOG` sets the filter.

use std::io::IsTerminal;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SPOKE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,librdkafka=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// An error and its causes on one line, as `{:#}` prints them, without the causes an error's
/// own message already ends with: most of spoke's errors name their cause in their message
/// (so that a log line of the error alone says it) and also return it as their source.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        let message = error.to_string();
        if !line.ends_with(&message) {
            line.push_str(": ");
            line.push_str(&message);
        }
        cause = error.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("cannot read /etc/spoke/agent.toml: {source}")]
        Repeats { source: std::io::Error },
        #[error("spool at /var/lib/spoke")]
        Names { source: std::io::Error },
    }

    fn io_error() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory")
    }

    #[test]
    fn a_cause_the_message_already_ends_with_is_not_repeated() {
        let error = Outer::Repeats { source: io_error() };
        assert_eq!(
            error_chain(&error),
            "cannot read /etc/spoke/agent.toml: No such file or directory"
        );
    }

    #[test]
    fn a_cause_the_message_does_not_name_is_appended() {
        let error = Outer::Names { source: io_error() };
        assert_eq!(
            error_chain(&error),
            "spool at /var/lib/spoke: No such file or directory"
        );
    }
}
