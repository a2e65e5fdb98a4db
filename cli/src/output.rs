//! Small formatting helpers shared by the commands.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// RFC 3339, UTC, seconds.
pub(crate) fn when(t: SystemTime) -> String {
    sigil_identity::x509::rfc3339(sigil_identity::clock::unix_seconds(t))
}

/// "in 59m12s" / "3m ago".
pub(crate) fn relative(t: SystemTime) -> String {
    let now = SystemTime::now();
    match t.duration_since(now) {
        Ok(d) => format!("in {}", short(d)),
        Err(e) => format!("{} ago", short(e.duration())),
    }
}

fn short(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

/// One line describing a certificate: subject or SPIFFE ID, serial, validity.
pub(crate) fn cert_line(der: &[u8]) -> String {
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, c)) => {
            let subject = c.subject().to_string();
            let who = if subject.is_empty() {
                "(empty subject)".to_owned()
            } else {
                subject
            };
            let na =
                UNIX_EPOCH + Duration::from_secs(c.validity().not_after.timestamp().max(0) as u64);
            format!(
                "{who}, serial {}, expires {} ({})",
                c.raw_serial_as_string(),
                when(na),
                relative(na)
            )
        }
        Err(e) => format!("(unparseable certificate: {e})"),
    }
}
