//! The AUTOMATIC1111 prompt syntax: attention weights `(word)`, `((word))`, `(word:1.3)`,
//! `[word]`, escapes `\(` `\)` `\[` `\]` `\\` `\:`, `BREAK`, and extra-network tags such as
//! `<lora:name:0.8>`, which are taken out of the text and returned for the adapter code.
//!
//! The parser never fails: anything it cannot read as syntax is text. It follows A1111's
//! `parse_prompt_attention` (modules/prompt_parser.py) with three deliberate differences,
//! all for inputs where A1111 does something nobody means:
//! - `\:` is a literal colon that never starts a weight (A1111 drops the backslash and
//!   then reads `:1.2)` as a weight anyway);
//! - a weight that is not a number (`(a:1.2.3)`) is text instead of an exception;
//! - `BREAK` inside brackets still breaks (A1111 multiplies its marker weight and then
//!   encodes the word "BREAK").
//!
//! Like A1111, a closing bracket without an opening one is text, and an opening bracket
//! that is never closed applies its weight up to the end of the prompt.

/// `(text)` multiplies the weight by this; `[text]` divides by it.
pub const ROUND_BRACKET_MULTIPLIER: f64 = 1.1;

/// A piece of a parsed prompt, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptPiece {
    /// Text with its attention weight (1.0 = neutral).
    Text { text: String, weight: f64 },
    /// `BREAK`: the next text starts a new 75-token chunk.
    Break,
}

/// A `<lora:name>`, `<lora:name:weight>` or `<lora:name:te_weight:unet_weight>` tag
/// (`<lyco:...>` is the same), also with A1111's named `te=` / `unet=` arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTag {
    /// The adapter's name (its file stem), exactly as written.
    pub name: String,
    /// The multiplier of the text-encoder part (1.0 when absent).
    pub weight: f64,
    /// The multiplier of the UNet part when the tag gives one separately; `None` means
    /// "same as `weight`".
    pub unet_weight: Option<f64>,
}

impl LoraTag {
    /// The multiplier of the UNet part.
    pub fn unet_multiplier(&self) -> f64 {
        self.unet_weight.unwrap_or(self.weight)
    }
}

/// A prompt as the text encoders and adapters consume it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParsedPrompt {
    /// Text and breaks in order; runs of equal weight are merged. Never empty.
    pub pieces: Vec<PromptPiece>,
    /// The LoRA tags found, in order of appearance (removed from the text).
    pub loras: Vec<LoraTag>,
    /// Other `<kind:args>` tags (hypernetworks and the like): removed from the text as A1111
    /// does, and listed so callers can warn that they are not supported.
    pub other_tags: Vec<String>,
    /// `<lora:...>` tags whose arguments are not readable (e.g. a non-numeric weight):
    /// kept here verbatim so validation can name them; they are removed from the text.
    pub malformed_tags: Vec<String>,
}

impl ParsedPrompt {
    /// Whether every text piece has weight 1 and there is no `BREAK`.
    pub fn is_plain(&self) -> bool {
        self.pieces
            .iter()
            .all(|piece| matches!(piece, PromptPiece::Text { weight, .. } if *weight == 1.0))
    }
}

/// Parses a prompt written in A1111's syntax.
pub fn parse_prompt(text: &str) -> ParsedPrompt {
    let mut parsed = ParsedPrompt::default();
    let remaining = extract_tags(text, &mut parsed);
    parsed.pieces = parse_attention(&remaining);
    parsed
}

/// Removes `<kind:args>` tags (A1111's extra networks: `<(\w+):([^>]+)>`), recording them.
fn extract_tags(text: &str, parsed: &mut ParsedPrompt) -> String {
    let mut kept = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('<') {
        kept.push_str(&rest[..start]);
        let candidate = &rest[start..];
        match read_tag(candidate) {
            Some((kind, args, length)) => {
                record_tag(kind, args, &candidate[..length], parsed);
                rest = &candidate[length..];
            }
            None => {
                kept.push('<');
                rest = &candidate[1..];
            }
        }
    }
    kept.push_str(rest);
    kept
}

/// Reads `<kind:args>` at the start of `text`: `kind` is word characters, `args` is
/// one or more characters other than `>`. Returns (kind, args, byte length of the tag).
fn read_tag(text: &str) -> Option<(&str, &str, usize)> {
    let body = text.strip_prefix('<')?;
    let kind_len = body.find(|c: char| !is_word_char(c)).unwrap_or(body.len());
    if kind_len == 0 || !body[kind_len..].starts_with(':') {
        return None;
    }
    let after_colon = &body[kind_len + 1..];
    let args_len = after_colon.find('>')?;
    if args_len == 0 {
        return None;
    }
    Some((&body[..kind_len], &after_colon[..args_len], 1 + kind_len + 1 + args_len + 1))
}

fn record_tag(kind: &str, args: &str, whole: &str, parsed: &mut ParsedPrompt) {
    if !matches!(kind, "lora" | "lyco") {
        parsed.other_tags.push(whole.to_string());
        return;
    }
    match lora_tag(args) {
        Some(tag) => parsed.loras.push(tag),
        None => parsed.malformed_tags.push(whole.to_string()),
    }
}

/// A1111's extra-network arguments: `name[:te[:unet]]`, where any argument after the name
/// may instead be `te=W` or `unet=W`.
fn lora_tag(args: &str) -> Option<LoraTag> {
    let mut parts = args.split(':');
    let name = parts.next()?.trim();
    if name.is_empty() {
        return None;
    }
    let (mut weight, mut unet_weight) = (None, None);
    let mut positional = 0;
    for part in parts {
        let part = part.trim();
        if let Some(value) = part.strip_prefix("te=") {
            weight = Some(parse_number(value)?);
        } else if let Some(value) = part.strip_prefix("unet=") {
            unet_weight = Some(parse_number(value)?);
        } else if part.contains('=') {
            // Other named arguments (A1111's `dyn=`) do not change the weights.
            continue;
        } else {
            let value = parse_number(part)?;
            match positional {
                0 => weight = Some(value),
                1 => unet_weight = Some(value),
                _ => return None,
            }
            positional += 1;
        }
    }
    Some(LoraTag { name: name.to_string(), weight: weight.unwrap_or(1.0), unet_weight })
}

fn parse_number(text: &str) -> Option<f64> {
    text.trim().parse::<f64>().ok().filter(|v| v.is_finite())
}

/// Python's `\w` for the characters prompts use: letters, digits, underscore.
fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// A lexical unit of the attention syntax.
#[derive(Debug)]
enum Lexeme<'a> {
    /// An escaped character or a run of plain text.
    Text(&'a str),
    OpenRound,
    OpenSquare,
    /// `:` weight `)`, with the weight as written.
    WeightClose {
        weight: &'a str,
        whole: &'a str,
    },
    CloseRound,
    CloseSquare,
}

/// Splits `text` the way A1111's `re_attention` does, plus the `\:` escape.
fn lex(text: &str) -> Vec<Lexeme<'_>> {
    let mut lexemes = Vec::new();
    let mut position = 0;
    while position < text.len() {
        let rest = &text[position..];
        let first = rest.chars().next().expect("position is inside the text; this is a bug");
        let (lexeme, length) = match first {
            '\\' => match rest[1..].chars().next() {
                Some(escaped @ ('(' | ')' | '[' | ']' | '\\' | ':')) => {
                    (Lexeme::Text(&rest[1..1 + escaped.len_utf8()]), 1 + escaped.len_utf8())
                }
                // A lone backslash disappears, as in A1111.
                _ => (Lexeme::Text(""), 1),
            },
            '(' => (Lexeme::OpenRound, 1),
            '[' => (Lexeme::OpenSquare, 1),
            ')' => (Lexeme::CloseRound, 1),
            ']' => (Lexeme::CloseSquare, 1),
            ':' => match weight_close(rest) {
                Some((weight, length)) => {
                    (Lexeme::WeightClose { weight, whole: &rest[..length] }, length)
                }
                None => (Lexeme::Text(":"), 1),
            },
            _ => {
                let length = rest.find(['\\', '(', ')', '[', ']', ':']).unwrap_or(rest.len());
                (Lexeme::Text(&rest[..length]), length)
            }
        };
        lexemes.push(lexeme);
        position += length;
    }
    lexemes
}

/// Matches `:\s*([+-]?[.\d]+)\s*\)` at the start of `text`.
fn weight_close(text: &str) -> Option<(&str, usize)> {
    let after_colon = &text[1..];
    let number_start = 1 + (after_colon.len() - after_colon.trim_start().len());
    let mut end = number_start;
    let bytes = text.as_bytes();
    if end < bytes.len() && (bytes[end] == b'+' || bytes[end] == b'-') {
        end += 1;
    }
    let digits_start = end;
    while end < bytes.len() && (bytes[end].is_ascii_digit() || bytes[end] == b'.') {
        end += 1;
    }
    if end == digits_start {
        return None;
    }
    let after_number = &text[end..];
    let close = end + (after_number.len() - after_number.trim_start().len());
    (text[close..].starts_with(')')).then(|| (&text[number_start..end], close + 1))
}

/// A1111's `parse_prompt_attention`, see the module docs for the differences.
fn parse_attention(text: &str) -> Vec<PromptPiece> {
    // Weights live beside the pieces so brackets can scale a range of them.
    let mut pieces: Vec<PromptPiece> = Vec::new();
    let mut round_starts: Vec<usize> = Vec::new();
    let mut square_starts: Vec<usize> = Vec::new();
    let scale = |pieces: &mut Vec<PromptPiece>, start: usize, multiplier: f64| {
        for piece in &mut pieces[start..] {
            if let PromptPiece::Text { weight, .. } = piece {
                *weight *= multiplier;
            }
        }
    };
    for lexeme in lex(text) {
        match lexeme {
            Lexeme::OpenRound => round_starts.push(pieces.len()),
            Lexeme::OpenSquare => square_starts.push(pieces.len()),
            Lexeme::WeightClose { weight, whole } => {
                match (weight.parse::<f64>().ok().filter(|w| w.is_finite()), round_starts.last()) {
                    (Some(value), Some(&start)) => {
                        round_starts.pop();
                        scale(&mut pieces, start, value);
                    }
                    _ => push_text(&mut pieces, whole),
                }
            }
            Lexeme::CloseRound => match round_starts.pop() {
                Some(start) => scale(&mut pieces, start, ROUND_BRACKET_MULTIPLIER),
                None => push_text(&mut pieces, ")"),
            },
            Lexeme::CloseSquare => match square_starts.pop() {
                Some(start) => scale(&mut pieces, start, 1.0 / ROUND_BRACKET_MULTIPLIER),
                None => push_text(&mut pieces, "]"),
            },
            Lexeme::Text(text) => push_text(&mut pieces, text),
        }
    }
    // Unclosed brackets weigh everything after them, innermost first, as in A1111.
    for start in round_starts {
        scale(&mut pieces, start, ROUND_BRACKET_MULTIPLIER);
    }
    for start in square_starts {
        scale(&mut pieces, start, 1.0 / ROUND_BRACKET_MULTIPLIER);
    }
    merge_equal_weights(pieces)
}

/// Appends plain text, splitting it at `BREAK` (a whole word, with the whitespace around
/// it consumed, like A1111's `\s*\bBREAK\b\s*`).
fn push_text(pieces: &mut Vec<PromptPiece>, text: &str) {
    let mut rest = text;
    loop {
        match find_break(rest) {
            Some((before_end, after_start)) => {
                pieces
                    .push(PromptPiece::Text { text: rest[..before_end].to_string(), weight: 1.0 });
                pieces.push(PromptPiece::Break);
                rest = &rest[after_start..];
            }
            None => {
                pieces.push(PromptPiece::Text { text: rest.to_string(), weight: 1.0 });
                return;
            }
        }
    }
}

/// The first whole-word `BREAK` in `text`: (end of the text before it, without trailing
/// whitespace; start of the text after it, without leading whitespace).
fn find_break(text: &str) -> Option<(usize, usize)> {
    let mut search_from = 0;
    while let Some(found) = text[search_from..].find("BREAK") {
        let start = search_from + found;
        let end = start + "BREAK".len();
        let word_before = text[..start].chars().next_back().is_some_and(is_word_char);
        let word_after = text[end..].chars().next().is_some_and(is_word_char);
        if !word_before && !word_after {
            let before_end = text[..start].trim_end().len();
            let after_start = text.len() - text[end..].trim_start().len();
            return Some((before_end, after_start));
        }
        search_from = end;
    }
    None
}

fn merge_equal_weights(pieces: Vec<PromptPiece>) -> Vec<PromptPiece> {
    let mut merged: Vec<PromptPiece> = Vec::with_capacity(pieces.len());
    for piece in pieces {
        if let (
            Some(PromptPiece::Text { text: previous, weight: previous_weight }),
            PromptPiece::Text { text, weight },
        ) = (merged.last_mut(), &piece)
        {
            if *previous_weight == *weight {
                previous.push_str(text);
                continue;
            }
        }
        merged.push(piece);
    }
    if merged.is_empty() {
        merged.push(PromptPiece::Text { text: String::new(), weight: 1.0 });
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(text: &str, weight: f64) -> PromptPiece {
        PromptPiece::Text { text: text.into(), weight }
    }

    /// Pieces with weights rounded to 1e-9, for comparison with A1111's printed values.
    fn pieces(prompt: &str) -> Vec<(String, f64)> {
        parse_prompt(prompt)
            .pieces
            .into_iter()
            .map(|piece| match piece {
                PromptPiece::Text { text, weight } => (text, (weight * 1e9).round() / 1e9),
                PromptPiece::Break => ("BREAK".into(), -1.0),
            })
            .collect()
    }

    fn expect(prompt: &str, expected: &[(&str, f64)]) {
        let expected: Vec<(String, f64)> =
            expected.iter().map(|(t, w)| (t.to_string(), (w * 1e9).round() / 1e9)).collect();
        assert_eq!(pieces(prompt), expected, "prompt {prompt:?}");
    }

    #[test]
    fn plain_text_is_one_piece() {
        expect("normal text", &[("normal text", 1.0)]);
        assert!(parse_prompt("normal text").is_plain());
    }

    #[test]
    fn empty_prompt_is_one_empty_piece() {
        expect("", &[("", 1.0)]);
    }

    #[test]
    fn round_brackets_multiply_by_1_1() {
        expect("an (important) word", &[("an ", 1.0), ("important", 1.1), (" word", 1.0)]);
        expect("((word))", &[("word", 1.21)]);
        expect("(((word)))", &[("word", 1.331)]);
        assert!(!parse_prompt("(a)").is_plain());
    }

    #[test]
    fn square_brackets_divide_by_1_1() {
        expect("[word]", &[("word", 1.0 / 1.1)]);
        expect("[[word]]", &[("word", 1.0 / 1.21)]);
        expect("([word])", &[("word", 1.0)]);
    }

    #[test]
    fn explicit_weights() {
        expect("(word:1.3)", &[("word", 1.3)]);
        expect("(word: 1.3 )", &[("word", 1.3)]);
        expect("(word:0.5) rest", &[("word", 0.5), (" rest", 1.0)]);
        expect("(word:-1)", &[("word", -1.0)]);
        expect("(word:+2)", &[("word", 2.0)]);
        expect("(word:.5)", &[("word", 0.5)]);
        expect("((word:1.5))", &[("word", 1.65)]);
        expect("(a (b:2) c)", &[("a ", 1.1), ("b", 2.2), (" c", 1.1)]);
    }

    #[test]
    fn a1111_doc_example() {
        expect(
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            &[
                ("a ", 1.0),
                ("house", 1.1 * 1.1 * 1.3),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641),
                (".", 1.1),
            ],
        );
    }

    #[test]
    fn adjacent_equal_weights_merge() {
        expect("(unnecessary)(parens)", &[("unnecessaryparens", 1.1)]);
    }

    #[test]
    fn escapes_are_literal() {
        expect(r"\(literal\]", &[("(literal]", 1.0)]);
        expect(r"\(a\) \[b\]", &[("(a) [b]", 1.0)]);
        expect(r"a \\ b", &[(r"a \ b", 1.0)]);
        expect(r"(a\:1.2)", &[("a:1.2", 1.1)]);
        expect(r"(a\)b)", &[("a)b", 1.1)]);
        // A backslash before anything else disappears, as in A1111.
        expect(r"a\b", &[("ab", 1.0)]);
        expect("trailing\\", &[("trailing", 1.0)]);
    }

    #[test]
    fn unbalanced_closers_are_text() {
        expect("a) b", &[("a) b", 1.0)]);
        expect("a] b", &[("a] b", 1.0)]);
        expect(")))", &[(")))", 1.0)]);
        expect("(a:1.2) b:1.5)", &[("a", 1.2), (" b:1.5)", 1.0)]);
        expect("(a] b)", &[("a] b", 1.1)]);
    }

    #[test]
    fn unclosed_openers_weigh_to_the_end_like_a1111() {
        expect("(unbalanced", &[("unbalanced", 1.1)]);
        expect("a [b", &[("a ", 1.0), ("b", 1.0 / 1.1)]);
        expect("((a) b", &[("a", 1.21), (" b", 1.1)]);
        expect("(((", &[("", 1.0)]);
        expect("[(", &[("", 1.0)]);
    }

    #[test]
    fn colons_that_are_not_weights_are_text() {
        expect("a: b", &[("a: b", 1.0)]);
        expect("(a:b)", &[("a:b", 1.1)]);
        expect("(a:1.2.3)", &[("a:1.2.3)", 1.1)]);
        expect("(a:.)", &[("a:.)", 1.1)]);
        expect("time 12:30", &[("time 12:30", 1.0)]);
        expect("a:1.5)", &[("a:1.5)", 1.0)]);
    }

    #[test]
    fn break_splits_chunks() {
        expect("a BREAK b", &[("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]);
        expect("a\nBREAK\nb", &[("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]);
        expect("BREAK b", &[("", 1.0), ("BREAK", -1.0), ("b", 1.0)]);
        expect(
            "a BREAK BREAK b",
            &[("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)],
        );
        expect("a BREAK, b", &[("a", 1.0), ("BREAK", -1.0), (", b", 1.0)]);
        // Not a whole word, or not upper case: text.
        expect("BREAKING news", &[("BREAKING news", 1.0)]);
        expect("a break b", &[("a break b", 1.0)]);
        expect("xBREAK", &[("xBREAK", 1.0)]);
        // Inside brackets it still breaks, and keeps the weights around it.
        expect("(a BREAK b)", &[("a", 1.1), ("BREAK", -1.0), ("b", 1.1)]);
        assert!(!parse_prompt("a BREAK b").is_plain());
    }

    #[test]
    fn lora_tags_are_removed_and_returned() {
        let parsed = parse_prompt("a cat <lora:myStyle:0.8>, <lora:other> sitting");
        assert_eq!(parsed.pieces, vec![text("a cat ,  sitting", 1.0)]);
        assert_eq!(
            parsed.loras,
            vec![
                LoraTag { name: "myStyle".into(), weight: 0.8, unet_weight: None },
                LoraTag { name: "other".into(), weight: 1.0, unet_weight: None },
            ]
        );
        let parsed = parse_prompt("<lora:x:0.5:0.25> <lyco:y:te=0.3:unet=0.7:dyn=4>");
        assert_eq!(parsed.loras[0].unet_multiplier(), 0.25);
        assert_eq!(parsed.loras[0].weight, 0.5);
        assert_eq!(
            parsed.loras[1],
            LoraTag { name: "y".into(), weight: 0.3, unet_weight: Some(0.7) }
        );
        assert_eq!(parsed.loras[1].unet_multiplier(), 0.7);
        // Tags inside weighted text: the tag goes, the weight stays on the text.
        let parsed = parse_prompt("(a <lora:z:-1> b:1.2)");
        assert_eq!(parsed.pieces, vec![text("a  b", 1.2)]);
        assert_eq!(parsed.loras[0].weight, -1.0);
    }

    #[test]
    fn malformed_and_other_tags() {
        let parsed = parse_prompt("a <lora:x:strong> b <hypernet:h:1> c");
        assert!(parsed.loras.is_empty());
        assert_eq!(parsed.malformed_tags, vec!["<lora:x:strong>".to_string()]);
        assert_eq!(parsed.other_tags, vec!["<hypernet:h:1>".to_string()]);
        assert_eq!(parsed.pieces, vec![text("a  b  c", 1.0)]);
        for literal in ["a < b", "<lora:>", "<lora", "<:x>", "<lora x>", "<-lora:x>", "<<lora:x>"] {
            let parsed = parse_prompt(literal);
            assert!(parsed.loras.is_empty() || literal == "<<lora:x>", "{literal}");
            if literal != "<<lora:x>" {
                assert_eq!(parsed.pieces, vec![text(literal, 1.0)], "{literal}");
            }
        }
        let parsed = parse_prompt("<<lora:x>");
        assert_eq!(parsed.loras[0].name, "x");
        assert_eq!(parsed.pieces, vec![text("<", 1.0)]);
        assert_eq!(parse_prompt("<lora:a:1:2:3>").malformed_tags.len(), 1);
        assert_eq!(parse_prompt("<lora:a:inf>").malformed_tags.len(), 1);
    }

    #[test]
    fn unicode_text_survives() {
        expect("(ねこ:1.2) 🐱 [café]", &[("ねこ", 1.2), (" 🐱 ", 1.0), ("café", 1.0 / 1.1)]);
        expect("\\é", &[("é", 1.0)]);
    }

    /// A small deterministic generator (xorshift) so the fuzz test needs no dependency.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn random_strings_never_panic() {
        const ALPHABET: &[&str] = &[
            "(", ")", "[", "]", "\\", ":", "<", ">", "lora", ":0.5", "1.2", ".", "-", "+", " ",
            "BREAK", "a", "é", "🐱", "\n", "=", "te=", ",",
        ];
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let length = (rng.next() % 24) as usize;
            let prompt: String = (0..length)
                .map(|_| ALPHABET[(rng.next() % ALPHABET.len() as u64) as usize])
                .collect();
            let parsed = parse_prompt(&prompt);
            assert!(!parsed.pieces.is_empty());
            for piece in &parsed.pieces {
                if let PromptPiece::Text { weight, .. } = piece {
                    assert!(weight.is_finite(), "{prompt:?}");
                }
            }
        }
        // Arbitrary bytes as (lossy) text, too.
        for _ in 0..5_000 {
            let bytes: Vec<u8> = (0..(rng.next() % 32)).map(|_| rng.next() as u8).collect();
            parse_prompt(&String::from_utf8_lossy(&bytes));
        }
    }
}
