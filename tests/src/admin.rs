//! Reading spoke's admin endpoints the way Prometheus and operators do.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{bail, Context};

/// GET `path` from `address`; returns (status code, body).
pub fn get(address: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(address)
        .with_context(|| format!("connecting to {address}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status code")?;
    Ok((code, body.to_owned()))
}

/// A Prometheus text scrape: series (`name{labels}`) → value.
pub fn scrape(address: &str) -> anyhow::Result<BTreeMap<String, f64>> {
    let (code, body) = get(address, "/metrics")?;
    if code != 200 {
        bail!("/metrics answered {code}: {body}");
    }
    let mut series = BTreeMap::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (name, value) = line.rsplit_once(' ').context("metric line without value")?;
        series.insert(
            name.to_owned(),
            value
                .parse::<f64>()
                .with_context(|| format!("value of {name}"))?,
        );
    }
    Ok(series)
}

/// Sum of every series of metric `name` whose labels contain all of `labels` (`k="v"`).
pub fn sum(series: &BTreeMap<String, f64>, name: &str, labels: &[&str]) -> f64 {
    series
        .iter()
        .filter(|(k, _)| {
            let metric = k.split('{').next().unwrap_or_default();
            metric == name && labels.iter().all(|l| k.contains(l))
        })
        .map(|(_, v)| v)
        .sum()
}

/// Metric names (without labels) present in a scrape.
pub fn names(series: &BTreeMap<String, f64>) -> Vec<String> {
    let mut names: Vec<String> = series
        .keys()
        .map(|k| k.split('{').next().unwrap_or_default().to_owned())
        .collect();
    names.dedup();
    names
}
