//! Plain HTTP/1.1 GETs on loopback, for health and `/metrics` endpoints, and reading
//! one value out of Prometheus text.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET path` on `addr` with `Connection: close`: (status, body), or `None` when nothing
/// answered.
pub async fn get(addr: impl tokio::net::ToSocketAddrs, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// The body of `GET path` on `addr` if it answered 200.
pub async fn get_ok(addr: impl tokio::net::ToSocketAddrs, path: &str) -> Option<String> {
    get(addr, path)
        .await
        .and_then(|(status, body)| (status == 200).then_some(body))
}

/// The value of the unlabelled sample `name` in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::metric;

    #[test]
    fn metric_reads_only_the_exact_unlabelled_sample() {
        let text = "# HELP x_total X\nx_total_other 7\nx_total{a=\"b\"} 3\nx_total 42\n";
        assert_eq!(metric(text, "x_total"), Some(42.0));
        assert_eq!(metric(text, "x"), None);
        assert_eq!(metric(text, "y_total"), None);
    }
}
