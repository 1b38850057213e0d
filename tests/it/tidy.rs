//! The module boundaries of ARCHITECTURE.md, held by reading `src/` as text: which module
//! alone names a crate, which modules nothing else may depend on, which strings only the LLM
//! provider may know, and the `//!` header every file starts with. Comments do not count, so a
//! doc comment may name what the code must not use.

use std::path::Path;

/// A crate that only some modules may name.
struct Owned {
    krate: &'static str,
    owners: &'static [&'static str],
    rule: &'static str,
}

const OWNED: &[Owned] = &[
    Owned {
        krate: "sqlx",
        owners: &["store"],
        rule: "only `store` names sqlx",
    },
    Owned {
        krate: "hyper",
        owners: &["http"],
        rule: "only `http` names hyper",
    },
    Owned {
        krate: "hyper_util",
        owners: &["http"],
        rule: "only `http` names hyper",
    },
    Owned {
        krate: "rhai",
        owners: &["sandbox"],
        rule: "only `sandbox` names rhai",
    },
    Owned {
        krate: "rmcp",
        owners: &["http", "mcp"],
        rule: "only `http` and `mcp` name rmcp",
    },
];

/// A module of the crate that only some others may depend on.
struct Guarded {
    module: &'static str,
    dependents: &'static [&'static str],
    rule: &'static str,
}

const GUARDED: &[Guarded] = &[
    Guarded {
        module: "http",
        dependents: &["supervisor"],
        rule: "nothing depends on `http` but the supervisor",
    },
    Guarded {
        module: "supervisor",
        dependents: &["cli"],
        rule: "nothing depends on `supervisor` but the CLI",
    },
];

/// Strings of the LLM wire format, known only to the agent's provider module: its path, its
/// JSON keys as literals (the typed `Completion` may name its own fields as it likes) and the
/// stream's end marker.
const WIRE_FORMAT: &[&str] = &[
    "chat/completions",
    "\"choices\"",
    "\"tool_calls\"",
    "[DONE]",
];
const WIRE_RULE: &str = "only `agent::provider` knows the LLM wire format";
const SANDBOX_RULE: &str = "`sandbox` depends on nothing else in the crate";
const HEADER_RULE: &str = "every file starts with a `//!` header";

/// Whether `path` (relative to the crate root, `/`-separated) belongs to the module `module`
/// of the crate, e.g. `store` for `src/store.rs` and `src/store/postgres.rs`, or
/// `agent/provider` for `src/agent/provider.rs` and `src/agent/provider/openai.rs`.
fn in_module(path: &str, module: &str) -> bool {
    let Some(rest) = path.strip_prefix("src/") else {
        return false;
    };
    rest == format!("{module}.rs") || rest.starts_with(&format!("{module}/"))
}

/// The top-level module of the crate a file belongs to (`lib` for `src/lib.rs`).
fn top_module(path: &str) -> &str {
    let rest = path.strip_prefix("src/").unwrap_or(path);
    let first = rest.split('/').next().unwrap_or(rest);
    first.strip_suffix(".rs").unwrap_or(first)
}

/// The source with comments blanked (newlines kept, so offsets keep their lines) and, when
/// `strings` is false, the contents of string and character literals blanked too.
fn strip(text: &str, strings: bool) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if c == 'r'
            && matches!(next, Some('"' | '#'))
            && (i == 0 || !ident(chars[i - 1]) || chars[i - 1] == 'b')
        {
            // A raw string: r"…", r#"…"#, br#"…"#.
            let mut j = i + 1;
            while chars.get(j) == Some(&'#') {
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            let hashes = j - i - 1;
            out.extend(&chars[i..=j]);
            i = j + 1;
            while i < chars.len() {
                if chars[i] == '"' && (1..=hashes).all(|k| chars.get(i + k) == Some(&'#')) {
                    out.extend(&chars[i..=i + hashes]);
                    i += hashes + 1;
                    break;
                }
                out.push(if strings { chars[i] } else { blank(chars[i]) });
                i += 1;
            }
        } else if c == '"' {
            out.push(c);
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                let escaped = chars[i] == '\\';
                let n = if escaped { 2 } else { 1 };
                for &ch in &chars[i..(i + n).min(chars.len())] {
                    out.push(if strings { ch } else { blank(ch) });
                }
                i += n;
            }
            if i < chars.len() {
                out.push('"');
                i += 1;
            }
        } else if c == '\'' {
            // A character literal ('x', '\n', '\u{1F600}'), or else a lifetime.
            let end = if next == Some('\\') {
                (i + 2..chars.len()).find(|&k| chars[k] == '\'')
            } else if chars.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match end {
                Some(end) => {
                    out.push('\'');
                    for &ch in &chars[i + 1..end] {
                        out.push(if strings { ch } else { blank(ch) });
                    }
                    out.push('\'');
                    i = end + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Byte offsets where `word` occurs as a whole identifier.
fn words<'a>(code: &'a str, word: &'a str) -> impl Iterator<Item = usize> + 'a {
    code.match_indices(word)
        .map(|(at, _)| at)
        .filter(move |&at| {
            let before = code[..at].chars().next_back();
            let after = code[at + word.len()..].chars().next();
            !before.is_some_and(is_ident) && !after.is_some_and(is_ident)
        })
}

/// Whether the identifier at `at..at + len` is used as a path (`name::`) or brought in
/// (`use name`, `extern crate name`).
fn names_crate(code: &str, at: usize, len: usize) -> bool {
    let after = code[at + len..].trim_start();
    let before = code[..at].trim_end();
    let as_path = after.starts_with("::")
        && !before.ends_with("::")
        && !before.ends_with("crate")
        && !before.ends_with("self")
        && !before.ends_with("super");
    as_path || before.ends_with("use") || before.ends_with("extern crate")
}

/// The crate modules `code` depends on, with the offset of each mention: `crate::name`,
/// each top-level name of `crate::{a, b::c}`, and (in a file directly under `src/`, a child
/// of the crate root) `super::name`.
fn crate_dependencies(path: &str, code: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    let mut roots = vec!["crate::"];
    if path.strip_prefix("src/").is_some_and(|r| !r.contains('/')) {
        roots.push("super::");
    }
    for root in roots {
        for at in words(code, root.trim_end_matches("::")) {
            let rest = &code[at..];
            let Some(rest) = rest.strip_prefix(root) else {
                continue;
            };
            let start = at + root.len();
            if let Some(group) = rest.strip_prefix('{') {
                let mut depth = 0usize;
                let mut item_start = true;
                for (k, ch) in group.char_indices() {
                    match ch {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => item_start = true,
                        c if item_start && is_ident(c) => {
                            let name: String =
                                group[k..].chars().take_while(|&c| is_ident(c)).collect();
                            found.push((start + 1 + k, name));
                            item_start = false;
                        }
                        c if !c.is_whitespace() => item_start = false,
                        _ => {}
                    }
                }
            } else {
                let name: String = rest.chars().take_while(|&c| is_ident(c)).collect();
                if !name.is_empty() {
                    found.push((start, name));
                }
            }
        }
    }
    found
}

fn line_of(text: &str, at: usize) -> usize {
    text[..at].matches('\n').count() + 1
}

/// Every crossing of a boundary in `files` (pairs of a path relative to the crate root and
/// the file's text), as `path:line: rule`.
pub fn check<'a>(files: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<String> {
    let mut breaches = Vec::new();
    for (path, text) in files {
        // Stripping keeps every newline, so an offset into either stripped text has the
        // line it has in the file.
        let code = strip(text, false);
        let with_strings = strip(text, true);
        let mut breach = |source: &str, at: usize, rule: &str| {
            breaches.push(format!("{path}:{}: {rule}", line_of(source, at)));
        };
        if !text.starts_with("//!") {
            breach(text, 0, HEADER_RULE);
        }
        for owned in OWNED {
            if owned.owners.iter().any(|m| in_module(path, m)) {
                continue;
            }
            for at in words(&code, owned.krate) {
                if names_crate(&code, at, owned.krate.len()) {
                    breach(&code, at, owned.rule);
                }
            }
        }
        if !in_module(path, "agent/provider") {
            for needle in WIRE_FORMAT {
                for (at, _) in with_strings.match_indices(needle) {
                    breach(&with_strings, at, WIRE_RULE);
                }
            }
        }
        let own = top_module(path);
        for (at, module) in crate_dependencies(path, &code) {
            for guarded in GUARDED {
                if module == guarded.module
                    && own != guarded.module
                    && !guarded.dependents.contains(&own)
                {
                    breach(&code, at, guarded.rule);
                }
            }
            if own == "sandbox" && module != "sandbox" {
                breach(&code, at, SANDBOX_RULE);
            }
        }
    }
    breaches
}

/// Every `.rs` file under `dir`, with its path relative to `root`.
fn sources(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            sources(root, &path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let relative = path.strip_prefix(root).unwrap();
            let relative = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            out.push((relative, std::fs::read_to_string(&path).unwrap()));
        }
    }
}

#[test]
fn the_source_tree_keeps_the_boundaries_of_the_architecture() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    sources(root, &root.join("src"), &mut files);
    assert!(files.len() > 20, "read only {} files", files.len());
    let breaches = check(files.iter().map(|(p, t)| (p.as_str(), t.as_str())));
    assert!(breaches.is_empty(), "{}", breaches.join("\n"));
}

#[test]
fn the_fuzz_targets_have_headers_and_reach_the_crate_through_its_api() {
    // The fuzz crate (`fuzz/`, a workspace of its own) goes through `spectral`'s public API:
    // it names none of the crates that only one module may name.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    sources(root, &root.join("fuzz/src"), &mut files);
    sources(root, &root.join("fuzz/fuzz_targets"), &mut files);
    assert!(files.len() >= 5, "read only {} files", files.len());
    let breaches = check(files.iter().map(|(p, t)| (p.as_str(), t.as_str())));
    assert!(breaches.is_empty(), "{}", breaches.join("\n"));
}

/// Each crossing, planted in a file of its own, is reported with its file, line and rule.
#[test]
fn a_crossed_boundary_is_reported_with_file_line_and_rule() {
    let planted: &[(&str, &str, &str)] = &[
        (
            "src/worlds/compile.rs",
            "//! h\n\nuse sqlx::PgPool;\n",
            "src/worlds/compile.rs:3: only `store` names sqlx",
        ),
        (
            "src/service.rs",
            "//! h\nfn f() -> hyper::Response<()> { todo!() }\n",
            "src/service.rs:2: only `http` names hyper",
        ),
        (
            "src/worlds/evaluate.rs",
            "//! h\nfn f(\n    e: &rhai::Engine,\n) {}\n",
            "src/worlds/evaluate.rs:3: only `sandbox` names rhai",
        ),
        (
            "src/service/cache.rs",
            "//! h\nuse rmcp::model::Tool;\n",
            "src/service/cache.rs:2: only `http` and `mcp` name rmcp",
        ),
        (
            "src/service.rs",
            "//! h\n\n\nuse crate::http::problem;\n",
            "src/service.rs:4: nothing depends on `http` but the supervisor",
        ),
        (
            "src/outbox/handlers.rs",
            "//! h\nuse crate::{\n    store,\n    http::Server,\n};\n",
            "src/outbox/handlers.rs:4: nothing depends on `http` but the supervisor",
        ),
        (
            "src/gate.rs",
            "//! h\nfn f() { super::http::serve(); }\n",
            "src/gate.rs:2: nothing depends on `http` but the supervisor",
        ),
        (
            "src/http/router.rs",
            "//! h\nuse crate::supervisor::Mode;\n",
            "src/http/router.rs:2: nothing depends on `supervisor` but the CLI",
        ),
        (
            "src/sandbox/value.rs",
            "//! h\nuse crate::worlds::model::AttrType;\n",
            "src/sandbox/value.rs:2: `sandbox` depends on nothing else in the crate",
        ),
        (
            "src/agent/run.rs",
            "//! h\nconst URL: &str = \"/v1/chat/completions\";\n",
            "src/agent/run.rs:2: only `agent::provider` knows the LLM wire format",
        ),
        (
            "src/service/audit.rs",
            "//! h\nfn f(v: &Value) { v[\"choices\"].clone(); }\n",
            "src/service/audit.rs:2: only `agent::provider` knows the LLM wire format",
        ),
        (
            "src/config.rs",
            "use std::env;\n",
            "src/config.rs:1: every file starts with a `//!` header",
        ),
    ];
    for (path, text, expected) in planted {
        assert_eq!(
            check([(*path, *text)]),
            vec![expected.to_string()],
            "{path}:\n{text}"
        );
    }
}

/// What the owners write, and what only mentions a crate, is not a crossing.
#[test]
fn owners_comments_and_mere_mentions_pass() {
    let allowed: &[(&str, &str)] = &[
        ("src/store/postgres.rs", "//! h\nuse sqlx::PgPool;\n"),
        ("src/store.rs", "//! h\nfn f(e: sqlx::Error) {}\n"),
        (
            "src/http/mcp.rs",
            "//! h\nuse rmcp::model::Tool;\nuse hyper::Request;\n",
        ),
        ("src/mcp.rs", "//! h\nuse rmcp::ServiceExt;\n"),
        (
            "src/sandbox/check.rs",
            "//! h\nuse rhai::AST;\nuse crate::sandbox::Limits;\n",
        ),
        (
            "src/supervisor.rs",
            "//! h\nfn f() { crate::http::serve(); }\n",
        ),
        (
            "src/cli.rs",
            "//! h\nuse crate::supervisor::{self, Mode};\n",
        ),
        (
            "src/http/router.rs",
            "//! h\nuse crate::http::problem;\nuse crate::{service, worlds};\n",
        ),
        (
            "src/agent/provider.rs",
            "//! h\nconst P: &str = \"/v1/chat/completions\";\n",
        ),
        (
            "src/agent/provider/stream.rs",
            "//! h\nconst END: &str = \"[DONE]\";\n",
        ),
        (
            "src/worlds/load.rs",
            "//! Predicates are `.rhai` files; rhai:: types stay in the sandbox.\n\
             // sqlx::query would be wrong here, and so would hyper::Body\n\
             /// See crate::http::serve and \"choices\"\n\
             /* rhai::Engine /* nested sqlx:: */ still hyper:: */\n\
             const EXT: &str = \".rhai\";\n\
             const URL: &str = \"http://localhost/\"; fn f<'a>(s: &'a str) -> char { 'x' }\n\
             const MSG: &str = r#\"uses sqlx:: \"and\" rhai::\"#;\n\
             mod http { pub fn sqlx() {} }\n\
             fn g() { self::http::sqlx(); }\n",
        ),
    ];
    for (path, text) in allowed {
        assert_eq!(
            check([(*path, *text)]),
            Vec::<String>::new(),
            "{path}:\n{text}"
        );
    }
}
