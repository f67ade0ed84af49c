//! The channel as feeds people subscribe to: Atom 1.0 and RSS 2.0, one entry per release, with
//! the version, date, image, artifact sizes and hashes, root hash, package changelog and notes.

use crate::{Metadata, Release, Timestamp};

/// XML text/attribute escaping.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 && !matches!(c, '\n' | '\t' | '\r') => {}
            c => out.push(c),
        }
    }
    out
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// RFC 822 date for RSS ("Sun, 22 Nov 2026 03:00:00 +0000").
pub fn rfc822(t: Timestamp) -> String {
    let days = (t.0 / 86_400) as i64;
    let secs = t.0 % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let wd = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    let mon = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"][(m - 1) as usize];
    format!("{wd}, {d:02} {mon} {y} {:02}:{:02}:{:02} +0000", secs / 3600, secs % 3600 / 60, secs % 60)
}

fn title(r: &Release) -> String {
    format!("{} {} for {}", r.profile, r.version, r.image)
}

/// The release as an HTML fragment (escaped again when put into the feed).
fn html(r: &Release) -> String {
    let mut h = format!(
        "<p>{} {} for <b>{}</b> ({}), published {}.</p>",
        xml_escape(&r.profile),
        xml_escape(r.version.as_str()),
        xml_escape(&r.image),
        xml_escape(&r.arch),
        r.published
    );
    if !r.notes.is_empty() {
        h.push_str(&format!("<p>{}</p>", xml_escape(&r.notes)));
    }
    h.push_str("<ul>");
    for a in &r.artifacts {
        h.push_str(&format!(
            "<li>{} ({}, {}): sha256 <code>{}</code></li>",
            xml_escape(&a.name),
            xml_escape(&format!("{:?}", a.kind).to_lowercase()),
            mib(a.size),
            xml_escape(&a.sha256)
        ));
    }
    h.push_str(&format!("</ul><p>dm-verity root hash <code>{}</code></p>", xml_escape(&r.root_hash)));
    if r.changelog.is_empty() {
        h.push_str("<p>No package changes.</p>");
    } else {
        h.push_str(&format!("<p>{} package change(s):</p><ul>", r.changelog.len()));
        for c in &r.changelog {
            h.push_str(&format!("<li>{}</li>", xml_escape(&c.to_string())));
        }
        h.push_str("</ul>");
    }
    h
}

/// Atom 1.0. `base_url` is where the channel's files are published (ends with '/').
pub fn atom(meta: &Metadata, base_url: &str, feed_title: &str) -> String {
    let base = xml_escape(base_url);
    let ch = xml_escape(&meta.channel);
    let updated = meta.releases.first().map(|r| r.published).unwrap_or(meta.generated);
    let mut x =
        String::from("<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<feed xmlns=\"http://www.w3.org/2005/Atom\">\n");
    x.push_str(&format!(
        "  <id>{base}{ch}.atom</id>\n  <title>{}</title>\n  <updated>{updated}</updated>\n",
        xml_escape(feed_title)
    ));
    x.push_str(&format!("  <link rel=\"self\" type=\"application/atom+xml\" href=\"{base}{ch}.atom\"/>\n"));
    x.push_str(&format!("  <link rel=\"alternate\" type=\"application/json\" href=\"{base}{ch}.json\"/>\n"));
    x.push_str("  <author><name>kiln publish</name></author>\n  <generator>kiln</generator>\n");
    for r in &meta.releases {
        let id = format!(
            "{base}{ch}.json#{}-{}-{}",
            xml_escape(&r.profile),
            xml_escape(&r.image),
            xml_escape(r.version.as_str())
        );
        x.push_str("  <entry>\n");
        x.push_str(&format!("    <id>{id}</id>\n    <title>{}</title>\n", xml_escape(&title(r))));
        x.push_str(&format!("    <published>{}</published>\n    <updated>{}</updated>\n", r.published, r.published));
        x.push_str(&format!("    <link rel=\"alternate\" type=\"application/json\" href=\"{base}{ch}.json\"/>\n"));
        x.push_str(&format!("    <content type=\"html\">{}</content>\n", xml_escape(&html(r))));
        x.push_str("  </entry>\n");
    }
    x.push_str("</feed>\n");
    x
}

/// RSS 2.0.
pub fn rss(meta: &Metadata, base_url: &str, feed_title: &str) -> String {
    let base = xml_escape(base_url);
    let ch = xml_escape(&meta.channel);
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<rss version=\"2.0\">\n<channel>\n");
    x.push_str(&format!("  <title>{}</title>\n  <link>{base}{ch}.rss</link>\n", xml_escape(feed_title)));
    x.push_str(&format!(
        "  <description>Releases of the {ch} channel, signed metadata at {base}{ch}.json</description>\n"
    ));
    x.push_str(&format!(
        "  <lastBuildDate>{}</lastBuildDate>\n  <generator>kiln</generator>\n",
        rfc822(meta.generated)
    ));
    for r in &meta.releases {
        x.push_str("  <item>\n");
        x.push_str(&format!("    <title>{}</title>\n    <link>{base}{ch}.json</link>\n", xml_escape(&title(r))));
        x.push_str(&format!(
            "    <guid isPermaLink=\"false\">{}-{}-{}</guid>\n",
            xml_escape(&r.profile),
            xml_escape(&r.image),
            xml_escape(r.version.as_str())
        ));
        x.push_str(&format!("    <pubDate>{}</pubDate>\n", rfc822(r.published)));
        x.push_str(&format!("    <description>{}</description>\n", xml_escape(&html(r))));
        x.push_str("  </item>\n");
    }
    x.push_str("</channel>\n</rss>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_escaping() {
        assert_eq!(rfc822(Timestamp(1795316400)), "Sun, 22 Nov 2026 03:00:00 +0000");
        assert_eq!(rfc822(Timestamp(0)), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc822(Timestamp(951782400)), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(xml_escape("a<b & \"c\"\u{1}"), "a&lt;b &amp; &quot;c&quot;");
    }
}
