//! Which local topics are replicated: `include` minus `exclude`, each an exact name or a regex
//! anchored at both ends. Kafka-internal topics (`__consumer_offsets`, ...) are never selected.

use regex::Regex;

#[derive(Debug, Clone)]
pub struct TopicSelector {
    include: Vec<Regex>,
    exclude: Vec<Regex>,
}

impl TopicSelector {
    /// On error returns the offending config key and the reason.
    pub fn new(include: &[String], exclude: &[String]) -> Result<Self, (&'static str, String)> {
        let compile = |key: &'static str, patterns: &[String]| {
            patterns
                .iter()
                .map(|p| {
                    Regex::new(&format!("^(?:{p})$"))
                        .map_err(|e| (key, format!("pattern {p:?}: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Self {
            include: compile("source.include", include)?,
            exclude: compile("source.exclude", exclude)?,
        })
    }

    pub fn selects(&self, topic: &str) -> bool {
        !topic.starts_with("__")
            && self.include.iter().any(|p| p.is_match(topic))
            && !self.exclude.iter().any(|p| p.is_match(topic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_minus_exclude_anchored() {
        let s = TopicSelector::new(
            &["orders".into(), "telemetry\\..*".into()],
            &["telemetry\\.debug".into()],
        )
        .expect("valid");
        assert!(s.selects("orders"));
        assert!(s.selects("telemetry.cpu"));
        assert!(!s.selects("telemetry.debug"));
        assert!(!s.selects("orders-archive"), "anchored at the end");
        assert!(!s.selects("old-orders"), "anchored at the start");
        assert!(!s.selects("telemetry"));
    }

    #[test]
    fn internal_topics_are_never_selected() {
        let s = TopicSelector::new(&[".*".into()], &[]).expect("valid");
        assert!(s.selects("a"));
        assert!(!s.selects("__consumer_offsets"));
    }
}
