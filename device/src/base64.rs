//! Standard base64 (RFC 4648, `+` and `/`), decoding only: certificates in PEM (the agent's
//! TLS expiry watcher) and OpenSSH public keys (`kiln flash --provision`'s check).

/// Decodes `s`, ignoring ASCII whitespace (PEM wraps lines) and up to two trailing `=`.
/// None for any other character.
pub fn decode(s: &str) -> Option<Vec<u8>> {
    let bytes: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let data = bytes.strip_suffix(b"==").or_else(|| bytes.strip_suffix(b"=")).unwrap_or(&bytes);
    let mut out = Vec::with_capacity(data.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in data {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::decode;

    #[test]
    fn decodes_padded_wrapped_and_refuses_other_characters() {
        assert_eq!(decode("a2lsbg==").unwrap(), b"kiln");
        assert_eq!(decode("a2ls\nbi1h\r\nZ2VudA==").unwrap(), b"kiln-agent");
        assert_eq!(decode("a2lsbi0").unwrap(), b"kiln-");
        assert_eq!(decode("").unwrap(), b"");
        assert!(decode("a2l!").is_none());
        assert!(decode("a2lsbg===").is_none());
        assert!(decode("a2-_").is_none(), "base64url is not this alphabet");
    }
}
