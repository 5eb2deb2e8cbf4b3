//! Keeps the fault path readable (issue 13): no function in `src/fault.rs`,
//! `src/fault/*.rs` or `src/vpagetable.rs` may exceed 80 lines (signature
//! to closing brace) or take more than 6 arguments. A plain count over the
//! sources, the same as the `before-stop` hook's.

use std::path::{Path, PathBuf};

const MAX_LINES: usize = 80;
const MAX_ARGS: usize = 6;

/// The fault-path sources: `fault.rs` or every file of `fault/`, and
/// `vpagetable.rs`.
fn sources() -> Vec<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = vec![src.join("vpagetable.rs")];
    if src.join("fault.rs").exists() {
        out.push(src.join("fault.rs"));
    }
    if let Ok(dir) = std::fs::read_dir(src.join("fault")) {
        for f in dir.flatten() {
            if f.path().extension().is_some_and(|e| e == "rs") {
                out.push(f.path());
            }
        }
    }
    out.sort();
    out
}

/// A line with string and char literals and `//` comments blanked, so
/// braces, parentheses and commas in them do not count.
fn code_only(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => break,
            '"' => {
                while let Some(d) = chars.next() {
                    match d {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
                out.push_str("\"\"");
            }
            // A char literal ('x', '\n', '{'), not a lifetime ('a).
            '\'' => {
                let rest: String = chars.clone().take(3).collect();
                let lit = rest.chars().nth(1) == Some('\'') || (rest.starts_with('\\') && rest.contains('\''));
                if lit {
                    for d in chars.by_ref() {
                        if d == '\'' {
                            break;
                        }
                    }
                    out.push_str("' '");
                } else {
                    out.push(c);
                }
            }
            _ => out.push(c),
        }
    }
    out
}

/// `name` if `line` starts a function definition.
fn fn_name(line: &str) -> Option<String> {
    let t = line.trim_start();
    let t = t.strip_prefix("pub(crate) ").or_else(|| t.strip_prefix("pub(super) ")).unwrap_or(t);
    let t = t.strip_prefix("pub ").unwrap_or(t);
    let t = t.strip_prefix("const ").unwrap_or(t);
    let t = t.strip_prefix("unsafe ").unwrap_or(t);
    let rest = t.strip_prefix("fn ")?;
    let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
    (!name.is_empty()).then_some(name)
}

/// Every function of `text`: (name, first line, lines, arguments).
fn functions(text: &str) -> Vec<(String, usize, usize, usize)> {
    let lines: Vec<String> = text.lines().map(code_only).collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(name) = fn_name(&lines[i]) else {
            i += 1;
            continue;
        };
        // (line, char) from the name on (not `pub(crate)`'s parentheses).
        let skip = lines[i].find("fn ").map_or(0, |k| k + 3 + name.len());
        let first = std::iter::once((i, &lines[i][skip..]));
        let rest = lines.iter().enumerate().skip(i + 1).map(|(j, l)| (j, l.as_str()));
        let mut chars = first.chain(rest).flat_map(|(j, l)| l.chars().map(move |c| (j, c)));
        let args = count_args(&mut chars);
        // The body: the first '{' after the argument list to its match; a
        // ';' first is a declaration without a body.
        let (mut depth, mut end, mut body) = (0i32, i, false);
        for (j, c) in chars {
            match c {
                ';' if !body => break,
                '{' => {
                    body = true;
                    depth += 1;
                }
                '}' => depth -= 1,
                _ => continue,
            }
            end = j;
            if body && depth == 0 {
                break;
            }
        }
        if body {
            out.push((name, i + 1, end - i + 1, args));
        }
        i += 1;
    }
    out
}

/// Consumes a signature up to the end of its argument list and counts the
/// arguments: non-empty top-level segments between commas.
fn count_args(chars: &mut impl Iterator<Item = (usize, char)>) -> usize {
    let (mut depth, mut args, mut nonempty, mut prev) = (0i32, 0, false, ' ');
    for (_, c) in chars.by_ref() {
        match c {
            '(' | '[' | '<' if depth > 0 || c == '(' => depth += 1,
            // `->` in a closure type is not a closing bracket.
            '>' if prev == '-' => {}
            ')' | ']' | '>' if depth > 0 => {
                depth -= 1;
                if depth == 0 {
                    return args + usize::from(nonempty);
                }
            }
            ',' if depth == 1 => {
                args += usize::from(nonempty);
                nonempty = false;
            }
            c if depth == 1 && !c.is_whitespace() => nonempty = true,
            _ => {}
        }
        prev = c;
    }
    args
}

#[test]
fn fault_path_functions_are_short_and_take_few_arguments() {
    let mut bad = Vec::new();
    let mut seen = 0;
    for path in sources() {
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for (name, line, n, args) in functions(&text) {
            seen += 1;
            if n > MAX_LINES {
                bad.push(format!("{}:{line} {name}: {n} lines (at most {MAX_LINES})", path.display()));
            }
            if args > MAX_ARGS {
                bad.push(format!("{}:{line} {name}: {args} arguments (at most {MAX_ARGS})", path.display()));
            }
        }
    }
    assert!(seen > 20, "found only {seen} functions: is the scan broken?");
    assert!(bad.is_empty(), "fault-path functions too long or with too many arguments:\n{}", bad.join("\n"));
}

#[test]
fn the_count_sees_lines_and_arguments() {
    let text = "fn a(x: u64, y: Vec<(u8, u8)>) -> Result<(), ()> {\n    let s = \"{\";\n    if x > 0 { }\n}\n\
                pub(crate) fn b<'g>(\n    g: &'g str,\n    f: impl FnOnce(u8, u8) -> u8,\n) {\n    let c = '}';\n}\n\
                fn c() {}\nfn d(x: u8);\n";
    let f = functions(text);
    assert_eq!(f, vec![("a".into(), 1, 4, 2), ("b".into(), 5, 6, 2), ("c".into(), 11, 1, 0)]);
}
