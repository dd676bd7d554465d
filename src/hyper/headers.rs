//! What a response says about its connection once this process is finishing.

use ::hyper::header::{HeaderValue, CONNECTION};
use ::hyper::{Response, StatusCode, Version};

/// Makes `response` the last one on its HTTP/1.x connection: exactly one `close` token in exactly one
/// `Connection` header, no `keep-alive` token and no `Keep-Alive` header. hyper then closes the connection once
/// the response is written.
///
/// For an HTTP/1.0 request the response's version becomes HTTP/1.0 too. hyper appends `keep-alive` to a
/// response's `Connection` header when it believes an HTTP/1.0 client wants keep-alive and the response is
/// HTTP/1.1 (the default of every response built by axum or by hand): a client that reads `close, keep-alive`
/// (ApacheBench does) keeps sending on a connection the server closes. With an HTTP/1.0 response hyper turns
/// keep-alive off instead.
///
/// HTTP/2 and later responses are left alone: connection-specific headers are forbidden there, and their
/// connections are closed with GOAWAY. A `101 Switching Protocols` response is left alone: the connection
/// becomes the application's (it stays tracked until it ends).
pub(crate) fn close_after<B>(request: Version, response: &mut Response<B>) {
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        return;
    }
    if !matches!(
        request,
        Version::HTTP_09 | Version::HTTP_10 | Version::HTTP_11
    ) {
        return;
    }
    let headers = response.headers_mut();
    // Other tokens name hop-by-hop headers of this response; they stay, after `close`.
    let mut value = String::from("close");
    for v in headers.get_all(CONNECTION) {
        for token in v.to_str().unwrap_or("").split(',').map(str::trim) {
            if token.is_empty()
                || token.eq_ignore_ascii_case("close")
                || token.eq_ignore_ascii_case("keep-alive")
            {
                continue;
            }
            value.push_str(", ");
            value.push_str(token);
        }
    }
    headers.remove(CONNECTION);
    headers.remove("keep-alive");
    let value = HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("close"));
    headers.insert(CONNECTION, value);
    if request != Version::HTTP_11 {
        *response.version_mut() = Version::HTTP_10;
    }
}

/// Whether `response` closes its connection (a `close` token in a `Connection` header).
pub(crate) fn says_close<B>(response: &Response<B>) -> bool {
    response.headers().get_all(CONNECTION).iter().any(|v| {
        v.to_str()
            .unwrap_or("")
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("close"))
    })
}

/// Makes `response` keep its HTTP/1.x connection open for the client, explicitly: the connection moves to
/// the new process after it, and hyper, told to end the connection here, would otherwise leave an HTTP/1.0
/// client's response without the `keep-alive` it needs to keep the connection (HTTP/1.1 keeps it by
/// default).
pub(crate) fn keep_open<B>(request: Version, response: &mut Response<B>) {
    if request != Version::HTTP_10 {
        return;
    }
    let headers = response.headers_mut();
    let has = headers.get_all(CONNECTION).iter().any(|v| {
        v.to_str()
            .unwrap_or("")
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("keep-alive"))
    });
    if !has {
        headers.append(CONNECTION, HeaderValue::from_static("keep-alive"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection(r: &Response<()>) -> Vec<String> {
        r.headers()
            .get_all(CONNECTION)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn one_close_replaces_every_keep_alive_token() {
        for (given, expected) in [
            (vec![], "close"),
            (vec!["keep-alive"], "close"),
            (vec!["Keep-Alive"], "close"),
            (vec!["close"], "close"),
            (vec!["close, keep-alive"], "close"),
            (vec!["keep-alive", "close"], "close"),
            (vec!["KEEP-ALIVE, x-trace"], "close, x-trace"),
            (vec!["x-a", "keep-alive, x-b"], "close, x-a, x-b"),
            (vec![" , ,"], "close"),
        ] {
            for version in [Version::HTTP_10, Version::HTTP_11] {
                let mut r = Response::new(());
                for g in &given {
                    r.headers_mut()
                        .append(CONNECTION, HeaderValue::from_static(g));
                }
                r.headers_mut()
                    .insert("keep-alive", HeaderValue::from_static("timeout=5"));
                close_after(version, &mut r);
                assert_eq!(connection(&r), vec![expected], "{given:?} {version:?}");
                assert!(r.headers().get("keep-alive").is_none());
                let want = if version == Version::HTTP_11 {
                    Version::HTTP_11
                } else {
                    Version::HTTP_10
                };
                assert_eq!(r.version(), want);
            }
        }
    }

    #[test]
    fn http2_and_switching_protocols_are_left_alone() {
        let mut r = Response::new(());
        close_after(Version::HTTP_2, &mut r);
        assert!(connection(&r).is_empty());
        let mut r = Response::new(());
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("upgrade"));
        close_after(Version::HTTP_11, &mut r);
        assert_eq!(connection(&r), vec!["upgrade"]);
    }
}
