//! deb822, the format of Debian's control data: Packages and Release indexes, apt's
//! `.sources` files, DEP-5 copyright files. The one parser kiln has for it.

/// One field of a deb822 paragraph: the value is the text after the colon, including any
/// continuation lines (joined by their newlines), trimmed.
#[derive(Debug)]
pub struct Field<'a> {
    pub name: &'a str,
    pub value: &'a str,
}

/// One paragraph, borrowing from the file's text.
#[derive(Debug)]
pub struct Paragraph<'a> {
    /// 1-based line of the paragraph's first field.
    pub line: usize,
    pub fields: Vec<Field<'a>>,
}

impl<'a> Paragraph<'a> {
    /// The first field of that name (field names are case-insensitive).
    pub fn get(&self, name: &str) -> Option<&'a str> {
        self.fields.iter().find(|f| f.name.eq_ignore_ascii_case(name)).map(|f| f.value)
    }
}

/// A deb822 syntax error: the paragraph it is in and what is wrong (naming the line).
#[derive(Debug)]
pub struct SyntaxError {
    pub paragraph_line: usize,
    pub problem: String,
}

/// Splits deb822 text into paragraphs (separated by blank lines); continuation lines start
/// with a space or tab; lines starting with `#` are comments. Values borrow from `text`.
pub fn paragraphs(text: &str) -> Result<Vec<Paragraph<'_>>, SyntaxError> {
    parse(text, true)
}

/// As [`paragraphs`], for files written by hand that other tools read forgivingly (DEP-5
/// copyright files): a line that is neither a field nor a continuation is skipped.
pub fn paragraphs_lenient(text: &str) -> Vec<Paragraph<'_>> {
    parse(text, false).unwrap_or_default()
}

fn parse(text: &str, strict: bool) -> Result<Vec<Paragraph<'_>>, SyntaxError> {
    let mut out = Vec::new();
    let mut current: Option<Paragraph<'_>> = None;
    // Byte range of the value of the field being read: (start, end) in `text`.
    let mut value_range: Option<(usize, usize)> = None;
    let mut offset = 0;
    for (n, raw) in text.split_inclusive('\n').enumerate() {
        let line_no = n + 1;
        let start = offset;
        offset += raw.len();
        let line = raw.trim_end_matches(['\n', '\r']);
        let end = start + line.len();
        if line.trim().is_empty() {
            close_field(text, &mut current, &mut value_range);
            out.extend(current.take());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            match (&current, &mut value_range) {
                (Some(_), Some((_, value_end))) => *value_end = end,
                _ if !strict => {}
                _ => {
                    return Err(SyntaxError {
                        paragraph_line: current.as_ref().map_or(line_no, |p| p.line),
                        problem: format!("line {line_no}: continuation line before any field"),
                    })
                }
            }
            continue;
        }
        let Some(colon) = line.find(':').filter(|&c| c > 0) else {
            if !strict {
                // Ends the field before it; continuation lines after it are skipped too.
                close_field(text, &mut current, &mut value_range);
                continue;
            }
            return Err(SyntaxError {
                paragraph_line: current.as_ref().map_or(line_no, |p| p.line),
                problem: format!("line {line_no}: expected \"Field: value\", found {line:?}"),
            });
        };
        close_field(text, &mut current, &mut value_range);
        let paragraph = current.get_or_insert_with(|| Paragraph { line: line_no, fields: Vec::new() });
        paragraph.fields.push(Field { name: line[..colon].trim(), value: "" });
        value_range = Some((start + colon + 1, end));
    }
    close_field(text, &mut current, &mut value_range);
    out.extend(current);
    Ok(out)
}

/// Sets the value of the paragraph's last field from its byte range in `text`.
fn close_field<'a>(text: &'a str, paragraph: &mut Option<Paragraph<'a>>, range: &mut Option<(usize, usize)>) {
    if let (Some(p), Some((start, end))) = (paragraph.as_mut(), range.take()) {
        if let Some(f) = p.fields.last_mut() {
            f.value = text[start..end].trim();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_continuations_and_comments() {
        let text = "# a comment\nTypes: deb\nURIs: http://a.example/debian\n  http://b.example/debian\n# inside\nSuites: trixie\n\n\nPackage: x\n";
        let p = paragraphs(text).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].line, 2);
        assert_eq!(p[0].get("uris"), Some("http://a.example/debian\n  http://b.example/debian"));
        assert_eq!(p[0].get("SUITES"), Some("trixie"));
        assert_eq!((p[1].line, p[1].get("Package")), (9, Some("x")));
    }

    #[test]
    fn strict_refuses_what_lenient_skips() {
        let text = "Format: x\nnot a field\n stray\nLicense: MIT\n";
        let e = paragraphs(text).unwrap_err();
        assert_eq!(
            (e.paragraph_line, e.problem.as_str()),
            (1, "line 2: expected \"Field: value\", found \"not a field\"")
        );
        let p = paragraphs_lenient(text);
        assert_eq!(p[0].get("License"), Some("MIT"));
        assert_eq!(p[0].get("Format"), Some("x"));
        assert!(paragraphs(" leading\n").unwrap_err().problem.contains("continuation line before any field"));
    }
}
