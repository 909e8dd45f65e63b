//! The CLIP BPE tokenizer: prompt text → token ids for the CLIP text encoders.
//!
//! The pipeline is assembled in code with the `tokenizers` crate from the standard CLIP
//! `vocab.json` + `merges.txt` and reproduces transformers 5's `CLIPTokenizer` id for id
//! (checked against `tests/fixtures/tokenizer/cases.json`, made by
//! `tools/make_tokenizer_cases.py`):
//!
//! - normalization: Unicode NFC, every whitespace run replaced by one space, lower-case.
//!   transformers 5 does exactly this and no longer calls `ftfy.fix_text` (transformers 4's
//!   slow tokenizer and OpenAI's original code did, which also unescaped HTML entities and
//!   repaired mojibake). We follow transformers 5, the reference of this project, so
//!   `&amp;` stays three tokens and no text is "fixed" behind the user's back.
//!   Leading/trailing whitespace needs no strip: the pre-tokenizer drops all whitespace.
//! - pre-tokenization: the CLIP regex (special tokens, English contractions, letter runs,
//!   single digits, runs of other symbols; whitespace removed), then the byte-level
//!   mapping (with its own GPT-2 split, as transformers configures it).
//! - BPE with the `</w>` end-of-word suffix; unknown pieces map to `<|endoftext|>`.
//! - `<|startoftext|>` (49406), `<|endoftext|>` (49407) and the pad token are special
//!   tokens matched verbatim in the raw text, before normalization. For SD 2.x / SDXL's
//!   second encoder the pad token is `!`, so a `!` in a prompt becomes id 0 (`!` without
//!   `</w>`) rather than merging with its neighbours: transformers does the same.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::ModelError;

/// Text that starts every CLIP sequence.
pub const BOS_TOKEN: &str = "<|startoftext|>";
/// Text that ends every CLIP sequence (and pads it in SD 1.x).
pub const EOS_TOKEN: &str = "<|endoftext|>";
/// Pad token when a tokenizer config names none (transformers' default).
pub const DEFAULT_PAD_TOKEN: &str = EOS_TOKEN;

/// CLIP's pre-tokenization pattern: special tokens, contractions, runs of letters, one
/// digit at a time, runs of anything that is neither whitespace, letter nor digit.
const CLIP_SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

const BUNDLED_VOCAB: &str = include_str!("../../assets/clip-tokenizer/vocab.json");
const BUNDLED_MERGES: &str = include_str!("../../assets/clip-tokenizer/merges.txt");

/// A CLIP tokenizer with its special-token ids resolved.
#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.tokenizer.get_vocab_size(true))
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl ClipTokenizer {
    /// Builds the tokenizer from a `vocab.json` and a `merges.txt` on disk.
    pub fn from_files(vocab: &Path, merges: &Path, pad_token: &str) -> Result<Self, ModelError> {
        let vocab_text = read_text(vocab)?;
        let merges_text = read_text(merges)?;
        let vocab_map = parse_vocab(&vocab_text)
            .map_err(|reason| ModelError::BadConfig { path: vocab.to_path_buf(), reason })?;
        let merge_list = parse_merges(&merges_text)
            .map_err(|reason| ModelError::BadConfig { path: merges.to_path_buf(), reason })?;
        Self::build(vocab_map, merge_list, pad_token)
    }

    /// Builds the tokenizer from the standard CLIP files compiled into the binary, for
    /// single-file checkpoints that carry no tokenizer of their own.
    pub fn bundled(pad_token: &str) -> Result<Self, ModelError> {
        let vocab = parse_vocab(BUNDLED_VOCAB)
            .map_err(|reason| ModelError::Tokenizer(format!("bundled vocab.json: {reason}")))?;
        let merges = parse_merges(BUNDLED_MERGES)
            .map_err(|reason| ModelError::Tokenizer(format!("bundled merges.txt: {reason}")))?;
        Self::build(vocab, merges, pad_token)
    }

    /// Builds the tokenizer of a diffusers `tokenizer/` (or `tokenizer_2/`) folder.
    ///
    /// The pad token comes from `tokenizer_config.json`, else `special_tokens_map.json`,
    /// else `<|endoftext|>`. `vocab.json` + `merges.txt` are used when the folder has them
    /// (symlinks, as in the Hugging Face cache, are followed); a folder with neither uses
    /// the bundled CLIP files, which every SD text encoder shares.
    pub fn from_folder(dir: &Path) -> Result<Self, ModelError> {
        if !dir.is_dir() {
            return Err(ModelError::NotFound(dir.to_path_buf()));
        }
        let pad_token = read_pad_token(dir)?;
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        match (entry_exists(&vocab), entry_exists(&merges)) {
            (true, true) => Self::from_files(&vocab, &merges, &pad_token),
            (false, false) => Self::bundled(&pad_token),
            (true, false) => Err(ModelError::NotFound(merges)),
            (false, true) => Err(ModelError::NotFound(vocab)),
        }
    }

    fn build(vocab: Vocab, merges: Merges, pad_token: &str) -> Result<Self, ModelError> {
        if pad_token.is_empty() {
            return Err(ModelError::Tokenizer("the pad token is empty".into()));
        }
        for required in [BOS_TOKEN, EOS_TOKEN] {
            if !vocab.contains_key(required) {
                return Err(ModelError::Tokenizer(format!(
                    "vocab.json has no {required} token; this is not a CLIP vocabulary"
                )));
            }
        }
        let model = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .end_of_word_suffix("</w>".into())
            .continuing_subword_prefix(String::new())
            .unk_token(EOS_TOKEN.into())
            .build()
            .map_err(|e| ModelError::Tokenizer(format!("invalid vocab/merges: {e}")))?;

        let regex_error = |e| ModelError::Tokenizer(format!("invalid regex: {e}"));
        let normalizer = NormalizerSequence::new(vec![
            NFC.into(),
            Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
                " ",
            )
            .map_err(regex_error)?
            .into(),
            Lowercase.into(),
        ]);
        let pre_tokenizer = PreTokenizerSequence::new(vec![
            Split::new(
                SplitPattern::Regex(CLIP_SPLIT_PATTERN.into()),
                SplitDelimiterBehavior::Removed,
                true,
            )
            .map_err(regex_error)?
            .into(),
            ByteLevel::new(false, true, true).into(),
        ]);

        let mut tokenizer = Tokenizer::new(model);
        tokenizer.with_normalizer(Some(normalizer)).with_pre_tokenizer(Some(pre_tokenizer));
        // Same order as transformers registers them, so a pad token missing from the
        // vocabulary gets the same new id.
        let specials: Vec<AddedToken> = [BOS_TOKEN, EOS_TOKEN, pad_token]
            .iter()
            .map(|content| AddedToken::from(*content, true).normalized(false))
            .collect();
        tokenizer.add_special_tokens(&specials);

        let id_of = |token: &str| {
            tokenizer
                .token_to_id(token)
                .ok_or_else(|| ModelError::Tokenizer(format!("special token {token:?} has no id")))
        };
        Ok(ClipTokenizer {
            bos_id: id_of(BOS_TOKEN)?,
            eos_id: id_of(EOS_TOKEN)?,
            pad_id: id_of(pad_token)?,
            tokenizer,
        })
    }

    /// Token ids of `text`, without `<|startoftext|>`/`<|endoftext|>` and untruncated.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(format!("cannot tokenize prompt: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Exactly `max_len` ids: `<|startoftext|>`, the first `max_len - 2` ids of `text`,
    /// `<|endoftext|>`, then the pad id (transformers' `padding="max_length"`,
    /// `truncation=True`). `max_len` must be at least 2.
    pub fn encode_padded(&self, text: &str, max_len: usize) -> Result<Vec<u32>, ModelError> {
        if max_len < 2 {
            return Err(ModelError::Tokenizer(format!(
                "max_len {max_len} leaves no room for the start and end tokens"
            )));
        }
        let ids = self.encode(text)?;
        let kept = ids.len().min(max_len - 2);
        let mut padded = Vec::with_capacity(max_len);
        padded.push(self.bos_id);
        padded.extend_from_slice(&ids[..kept]);
        padded.push(self.eos_id);
        padded.resize(max_len, self.pad_id);
        Ok(padded)
    }

    /// Id of `<|startoftext|>`.
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// Id of `<|endoftext|>`.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Id of the pad token.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Id of one vocabulary entry (e.g. `"cat</w>"`) or special token.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }
}

fn read_text(path: &Path) -> Result<String, ModelError> {
    std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ModelError::NotFound(path.to_path_buf())
        } else {
            ModelError::Io { path: path.to_path_buf(), source }
        }
    })
}

/// True when `path` is a file or a link, even a dangling one: a dangling link to a
/// vocabulary must fail loudly rather than silently fall back to the bundled files.
fn entry_exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

fn parse_vocab(text: &str) -> Result<Vocab, String> {
    let map: HashMap<String, u32> =
        serde_json::from_str(text).map_err(|e| format!("not a token → id JSON object: {e}"))?;
    Ok(map.into_iter().collect())
}

/// Parses `merges.txt`: an optional `#version` header, then one `left right` pair per
/// line in priority order.
fn parse_merges(text: &str) -> Result<Merges, String> {
    let mut merges = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.starts_with("#version") || line.is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(left), Some(right), None) if !left.is_empty() && !right.is_empty() => {
                merges.push((left.to_owned(), right.to_owned()))
            }
            _ => {
                return Err(format!(
                    "line {}: expected two tokens separated by one space, got {line:?}",
                    index + 1
                ))
            }
        }
    }
    Ok(merges)
}

/// The pad token named by the folder's tokenizer config, or the CLIP default.
fn read_pad_token(dir: &Path) -> Result<String, ModelError> {
    for name in ["tokenizer_config.json", "special_tokens_map.json"] {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let config: serde_json::Value = serde_json::from_str(&read_text(&path)?)
            .map_err(|e| bad_config(&path, format!("not valid JSON: {e}")))?;
        match config.get("pad_token") {
            None | Some(serde_json::Value::Null) => continue,
            Some(serde_json::Value::String(token)) => return Ok(token.clone()),
            Some(serde_json::Value::Object(token)) => {
                return match token.get("content") {
                    Some(serde_json::Value::String(content)) => Ok(content.clone()),
                    _ => Err(bad_config(&path, "pad_token object has no string \"content\"")),
                }
            }
            Some(other) => {
                return Err(bad_config(
                    &path,
                    format!("pad_token must be a string or an object, got {other}"),
                ))
            }
        }
    }
    Ok(DEFAULT_PAD_TOKEN.to_owned())
}

fn bad_config(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::BadConfig { path: PathBuf::from(path), reason: reason.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::OnceLock;

    const MAX_LEN: usize = 77;

    #[derive(serde::Deserialize)]
    struct CaseFile {
        max_length: usize,
        cases: Vec<Case>,
    }

    #[derive(serde::Deserialize)]
    struct Case {
        text: String,
        ids: Vec<u32>,
        ids_pad_bang: Vec<u32>,
        padded_eot: Vec<u32>,
        padded_bang: Vec<u32>,
    }

    fn cases() -> CaseFile {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tokenizer/cases.json");
        let text = std::fs::read_to_string(path).expect("fixture cases.json is readable");
        serde_json::from_str(&text).expect("fixture cases.json parses")
    }

    fn eot_tokenizer() -> &'static ClipTokenizer {
        static TOKENIZER: OnceLock<ClipTokenizer> = OnceLock::new();
        TOKENIZER.get_or_init(|| ClipTokenizer::bundled(EOS_TOKEN).expect("bundled tokenizer"))
    }

    fn bang_tokenizer() -> &'static ClipTokenizer {
        static TOKENIZER: OnceLock<ClipTokenizer> = OnceLock::new();
        TOKENIZER.get_or_init(|| ClipTokenizer::bundled("!").expect("bundled tokenizer"))
    }

    fn short(text: &str) -> String {
        text.chars().take(60).collect()
    }

    #[test]
    fn matches_transformers_on_every_fixture_case() {
        let file = cases();
        assert_eq!(file.max_length, MAX_LEN);
        assert!(file.cases.len() >= 30, "fixture has too few cases");
        let mut failures = Vec::new();
        for case in &file.cases {
            let checks = [
                ("ids (pad <|endoftext|>)", eot_tokenizer().encode(&case.text), &case.ids),
                ("ids (pad !)", bang_tokenizer().encode(&case.text), &case.ids_pad_bang),
                (
                    "padded (pad <|endoftext|>)",
                    eot_tokenizer().encode_padded(&case.text, MAX_LEN),
                    &case.padded_eot,
                ),
                (
                    "padded (pad !)",
                    bang_tokenizer().encode_padded(&case.text, MAX_LEN),
                    &case.padded_bang,
                ),
            ];
            for (what, got, expected) in checks {
                let got = got.expect("fixture text tokenizes");
                if &got != expected {
                    failures.push(format!(
                        "{:?} {what}:\n  got      {got:?}\n  expected {expected:?}",
                        short(&case.text)
                    ));
                }
            }
        }
        assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
    }

    #[test]
    fn can_be_shared_between_worker_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ClipTokenizer>();
    }

    #[test]
    fn special_ids_are_the_clip_ones() {
        let eot = eot_tokenizer();
        assert_eq!((eot.bos_id(), eot.eos_id(), eot.pad_id()), (49406, 49407, 49407));
        assert_eq!(bang_tokenizer().pad_id(), 0);
        assert_eq!(eot.token_id("cat</w>"), Some(2368));
        assert_eq!(eot.token_id("no such token"), None);
    }

    #[test]
    fn padded_output_is_truncated_and_framed() {
        let eot = eot_tokenizer();
        let long = "cat ".repeat(200);
        let ids = eot.encode_padded(&long, MAX_LEN).unwrap();
        assert_eq!(ids.len(), MAX_LEN);
        assert_eq!(ids[0], 49406);
        assert_eq!(ids[MAX_LEN - 1], 49407);
        assert!(ids[1..MAX_LEN - 1].iter().all(|&id| id == 2368));

        let empty = eot.encode_padded("", 4).unwrap();
        assert_eq!(empty, vec![49406, 49407, 49407, 49407]);
        assert!(eot.encode_padded("cat", 1).is_err());
    }

    #[test]
    fn folder_reads_pad_token_and_falls_back_to_bundled_files() {
        let dir = std::env::temp_dir().join(format!("sdserve-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();

        // No config at all: CLIP's default pad.
        assert_eq!(ClipTokenizer::from_folder(&dir).unwrap().pad_id(), 49407);

        // pad_token as an AddedToken object in special_tokens_map.json.
        std::fs::write(
            dir.join("special_tokens_map.json"),
            r#"{"pad_token": {"content": "!", "lstrip": false}}"#,
        )
        .unwrap();
        assert_eq!(ClipTokenizer::from_folder(&dir).unwrap().pad_id(), 0);

        // tokenizer_config.json wins, and local vocab/merges are used when present.
        std::fs::write(dir.join("tokenizer_config.json"), r#"{"pad_token": "<|endoftext|>"}"#)
            .unwrap();
        let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/clip-tokenizer");
        std::fs::copy(assets.join("vocab.json"), dir.join("vocab.json")).unwrap();
        std::fs::copy(assets.join("merges.txt"), dir.join("merges.txt")).unwrap();
        let from_folder = ClipTokenizer::from_folder(&dir).unwrap();
        assert_eq!(from_folder.pad_id(), 49407);
        assert_eq!(
            from_folder.encode("a red cat").unwrap(),
            eot_tokenizer().encode("a red cat").unwrap()
        );

        // Half a vocabulary is an error, not a silent fallback.
        std::fs::remove_file(dir.join("merges.txt")).unwrap();
        assert!(matches!(ClipTokenizer::from_folder(&dir), Err(ModelError::NotFound(_))));

        std::fs::write(dir.join("tokenizer_config.json"), r#"{"pad_token": 3}"#).unwrap();
        let err = ClipTokenizer::from_folder(&dir).unwrap_err();
        assert!(matches!(err, ModelError::BadConfig { .. }), "{err}");

        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn broken_vocabulary_files_are_reported() {
        assert!(parse_merges("#version: 0.2\na b c\n").unwrap_err().contains("line 2"));
        assert_eq!(parse_merges("#version: 0.2\na b\n\n").unwrap().len(), 1);
        assert!(parse_vocab("[1, 2]").is_err());
        let missing = ClipTokenizer::from_files(
            Path::new("/nonexistent/vocab.json"),
            Path::new("/nonexistent/merges.txt"),
            EOS_TOKEN,
        );
        assert!(matches!(missing, Err(ModelError::NotFound(_))));
        let not_clip = ClipTokenizer::build(
            [("a".to_owned(), 0)].into_iter().collect(),
            Vec::new(),
            EOS_TOKEN,
        );
        assert!(matches!(not_clip, Err(ModelError::Tokenizer(_))));
    }
}
