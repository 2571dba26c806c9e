//! The parts of `ftfy.fix_text` (ftfy 6, default settings) that apply to text typed or pasted
//! as a prompt, applied in ftfy's order, line by line, until nothing changes:
//!
//! - HTML entities, as ftfy reads them (`&name;` and `&#…;` with their semicolon, plus
//!   upper-cased names such as `&EACUTE;`), skipped from the first line containing `<` on;
//! - C1 controls (U+0080–U+009F) read as Windows-1252;
//! - Latin ligatures (`ﬁ` → `fi`, `Ĳ` → `IJ`, …);
//! - full- and half-width forms (U+FF01–U+FFEF, and U+3000 → space);
//! - curly quotes (`‘’‚‛ʼ` → `'`, `“”„‟` → `"`);
//! - line breaks (`\r\n`, `\r`, U+2028, U+2029, U+0085 → `\n`);
//! - ANSI terminal escapes (`ESC [ digits/; letter`; ASCII digits only);
//! - control characters (C0 except tab, newline, form feed and carriage return; DEL;
//!   U+206A–U+206F; U+FEFF; U+FFF9–U+FFFC);
//! - NFC normalisation.
//!
//! Not covered: mojibake repair (`fix_encoding`: re-decoding text that was UTF-8 read as
//! Latin-1, Windows-125x or MacRoman, with its sub-steps `restore_byte_a0`,
//! `replace_lossy_sequences` and `decode_inconsistent_utf8`), which ftfy applies only to text its
//! "badness" heuristic flags; and lone surrogates, which a Rust `str` cannot hold.

use super::html::{entities, html_unescape, windows_1252_c1};
use std::collections::HashMap;
use std::sync::OnceLock;
use unicode_normalization::UnicodeNormalization;

/// ftfy's entity table: `&name;` for every HTML5 name with a semicolon, plus the upper-cased
/// spelling of lower-case names when that spelling means nothing to `html.unescape`.
fn ftfy_entities() -> &'static HashMap<String, String> {
    static TABLE: OnceLock<HashMap<String, String>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = HashMap::new();
        for (name, value) in entities() {
            if !name.ends_with(';') {
                continue;
            }
            table.insert(format!("&{name}"), value.clone());
            if *name == name.to_lowercase() {
                let upper = format!("&{}", name.to_uppercase());
                if html_unescape(&upper) == upper {
                    table.insert(upper, value.to_uppercase());
                }
            }
        }
        table
    })
}

/// ftfy's `unescape_html`: replaces each `&#?[0-9A-Za-z]{1,24};`.
fn unescape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let candidate = &rest[amp..];
        let b = candidate.as_bytes();
        let start = 1 + usize::from(b.get(1) == Some(&b'#'));
        let alnum = b[start..].iter().take(25).take_while(|c| c.is_ascii_alphanumeric()).count();
        let matched = (1..=24).contains(&alnum) && b.get(start + alnum) == Some(&b';');
        if !matched {
            out.push('&');
            rest = &candidate[1..];
            continue;
        }
        let entity = &candidate[..start + alnum + 1];
        if let Some(v) = ftfy_entities().get(entity) {
            out.push_str(v);
        } else if entity.starts_with("&#") {
            // a numeric reference counts only if the whole of it, semicolon included, was read
            let decoded = html_unescape(entity);
            out.push_str(if decoded.contains(';') { entity } else { &decoded });
        } else {
            out.push_str(entity);
        }
        rest = &candidate[entity.len()..];
    }
    out.push_str(rest);
    out
}

/// ftfy's `fix_latin_ligatures` table.
fn ligature(c: char) -> Option<&'static str> {
    Some(match c {
        'Ĳ' => "IJ",
        'ĳ' => "ij",
        'ŉ' => "ʼn",
        'Ǳ' => "DZ",
        'ǲ' => "Dz",
        'ǳ' => "dz",
        'Ǆ' => "DŽ",
        'ǅ' => "Dž",
        'ǆ' => "dž",
        'Ǉ' => "LJ",
        'ǈ' => "Lj",
        'ǉ' => "lj",
        'Ǌ' => "NJ",
        'ǋ' => "Nj",
        'ǌ' => "nj",
        'ﬀ' => "ff",
        'ﬁ' => "fi",
        'ﬂ' => "fl",
        'ﬃ' => "ffi",
        'ﬄ' => "ffl",
        'ﬅ' => "ſt",
        'ﬆ' => "st",
        _ => return None,
    })
}

/// Whether ftfy's `remove_control_chars` deletes `c`.
fn is_removed_control(c: char) -> bool {
    matches!(c, '\u{0}'..='\u{8}' | '\u{B}' | '\u{E}'..='\u{1F}' | '\u{7F}' | '\u{206A}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFC}')
}

/// One pass of the character-level fixes, in ftfy's order.
fn fix_characters(text: &str) -> String {
    // C1 controls, ligatures and widths map disjoint sets of characters to text none of the
    // three touches again, so one sweep does all three.
    let mut swept = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\u{80}'..='\u{9F}' => swept.push(windows_1252_c1(c as u8)),
            '\u{3000}' => swept.push(' '),
            '\u{FF01}'..='\u{FFEF}' => swept.extend(c.to_string().nfkc()),
            _ => match ligature(c) {
                Some(s) => swept.push_str(s),
                None => swept.push(c),
            },
        }
    }
    // After the C1 fix, which can produce curly quotes (0x91–0x94) and U+2026 from 0x85.
    let uncurled: String = swept
        .chars()
        .map(|c| match c {
            '\u{2BC}' | '\u{2018}'..='\u{201B}' => '\'',
            '\u{201C}'..='\u{201F}' => '"',
            _ => c,
        })
        .collect();
    let lines = uncurled.replace("\r\n", "\n").replace(['\r', '\u{2028}', '\u{2029}', '\u{85}'], "\n");
    let no_escapes = remove_terminal_escapes(&lines);
    no_escapes.chars().filter(|&c| !is_removed_control(c)).collect()
}

/// Removes `ESC [ (digit | ;)* letter` sequences.
fn remove_terminal_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(esc) = rest.find("\u{1B}[") {
        out.push_str(&rest[..esc]);
        let after = &rest[esc + 2..];
        let params = after.bytes().take_while(|b| b.is_ascii_digit() || *b == b';').count();
        match after.as_bytes().get(params) {
            Some(b) if b.is_ascii_alphabetic() => rest = &after[params + 1..],
            _ => {
                out.push_str("\u{1B}[");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// ftfy's `fix_and_explain` on one segment, without mojibake repair.
fn fix_segment(segment: &str, unescape: bool) -> String {
    let mut text = segment.to_string();
    loop {
        let before = text.clone();
        if unescape {
            text = unescape_html(&text);
        }
        text = fix_characters(&text).nfc().collect();
        if text == before {
            return text;
        }
    }
}

/// `ftfy.fix_text(text)` with ftfy's default settings, for the fixes listed in this module's
/// documentation. Works line by line; entities are left alone from the first line with `<` on,
/// which may be HTML.
pub fn fix_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut unescape = true;
    for segment in text.split_inclusive('\n') {
        if segment.contains('<') {
            unescape = false;
        }
        out.push_str(&fix_segment(segment, unescape));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Outputs of ftfy 6.3.1's `fix_text` on the same inputs.
    #[test]
    fn matches_ftfy_on_prompt_like_text() {
        let cases: &[(&str, &str)] = &[
            ("a red ball bouncing on a wooden floor", "a red ball bouncing on a wooden floor"),
            ("Broken text&hellip; it&#x2019;s ﬂubberiﬁc!", "Broken text… it's flubberific!"),
            ("ＬＯＵＤ　ＮＯＩＳＥＳ", "LOUD NOISES"),
            ("“quoted” ‘single’ ʼn", "\"quoted\" 'single' 'n"),
            ("caf\u{65}\u{301} &EACUTE;t&eacute;", "café Été"),
            ("a\r\nb\rc\u{2028}d\u{2029}e\u{85}", "a\nb\nc\nd\ne…"),
            ("\u{1B}[31mred\u{1B}[0m and\u{0}\u{7F}\u{FEFF} nulls\ttab", "red and nulls\ttab"),
            ("price \u{80}5 \u{93}hi\u{94}", "price €5 \"hi\""),
            ("&amp;amp; &#59; &#65a; &lt;", "& &#59; &#65a; <"),
            ("1 < 2 &amp; 3\nnext &amp; line", "1 < 2 &amp; 3\nnext &amp; line"),
            ("first &amp;\nthen < &amp;", "first &\nthen < &amp;"),
            ("ﾊﾟｲﾌﾟ ｶﾀｶﾅ", "パイプ カタカナ"),
        ];
        for (input, want) in cases {
            assert_eq!(fix_text(input), *want, "fix_text({input:?})");
        }
    }
}
