//! The library's modules follow the data flow, each importing only the layers below it, so that
//! no cycle (such as the one `identity` and `pipelines` once had) can come back unnoticed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Top-level modules of `src/`, lowest layer first. A module may use the modules of the layers
/// below its own, never those beside or above it.
///
/// - the error type, then seeded noise and atomic file writes, serve everything;
/// - reading weights, the tokenizer, the differentiable blocks and the noise schedules know no
///   model;
/// - `models` holds the networks and the Stable Diffusion components that bundle them;
/// - `priors` prepares a photo, `identity` learns from it, `pipelines` use identities, the
///   benchmark measures the learner and the models, and `eval` the identities; the web app's `server` uses them all. The command line sits in the
///   binary, above all.
const LAYERS: &[&[&str]] = &[
    &["error"],
    &["random", "io"],
    &["weights", "tokenizer", "nn", "schedulers", "splats"],
    &["models"],
    &["priors"],
    &["identity"],
    &["pipelines"],
    &["bench", "eval"],
    &["server"],
];

/// Items the crate root re-exports, and the module they come from.
const ROOT_REEXPORTS: &[(&str, &str)] = &[("Error", "error"), ("Result", "error")];

fn layer_of(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|layer| layer.contains(&module))
        .unwrap_or_else(|| panic!("module `{module}` is in no layer of tests/layers.rs: place it there"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without its comments (doc links may point anywhere).
fn code_only(source: &str) -> String {
    source.lines().map(|line| line.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// The top-level modules named by `crate::` paths in `code`, including each item of a
/// `crate::{a, b::c, ...}` group.
fn crate_imports(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (start, _) in code.match_indices("crate::") {
        let rest = &code[start + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Items at depth 0 of the group, up to its closing brace.
            let mut depth = 0;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && (c.is_alphanumeric() || c == '_') => {
                        let name: String =
                            group[i..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                        found.insert(name);
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            found.insert(name);
        }
    }
    found
        .into_iter()
        .map(|name| {
            ROOT_REEXPORTS.iter().find(|(item, _)| *item == name).map_or(name, |(_, module)| module.to_string())
        })
        .collect()
}

#[test]
fn modules_import_only_the_layers_below_them() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations = Vec::new();
    let mut modules_seen = BTreeSet::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap();
        let top = relative.components().next().unwrap().as_os_str().to_str().unwrap();
        let module = top.trim_end_matches(".rs");
        // The crate root and the binary (main.rs and the command line) sit above the library.
        if matches!(module, "lib" | "main" | "cli") {
            continue;
        }
        modules_seen.insert(module.to_string());
        let own_layer = layer_of(module);
        let code = code_only(&std::fs::read_to_string(&file).unwrap());
        for import in crate_imports(&code) {
            if import != module && layer_of(&import) >= own_layer {
                violations.push(format!("{}: `{module}` imports `{import}`", relative.display()));
            }
        }
    }
    assert!(modules_seen.contains("pipelines") && modules_seen.contains("models"), "{modules_seen:?}");
    assert!(violations.is_empty(), "imports against the data flow:\n{}", violations.join("\n"));
}

#[test]
fn import_parsing_finds_grouped_and_nested_paths() {
    let code = "use crate::{Error, models::{unet, vae}, nn};\nlet x = crate::io::write_bytes(p, b);";
    let found: Vec<String> = crate_imports(code).into_iter().collect();
    assert_eq!(found, ["error", "io", "models", "nn"]);
}
