//! CLIP tokenizer against transformers' `CLIPTokenizer` (fixture from tools/reference/tokenizer_cases.py):
//! the real SD vocabulary with SD2 ("!") and SD1 (<|endoftext|>) padding, with and without the
//! placeholders v1* v2*, and the tiny model's tokenizer.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::fixture;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use stableid::tokenizer::ClipTokenizer;
use stableid::Error;

#[derive(Deserialize)]
struct Cases {
    known_ids: std::collections::HashMap<String, u32>,
    suites: Vec<Suite>,
}

#[derive(Deserialize)]
struct Suite {
    name: String,
    vocab_dir: String,
    config_dir: String,
    placeholders: Vec<String>,
    placeholder_ids: Vec<u32>,
    base_vocab_size: usize,
    len: usize,
    max_length: usize,
    pad_id: u32,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    tokens: Vec<String>,
    truncated: bool,
}

fn cases() -> Cases {
    let text = std::fs::read_to_string(fixture("tokenizer/cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A tokenizer folder holding the suite's vocabulary and config files.
fn suite_folder(suite: &Suite, tmp: &Path) -> PathBuf {
    if suite.vocab_dir == suite.config_dir {
        return fixture(&suite.vocab_dir);
    }
    let dir = tmp.join(&suite.name);
    std::fs::create_dir_all(&dir).unwrap();
    for (from, file) in [
        (&suite.vocab_dir, "vocab.json"),
        (&suite.vocab_dir, "merges.txt"),
        (&suite.config_dir, "tokenizer_config.json"),
        (&suite.config_dir, "special_tokens_map.json"),
    ] {
        std::fs::copy(fixture(from).join(file), dir.join(file)).unwrap();
    }
    dir
}

fn load(suite: &Suite, tmp: &Path) -> ClipTokenizer {
    let mut tok = ClipTokenizer::from_dir(&suite_folder(suite, tmp)).unwrap();
    let placeholders: Vec<&str> = suite.placeholders.iter().map(String::as_str).collect();
    if !placeholders.is_empty() {
        assert_eq!(tok.add_placeholder_tokens(&placeholders).unwrap(), suite.placeholder_ids, "{}", suite.name);
    }
    tok
}

#[test]
fn every_case_matches_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = cases();
    assert_eq!(cases.suites.len(), 6);
    let mut checked = 0;
    for suite in &cases.suites {
        let tok = load(suite, tmp.path());
        assert_eq!(tok.base_vocab_size(), suite.base_vocab_size, "{}", suite.name);
        assert_eq!(tok.len(), suite.len, "{}", suite.name);
        assert_eq!(tok.max_length(), suite.max_length, "{}", suite.name);
        for case in &suite.cases {
            let text = case.text.as_str();
            let enc = tok.encode(text);
            assert_eq!(enc.ids, case.ids, "{}: ids of {:?}", suite.name, case.text);
            assert_eq!(enc.truncated, case.truncated, "{}: truncated flag of {:?}", suite.name, case.text);
            assert_eq!(tok.tokenize(text), case.tokens, "{}: tokens of {:?}", suite.name, case.text);
            checked += 1;
        }
        // Padding is the suite's pad token.
        assert_eq!(*tok.encode("a").ids.last().unwrap(), suite.pad_id, "{}", suite.name);
    }
    assert!(checked >= 4 * 60, "only {checked} cases");
}

#[test]
fn real_vocabulary_has_stable_diffusion_ids() {
    let tok = ClipTokenizer::from_dir(&fixture("tokenizer")).unwrap();
    for (token, id) in cases().known_ids {
        assert_eq!(tok.token_to_id(&token), Some(id), "{token}");
    }
    assert_eq!(tok.base_vocab_size(), 49408);
    let enc = tok.encode("a photo of a cat");
    assert_eq!(&enc.ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
    assert!(enc.ids[7..].iter().all(|&id| id == 0), "SD2 pads with \"!\" (id 0)");
    assert!(!enc.truncated);
}

#[test]
fn long_prompts_are_truncated_with_eos_last() {
    let tok = ClipTokenizer::from_dir(&fixture("tokenizer")).unwrap();
    // 75 tokens fit exactly between BOS and EOS; one more is dropped.
    let fits = tok.encode(&"a ".repeat(75));
    assert!(!fits.truncated);
    let over = tok.encode(&"a ".repeat(76));
    assert!(over.truncated);
    for enc in [&fits, &over] {
        assert_eq!(enc.ids.len(), 77);
        assert_eq!(enc.ids[0], 49406);
        assert_eq!(enc.ids[76], 49407);
        assert!(enc.ids[1..76].iter().all(|&id| id == 320));
    }
}

#[test]
fn placeholders_are_whole_tokens_after_the_vocabulary() {
    let mut tok = ClipTokenizer::from_dir(&fixture("tokenizer")).unwrap();
    assert_eq!(tok.add_placeholder_tokens(&["v1*", "v2*"]).unwrap(), vec![49408, 49409]);
    assert_eq!((tok.base_vocab_size(), tok.len()), (49408, 49410));
    assert_eq!(tok.token_to_id("v2*"), Some(49409));
    assert_eq!(tok.tokenize("A photo of V1*v2*!"), ["a</w>", "photo</w>", "of</w>", "v1*", "v2*", "!"]);
    // Adding an existing token, a vocabulary entry or an empty name is refused, and changes nothing.
    for bad in [&["v3*", "v1*"][..], &["photo</w>"], &["w*", "w*"], &[""]] {
        assert!(matches!(tok.add_placeholder_tokens(bad), Err(Error::Input(_))), "{bad:?}");
    }
    assert_eq!(tok.len(), 49410);
    assert_eq!(tok.token_to_id("v3*"), None);
}

#[test]
fn celebrity_names_split_into_two_tokens() {
    let tok = ClipTokenizer::from_dir(&fixture("tokenizer")).unwrap();
    assert_eq!(tok.tokenize("Barack Obama"), ["barack</w>", "obama</w>"]);
    assert_eq!(tok.tokenize("emma watson"), ["emma</w>", "watson</w>"]);
}

/// A folder with copies of the fixture tokenizer's files, `edit` applied.
fn edited_folder(tmp: &Path, edit: impl FnOnce(&Path)) -> PathBuf {
    let dir = tmp.join("edited");
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"] {
        std::fs::copy(fixture("tokenizer").join(file), dir.join(file)).unwrap();
    }
    edit(&dir);
    dir
}

#[test]
fn incomplete_or_malformed_folders_are_reported_by_file() {
    let tmp = tempfile::tempdir().unwrap();
    for missing in ["vocab.json", "merges.txt"] {
        let dir = edited_folder(tmp.path(), |d| std::fs::remove_file(d.join(missing)).unwrap());
        let err = ClipTokenizer::from_dir(&dir).unwrap_err();
        assert!(matches!(err, Error::MissingFile { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(missing) && msg.contains("incomplete"), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
    let broken: [(&str, &str); 5] = [
        ("vocab.json", "{\"a\": 0,"),
        ("merges.txt", "#version: 0.2\na b c\n"),
        ("merges.txt", "#version: 0.2\nnot-a-token x\n"),
        ("tokenizer_config.json", "{\"model_max_length\": 1}"),
        // Every encoding is padded to this length.
        ("tokenizer_config.json", "{\"model_max_length\": 1000000000}"),
    ];
    for (file, text) in broken {
        let dir = edited_folder(tmp.path(), |d| std::fs::write(d.join(file), text).unwrap());
        let err = ClipTokenizer::from_dir(&dir).unwrap_err();
        match &err {
            Error::Config { file: path, .. } => assert!(path.ends_with(file), "{err}"),
            other => panic!("{file} {text:?}: expected a config error, got {other}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn config_defaults_when_optional_files_are_absent() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = edited_folder(tmp.path(), |d| {
        std::fs::remove_file(d.join("tokenizer_config.json")).unwrap();
        std::fs::remove_file(d.join("special_tokens_map.json")).unwrap();
    });
    let tok = ClipTokenizer::from_dir(&dir).unwrap();
    assert_eq!(tok.max_length(), 77);
    // CLIPTokenizer's defaults: <|endoftext|> pads.
    assert_eq!(*tok.encode("a").ids.last().unwrap(), 49407);
}

#[test]
fn bpe_is_fast_on_unseen_words() {
    let tok = ClipTokenizer::from_dir(&fixture("tokenizer")).unwrap();
    // Distinct made-up words defeat the per-word cache: every one goes through BPE.
    let prompts: Vec<String> = (0..2000)
        .map(|i| (0..20).map(|j| format!("zq{}x{}vb{}", i * 31 + j, j * 7, i)).collect::<Vec<_>>().join(" "))
        .collect();
    let start = std::time::Instant::now();
    let tokens: usize = prompts.iter().map(|p| tok.tokenize(p).len()).sum();
    let elapsed = start.elapsed();
    eprintln!("{tokens} tokens from 40000 unseen words in {elapsed:?}");
    assert!(elapsed.as_secs_f64() < 10.0, "BPE too slow: {elapsed:?}");
}

/// BPE as the reference implementation writes it (the slow `CLIPTokenizer.bpe` of
/// transformers): the best-ranked pair is merged everywhere at once, left to right, until no
/// pair of the word has a merge.
fn reference_bpe(word: &str, ranks: &HashMap<(String, String), usize>) -> Vec<String> {
    let mut symbols: Vec<String> = word.chars().map(String::from).collect();
    symbols.last_mut().unwrap().push_str("</w>");
    loop {
        let ranked = symbols.windows(2).filter_map(|p| ranks.get(&(p[0].clone(), p[1].clone())).map(|&r| (r, p)));
        let Some((_, [first, second])) = ranked.min_by_key(|(rank, _)| *rank) else { return symbols };
        let (first, second) = (first.clone(), second.clone());
        let mut merged = Vec::with_capacity(symbols.len());
        let mut i = 0;
        while i < symbols.len() {
            if i + 1 < symbols.len() && symbols[i] == first && symbols[i + 1] == second {
                merged.push(format!("{first}{second}"));
                i += 2;
            } else {
                merged.push(symbols[i].clone());
                i += 1;
            }
        }
        symbols = merged;
    }
}

#[test]
fn bpe_merges_as_the_reference_implementation_on_random_words() {
    let tok = ClipTokenizer::from_dir(&fixture("tokenizer")).unwrap();
    let merges = std::fs::read_to_string(fixture("tokenizer/merges.txt")).unwrap();
    let ranks: HashMap<(String, String), usize> = merges
        .lines()
        .filter(|l| !l.starts_with("#version"))
        .enumerate()
        .map(|(rank, line)| {
            let (a, b) = line.split_once(' ').unwrap();
            ((a.to_string(), b.to_string()), rank)
        })
        .collect();
    // Lower-case ASCII letters are their own byte symbols and one pre-split word; few letters and
    // repeats make the ties and overlapping pairs where merge orders could differ.
    let mut rng = rand::rngs::StdRng::seed_from_u64(18);
    let alphabets = ["etaoinshrdlucmfwyp", "aeiou", "ab", "s", "lovephotograph"];
    let mut checked = 0;
    for i in 0..3000 {
        let alphabet = alphabets[i % alphabets.len()].as_bytes();
        let len = if i % 300 == 0 { rng.random_range(200..800) } else { rng.random_range(1..24) };
        let word: String = (0..len).map(|_| alphabet[rng.random_range(0..alphabet.len())] as char).collect();
        assert_eq!(tok.tokenize(&word), reference_bpe(&word, &ranks), "{word}");
        checked += 1;
    }
    assert_eq!(checked, 3000);
}

#[test]
fn bpe_takes_about_linear_time_in_the_word_length() {
    let tok = ClipTokenizer::from_dir(&fixture("tokenizer")).unwrap();
    // One such word took more than a minute when every merge rescanned the word.
    let repeated = "a".repeat(120_000);
    let mixed: String = "photographmonalisa".chars().cycle().take(120_000).collect();
    for word in [repeated, mixed] {
        let start = std::time::Instant::now();
        let encoding = tok.encode(&word);
        let elapsed = start.elapsed();
        eprintln!("a word of 120,000 characters in {elapsed:?}");
        assert!(encoding.truncated && elapsed.as_secs_f64() < 2.0, "BPE too slow: {elapsed:?}");
    }
}
