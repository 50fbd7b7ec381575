//! CLIP's byte-level BPE tokenizer, giving the ids Stable Diffusion's pipelines feed the text encoder.
//!
//! It reproduces transformers 5's `CLIPTokenizer` (backed by the `tokenizers` library,
//! <https://github.com/huggingface/transformers/blob/main/src/transformers/models/clip/tokenization_clip.py>)
//! loaded from a diffusers `tokenizer/` folder, and diffusers' call
//! `tokenizer(prompt, padding="max_length", max_length=model_max_length, truncation=True)`:
//!
//! 1. Added tokens (the special tokens, placeholders such as `v1*`) are cut out of the text first:
//!    those marked `normalized: false` on the raw text, the others on the normalised text. The
//!    longest token starting leftmost wins, also inside words (`xv1*` is `x` + `v1*`).
//! 2. The rest is normalised: Unicode NFC, runs of whitespace become one space, then each character is
//!    lower-cased on its own.
//! 3. CLIP's regex splits it into words (letter runs, single digits, runs of other symbols,
//!    contractions such as `'s`); spaces are dropped.
//! 4. Each word's UTF-8 bytes are mapped to printable characters and merged by BPE, the last
//!    symbol carrying `</w>`.
//! 5. BOS + ids + EOS, truncated to `model_max_length` (EOS kept last) and padded with the pad
//!    token: `"!"` (id 0) for SD 2.x, `<|endoftext|>` for SD 1.x.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::path::Path;
use std::sync::Mutex;

use regex::Regex;
use serde_json::{Map, Value};
use unicode_normalization_alignments::UnicodeNormalization;

use crate::io::{read_text_bounded, SMALL_FILE_LIMIT};
use crate::{Error, Result};

/// The placeholder token of learned word `index` (0-based): `v1*`, `v2*`, ... An identity takes
/// two words, so identity `i` is `v{2i+1}* v{2i+2}*`.
pub fn placeholder_token(index: usize) -> String {
    format!("v{}*", index + 1)
}

/// CLIP's pre-split: transformers' `Split` pattern, matched on lower-cased text.
const PRE_SPLIT: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+";
/// Marks the last symbol of a word in the vocabulary.
const END_OF_WORD: &str = "</w>";
/// Words kept in the BPE cache at most (the `tokenizers` library's bound).
const CACHE_CAPACITY: usize = 10_000;
/// Token length used when tokenizer_config.json has no `model_max_length` (CLIP's context).
const DEFAULT_MAX_LENGTH: usize = 77;
/// The largest `model_max_length` taken, far above any text encoder's positions: every encoding
/// is padded to that length.
const MAX_LENGTH_LIMIT: usize = 1 << 16;
/// The special-token keys of tokenizer_config.json, in the order transformers adds them.
const SPECIAL_TOKEN_KEYS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// The ids of one prompt, ready for the text encoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoding {
    /// `max_length` ids: BOS, the prompt's tokens, EOS, padding.
    pub ids: Vec<u32>,
    /// The prompt had more tokens than fit; the rest was dropped (diffusers warns then).
    pub truncated: bool,
}

/// A token recognised in the text before BPE: a special token or a placeholder.
#[derive(Debug, Clone)]
struct AddedToken {
    content: String,
    /// The text it matches: its content, normalised when `normalized` is set.
    pattern: String,
    id: u32,
    /// Matched on the normalised text (placeholders) rather than the raw text.
    normalized: bool,
}

/// A piece of the prompt after added tokens are cut out and the rest is split into words.
enum Piece<'a> {
    Added(&'a AddedToken),
    Word(String),
}

/// A BPE merge: its priority (lower merges first) and the id of the merged symbol.
#[derive(Debug, Clone, Copy)]
struct Merge {
    rank: u32,
    id: u32,
}

/// CLIP's tokenizer loaded from a diffusers `tokenizer/` folder. `Send + Sync`: the per-word BPE
/// cache sits behind a mutex.
pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    /// The base vocabulary by id.
    tokens: Vec<String>,
    merges: HashMap<(u32, u32), Merge>,
    added: Vec<AddedToken>,
    /// The printable character standing for each byte (GPT-2's table).
    byte_chars: [char; 256],
    pre_split: Regex,
    whitespace: Regex,
    bos: u32,
    eos: u32,
    pad: u32,
    unk: u32,
    max_length: usize,
    /// BPE ids of words seen before.
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab", &self.vocab.len())
            .field("merges", &self.merges.len())
            .field("added", &self.added)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("max_length", &self.max_length)
            .finish()
    }
}

impl ClipTokenizer {
    /// Loads a diffusers `tokenizer/` folder: vocab.json, merges.txt, and (optional)
    /// tokenizer_config.json / special_tokens_map.json for the special tokens (pad `"!"`, id 0, for
    /// SD 2.x; `<|endoftext|>` for SD 1.x) and `model_max_length` (77 when absent).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let vocab_file = dir.join("vocab.json");
        let merges_file = dir.join("merges.txt");
        let vocab: HashMap<String, u32> = serde_json::from_str(&read_required(&vocab_file)?)
            .map_err(|e| config_error(&vocab_file, format!("not a JSON map of token -> id: {e}")))?;
        let merges = read_required(&merges_file)?;
        let config = SpecialTokens::read(dir)?;
        Self::new(vocab, &merges, config, &vocab_file, &merges_file)
    }

    fn new(
        vocab: HashMap<String, u32>,
        merges: &str,
        config: SpecialTokens,
        vocab_file: &Path,
        merges_file: &Path,
    ) -> Result<Self> {
        let mut tokens = vec![None; vocab.len()];
        for (token, &id) in &vocab {
            match tokens.get_mut(id as usize) {
                Some(slot @ None) => *slot = Some(token.clone()),
                _ => {
                    return Err(config_error(
                        vocab_file,
                        format!("ids must be 0..{} with no repeats; {token:?} has {id}", vocab.len()),
                    ))
                }
            }
        }
        let tokens: Vec<String> = tokens.into_iter().map(|t| t.expect("every id was checked")).collect();
        let merges = parse_merges(merges, &vocab, merges_file)?;

        let mut tokenizer = Self {
            vocab,
            tokens,
            merges,
            added: Vec::new(),
            byte_chars: byte_chars(),
            pre_split: Regex::new(PRE_SPLIT).expect("valid pre-split regex"),
            whitespace: Regex::new(r"\s+").expect("valid whitespace regex"),
            bos: 0,
            eos: 0,
            pad: 0,
            unk: 0,
            max_length: config.max_length,
            cache: Mutex::new(HashMap::new()),
        };
        for token in &config.added {
            tokenizer.add_token(&token.content, token.normalized);
        }
        let id_of = |key: &str| tokenizer.token_to_id(&config.named[key]).expect("named special tokens are added");
        let (bos, eos, pad) = (id_of("bos_token"), id_of("eos_token"), id_of("pad_token"));
        // BPE replaces bytes missing from the vocabulary with the unknown token, taken from vocab.json.
        let unk_content = &config.named["unk_token"];
        let unk = *tokenizer.vocab.get(unk_content).ok_or_else(|| {
            config_error(vocab_file, format!("the unknown token {unk_content:?} (unk_token) is not in the vocabulary"))
        })?;
        tokenizer.bos = bos;
        tokenizer.eos = eos;
        tokenizer.pad = pad;
        tokenizer.unk = unk;
        Ok(tokenizer)
    }

    /// Adds whole-word tokens such as `"v1*"`, `"v2*"` (never split by BPE, matched anywhere in the
    /// lower-cased prompt like transformers' `tokenizer.add_tokens`), with ids after the current
    /// vocabulary, in order; returns their ids. Adding an existing token is an error.
    pub fn add_placeholder_tokens(&mut self, tokens: &[&str]) -> Result<Vec<u32>> {
        for (i, token) in tokens.iter().enumerate() {
            if token.is_empty() {
                return Err(Error::Input("a placeholder token cannot be empty".into()));
            }
            if self.token_to_id(token).is_some() || tokens[..i].contains(token) {
                return Err(Error::Input(format!(
                    "placeholder token {token:?} is already in the tokenizer's vocabulary; choose another name"
                )));
            }
        }
        Ok(tokens.iter().map(|token| self.add_token(token, true)).collect())
    }

    /// Adds a token matched before BPE (keeping its vocabulary id if it has one) and returns its
    /// id. A token added again takes the new `normalized` flag, as in the `tokenizers` library.
    fn add_token(&mut self, content: &str, normalized: bool) -> u32 {
        let pattern = if normalized { self.normalize(content) } else { content.to_string() };
        if let Some(token) = self.added.iter_mut().find(|t| t.content == content) {
            token.pattern = pattern;
            token.normalized = normalized;
            return token.id;
        }
        let id = self.vocab.get(content).copied().unwrap_or(self.len() as u32);
        self.added.push(AddedToken { content: content.to_string(), pattern, id, normalized });
        id
    }

    /// BOS + tokens + EOS, truncated to `max_length` (EOS kept last) and padded to `max_length`,
    /// as diffusers' pipelines call the tokenizer (`padding="max_length", truncation=True`).
    pub fn encode(&self, text: &str) -> Encoding {
        let room = self.max_length - 2;
        let mut content: Vec<u32> = self.pieces(text).iter().flat_map(|piece| self.piece_ids(piece)).collect();
        let truncated = content.len() > room;
        content.truncate(room);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos);
        ids.extend(content);
        ids.push(self.eos);
        ids.resize(self.max_length, self.pad);
        Encoding { ids, truncated }
    }

    /// BPE tokens of `text` without BOS/EOS/padding, e.g. `["a</w>", "photo</w>", "v1*"]`.
    pub fn tokenize(&self, text: &str) -> Vec<String> {
        let mut tokens = Vec::new();
        for piece in self.pieces(text) {
            match piece {
                Piece::Added(token) => tokens.push(token.pattern.clone()),
                Piece::Word(_) => {
                    tokens.extend(self.piece_ids(&piece).iter().map(|&id| self.tokens[id as usize].clone()))
                }
            }
        }
        tokens
    }

    /// The id of a token (an added token or a vocabulary entry such as `"photo</w>"`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        let added = self.added.iter().find(|t| t.content == token);
        added.map(|t| t.id).or_else(|| self.vocab.get(token).copied())
    }

    /// Size of vocab.json, without added tokens.
    pub fn base_vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// Number of ids, added tokens included: the rows the text encoder's embedding needs.
    pub fn len(&self) -> usize {
        self.added.iter().map(|t| t.id as usize + 1).fold(self.vocab.len(), usize::max)
    }

    /// Never true for a loaded tokenizer (it holds at least its special tokens).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ids per prompt, BOS and EOS included (`model_max_length`).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Whitespace runs become one space, then each character is lower-cased on its own (so a
    /// final capital sigma becomes σ, not ς, as in `tokenizers`).
    fn normalize(&self, text: &str) -> String {
        let composed: String = text.nfc().map(|(c, _)| c).collect();
        self.whitespace.replace_all(&composed, " ").chars().flat_map(char::to_lowercase).collect()
    }

    /// Cuts the added tokens out of `text` and splits the rest into words.
    fn pieces(&self, text: &str) -> Vec<Piece<'_>> {
        let mut pieces = Vec::new();
        for raw in split_on_added(text, &self.added, false) {
            match raw {
                Ok(token) => pieces.push(Piece::Added(token)),
                Err(raw) => {
                    let normalized = self.normalize(raw);
                    for part in split_on_added(&normalized, &self.added, true) {
                        match part {
                            Ok(token) => pieces.push(Piece::Added(token)),
                            Err(rest) => self.split_words(rest, &mut pieces),
                        }
                    }
                }
            }
        }
        pieces
    }

    /// CLIP's regex split. transformers then applies GPT-2's byte-level split, which leaves CLIP's
    /// words whole except the special-token spellings, cut into `<|`, the name and `|>`.
    fn split_words<'a>(&self, text: &str, pieces: &mut Vec<Piece<'a>>) {
        for word in self.pre_split.find_iter(text).map(|m| m.as_str()) {
            match word.strip_prefix("<|").and_then(|w| w.strip_suffix("|>")) {
                Some(name) => pieces.extend(["<|", name, "|>"].map(|w| Piece::Word(w.to_string()))),
                None => pieces.push(Piece::Word(word.to_string())),
            }
        }
    }

    fn piece_ids(&self, piece: &Piece) -> Vec<u32> {
        match piece {
            Piece::Added(token) => vec![token.id],
            Piece::Word(word) => self.bpe(word),
        }
    }

    /// BPE of one word: its bytes as symbols (the last one ending the word), then the
    /// lowest-ranked adjacent pair merged, leftmost first, until no pair has a merge.
    fn bpe(&self, word: &str) -> Vec<u32> {
        if let Some(ids) = self.cache.lock().expect("BPE cache lock").get(word) {
            return ids.clone();
        }
        let last = word.len() - 1;
        let symbols: Vec<u32> = word
            .bytes()
            .enumerate()
            .map(|(i, byte)| {
                let mut symbol = self.byte_chars[byte as usize].to_string();
                if i == last {
                    symbol.push_str(END_OF_WORD);
                }
                self.vocab.get(&symbol).copied().unwrap_or(self.unk)
            })
            .collect();
        let symbols = self.merge(symbols);
        let mut cache = self.cache.lock().expect("BPE cache lock");
        if cache.len() < CACHE_CAPACITY {
            cache.insert(word.to_string(), symbols.clone());
        }
        symbols
    }

    /// Merges adjacent symbols, the lowest-ranked pair first and the leftmost among equals, as
    /// the `tokenizers` library does in O(n log n) for n symbols: the symbols form a linked list
    /// (a merged pair lives on at its left position), the candidate pairs wait in a min-heap keyed
    /// by (rank, left position), and a pair that a merge changed is skipped when it comes up.
    fn merge(&self, mut symbols: Vec<u32>) -> Vec<u32> {
        const NONE: usize = usize::MAX;
        let n = symbols.len();
        let mut next: Vec<usize> = (1..n).chain([NONE]).collect();
        let mut prev: Vec<usize> = [NONE].into_iter().chain(0..n - 1).collect();
        let pair = |symbols: &[u32], left: usize, right: usize| {
            self.merges.get(&(symbols[left], symbols[right])).map(|m| Reverse((m.rank, left, right)))
        };
        let mut queue: BinaryHeap<_> = (1..n).filter_map(|i| pair(&symbols, i - 1, i)).collect();
        while let Some(Reverse((rank, left, right))) = queue.pop() {
            // Still neighbours holding the pair this rank merges (symbols only ever grow, so a
            // changed position never holds its old symbol again).
            let merge = self.merges.get(&(symbols[left], symbols[right])).filter(|m| m.rank == rank);
            let Some(merge) = merge.filter(|_| next[left] == right) else { continue };
            symbols[left] = merge.id;
            let after = next[right];
            next[left] = after;
            next[right] = NONE;
            if after != NONE {
                prev[after] = left;
                queue.extend(pair(&symbols, left, after));
            }
            if prev[left] != NONE {
                queue.extend(pair(&symbols, prev[left], left));
            }
        }
        // The first symbol is never merged away: it is the left of every merge it takes part in.
        let mut ids = Vec::new();
        let mut at = 0;
        while at != NONE {
            ids.push(symbols[at]);
            at = next[at];
        }
        ids
    }
}

/// Splits `text` around the added tokens with the given `normalized` flag: `Ok(token)` for a
/// token, `Err(text)` for the text between. At each position the longest token wins.
fn split_on_added<'t, 'a>(
    text: &'t str,
    added: &'a [AddedToken],
    normalized: bool,
) -> Vec<Result<&'a AddedToken, &'t str>> {
    let candidates: Vec<&AddedToken> =
        added.iter().filter(|t| t.normalized == normalized && !t.pattern.is_empty()).collect();
    let mut parts = Vec::new();
    let mut start = 0;
    let mut pos = 0;
    while pos < text.len() {
        let rest = &text[pos..];
        match candidates.iter().filter(|t| rest.starts_with(&t.pattern)).max_by_key(|t| t.pattern.len()) {
            Some(token) => {
                if start < pos {
                    parts.push(Err(&text[start..pos]));
                }
                parts.push(Ok(*token));
                pos += token.pattern.len();
                start = pos;
            }
            None => pos += rest.chars().next().map_or(1, char::len_utf8),
        }
    }
    if start < text.len() {
        parts.push(Err(&text[start..]));
    }
    parts
}

/// GPT-2's reversible byte -> printable character table: printable Latin-1 bytes stand for
/// themselves, the others (controls, space, ...) for the characters from U+0100 on, in byte order.
fn byte_chars() -> [char; 256] {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut chars = ['\0'; 256];
    let mut next = 0x100;
    for (b, c) in (0u32..).zip(chars.iter_mut()) {
        *c = if printable(b) {
            char::from_u32(b).expect("Latin-1")
        } else {
            next += 1;
            char::from_u32(next - 1).expect("Latin Extended-A")
        };
    }
    chars
}

/// merges.txt: one `left right` pair per line by priority, `#version` lines skipped; both sides
/// and their concatenation must be in the vocabulary.
fn parse_merges(text: &str, vocab: &HashMap<String, u32>, file: &Path) -> Result<HashMap<(u32, u32), Merge>> {
    let mut merges = HashMap::new();
    for (rank, (number, line)) in (0u32..).zip(text.lines().enumerate().filter(|(_, l)| !l.starts_with("#version"))) {
        let id = |token: &str| {
            vocab
                .get(token)
                .copied()
                .ok_or_else(|| config_error(file, format!("line {}: {token:?} is not in vocab.json", number + 1)))
        };
        let (left, right) = match line.split(' ').collect::<Vec<_>>()[..] {
            [left, right] => (left, right),
            _ => {
                return Err(config_error(
                    file,
                    format!("line {}: expected two tokens separated by one space, found {line:?}", number + 1),
                ))
            }
        };
        merges.insert((id(left)?, id(right)?), Merge { rank, id: id(&format!("{left}{right}"))? });
    }
    Ok(merges)
}

/// One special token as written in the config files.
#[derive(Debug, Clone)]
struct TokenSpec {
    content: String,
    normalized: bool,
}

/// What tokenizer_config.json and special_tokens_map.json say about the special tokens.
struct SpecialTokens {
    /// Tokens matched before BPE, in the order transformers adds them.
    added: Vec<TokenSpec>,
    /// Content of each special-token key (bos_token, eos_token, ...).
    named: HashMap<&'static str, String>,
    max_length: usize,
}

impl SpecialTokens {
    /// Follows transformers' `from_pretrained`: when tokenizer_config.json lists
    /// `added_tokens_decoder`, those tokens come first and special_tokens_map.json is not read;
    /// otherwise special_tokens_map.json overrides tokenizer_config.json key by key. Special tokens
    /// not set anywhere take CLIPTokenizer's defaults.
    fn read(dir: &Path) -> Result<Self> {
        let config_file = dir.join("tokenizer_config.json");
        let map_file = dir.join("special_tokens_map.json");
        let config = read_json_object(&config_file)?;
        let mut added = Vec::new();
        let mut named: HashMap<&'static str, TokenSpec> = HashMap::new();
        for key in SPECIAL_TOKEN_KEYS {
            if let Some(spec) = token_spec(config.get(key), false, &config_file, key)? {
                named.insert(key, spec);
            }
        }
        for key in ["additional_special_tokens", "extra_special_tokens"] {
            let listed = match config.get(key) {
                Some(Value::Array(tokens)) => !tokens.is_empty(),
                Some(Value::Object(tokens)) => !tokens.is_empty(),
                _ => false,
            };
            if listed {
                return Err(config_error(&config_file, format!("{key} is not supported")));
            }
        }
        if config.get("split_special_tokens").and_then(Value::as_bool) == Some(true) {
            return Err(config_error(&config_file, "split_special_tokens=true is not supported".into()));
        }
        for key in ["padding_side", "truncation_side"] {
            if let Some(side) = config.get(key).filter(|v| v.as_str() != Some("right")) {
                return Err(config_error(&config_file, format!("{key} {side} is not supported (only \"right\")")));
            }
        }
        match config.get("added_tokens_decoder") {
            Some(Value::Object(decoder)) => {
                let mut entries = Vec::new();
                for (id, value) in decoder {
                    let id: u32 = id.parse().map_err(|_| {
                        config_error(&config_file, format!("added_tokens_decoder: {id:?} is not an id"))
                    })?;
                    let spec =
                        token_spec(Some(value), false, &config_file, "added_tokens_decoder")?.ok_or_else(|| {
                            config_error(&config_file, format!("added_tokens_decoder: token {id} is null"))
                        })?;
                    entries.push((id, spec));
                }
                entries.sort_by_key(|(id, _)| *id);
                added.extend(entries.into_iter().map(|(_, spec)| spec));
            }
            Some(other) => {
                return Err(config_error(&config_file, format!("added_tokens_decoder must be a map, found {other}")))
            }
            None => {
                let map = read_json_object(&map_file)?;
                for key in SPECIAL_TOKEN_KEYS {
                    if let Some(spec) = token_spec(map.get(key), true, &map_file, key)? {
                        named.insert(key, spec);
                    }
                }
            }
        }
        let defaults = [
            ("bos_token", "<|startoftext|>"),
            ("eos_token", "<|endoftext|>"),
            ("unk_token", "<|endoftext|>"),
            ("pad_token", "<|endoftext|>"),
        ];
        for (key, content) in defaults {
            named.entry(key).or_insert(TokenSpec { content: content.into(), normalized: false });
        }
        // Named tokens already listed in added_tokens_decoder keep the flags given there.
        let listed: Vec<String> = added.iter().map(|t| t.content.clone()).collect();
        for key in SPECIAL_TOKEN_KEYS {
            if let Some(spec) = named.get(key).filter(|s| !listed.contains(&s.content)) {
                added.push(spec.clone());
            }
        }
        let max_length = match config.get("model_max_length") {
            None | Some(Value::Null) => DEFAULT_MAX_LENGTH,
            Some(v) => {
                let in_range = |n: &u64| (2..=MAX_LENGTH_LIMIT as u64).contains(n);
                let problem = format!(
                    "model_max_length {v} is out of range: expected an integer from 2 (room for BOS and EOS) to \
                     {MAX_LENGTH_LIMIT} (CLIP's text encoder takes 77 tokens)"
                );
                v.as_u64().filter(in_range).ok_or_else(|| config_error(&config_file, problem))? as usize
            }
        };
        Ok(Self { added, named: named.into_iter().map(|(key, spec)| (key, spec.content)).collect(), max_length })
    }
}

/// A token written as a string (a special token, matched on the raw text) or as an AddedToken
/// object, whose `normalized` defaults to "not special" like `tokenizers.AddedToken`.
/// special_tokens_map.json's objects are special.
fn token_spec(value: Option<&Value>, special: bool, file: &Path, key: &str) -> Result<Option<TokenSpec>> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(content)) if !content.is_empty() => {
            Ok(Some(TokenSpec { content: content.clone(), normalized: false }))
        }
        Some(Value::Object(token)) => {
            let flag = |name: &str| token.get(name).and_then(Value::as_bool);
            for unsupported in ["lstrip", "rstrip", "single_word"] {
                if flag(unsupported) == Some(true) {
                    return Err(config_error(file, format!("{key}: {unsupported}=true is not supported")));
                }
            }
            let content = token.get("content").and_then(Value::as_str).filter(|c| !c.is_empty());
            let content = content.ok_or_else(|| config_error(file, format!("{key} has no \"content\" string")))?;
            let special = special || flag("special").unwrap_or(false);
            Ok(Some(TokenSpec { content: content.to_string(), normalized: flag("normalized").unwrap_or(!special) }))
        }
        Some(other) => Err(config_error(file, format!("{key} must be a non-empty string or an object, found {other}"))),
    }
}

/// A required file of the tokenizer folder.
fn read_required(path: &Path) -> Result<String> {
    match read_text_bounded(path, SMALL_FILE_LIMIT) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::MissingFile {
            what: format!(
                "tokenizer file {}",
                path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned())
            ),
            path: path.to_path_buf(),
            hint: "the model folder is incomplete: its tokenizer/ folder needs vocab.json and merges.txt".into(),
        }),
        Err(e) => Err(config_error(path, e.to_string())),
    }
}

/// An optional JSON object file (empty when absent).
fn read_json_object(path: &Path) -> Result<Map<String, Value>> {
    match read_text_bounded(path, SMALL_FILE_LIMIT) {
        Ok(text) => match serde_json::from_str(&text) {
            Ok(Value::Object(map)) => Ok(map),
            Ok(_) => Err(config_error(path, "not a JSON object".into())),
            Err(e) => Err(config_error(path, e.to_string())),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Map::new()),
        Err(e) => Err(config_error(path, e.to_string())),
    }
}

fn config_error(file: &Path, msg: String) -> Error {
    Error::Config { file: file.to_path_buf(), msg }
}
