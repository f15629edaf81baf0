//! `spoke-agent check` beyond the configuration: a QUIC handshake with each relay as the
//! shipper makes it, so that both certificate chains are verified (the relay's against
//! `relay.ca` and `relay.server_name`, this site's by the relay) before the service runs.

use std::time::Duration;

use spoke_kafka::check::Verdict;

use crate::config::Endpoint;

/// How long the relay has, after the handshake, to refuse this site's certificate: it judges
/// it once the handshake is done on its side, and says so by closing the connection.
const REFUSAL_WAIT: Duration = Duration::from_millis(500);

pub async fn relay(endpoint: &Endpoint, client: &quinn::ClientConfig) -> Verdict {
    let subject = format!("relay {}", endpoint.address);
    let (mut v4, mut v6) = (None, None);
    let connection = match crate::ship::connect(endpoint, client, &mut v4, &mut v6).await {
        Ok(connection) => connection,
        Err(error) => return refused(subject, &error.to_string(), endpoint),
    };
    tokio::time::sleep(REFUSAL_WAIT).await;
    if let Some(reason) = connection.close_reason() {
        return refused(subject, &reason.to_string(), endpoint);
    }
    connection.close(0u32.into(), b"check");
    Verdict::ok(
        subject,
        format!(
            "QUIC handshake done: the relay's certificate verifies against relay.ca for {}, \
             and the relay took this site's",
            endpoint.server_name
        ),
    )
}

fn refused(subject: String, said: &str, endpoint: &Endpoint) -> Verdict {
    let has = |needle: &str| said.contains(needle);
    if has("UnknownIssuer") || has("BadSignature") {
        Verdict::failed(
            subject,
            "the relay's certificate is not signed by the CA in relay.ca",
            "set relay.ca to the CA that signed the relay's certificate (ca.pem of spoke-relay \
             pki init)",
        )
    } else if has("Expired") {
        Verdict::failed(
            subject,
            "the relay's certificate has expired",
            "renew the relay's certificate (and check this host's clock)",
        )
    } else if has("NotValidForName") {
        Verdict::failed(
            subject,
            format!(
                "the relay's certificate does not name {}",
                endpoint.server_name
            ),
            "set relay.server_name to a name the relay's certificate holds",
        )
    } else if has("timed out") {
        Verdict::failed(
            subject,
            "no answer to the QUIC handshake",
            "check relay.endpoints, that the relay runs, and that UDP to it is not blocked",
        )
    } else {
        Verdict::failed(
            subject,
            format!("the handshake failed: {said}"),
            "check that this site's certificate comes from the relay's CA (spoke-relay pki \
             issue), is current, and is not on the relay's deny list",
        )
    }
}
