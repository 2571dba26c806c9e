//! The Wan pipelines' prompt cleaning (diffusers `prompt_clean`, the original's
//! `clean='whitespace'`): `ftfy.fix_text`, `html.unescape` twice, strip, and every run of
//! whitespace collapsed to one space.

use super::ftfy::fix_text;
use super::html::html_unescape;

/// Python's `str.isspace()`, which is also what `\s` matches in a `str` pattern: Unicode
/// White_Space plus the separators U+001C–U+001F.
pub fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1C}'..='\u{1F}').contains(&c)
}

/// `re.sub(r"\s+", " ", text).strip()`.
pub fn whitespace_clean(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_space = false;
    for c in text.chars() {
        if is_python_space(c) {
            in_space = true;
            continue;
        }
        if in_space && !out.is_empty() {
            out.push(' ');
        }
        in_space = false;
        out.push(c);
    }
    out
}

/// `html.unescape(html.unescape(ftfy.fix_text(text))).strip()`.
pub fn basic_clean(text: &str) -> String {
    let fixed = html_unescape(&html_unescape(&fix_text(text)));
    fixed.trim_matches(is_python_space).to_string()
}

/// The whole cleaning a prompt gets before tokenization.
pub fn prompt_clean(text: &str) -> String {
    whitespace_clean(&basic_clean(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collapses_and_strips_python_whitespace() {
        assert_eq!(whitespace_clean("  a \t\n b\u{3000}\u{a0}c\u{1f}d  "), "a b c d");
        assert_eq!(whitespace_clean(" \n\t "), "");
        assert_eq!(whitespace_clean("x"), "x");
        assert!(is_python_space('\u{1c}') && is_python_space('\u{85}') && !is_python_space('\u{200b}'));
    }

    /// Outputs of diffusers' `prompt_clean` (ftfy 6.3.1, Python 3.11) on the same inputs.
    #[test]
    fn matches_the_pipeline_cleaning() {
        let cases: &[(&str, &str)] = &[
            ("a red ball bouncing on a wooden floor", "a red ball bouncing on a wooden floor"),
            ("", ""),
            ("  A cat&amp;dog &amp;amp; friends\n\n on  the ﬁeld  ", "A cat&dog & friends on the field"),
            ("“Ｈｅｌｌｏ”\u{3000}world &lt;3 &#8230;", "\"Hello\" world <3 …"),
            ("x &amp;lt; y < z", "x < y < z"),
            ("tab\tand\u{200b}zero-width", "tab and\u{200b}zero-width"),
        ];
        for (input, want) in cases {
            assert_eq!(prompt_clean(input), *want, "prompt_clean({input:?})");
        }
    }
}
