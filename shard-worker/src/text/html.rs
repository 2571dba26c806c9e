//! Python's `html.unescape`: HTML5 named and numeric character references, with the standard's
//! rules for references without a semicolon and for invalid code points.
//!
//! The named references are WHATWG's table, in `html_entities.tsv` (name, then the code points
//! in hex), written out from Python's `html.entities.html5` with
//! `for n, v in sorted(html5.items()): print(n, ' '.join('%X' % ord(c) for c in v), sep='\t')`.

use std::collections::HashMap;
use std::sync::OnceLock;

/// Longest name after `&` that a reference may have (`[^\t\n\f <&#;]{1,32}`).
const MAX_NAME_CHARS: usize = 32;

/// Every HTML5 named reference (as written after `&`, with its `;` where it has one).
pub(crate) fn entities() -> &'static HashMap<&'static str, String> {
    static TABLE: OnceLock<HashMap<&'static str, String>> = OnceLock::new();
    TABLE.get_or_init(|| {
        include_str!("html_entities.tsv")
            .lines()
            .filter_map(|line| {
                let (name, points) = line.split_once('\t')?;
                let value = points.split(' ').filter_map(|p| u32::from_str_radix(p, 16).ok().and_then(char::from_u32)).collect();
                Some((name, value))
            })
            .collect()
    })
}

/// What a numeric reference to `code` stands for (`None`: a code point past U+10FFFF).
/// Code points 0x80–0x9F are read as Windows-1252, as browsers do.
fn numeric_reference(code: Option<u32>) -> String {
    let Some(code) = code else { return '\u{FFFD}'.to_string() };
    match code {
        0 => return '\u{FFFD}'.to_string(),
        0x0D => return '\r'.to_string(),
        0x80..=0x9F => return windows_1252_c1(code as u8).to_string(),
        0xD800..=0xDFFF | 0x11_0000.. => return '\u{FFFD}'.to_string(),
        _ => {}
    }
    let noncharacter = (0xFDD0..=0xFDEF).contains(&code) || (code & 0xFFFE) == 0xFFFE;
    if matches!(code, 0x01..=0x08 | 0x0B | 0x0E..=0x1F | 0x7F) || noncharacter {
        return String::new();
    }
    char::from_u32(code).map(String::from).unwrap_or_default()
}

/// The Windows-1252 character of a byte 0x80–0x9F; the five bytes it leaves undefined map to
/// the C1 control of the same number (Python's `_invalid_charrefs`, ftfy's "sloppy" codec).
pub(crate) fn windows_1252_c1(byte: u8) -> char {
    const TABLE: [char; 32] = [
        '\u{20AC}', '\u{81}', '\u{201A}', '\u{192}', '\u{201E}', '\u{2026}', '\u{2020}', '\u{2021}', '\u{2C6}', '\u{2030}', '\u{160}', '\u{2039}', '\u{152}',
        '\u{8D}', '\u{17D}', '\u{8F}', '\u{90}', '\u{2018}', '\u{2019}', '\u{201C}', '\u{201D}', '\u{2022}', '\u{2013}', '\u{2014}', '\u{2DC}', '\u{2122}',
        '\u{161}', '\u{203A}', '\u{153}', '\u{9D}', '\u{17E}', '\u{178}',
    ];
    TABLE[(byte - 0x80) as usize]
}

/// Parses ASCII digits in `radix`; `None` when the value exceeds U+10FFFF (Python's unbounded
/// integers then give U+FFFD too).
fn parse_code(digits: &str, radix: u32) -> Option<u32> {
    digits.chars().try_fold(0u32, |acc, c| {
        let v = acc.checked_mul(radix)?.checked_add(c.to_digit(radix)?)?;
        (v <= 0x10_FFFF).then_some(v)
    })
}

/// Tries to read a reference at `s` (which starts right after a `&`): the replacement and the
/// number of bytes consumed, or `None` when `&` does not start one.
fn reference_at(s: &str) -> Option<(String, usize)> {
    let bytes = s.as_bytes();
    if bytes.first() == Some(&b'#') {
        let hex = matches!(bytes.get(1), Some(b'x' | b'X'));
        let start = if hex { 2 } else { 1 };
        let digits = s[start..].bytes().take_while(|b| if hex { b.is_ascii_hexdigit() } else { b.is_ascii_digit() }).count();
        if digits == 0 {
            return None; // `#` cannot start a name either
        }
        let end = start + digits;
        let code = parse_code(&s[start..end], if hex { 16 } else { 10 });
        let consumed = end + usize::from(bytes.get(end) == Some(&b';'));
        return Some((numeric_reference(code), consumed));
    }
    // `[^\t\n\f <&#;]{1,32};?`, counted in characters
    let mut end = 0;
    for (n, c) in s.chars().enumerate() {
        if n == MAX_NAME_CHARS || matches!(c, '\t' | '\n' | '\x0C' | ' ' | '<' | '&' | '#' | ';') {
            break;
        }
        end += c.len_utf8();
    }
    if end == 0 {
        return None;
    }
    let with_semicolon = end + usize::from(bytes.get(end) == Some(&b';'));
    let name = &s[..with_semicolon];
    let table = entities();
    if let Some(v) = table.get(name) {
        return Some((v.clone(), with_semicolon));
    }
    // The longest prefix (at least 2 characters, shorter than the whole) that is a reference;
    // the rest stays as it is.
    let boundaries: Vec<usize> = name.char_indices().map(|(i, _)| i).skip(2).collect();
    for &cut in boundaries.iter().rev() {
        if let Some(v) = table.get(&name[..cut]) {
            return Some((v.clone(), cut));
        }
    }
    Some((format!("&{name}"), with_semicolon))
}

/// Python's `html.unescape(text)`.
pub fn html_unescape(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp + 1..];
        match reference_at(after) {
            Some((replacement, consumed)) => {
                out.push_str(&replacement);
                rest = &after[consumed..];
            }
            None => {
                out.push('&');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_references() {
        assert_eq!(entities().len(), 2231);
        assert_eq!(html_unescape("a &amp; b &lt;c&gt; &quot;d&quot; &eacute;&nbsp;"), "a & b <c> \"d\" é\u{a0}");
        // without semicolon: legacy names, and the longest known prefix
        assert_eq!(html_unescape("&amp &ampxyz &copy2024 &notit; &notin;"), "& &xyz ©2024 ¬it; ∉");
        // unknown names stay
        assert_eq!(html_unescape("&foo; & &; &#; AT&T"), "&foo; & &; &#; AT&T");
        // two code points
        assert_eq!(html_unescape("&NotEqualTilde;"), "\u{2242}\u{338}");
        // a name is at most 32 characters
        let long = format!("&{};", "a".repeat(40));
        assert_eq!(html_unescape(&long), long);
    }

    #[test]
    fn numeric_references() {
        assert_eq!(html_unescape("&#65;&#x42;&#X43&#100x"), "ABCdx");
        assert_eq!(html_unescape("&#0; &#13; &#128; &#x81; &#150;"), "\u{FFFD} \r € \u{81} –");
        assert_eq!(html_unescape("&#xD800; &#x110000; &#99999999999999999999;"), "\u{FFFD} \u{FFFD} \u{FFFD}");
        assert_eq!(html_unescape("a&#1;b&#x7f;c&#xFFFE;d&#x1FFFF;e"), "abcde");
        assert_eq!(html_unescape("&#x1F600;"), "😀");
    }

    #[test]
    fn twice_decodes_double_escapes() {
        assert_eq!(html_unescape(&html_unescape("&amp;lt;b&amp;gt;")), "<b>");
    }
}
