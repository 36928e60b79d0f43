//! SASL PLAIN (RFC 4616) and LOGIN decoding for AUTH.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

/// Why a SASL response was refused: the text of a `501 5.5.2` reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SaslError {
    #[error("invalid base64 in SASL response")]
    Base64,
    #[error("malformed PLAIN response")]
    Plain,
    #[error("SASL response is not UTF-8")]
    Utf8,
}

/// Decodes one base64 response line (an empty line is an empty response;
/// the `=` of an empty *initial* response is the session's business).
pub fn decode(line: &str) -> Result<Vec<u8>, SaslError> {
    STANDARD.decode(line.trim()).map_err(|_| SaslError::Base64)
}

/// Decodes a base64 line into UTF-8 text (LOGIN's username and password).
pub fn decode_text(line: &str) -> Result<String, SaslError> {
    String::from_utf8(decode(line)?).map_err(|_| SaslError::Utf8)
}

/// Splits a decoded PLAIN response `authzid NUL authcid NUL passwd`.
pub fn parse_plain(decoded: &[u8]) -> Result<(String, String, String), SaslError> {
    let mut parts = decoded.split(|b| *b == 0);
    let (Some(authz), Some(user), Some(pass), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslError::Plain);
    };
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| SaslError::Utf8);
    if user.is_empty() {
        return Err(SaslError::Plain);
    }
    Ok((text(authz)?, text(user)?, text(pass)?))
}

/// Base64 of a server challenge (LOGIN's `Username:` and `Password:`).
pub fn encode(text: &str) -> String {
    STANDARD.encode(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_splits_three_fields() {
        let d = decode(&STANDARD.encode(b"\0scanner\0s3cret")).unwrap();
        assert_eq!(
            parse_plain(&d).unwrap(),
            ("".into(), "scanner".into(), "s3cret".into())
        );
    }

    #[test]
    fn plain_refuses_missing_fields_and_bad_base64() {
        assert_eq!(parse_plain(b"scanner\0pw"), Err(SaslError::Plain));
        assert_eq!(parse_plain(b"\0\0pw"), Err(SaslError::Plain));
        assert_eq!(decode("***"), Err(SaslError::Base64));
        assert_eq!(decode(""), Ok(Vec::new()));
        assert_eq!(parse_plain(&decode("").unwrap()), Err(SaslError::Plain));
    }
}
