//! Just enough X.509 to read when a certificate expires: PEM -> DER -> tbsCertificate ->
//! validity -> notAfter. Every length is checked against what is left; anything unexpected is
//! `None` (the monitor then names the file it could not read).

use kiln_feed::Timestamp;

/// The notAfter of the first certificate in a PEM text.
pub fn not_after_pem(pem: &str) -> Option<Timestamp> {
    let body: String = pem
        .lines()
        .skip_while(|l| l.trim() != "-----BEGIN CERTIFICATE-----")
        .skip(1)
        .take_while(|l| l.trim() != "-----END CERTIFICATE-----")
        .collect();
    not_after_der(&kiln_device::base64::decode(body.trim())?)
}

/// One DER element: (tag, contents, the rest after it).
fn element(d: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = d.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        (rest[..n].iter().fold(0usize, |a, &b| (a << 8) | b as usize), &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

fn not_after_der(der: &[u8]) -> Option<Timestamp> {
    let (0x30, cert, _) = element(der)? else { return None };
    let (0x30, tbs, _) = element(cert)? else { return None };
    let mut rest = tbs;
    // [0] version, optional.
    if rest.first() == Some(&0xa0) {
        rest = element(rest)?.2;
    }
    let (_serial, _, rest) = element(rest)?;
    let (_signature, _, rest) = element(rest)?;
    let (_issuer, _, rest) = element(rest)?;
    let (0x30, validity, _) = element(rest)? else { return None };
    let (_, _, after) = element(validity)?;
    let (tag, time, _) = element(after)?;
    parse_time(tag, std::str::from_utf8(time).ok()?)
}

/// UTCTime (YYMMDDHHMMSSZ, years 1950-2049) or GeneralizedTime (YYYYMMDDHHMMSSZ); digits only,
/// years from 1970.
fn parse_time(tag: u8, s: &str) -> Option<Timestamp> {
    let s = s.strip_suffix('Z')?;
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (year, rest): (u64, &str) = match (tag, s.len()) {
        (0x17, 12) => {
            let yy: u64 = s[..2].parse().ok()?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &s[2..])
        }
        (0x18, 14) => (s[..4].parse().ok()?, &s[4..]),
        _ => return None,
    };
    let n = |i: usize| rest.get(i..i + 2)?.parse::<u64>().ok();
    let (month, day, h, m, sec) = (n(0)?, n(2)?, n(4)?, n(6)?, n(8)?);
    if year < 1970 || !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm); year >= 1970, so nothing underflows.
    let (y, mo) = if month <= 2 { (year - 1, month + 9) } else { (year, month - 3) };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * mo + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    Some(Timestamp(days * 86400 + h * 3600 + m * 60 + sec))
}

#[cfg(test)]
mod tests {
    use super::*;

    // `openssl req -x509 -newkey ec ... -days 30 -subj /CN=a.example`: notAfter=Jan  5 06:08:26 2027 GMT (UTCTime).
    const SHORT: &str = "-----BEGIN CERTIFICATE-----
MIIBfTCCASOgAwIBAgIUTbopQ1uIH4Z5GvLMrQdASPAtiQcwCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJYS5leGFtcGxlMB4XDTI2MTIwNjA2MDgyNloXDTI3MDEwNTA2
MDgyNlowFDESMBAGA1UEAwwJYS5leGFtcGxlMFkwEwYHKoZIzj0CAQYIKoZIzj0D
AQcDQgAEwJDcCJsEFtd+FXaYM86bbzpp7gAc0/5NM8XuPa3aCAHXdjRBbEMeorv9
1uDK/rSBMbD8HUHzBiC7YeZPJ8FijqNTMFEwHQYDVR0OBBYEFJt8tU6OpgLaNE8e
dPqWHCXswMGjMB8GA1UdIwQYMBaAFJt8tU6OpgLaNE8edPqWHCXswMGjMA8GA1Ud
EwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDSAAwRQIgOG+6PS5f7mdQRaPy2M/TUWkR
isJ01MCVStQhwsje2VsCIQCC3rkFRrTnPq6qrbdgW4QoVd2NJqdJA6vrBNPYafWl
DQ==
-----END CERTIFICATE-----
";
    // -days 40000: notAfter=Jun 12 06:08:26 2136 GMT (GeneralizedTime).
    const LONG: &str = "junk before
-----BEGIN CERTIFICATE-----
MIIBfjCCASWgAwIBAgIUL1B2Pxnym2+hlK8pJuvk484534swCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJYi5leGFtcGxlMCAXDTI2MTIwNjA2MDgyNloYDzIxMzYwNjEy
MDYwODI2WjAUMRIwEAYDVQQDDAliLmV4YW1wbGUwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAAT37UadMLTrYGZeTxrTADwE/FHidE3h9HKuj/ic4GnWoPRolExMw/+C
EcN+1i1LbB9RucFZGQnXBhG3A/imo8xno1MwUTAdBgNVHQ4EFgQUr9ZH68oO4FSS
MU+p3r++jQaxeR8wHwYDVR0jBBgwFoAUr9ZH68oO4FSSMU+p3r++jQaxeR8wDwYD
VR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNHADBEAiBzyi6ZFYRpvRWZHYnY2JTh
j5Bk1IZ6rIfWReAM1WFWVQIgLonrr/sdorSIZWGEDE4wqh600ZsFXAmkpvvdLalL
7A0=
-----END CERTIFICATE-----
";

    #[test]
    fn reads_not_after_from_openssl_certificates() {
        assert_eq!(not_after_pem(SHORT).unwrap().to_string(), "2027-01-05T06:08:26Z");
        assert_eq!(not_after_pem(LONG).unwrap().to_string(), "2136-06-12T06:08:26Z");
    }

    #[test]
    fn anything_else_is_none() {
        assert_eq!(not_after_pem(""), None);
        assert_eq!(not_after_pem("-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----"), None);
        // Truncated DER: every length is checked.
        let cut: String = SHORT.lines().take(4).chain(["-----END CERTIFICATE-----"]).collect::<Vec<_>>().join("\n");
        assert_eq!(not_after_pem(&cut), None);
        assert_eq!(parse_time(0x17, "271305000000Z"), None);
        // Hostile times: non-ASCII where digits belong, years before 1970 or 0000.
        assert_eq!(parse_time(0x17, "1\u{e9}000000000Z"), None);
        assert_eq!(parse_time(0x18, "00000115000000Z"), None);
        assert_eq!(parse_time(0x18, "19690101000000Z"), None);
        assert_eq!(parse_time(0x18, "+1970101000000Z"), None);
        assert_eq!(parse_time(0x18, "19700101000000Z"), Some(Timestamp(0)));
    }
}
