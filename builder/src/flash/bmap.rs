//! Block maps of sparse disk images, in bmap-tools' XML format version 2.0: which 4 KiB blocks
//! of an image must be written to a device, with a sha256 per range of blocks.
//!
//! The build makes one next to every `disk.img` ([`default_path`]: `disk.img.bmap`); `kiln
//! flash` writes only the mapped blocks and verifies them, and `bmaptool copy` accepts the same
//! file. The format is the one `bmaptool create` writes:
//!
//! ```text
//! <?xml version="1.0" ?>
//! <bmap version="2.0">
//!     <ImageSize> 67108864 </ImageSize>          bytes
//!     <BlockSize> 4096 </BlockSize>
//!     <BlocksCount> 16384 </BlocksCount>         ceil(ImageSize / BlockSize)
//!     <MappedBlocksCount> 2050 </MappedBlocksCount>
//!     <ChecksumType> sha256 </ChecksumType>
//!     <BmapFileChecksum> … </BmapFileChecksum>
//!     <BlockMap>
//!         <Range chksum="…"> 0-1 </Range>        inclusive block numbers, or one block
//!         <Range chksum="…"> 2304 </Range>
//!     </BlockMap>
//! </bmap>
//! ```
//!
//! A range's `chksum` is the sha256 of its bytes in the image (the last block only up to
//! ImageSize). `BmapFileChecksum` is the sha256 of the whole file as it reads with that
//! checksum's 64 hex digits replaced by 64 ASCII `0`s (bmap-tools finds the first occurrence of
//! the stored value, zeroes it, and hashes the file).
//!
//! Data ranges are found with `SEEK_DATA`/`SEEK_HOLE`, so holes cost nothing; ranges the caller
//! says must be written even though they read as zeros (the head of every partition, so that a
//! stale filesystem on a reused SD card does not survive) are added to the map.

use crate::units::Sha256;
use sha2::Digest;
use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The block size kiln's maps use (bmap-tools' too, on every common filesystem).
pub const BLOCK_SIZE: u64 = 4096;
/// The only format version kiln writes; it reads 2.x (and 1.4, which is the same format).
pub const VERSION: &str = "2.0";
const ZERO_CHECKSUM: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// The buffer size for hashing ranges.
const CHUNK: usize = 4 << 20;

/// A run of mapped blocks, `first..=last`, and the sha256 of its bytes in the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockRange {
    pub first: u64,
    /// Inclusive, as the XML writes it.
    pub last: u64,
    pub sha256: Sha256,
}

impl BlockRange {
    pub fn blocks(&self) -> u64 {
        self.last - self.first + 1
    }
}

impl fmt::Display for BlockRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "block {}", self.first)
        } else {
            write!(f, "blocks {}-{}", self.first, self.last)
        }
    }
}

/// The block map of one image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bmap {
    pub image_size: u64,
    pub block_size: u64,
    /// Sorted, non-overlapping, not adjacent when made by [`create`].
    pub ranges: Vec<BlockRange>,
}

#[derive(Debug, thiserror::Error)]
pub enum BmapError {
    #[error("{}: {what}: {source}", path.display())]
    Io { path: PathBuf, what: &'static str, source: std::io::Error },
    #[error("{}: the image is empty: there is nothing to map", path.display())]
    EmptyImage { path: PathBuf },
    #[error("{}: the range to write at byte {offset} (+{len}) lies outside the image ({size} bytes)", path.display())]
    OutsideImage { path: PathBuf, offset: u64, len: u64, size: u64 },
    #[error("{}:{line}: {msg}", path.display())]
    Syntax { path: PathBuf, line: usize, msg: String },
    #[error("{}: {msg}", path.display())]
    Invalid { path: PathBuf, msg: String },
    #[error("{}: the file's checksum is {computed} but its BmapFileChecksum says {stored}: the bmap was changed after it was made; make it again from the image", path.display())]
    FileChecksum { path: PathBuf, computed: String, stored: String },
}

/// Where the map of `image` lives by default: next to it, with `.bmap` appended
/// (`disk.img` -> `disk.img.bmap`), as `bmaptool copy` looks for it.
pub fn default_path(image: &Path) -> PathBuf {
    let mut name = image.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".bmap");
    image.with_file_name(name)
}

/// Maps `image`: its data ranges (`SEEK_DATA`/`SEEK_HOLE`) plus `must_write`, given as
/// `(offset, length)` in bytes, which are written even where the image holds zeros (a hole).
/// Ranges are rounded out to whole blocks, merged, and hashed.
pub fn create(image: &Path, must_write: &[(u64, u64)]) -> Result<Bmap, BmapError> {
    let io = |what: &'static str| move |source| BmapError::Io { path: image.to_path_buf(), what, source };
    let file = File::open(image).map_err(io("opening the image"))?;
    let size = file.metadata().map_err(io("reading the image's size"))?.len();
    if size == 0 {
        return Err(BmapError::EmptyImage { path: image.to_path_buf() });
    }
    let mut spans = data_ranges(&file, size).map_err(io("finding the image's data (SEEK_DATA)"))?;
    for &(offset, len) in must_write {
        if len == 0 {
            continue;
        }
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(BmapError::OutsideImage { path: image.to_path_buf(), offset, len, size });
        }
        spans.push((offset, offset + len));
    }
    let mut blocks: Vec<(u64, u64)> = spans.iter().map(|&(s, e)| (s / BLOCK_SIZE, (e - 1) / BLOCK_SIZE)).collect();
    blocks.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(blocks.len());
    for (first, last) in blocks {
        match merged.last_mut() {
            Some(prev) if first <= prev.1 + 1 => prev.1 = prev.1.max(last),
            _ => merged.push((first, last)),
        }
    }
    let mut buf = vec![0u8; CHUNK];
    let mut ranges = Vec::with_capacity(merged.len());
    for (first, last) in merged {
        let start = first * BLOCK_SIZE;
        let end = ((last + 1) * BLOCK_SIZE).min(size);
        let sha256 = hash_span(&file, start, end, &mut buf).map_err(io("reading the image"))?;
        ranges.push(BlockRange { first, last, sha256 });
    }
    Ok(Bmap { image_size: size, block_size: BLOCK_SIZE, ranges })
}

/// The byte spans of `file` that hold data, by `SEEK_DATA`/`SEEK_HOLE`; the whole file where
/// the filesystem cannot tell.
fn data_ranges(file: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use nix::errno::Errno;
    use nix::unistd::{lseek, Whence};
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match lseek(file, pos as i64, Whence::SeekData) {
            Ok(s) => s as u64,
            Err(Errno::ENXIO) => break,
            Err(Errno::EINVAL) if pos == 0 => return Ok(vec![(0, size)]),
            Err(e) => return Err(e.into()),
        };
        if start >= size {
            break;
        }
        let end = (lseek(file, start as i64, Whence::SeekHole)? as u64).min(size);
        if end > start {
            out.push((start, end));
        }
        pos = end.max(start + 1);
    }
    Ok(out)
}

fn hash_span(file: &File, start: u64, end: u64, buf: &mut [u8]) -> std::io::Result<Sha256> {
    let mut h = sha2::Sha256::new();
    let mut pos = start;
    while pos < end {
        let n = (end - pos).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], pos)?;
        h.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(Sha256(h.finalize().into()))
}

impl Bmap {
    /// Blocks in the image (the last one may be partial).
    pub fn blocks_count(&self) -> u64 {
        self.image_size.div_ceil(self.block_size)
    }

    pub fn mapped_blocks(&self) -> u64 {
        self.ranges.iter().map(BlockRange::blocks).sum()
    }

    /// Bytes to write: the mapped blocks, the last one only up to the image's end.
    pub fn mapped_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| self.bytes(r).end - self.bytes(r).start).sum()
    }

    /// The byte span of a range in the image.
    pub fn bytes(&self, r: &BlockRange) -> std::ops::Range<u64> {
        r.first * self.block_size..((r.last + 1) * self.block_size).min(self.image_size)
    }

    /// The XML text, with its BmapFileChecksum filled in.
    pub fn to_xml(&self) -> String {
        let mapped = self.mapped_blocks();
        let percent = mapped as f64 * 100.0 / self.blocks_count().max(1) as f64;
        let mut x = String::new();
        x.push_str("<?xml version=\"1.0\" ?>\n");
        x.push_str("<!-- The block map of a disk image, written by kiln in bmap-tools' format: the\n");
        x.push_str("     ranges of blocks that carry data (or must be written even though they hold\n");
        x.push_str("     zeros) and the sha256 of each. `kiln flash` and `bmaptool copy` write only\n");
        x.push_str("     these blocks and verify them. -->\n\n");
        x.push_str(&format!("<bmap version=\"{VERSION}\">\n"));
        x.push_str(&format!("    <!-- Image size in bytes: {} -->\n", human_size(self.image_size)));
        x.push_str(&format!("    <ImageSize> {} </ImageSize>\n\n", self.image_size));
        x.push_str("    <!-- Size of a block in bytes -->\n");
        x.push_str(&format!("    <BlockSize> {} </BlockSize>\n\n", self.block_size));
        x.push_str("    <!-- Count of blocks in the image file -->\n");
        x.push_str(&format!("    <BlocksCount> {} </BlocksCount>\n\n", self.blocks_count()));
        x.push_str(&format!(
            "    <!-- Count of mapped blocks: {} or {percent:.1}% -->\n",
            human_size(mapped * self.block_size)
        ));
        x.push_str(&format!("    <MappedBlocksCount> {mapped} </MappedBlocksCount>\n\n"));
        x.push_str("    <!-- Type of checksum used in this file -->\n");
        x.push_str("    <ChecksumType> sha256 </ChecksumType>\n\n");
        x.push_str("    <!-- The checksum of this bmap file. When it is calculated, the value of\n");
        x.push_str("         the checksum has be zero (all ASCII \"0\" symbols).  -->\n");
        x.push_str(&format!("    <BmapFileChecksum> {ZERO_CHECKSUM} </BmapFileChecksum>\n\n"));
        x.push_str("    <!-- The block map which consists of elements which may either be a\n");
        x.push_str("         range of blocks or a single block. The 'chksum' attribute\n");
        x.push_str("         (if present) is the checksum of this blocks range. -->\n");
        x.push_str("    <BlockMap>\n");
        for r in &self.ranges {
            if r.first == r.last {
                x.push_str(&format!("        <Range chksum=\"{}\"> {} </Range>\n", r.sha256, r.first));
            } else {
                x.push_str(&format!("        <Range chksum=\"{}\"> {}-{} </Range>\n", r.sha256, r.first, r.last));
            }
        }
        x.push_str("    </BlockMap>\n");
        x.push_str("</bmap>\n");
        let sum = Sha256::of(x.as_bytes());
        // The zeros above are the first 64-zero run in the text: ranges come after them.
        x.replacen(ZERO_CHECKSUM, &sum.hex(), 1)
    }

    /// Writes the map to `path` (a temporary file renamed into place).
    pub fn write_xml(&self, path: &Path) -> Result<(), BmapError> {
        let io = |what: &'static str| move |source| BmapError::Io { path: path.to_path_buf(), what, source };
        let mut tmp = path.as_os_str().to_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        std::fs::write(&tmp, self.to_xml()).map_err(io("writing the block map"))?;
        std::fs::rename(&tmp, path).map_err(io("renaming the block map into place"))?;
        Ok(())
    }

    /// Reads and checks a map written by kiln or by `bmaptool create` (format 2.0, sha256).
    pub fn read_xml(path: &Path) -> Result<Bmap, BmapError> {
        let bytes = std::fs::read(path).map_err(|source| BmapError::Io {
            path: path.to_path_buf(),
            what: "reading the block map",
            source,
        })?;
        Bmap::parse(&bytes, path)
    }

    /// Parses the text of a map; `path` is for messages. Strict: unknown or repeated elements,
    /// missing fields, inconsistent counts and a wrong file checksum are errors.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Bmap, BmapError> {
        let text = std::str::from_utf8(bytes).map_err(|e| {
            let line = bytes[..e.valid_up_to()].iter().filter(|b| **b == b'\n').count() + 1;
            BmapError::Syntax { path: path.to_path_buf(), line, msg: "not UTF-8 text (is this a bmap file?)".into() }
        })?;
        let raw =
            parse_document(text).map_err(|(line, msg)| BmapError::Syntax { path: path.to_path_buf(), line, msg })?;
        let invalid = |msg: String| BmapError::Invalid { path: path.to_path_buf(), msg };
        let (major, minor) = raw
            .version
            .split_once('.')
            .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
            .ok_or_else(|| invalid(format!("bmap version {:?} is not a version number", raw.version)))?;
        if !(major == 2 || (major, minor) == (1, 4)) {
            return Err(invalid(format!(
                "bmap format version {} is not supported (kiln reads version 2.0, which `bmaptool create` writes)",
                raw.version
            )));
        }
        if !raw.checksum_type.eq_ignore_ascii_case("sha256") {
            return Err(invalid(format!("checksum type {:?} is not supported (kiln reads sha256 maps: `bmaptool create` writes them by default)", raw.checksum_type)));
        }
        // bmap-tools' rule: the first occurrence of the stored value is replaced by zeros.
        let stored = raw.file_checksum.to_ascii_lowercase();
        let Some(at) = text.find(raw.file_checksum.as_str()) else {
            return Err(invalid("BmapFileChecksum is missing".into()));
        };
        let mut zeroed = bytes.to_vec();
        zeroed[at..at + raw.file_checksum.len()].fill(b'0');
        let computed = Sha256::of(&zeroed).hex();
        if computed != stored {
            return Err(BmapError::FileChecksum { path: path.to_path_buf(), computed, stored });
        }
        if raw.block_size == 0 || raw.block_size % 512 != 0 {
            return Err(invalid(format!("BlockSize {} is not a multiple of 512", raw.block_size)));
        }
        if raw.image_size == 0 {
            return Err(invalid("ImageSize is 0".into()));
        }
        let blocks = raw.image_size.div_ceil(raw.block_size);
        if raw.blocks_count != blocks {
            return Err(invalid(format!(
                "BlocksCount is {} but an image of {} bytes has {blocks} blocks of {}",
                raw.blocks_count, raw.image_size, raw.block_size
            )));
        }
        let mut prev_last: Option<u64> = None;
        for (line, r) in &raw.ranges {
            if r.last < r.first {
                return Err(BmapError::Syntax {
                    path: path.to_path_buf(),
                    line: *line,
                    msg: format!("range {}-{} ends before it starts", r.first, r.last),
                });
            }
            if r.last >= blocks {
                return Err(BmapError::Syntax {
                    path: path.to_path_buf(),
                    line: *line,
                    msg: format!("{r} lies beyond the image's {blocks} blocks"),
                });
            }
            if prev_last.is_some_and(|p| r.first <= p) {
                return Err(BmapError::Syntax {
                    path: path.to_path_buf(),
                    line: *line,
                    msg: format!("{r} overlaps or comes before the previous range"),
                });
            }
            prev_last = Some(r.last);
        }
        let bmap = Bmap {
            image_size: raw.image_size,
            block_size: raw.block_size,
            ranges: raw.ranges.into_iter().map(|(_, r)| r).collect(),
        };
        if bmap.mapped_blocks() != raw.mapped_blocks_count {
            return Err(invalid(format!(
                "MappedBlocksCount is {} but the ranges hold {} blocks",
                raw.mapped_blocks_count,
                bmap.mapped_blocks()
            )));
        }
        Ok(bmap)
    }
}

/// What the XML says, before the checks that relate fields to each other.
struct RawBmap {
    version: String,
    image_size: u64,
    block_size: u64,
    blocks_count: u64,
    mapped_blocks_count: u64,
    checksum_type: String,
    file_checksum: String,
    /// With the line each range is on.
    ranges: Vec<(usize, BlockRange)>,
}

#[derive(Debug)]
enum Token<'a> {
    Open { name: &'a str, attrs: Vec<(&'a str, &'a str)>, line: usize },
    Close { name: &'a str, line: usize },
    Text { text: &'a str, line: usize },
}

type ParseError = (usize, String);

/// Splits the document into tags and text; comments, the XML declaration and whitespace
/// between elements are dropped. Entities, CDATA, DOCTYPE and empty-element tags do not occur
/// in this format and are errors.
fn tokenize(s: &str) -> Result<Vec<Token<'_>>, ParseError> {
    let mut out = Vec::new();
    let mut i = 0;
    let line_at = |pos: usize| s[..pos].bytes().filter(|b| *b == b'\n').count() + 1;
    while i < s.len() {
        let rest = &s[i..];
        if rest.starts_with("<!--") {
            let end = rest.find("-->").ok_or_else(|| (line_at(i), "unterminated comment".to_string()))?;
            i += end + 3;
        } else if rest.starts_with("<?") {
            let end = rest.find("?>").ok_or_else(|| (line_at(i), "unterminated <? … ?>".to_string()))?;
            i += end + 2;
        } else if rest.starts_with("<!") {
            return Err((line_at(i), "DOCTYPE and CDATA do not belong in a bmap file".into()));
        } else if let Some(tag) = rest.strip_prefix("</") {
            let end = tag.find('>').ok_or_else(|| (line_at(i), "unterminated closing tag".to_string()))?;
            out.push(Token::Close { name: tag[..end].trim(), line: line_at(i) });
            i += 2 + end + 1;
        } else if let Some(tag) = rest.strip_prefix('<') {
            let line = line_at(i);
            let (name, attrs, len) = parse_tag(tag).map_err(|m| (line, m))?;
            out.push(Token::Open { name, attrs, line });
            i += 1 + len;
        } else {
            let end = rest.find('<').unwrap_or(rest.len());
            let text = &rest[..end];
            if text.contains('&') {
                return Err((line_at(i), "character references (&…;) do not belong in a bmap file".into()));
            }
            if !text.trim().is_empty() {
                out.push(Token::Text { text: text.trim(), line: line_at(i + text.len() - text.trim_start().len()) });
            }
            i += end;
        }
    }
    Ok(out)
}

/// A start tag: its name, its attributes, and the bytes it takes after `<` (including `>`).
type Tag<'a> = (&'a str, Vec<(&'a str, &'a str)>, usize);

/// Parses `Name attr="value" …>` (the text after `<`).
fn parse_tag(tag: &str) -> Result<Tag<'_>, String> {
    let name_end = tag.find(|c: char| c.is_whitespace() || c == '>' || c == '/').ok_or("unterminated tag")?;
    let name = &tag[..name_end];
    if name.is_empty() {
        return Err("a tag without a name".into());
    }
    let mut attrs = Vec::new();
    let mut i = name_end;
    loop {
        let rest = &tag[i..];
        let skipped = rest.len() - rest.trim_start().len();
        i += skipped;
        let rest = &tag[i..];
        if rest.starts_with('>') {
            return Ok((name, attrs, i + 1));
        }
        if rest.starts_with("/>") {
            return Err(format!("<{name}/>: empty elements do not occur in a bmap file"));
        }
        if rest.is_empty() {
            return Err(format!("unterminated tag <{name}"));
        }
        let eq = rest.find('=').ok_or_else(|| format!("<{name}>: an attribute without a value"))?;
        let key = rest[..eq].trim();
        let after = rest[eq + 1..].trim_start();
        let quote = after
            .chars()
            .next()
            .filter(|c| *c == '"' || *c == '\'')
            .ok_or_else(|| format!("<{name}>: attribute {key} is not quoted"))?;
        let close = after[1..].find(quote).ok_or_else(|| format!("<{name}>: attribute {key} has no closing quote"))?;
        let value = &after[1..1 + close];
        if value.contains('&') || value.contains('<') {
            return Err(format!("<{name}>: attribute {key} holds markup"));
        }
        attrs.push((key, value));
        let consumed = rest.len() - after.len() + 1 + close + 1;
        i += consumed;
    }
}

const ELEMENTS: &[&str] =
    &["ImageSize", "BlockSize", "BlocksCount", "MappedBlocksCount", "ChecksumType", "BmapFileChecksum", "BlockMap"];

fn parse_document(s: &str) -> Result<RawBmap, ParseError> {
    let tokens = tokenize(s)?;
    let mut it = tokens.into_iter().peekable();
    let version = match it.next() {
        Some(Token::Open { name: "bmap", attrs, line }) => {
            let mut version = None;
            for (k, v) in attrs {
                match k {
                    "version" => version = Some(v.to_string()),
                    other => return Err((line, format!("<bmap>: unknown attribute {other:?} (expected version)"))),
                }
            }
            version.ok_or((line, "<bmap> has no version attribute".to_string()))?
        }
        Some(t) => return Err((token_line(&t), format!("expected <bmap version=\"2.0\">, found {}", describe(&t)))),
        None => return Err((1, "no <bmap> element: this is not a bmap file".into())),
    };
    let mut fields: std::collections::BTreeMap<&str, (usize, String)> = Default::default();
    let mut ranges = None;
    loop {
        match it.next() {
            Some(Token::Close { name: "bmap", .. }) => break,
            Some(Token::Open { name: "BlockMap", attrs, line }) => {
                if !attrs.is_empty() {
                    return Err((line, "<BlockMap> takes no attributes".into()));
                }
                if ranges.is_some() {
                    return Err((line, "a second <BlockMap>".into()));
                }
                ranges = Some(parse_block_map(&mut it)?);
            }
            Some(Token::Open { name, attrs, line }) if ELEMENTS.contains(&name) => {
                if !attrs.is_empty() {
                    return Err((line, format!("<{name}> takes no attributes")));
                }
                if fields.contains_key(name) {
                    return Err((line, format!("a second <{name}>")));
                }
                let text = match it.next() {
                    Some(Token::Text { text, .. }) => {
                        expect_close(it.next(), name)?;
                        text.to_string()
                    }
                    Some(Token::Close { name: n, .. }) if n == name => String::new(),
                    other => return Err(unexpected(other, &format!("the value of <{name}>"))),
                };
                fields.insert(name, (line, text));
            }
            Some(Token::Open { name, line, .. }) => {
                return Err((line, format!("unknown element <{name}> (expected one of: {})", ELEMENTS.join(", "))));
            }
            other => return Err(unexpected(other, "an element of <bmap> or </bmap>")),
        }
    }
    if let Some(t) = it.next() {
        return Err((token_line(&t), format!("{} after </bmap>", describe(&t))));
    }
    for name in ELEMENTS {
        if *name != "BlockMap" && !fields.contains_key(name) {
            return Err((s.lines().count().max(1), format!("<{name}> is missing")));
        }
    }
    let ranges = ranges.ok_or((s.lines().count().max(1), "<BlockMap> is missing".to_string()))?;
    let number = |name: &str| -> Result<u64, ParseError> {
        let (line, text) = &fields[name];
        text.parse::<u64>().map_err(|_| (*line, format!("<{name}>: expected a number, found {text:?}")))
    };
    let file_checksum = fields["BmapFileChecksum"].1.clone();
    if file_checksum.len() != 64 || !file_checksum.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err((
            fields["BmapFileChecksum"].0,
            format!("<BmapFileChecksum>: expected 64 hex digits, found {file_checksum:?}"),
        ));
    }
    Ok(RawBmap {
        version,
        image_size: number("ImageSize")?,
        block_size: number("BlockSize")?,
        blocks_count: number("BlocksCount")?,
        mapped_blocks_count: number("MappedBlocksCount")?,
        checksum_type: fields["ChecksumType"].1.clone(),
        file_checksum,
        ranges,
    })
}

fn parse_block_map<'a>(it: &mut impl Iterator<Item = Token<'a>>) -> Result<Vec<(usize, BlockRange)>, ParseError> {
    let mut ranges = Vec::new();
    loop {
        match it.next() {
            Some(Token::Close { name: "BlockMap", .. }) => return Ok(ranges),
            Some(Token::Open { name: "Range", attrs, line }) => {
                let mut sum = None;
                for (k, v) in attrs {
                    match k {
                        "chksum" => sum = Some(v),
                        other => return Err((line, format!("<Range>: unknown attribute {other:?} (expected chksum)"))),
                    }
                }
                let sum = sum.ok_or((
                    line,
                    "<Range> has no chksum: kiln verifies every range (make the map with checksums)".to_string(),
                ))?;
                let sha256 = Sha256::try_from(sum.to_ascii_lowercase())
                    .map_err(|_| (line, format!("<Range>: chksum {sum:?} is not a sha256")))?;
                let text = match it.next() {
                    Some(Token::Text { text, .. }) => text,
                    other => return Err(unexpected(other, "a block range like 12-34")),
                };
                expect_close(it.next(), "Range")?;
                let block = |t: &str| {
                    t.trim()
                        .parse::<u64>()
                        .map_err(|_| (line, format!("<Range>: expected a block number or first-last, found {text:?}")))
                };
                let (first, last) = match text.split_once('-') {
                    Some((a, b)) => (block(a)?, block(b)?),
                    None => (block(text)?, block(text)?),
                };
                ranges.push((line, BlockRange { first, last, sha256 }));
            }
            Some(Token::Open { name, line, .. }) => {
                return Err((line, format!("unknown element <{name}> in <BlockMap> (expected <Range>)")))
            }
            other => return Err(unexpected(other, "<Range> or </BlockMap>")),
        }
    }
}

fn expect_close(t: Option<Token<'_>>, name: &str) -> Result<(), ParseError> {
    match t {
        Some(Token::Close { name: n, .. }) if n == name => Ok(()),
        other => Err(unexpected(other, &format!("</{name}>"))),
    }
}

fn unexpected(t: Option<Token<'_>>, expected: &str) -> ParseError {
    match t {
        Some(t) => (token_line(&t), format!("expected {expected}, found {}", describe(&t))),
        None => (0, format!("the file ends where {expected} was expected")),
    }
}

fn token_line(t: &Token<'_>) -> usize {
    match t {
        Token::Open { line, .. } | Token::Close { line, .. } | Token::Text { line, .. } => *line,
    }
}

fn describe(t: &Token<'_>) -> String {
    match t {
        Token::Open { name, .. } => format!("<{name}>"),
        Token::Close { name, .. } => format!("</{name}>"),
        Token::Text { text, .. } => format!("text {:?}", text.chars().take(40).collect::<String>()),
    }
}

/// A size the way bmap-tools prints it: "512 bytes", "2.8 GiB".
pub fn human_size(size: u64) -> String {
    if size < 1024 {
        return format!("{size} bytes");
    }
    let mut s = size as f64;
    for unit in ["KiB", "MiB", "GiB", "TiB"] {
        s /= 1024.0;
        if s < 1024.0 {
            return format!("{s:.1} {unit}");
        }
    }
    format!("{:.1} PiB", s / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const MIB: u64 = 1 << 20;

    /// A sparse image: data at 1 MiB (8 KiB), at 5 MiB + 100 (3 bytes), and a last partial block.
    fn sparse_image(dir: &Path) -> PathBuf {
        let path = dir.join("disk.img");
        let f = File::create(&path).unwrap();
        f.set_len(16 * MIB + 1000).unwrap();
        f.write_all_at(&[0x5a; 8192], MIB).unwrap();
        f.write_all_at(b"abc", 5 * MIB + 100).unwrap();
        f.write_all_at(b"tail", 16 * MIB + 990).unwrap();
        path
    }

    fn sha_of(path: &Path, start: u64, end: u64) -> Sha256 {
        let data = std::fs::read(path).unwrap();
        Sha256::of(&data[start as usize..end as usize])
    }

    #[test]
    fn holes_are_not_mapped_and_must_write_ranges_are() {
        let dir = tempfile::tempdir().unwrap();
        let img = sparse_image(dir.path());
        let m = create(&img, &[]).unwrap();
        let spans: Vec<(u64, u64)> = m.ranges.iter().map(|r| (r.first, r.last)).collect();
        // The filesystem may allocate in larger units than 4 KiB, but never less than the data.
        assert!(spans.iter().any(|&(a, b)| a <= 256 && b >= 257), "{spans:?}");
        assert!(spans.iter().any(|&(a, b)| a <= 1280 && b >= 1280), "{spans:?}");
        assert!(spans.iter().any(|&(a, b)| a <= 4096 && b == 4096), "{spans:?}");
        assert!(m.mapped_blocks() < 64, "holes stay unmapped: {spans:?}");
        assert_eq!(m.image_size, 16 * MIB + 1000);
        assert_eq!(m.blocks_count(), 4097);
        for r in &m.ranges {
            let b = m.bytes(r);
            assert_eq!(r.sha256, sha_of(&img, b.start, b.end), "{r}");
        }
        // A must-write range of zeros (the first MiB) joins the map; adjacent ranges merge.
        let m2 = create(&img, &[(0, MIB), (8 * MIB, 10)]).unwrap();
        assert_eq!((m2.ranges[0].first, m2.ranges[0].last), (0, 257), "{:?}", m2.ranges);
        assert!(m2.ranges.iter().any(|r| r.first == 2048 && r.last == 2048), "{:?}", m2.ranges);
        assert_eq!(m2.ranges[0].sha256, sha_of(&img, 0, 258 * 4096));
        // The last, partial block is hashed up to the image's end.
        let last = m2.ranges.last().unwrap();
        assert_eq!(m2.bytes(last).end, 16 * MIB + 1000);
        assert!(matches!(create(&img, &[(16 * MIB, 2000)]), Err(BmapError::OutsideImage { .. })));
    }

    #[test]
    fn xml_round_trips_and_checks_itself() {
        let dir = tempfile::tempdir().unwrap();
        let img = sparse_image(dir.path());
        let m = create(&img, &[(0, MIB)]).unwrap();
        let path = default_path(&img);
        assert_eq!(path, dir.path().join("disk.img.bmap"));
        m.write_xml(&path).unwrap();
        assert_eq!(Bmap::read_xml(&path).unwrap(), m);
        assert_eq!(m.mapped_bytes(), m.ranges.iter().map(|r| m.bytes(r).end - m.bytes(r).start).sum::<u64>());

        // A changed digit anywhere is caught by the file checksum.
        let text = std::fs::read_to_string(&path).unwrap();
        let at = text.find("<Range chksum=\"").unwrap() + 15;
        let flipped = if &text[at..at + 1] == "a" { "b" } else { "a" };
        let tampered = format!("{}{flipped}{}", &text[..at], &text[at + 1..]);
        assert_ne!(tampered, text);
        let err = Bmap::parse(tampered.as_bytes(), &path).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{}: the file's checksum is ", path.display())), "{err}");
    }

    /// Puts a correct BmapFileChecksum into an edited map.
    fn reseal(text: &str) -> String {
        let start = text.find("<BmapFileChecksum> ").unwrap() + 19;
        let zeroed = format!("{}{ZERO_CHECKSUM}{}", &text[..start], &text[start + 64..]);
        zeroed.replacen(ZERO_CHECKSUM, &Sha256::of(zeroed.as_bytes()).hex(), 1)
    }

    #[test]
    fn strict_parser_names_the_file_and_line() {
        let p = Path::new("x.bmap");
        let err = |s: &str| Bmap::parse(s.as_bytes(), p).unwrap_err().to_string();
        assert_eq!(err("hello"), "x.bmap:1: expected <bmap version=\"2.0\">, found text \"hello\"");
        assert_eq!(err("<bmap version=\"2.0\">\n  <Foo> 1 </Foo>\n</bmap>"), "x.bmap:2: unknown element <Foo> (expected one of: ImageSize, BlockSize, BlocksCount, MappedBlocksCount, ChecksumType, BmapFileChecksum, BlockMap)");
        assert_eq!(err("<bmap version=\"2.0\">\n</bmap>\n"), "x.bmap:2: <ImageSize> is missing");
        assert_eq!(err("<bmap version=\"1.3\"><ImageSize>1</ImageSize><BlockSize>4096</BlockSize><BlocksCount>1</BlocksCount><MappedBlocksCount>0</MappedBlocksCount><ChecksumType>sha1</ChecksumType><BmapFileChecksum>0000000000000000000000000000000000000000000000000000000000000000</BmapFileChecksum><BlockMap></BlockMap></bmap>"),
            "x.bmap: bmap format version 1.3 is not supported (kiln reads version 2.0, which `bmaptool create` writes)");
        let ok = Bmap {
            image_size: 8192,
            block_size: 4096,
            ranges: vec![BlockRange { first: 1, last: 1, sha256: Sha256([7; 32]) }],
        }
        .to_xml();
        assert!(Bmap::parse(ok.as_bytes(), p).is_ok());
        let no_sum = reseal(&ok.replacen(&format!(" chksum=\"{}\"", Sha256([7; 32])), "", 1));
        assert!(
            err(&no_sum).ends_with("<Range> has no chksum: kiln verifies every range (make the map with checksums)"),
            "{}",
            err(&no_sum)
        );
        let beyond = reseal(&ok.replacen("> 1 </Range>", "> 2 </Range>", 1));
        assert!(err(&beyond).contains("block 2 lies beyond the image's 2 blocks"), "{}", err(&beyond));
    }

    #[test]
    fn human_sizes_match_bmap_tools() {
        assert_eq!(human_size(100), "100 bytes");
        assert_eq!(human_size(3 * MIB / 2), "1.5 MiB");
        assert_eq!(human_size(2818 * MIB), "2.8 GiB");
    }

    fn run(cmd: &mut Command) -> String {
        let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        assert!(
            out.status.success(),
            "{cmd:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    #[test]
    fn bmaptool_copy_accepts_our_map() {
        if !crate::testing::host_has("bmaptool_copy_accepts_our_map", "bmaptool") {
            return;
        }
        let tool = "bmaptool";
        let dir = tempfile::tempdir().unwrap();
        let img = sparse_image(dir.path());
        let bmap = dir.path().join("ours.bmap");
        create(&img, &[(0, MIB)]).unwrap().write_xml(&bmap).unwrap();
        let out = dir.path().join("out.img");
        run(Command::new(tool).arg("copy").arg("--bmap").arg(&bmap).arg(&img).arg(&out));
        assert_eq!(
            std::fs::read(&out).unwrap(),
            std::fs::read(&img).unwrap(),
            "bmaptool copy with our map gives the same file"
        );

        // A map whose range checksum is wrong is refused by bmaptool too (so it does check them).
        let m = create(&img, &[(0, MIB)]).unwrap();
        let mut bad = m.clone();
        bad.ranges[0].sha256 = Sha256([0xee; 32]);
        bad.write_xml(&bmap).unwrap();
        let o = Command::new(tool)
            .arg("copy")
            .arg("--bmap")
            .arg(&bmap)
            .arg(&img)
            .arg(dir.path().join("out2.img"))
            .output()
            .unwrap();
        assert!(!o.status.success(), "bmaptool accepted a wrong range checksum");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("checksum mismatch"),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    #[test]
    fn we_read_what_bmaptool_create_writes() {
        if !crate::testing::host_has("we_read_what_bmaptool_create_writes", "bmaptool") {
            return;
        }
        let tool = "bmaptool";
        let dir = tempfile::tempdir().unwrap();
        let img = sparse_image(dir.path());
        let theirs = dir.path().join("theirs.bmap");
        run(Command::new(tool).arg("create").arg("-o").arg(&theirs).arg(&img));
        let parsed = Bmap::read_xml(&theirs).unwrap();
        assert_eq!(parsed, create(&img, &[]).unwrap(), "same ranges and checksums as bmaptool create");
    }
}
